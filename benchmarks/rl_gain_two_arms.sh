#!/usr/bin/env bash
# Issue 9's base -> PPO and GRPO table in one job (measured on the lent nvidia-h200-x2, 32 cores):
#   1. the base on GPU 0 ($DEMOS noise-0.3 expert demos -> BC $BC_STEPS steps of a $SIZE model -> its
#      table on every split),
#   2. PPO and GRPO (groups of 8 from one start) side by side from that base, 32 envs each, on
#      GPU $PPO_GPU and GPU $GRPO_GPU, each stopped after $MINUTES of training,
#   3. each arm's table on the same fixed starts as the base's (rl_gain.py rl does it).
# Both arms on one H200 (the default, what was measured) used 59 GB; 64 envs per arm on one GPU
# (128 ManiSkill renderers) ran SAPIEN out of GPU memory. GRPO_GPU=1 puts GRPO on the second GPU
# (the launcher maps placement index 0 to the CUDA_VISIBLE_DEVICES it is given).
# Run it from the repository root with ManiSkill installed (benchmarks/README.md says how on a lent
# machine); it writes $W/{base,ppo,grpo}.log and everything rl_gain.py writes under $W/out, and
# touches $W/done at the end. Extra rl_gain.py flags for both arms: RL_ARGS; for one arm: PPO_ARGS,
# GRPO_ARGS (after RL_ARGS, so they win). Envs per arm: PPO_SERVERS x PPO_ENVS_PER_SERVER and
# GRPO_SERVERS x 8 (one group of 8 per server). ARMS (default "ppo grpo") runs fewer arms, e.g.
# ARMS=grpo GRPO_SERVERS=8 for one arm with the whole machine's cores.
set -u
W=${W:-/tmp/rg}
MINUTES=${MINUTES:-9}
LR=${LR:-1e-3}
SIZE=${SIZE:-tiny}         # the BC model: tiny (4.4M, what was measured) or small (25M)
BC_STEPS=${BC_STEPS:-800}     # one or more (space-separated): candidates, the one nearest 35% wins
SELECT_EPISODES=${SELECT_EPISODES:-8}
SELECT_BY=${SELECT_BY:-greedy}  # greedy or sampled: which success of the candidates --target-base reads
DEMOS=${DEMOS:-100}          # noise-0.3 expert demonstrations the base is cloned from
PPO_GPU=${PPO_GPU:-0}
GRPO_GPU=${GRPO_GPU:-0}
PPO_SERVERS=${PPO_SERVERS:-16}
PPO_ENVS_PER_SERVER=${PPO_ENVS_PER_SERVER:-2}
GRPO_SERVERS=${GRPO_SERVERS:-4}
ARMS=${ARMS:-ppo grpo}
mkdir -p "$W"
A=(--model openvlaoft --chunk 5 --work "$W" --out "$W/out" --eval-episodes 200)
# shellcheck disable=SC2206,SC2086  # BC_STEPS and the *_ARGS are lists, split on purpose
RL=(--base "$W/out/base" --lr "$LR" --update-epochs 2 --ignore-terminations --reward-mode sparse
    --eval-every 1000 --iterations 1000 --save-every 10 --minutes "$MINUTES" ${RL_ARGS:-})
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/rl_gain.py base "${A[@]}" --demos "$DEMOS" --demo-noise 0.3 \
    --size "$SIZE" --bc-steps $BC_STEPS --select-episodes "$SELECT_EPISODES" --target-base 0.35 \
    --select-by "$SELECT_BY" \
    >"$W/base.log" 2>&1 || {
    echo "base failed" >"$W/done"; exit 1; }
# PPO: 16 env servers x 2 envs by default, returns of order 1 (rewards x 0.02) so the critic does not swamp
# the shared LoRA's gradient.
[[ " $ARMS " == *" ppo "* ]] && CUDA_VISIBLE_DEVICES=$PPO_GPU python3 benchmarks/rl_gain.py rl "${A[@]}" "${RL[@]}" \
    --algorithm ppo --envs "$PPO_SERVERS" --envs-per-server "$PPO_ENVS_PER_SERVER" \
    --reward-scale 0.02 ${PPO_ARGS:-} >"$W/ppo.log" 2>&1 &
# GRPO: 4 env servers x 8 envs by default, each server's 8 envs one group from one start; no critic, and the
# rollout's log-probs serve as the old ones (no recompute forward in the learner).
[[ " $ARMS " == *" grpo "* ]] && CUDA_VISIBLE_DEVICES=$GRPO_GPU python3 benchmarks/rl_gain.py rl "${A[@]}" "${RL[@]}" \
    --algorithm grpo --group-size 8 --envs "$GRPO_SERVERS" --envs-per-server 8 \
    --set algorithm.recompute_logprobs=false ${GRPO_ARGS:-} >"$W/grpo.log" 2>&1 &
wait
echo ok >"$W/done"
