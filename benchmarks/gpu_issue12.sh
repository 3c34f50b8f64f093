#!/usr/bin/env bash
# Issue 12's GPU figures on one lent GPU, in one background job, most wanted first; each step
# writes its results under $RES as it ends, so a job cut short by the machine's time limit keeps
# what finished. Run from the repository root on a machine with vLLM's CUDA build and ManiSkill
# installed, e.g. `RES=/tmp/res setsid nohup bash benchmarks/gpu_issue12.sh &`.
#   1. the engine table: vLLM vs torch engine vs HF generate, 7B shapes, batch 32..256;
#   2. LoRA r32 weight sync into vLLM, merge then lora;
#   3. the loop on one GPU (vLLM rollout, 32 envs): synchronous and overlapped, both with
#      gradient checkpointing off, so their ratio is the overlap's alone (the publish beside
#      the next iteration included); then synchronous with checkpointing on, the earlier baseline.
# ~35 min on an H200 in all (engine starts ~100 s each, loop runs ~5 min each).
set -u
RES=${RES:-/tmp/res}
WORK=${WORK:-/tmp/v7b}
mkdir -p "$RES" /tmp/placements /tmp/placements_gc
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower())")
stamp() { echo "=== $(date +%T) $*"; }
stamp "card $card"
python3 benchmarks/engine_throughput.py --size 7b --device cuda --batches 32 64 128 256 --calls 5 \
    --work "$WORK" --out "$RES/engine_throughput/${card}_7b.json" >"$RES/engine_throughput.log" 2>&1
stamp "engine table: exit $?"
for mode in merge lora; do
    timeout 480 python3 benchmarks/vllm_weight_sync.py --size 7b --device cuda --dtype bfloat16 \
        --sync "$mode" --rank 32 --work "$WORK" \
        --out "$RES/vllm_weight_sync/${card}_7b_$mode.json" >"$RES/weight_sync_$mode.log" 2>&1
    stamp "weight sync $mode: exit $?"
done
for w in /tmp/placements /tmp/placements_gc; do  # the checkpoint written above, not another
    ln -sfn "$WORK/random_7b" "$w/openvla-7b-random"
done
loop=(--gpus 1 --envs 32 --servers 8 --iterations 4 --out "$RES/placements" --work /tmp/placements
      --set rollout.engine=vllm --set rollout.gpu_memory_utilization=0.25)
timeout 900 python3 benchmarks/placements.py "${loop[@]}" --placements baseline,overlapped \
    --set actor.fsdp_config.gradient_checkpointing=false --tag "_1gpu_vllm_nogc_$card" \
    >"$RES/loop_nogc.log" 2>&1
stamp "loop without checkpointing: exit $?"
timeout 600 python3 benchmarks/placements.py "${loop[@]}" --placements baseline \
    --work /tmp/placements_gc --tag "_1gpu_vllm_$card" >"$RES/loop_gc.log" 2>&1
stamp "loop with checkpointing: exit $?"
stamp done
