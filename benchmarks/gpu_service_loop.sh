#!/usr/bin/env bash
# The whole service loop on one lent GPU with OpenVLA-7B's shapes (random bf16 weights):
# rollout server (torch engine), learner (LoRA r32, AdamW) and env server (ManiSkill3, CPU
# physics, GPU rendering) all on GPU 0, buffer = the served in-memory store (no redis there).
# Run on the device machine after ManiSkill and the wheels are installed (benchmarks/README.md).
set -euo pipefail
OUT=${OUT:-/tmp/out}
RUNS=/tmp/runs
CKPT=/tmp/openvla-7b-random
ITERS=${ITERS:-3}
ENVS=${ENVS:-8}
[ -f "$CKPT/config.json" ] || python3 benchmarks/random_checkpoint.py "$CKPT" --size 7b
python3 -m vla_rl.cli train \
  runner.logger.log_path=$RUNS runner.logger.experiment_name=gpu_7b \
  runner.max_epochs=$ITERS \
  "cluster.component_placement={actor: 0, rollout: 0, env: 0}" \
  actor.model.model_path=$CKPT actor.model.precision=bf16 \
  actor.micro_batch_size=8 actor.global_batch_size=40 \
  env.train.total_num_envs=$ENVS env.train.max_episode_steps=10 \
  env.train.max_steps_per_rollout_epoch=10 \
  rollout.max_batch_size=64 "$@"
mkdir -p "$OUT"
cp -r $RUNS/gpu_7b/summary.json $RUNS/gpu_7b/config.yaml $RUNS/gpu_7b/tensorboard $RUNS/gpu_7b/logs "$OUT"/
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/nvidia-smi.csv"
