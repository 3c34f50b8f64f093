#!/usr/bin/env bash
# Issue 12's GPU figures on one lent GPU, in one background job; each step writes its results
# under $RES as it ends, so a job cut short by the machine's time limit keeps what finished.
# Run from the repository root on a machine with vLLM's CUDA build and ManiSkill installed, e.g.
#   RES=/tmp/res setsid nohup bash benchmarks/gpu_issue12.sh &
# STEPS picks the steps, in the order given (default: the ones never measured, most wanted first):
#   loop      the loop on one GPU (vLLM rollout, 32 envs): synchronous and overlapped, both with
#             gradient checkpointing off, so their ratio is the overlap's alone (the background
#             publish included); ~10 min on an H200;
#   inprocess the same 7B loop (torch engine, checkpointing off) through the services and in one
#             process (benchmarks/inprocess_loop.py): the services' price; ~8 min;
#   engine    the engine table, vLLM vs torch engine vs HF generate, batch 32..256 (measured
#             2026-11-27 on an H200: benchmarks/README.md); ~8 min;
#   sync      LoRA r32 weight sync into vLLM, merge then lora (measured 2026-11-27); ~6 min;
#   loop_gc   the synchronous loop with checkpointing on, the earlier baseline; ~5 min.
set -u
RES=${RES:-/tmp/res}
WORK=${WORK:-/tmp/v7b}
STEPS=${STEPS:-loop inprocess}
mkdir -p "$RES" /tmp/placements /tmp/placements_gc
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower())")
stamp() { echo "=== $(date +%T) $*"; }
stamp "card $card; steps: $STEPS"
# One random 7B checkpoint for every step (placements.py writes it where it is missing).
ckpt=/tmp/placements/openvla-7b-random
if [ ! -e "$ckpt/config.json" ]; then
    python3 benchmarks/random_checkpoint.py "$ckpt" --size 7b --device cuda >"$RES/checkpoint.log" 2>&1
    stamp "random 7B checkpoint: exit $?"
fi
mkdir -p "$WORK" && ln -sfn "$ckpt" "$WORK/random_7b" && ln -sfn "$ckpt" /tmp/placements_gc/openvla-7b-random
loop=(--gpus 1 --envs 32 --servers 8 --iterations 4 --out "$RES/placements" --work /tmp/placements
      --set rollout.engine=vllm --set rollout.gpu_memory_utilization=0.25)
for step in $STEPS; do
    case $step in
    loop)
        timeout 900 python3 benchmarks/placements.py "${loop[@]}" --placements baseline,overlapped \
            --set actor.fsdp_config.gradient_checkpointing=false --tag "_1gpu_vllm_nogc_$card" \
            >"$RES/loop_nogc.log" 2>&1 ;;
    inprocess)
        # placements.py's baseline at 7B (32 envs, 8 servers, 10-step segments), torch engine.
        timeout 900 python3 benchmarks/inprocess_loop.py --iterations 4 --gpus 1 \
            --work /tmp/inprocess_loop --out "$RES/inprocess_loop" --tag "_7b_$card" -- \
            actor.model.model_path=$ckpt actor.model.precision=bf16 rollout.precision=bf16 \
            actor.micro_batch_size=20 actor.global_batch_size=160 \
            actor.fsdp_config.gradient_checkpointing=false \
            env.train.total_num_envs=32 env.train.num_servers=8 env.train.max_episode_steps=10 \
            env.train.max_steps_per_rollout_epoch=10 rollout.max_batch_size=64 \
            'cluster.component_placement={"actor,rollout,env": 0}' \
            >"$RES/inprocess_7b.log" 2>&1 ;;
    engine)
        python3 benchmarks/engine_throughput.py --size 7b --device cuda --batches 32 64 128 256 \
            --calls 5 --work "$WORK" --out "$RES/engine_throughput/${card}_7b.json" \
            >"$RES/engine_throughput.log" 2>&1 ;;
    sync)
        for mode in merge lora; do
            timeout 480 python3 benchmarks/vllm_weight_sync.py --size 7b --device cuda \
                --dtype bfloat16 --sync "$mode" --rank 32 --work "$WORK" \
                --out "$RES/vllm_weight_sync/${card}_7b_$mode.json" >"$RES/weight_sync_$mode.log" 2>&1
            stamp "weight sync $mode: exit $?"
        done ;;
    loop_gc)
        timeout 600 python3 benchmarks/placements.py "${loop[@]}" --placements baseline \
            --work /tmp/placements_gc --tag "_1gpu_vllm_$card" >"$RES/loop_gc.log" 2>&1 ;;
    *) echo "unknown step $step (loop, inprocess, engine, sync, loop_gc)"; exit 2 ;;
    esac
    stamp "$step: exit $?"
done
stamp done
