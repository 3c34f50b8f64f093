"""The learner's data path on hand-made segments: gather (held, stale, duplicate), batch building
(GAE / GRPO, filtering, loss weights) and the update's handling of GRPO, chunk-level ratios,
decoupled PPO and empty batches. Each test here failed on the learner before issue 8's fixes."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from services.learner.batch import (
    AdvantageConfig,
    build_train_batch,
    recompute_old,
    stack_segments,
)
from services.learner.main import learner_plan
from services.learner.trainer import Learner, LoopSettings, SegmentTimeout, format_line
from vla_rl.algorithms import (
    behaviour_importance_weights,
    compute_gae,
    episode_loss_weights,
    normalize_advantages,
    ppo_policy_loss,
)
from vla_rl.buffer import Segment, from_url
from vla_rl.config import ConfigError, load_config
from vla_rl.models import PromptTokenizer, tiny_config
from vla_rl.models.lora import LoRASettings, apply_lora
from vla_rl.models.tiny import build_tiny_policy, build_tiny_tokenizer
from vla_rl.training import PPOUpdateConfig, TrainBatch, ppo_update
from vla_rl.training.checkpoints import (
    CheckpointState,
    read_checkpoint,
    resume_source,
    save_checkpoint,
)
from vla_rl.training.demo import make_optimizer
from vla_rl.training.distributed import optimizer_state, serialize_adapter_distributed

H = W = 224


@pytest.fixture(scope="module")
def prompts_of():
    return PromptTokenizer(build_tiny_tokenizer())


def make_segment(
    index: int,
    *,
    iteration: int = 0,
    policy_version: int | None = None,
    rewards: list[float] | None = None,
    terminated: list[bool] | None = None,
    truncated: list[bool] | None = None,
    success: list[bool] | None = None,
    group_id: int = -1,
    k: int = 7,
    segment_id: str | None = None,
) -> Segment:
    rewards = rewards if rewards is not None else [0.0, 0.0, 0.0, 0.0]
    t = len(rewards)
    rng = np.random.default_rng(index)
    return Segment(
        segment_id=segment_id or f"run-env0-{iteration}-{index}",
        run_id="run",
        policy_version=iteration if policy_version is None else policy_version,
        iteration=iteration,
        group_id=group_id,
        task_id="PickCube-v1",
        images=rng.integers(0, 256, (t, H, W, 3), dtype=np.uint8),
        instructions=["pick up the red cube"] * t,
        action_tokens=rng.integers(31744, 32000, (t, k), dtype=np.int64),
        behaviour_logprobs=np.full((t, k), -5.5, np.float32),
        rewards=np.asarray(rewards, np.float32),
        terminated=np.asarray(terminated or [False] * t, bool),
        truncated=np.asarray(truncated or [False] * t, bool),
        success=np.asarray(success or [False] * t, bool),
        bootstrap_image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        bootstrap_instruction="pick up the red cube",
    )


def grpo_group(group: int, success_at: list[int | None], t: int = 6) -> list[Segment]:
    """Episodes of one group: a success at step s ends the episode there (reward 1, terminated);
    None is a failure that runs to the time limit (reward 0, truncated at the last step)."""
    out = []
    for member, s in enumerate(success_at):
        rewards, term, trunc, succ = [0.0] * t, [False] * t, [False] * t, [False] * t
        if s is None:
            trunc[-1] = True
        else:
            rewards[s], term[s], succ[s] = 1.0, True, True
        out.append(
            make_segment(
                10 * group + member,
                rewards=rewards,
                terminated=term,
                truncated=trunc,
                success=succ,
                group_id=group,
            )  # fmt: skip
        )
    return out


# ------------------------------------------------------------------ 1. GRPO keeps its signs


def test_grpo_failures_never_get_a_positive_advantage(prompts_of):
    """Groups of unequal episode lengths: successes end early, failures run long. The per-decision
    re-standardisation that the learner used to apply made every failure positive here."""
    segments = grpo_group(0, [0, None, None, None]) + grpo_group(1, [0, 1, 0, None])
    policy = build_tiny_policy()
    batch, _ = build_train_batch(
        policy, prompts_of, stack_segments(segments), AdvantageConfig("grpo"), 1.0, 8
    )
    cfg = load_config(None, ["algorithm.adv_type=grpo", "algorithm.loss_type=actor",
                             "algorithm.group_size=2", "env.train.total_num_envs=8"])  # fmt: skip
    update = learner_plan(cfg).update
    assert update.normalize_advantages is False
    failed = torch.tensor([not s.success.any() for s in segments]).repeat(6)  # [T*N], t-major
    valid = batch.mask.bool()
    adv = batch.advantages
    assert (adv[failed & valid] < 0).all() and (adv[~failed & valid] > 0).all()
    # What the old path did to the same batch: standardising per decision flips the failures.
    flipped = normalize_advantages(adv, valid)
    assert (flipped[failed & valid] > 0).any()


def test_grpo_with_normalize_advantages_true_is_refused():
    with pytest.raises(ConfigError, match="algorithm.normalize_advantages"):
        load_config(None, ["algorithm.adv_type=grpo", "algorithm.loss_type=actor",
                           "algorithm.group_size=2", "algorithm.normalize_advantages=true"])  # fmt: skip
    assert load_config(None).algorithm.normalize_advantages is True  # null means true for gae


# -------------------------------------------------------------- 2. chunk-level ratios work


@pytest.mark.parametrize("decoding,chunk", [("autoregressive", 1), ("parallel", 2)])
@pytest.mark.parametrize("level", ["token", "action", "chunk"])
def test_update_runs_at_every_logprob_level(decoding, chunk, level, prompts_of, images):
    policy = apply_lora(build_tiny_policy(tiny_config(decoding=decoding, action_chunk=chunk)),
                        LoRASettings(rank=4))  # fmt: skip
    prompts = prompts_of(["pick up the red cube"] * 3)
    out = policy.generate(policy.pixel_values(images), prompts, generator=torch.Generator())
    batch = TrainBatch(images, prompts, out.action_tokens, out.logprobs,
                       torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3), out.values)  # fmt: skip
    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    metrics = ppo_update(
        policy, make_optimizer(policy, 1e-3, 1e-3), batch,
        PPOUpdateConfig(logprob_level=level, micro_batch_size=2),
    )  # fmt: skip
    assert math.isfinite(metrics["actor/policy_loss"])
    after = [p for p in policy.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ---------------------------------------------------------------------- 3. decoupled PPO


def test_decoupled_ppo_loss_on_hand_made_numbers():
    """One entry: pi = 0.5, pi_prox = 0.4, pi_behav = 0.2, A = 1, clip 0.2.
    ratio = 0.5 / 0.4 = 1.25, clipped to 1.2 (A > 0 takes the min); weight = 0.4 / 0.2 = 2."""
    logp = torch.tensor([math.log(0.5)], requires_grad=True)
    prox, behav = torch.tensor([math.log(0.4)]), torch.tensor([math.log(0.2)])
    weights, metrics = behaviour_importance_weights(prox, behav)
    assert weights.item() == pytest.approx(2.0)
    loss, _ = ppo_policy_loss(logp, prox, torch.ones(1), 0.2, 0.2, behaviour_weights=weights)
    assert loss.item() == pytest.approx(-2.4)
    # Truncated at 1.5: the weight is capped and counted.
    capped, metrics = behaviour_importance_weights(prox, behav, cap=1.5)
    assert capped.item() == pytest.approx(1.5)
    assert metrics["behaviour_weight_capped_fraction"].item() == 1.0
    assert metrics["behaviour_weight_max"].item() == pytest.approx(2.0)
    # Inside the clip range the gradient is the weighted on-policy one: d/dlogp (-w * r * A).
    logp2 = torch.tensor([math.log(0.42)], requires_grad=True)
    loss2, _ = ppo_policy_loss(logp2, prox, torch.ones(1), 0.2, 0.2, behaviour_weights=weights)
    loss2.backward()
    assert logp2.grad.item() == pytest.approx(-2.0 * 0.42 / 0.4)


def test_decoupled_update_uses_the_behaviour_log_probs(prompts_of, images):
    def run(behaviour_shift: torch.Tensor, decoupled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
        prompts = prompts_of(["pick up the red cube"] * 3)
        out = policy.generate(policy.pixel_values(images), prompts, generator=torch.Generator())
        batch = TrainBatch(
            images, prompts, out.action_tokens, out.logprobs, torch.tensor([1.0, -1.0, 0.5]),
            torch.zeros(3), out.values, behaviour_logprobs=out.logprobs + behaviour_shift[:, None],
        )  # fmt: skip
        cfg = PPOUpdateConfig(
            decoupled=decoupled, normalize_advantages=False, value_coef=0.0, max_grad_norm=1e6
        )
        opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        ppo_update(policy, opt, batch, cfg, torch.Generator().manual_seed(0))
        return [p.detach() for p in policy.parameters() if p.requires_grad]

    plain = run(torch.zeros(3), decoupled=False)
    same = run(torch.zeros(3), decoupled=True)  # behaviour == proximal: weights are 1
    # Samples 0 and 2 were less / more likely under the behaviour policy: weights e^(-+0.05).
    shifted = run(torch.tensor([-0.05, 0.0, 0.05]), decoupled=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, same, strict=True))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, shifted, strict=True))


def test_max_staleness_turns_decoupled_ppo_on():
    on = learner_plan(load_config(None, ["algorithm.max_staleness=1"]))
    off = learner_plan(load_config(None))
    assert on.update.decoupled and not off.update.decoupled
    assert on.loop.max_staleness == 1


# ------------------------------------------------------------------------ 4. NaN containment


def test_gae_keeps_a_nan_inside_its_own_episode():
    """Column 0: episode A ends (terminated) at step 1; episode B then has a NaN reward."""
    rewards = torch.tensor([[1.0], [1.0], [float("nan")], [0.0]])
    values = torch.tensor([[0.5], [0.5], [0.5], [float("nan")]])
    terminated = torch.tensor([[False], [True], [False], [False]])
    truncated = torch.zeros_like(terminated)
    adv, _ = compute_gae(rewards, values, values.roll(-1, 0), terminated, truncated, 0.9, 0.8)
    assert torch.isfinite(adv[:2]).all(), adv


def test_update_on_an_all_masked_batch_does_not_move_the_weights(prompts_of, images):
    policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    prompts = prompts_of(["pick up the red cube"] * 3)
    out = policy.generate(policy.pixel_values(images), prompts)
    optimizer = make_optimizer(policy, 1e-2, 1e-2)
    batch = TrainBatch(images, prompts, out.action_tokens, out.logprobs,
                       torch.tensor([1.0, -1.0, 0.5]), torch.zeros(3), out.values)  # fmt: skip
    ppo_update(policy, optimizer, batch, PPOUpdateConfig())  # AdamW now has momentum
    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    masked = TrainBatch(**{**batch.__dict__, "mask": torch.zeros(3, dtype=torch.bool)})
    metrics = ppo_update(policy, optimizer, masked, PPOUpdateConfig())
    after = [p.detach() for p in policy.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert metrics["actor/skipped_mini_batches"] == 1.0


# ------------------------------------------------------ 5. mid-segment truncation is refused


def test_segment_truncated_before_its_last_step_is_invalid(prompts_of):
    bad = make_segment(0, truncated=[False, True, False, False])
    with pytest.raises(ValueError, match="truncated at step 1 of 4"):
        bad.validate()
    with pytest.raises(ValueError, match="truncated before its last step"):
        build_train_batch(
            build_tiny_policy(), prompts_of, stack_segments([bad]), AdvantageConfig(), 1.0, 8
        )


# ------------------------------------------------------------- gather: held, stale, duplicate


def _learner(buffer, segments_per_iteration: int, max_staleness: int = 0) -> Learner:
    policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    return Learner(
        policy, None, make_optimizer(policy, 1e-3, 1e-3), buffer, lambda blob, v: None,
        PPOUpdateConfig(),
        AdvantageConfig(),
        LoopSettings(segments_per_iteration, 10, checkpoint_dir=None, max_staleness=max_staleness),
    )  # fmt: skip


def test_gather_holds_later_iterations_and_drops_stale_and_duplicate_segments():
    buffer = from_url("memory://", stream="gather-test", group="learner")
    learner = _learner(buffer, segments_per_iteration=2, max_staleness=1)
    learner.iteration = learner.policy_version = 3
    buffer.put(make_segment(0, iteration=2))  # an iteration already trained: dropped
    buffer.put(make_segment(1, iteration=4, policy_version=3))  # the next iteration: held
    buffer.put(make_segment(2, iteration=3, policy_version=1))  # 2 versions behind: dropped
    buffer.put(make_segment(3, iteration=3, policy_version=2))  # 1 behind: allowed
    buffer.put(make_segment(4, iteration=3, segment_id="run-env0-3-3"))  # same id: dropped
    buffer.put(make_segment(5, iteration=3))
    got = learner.gather()
    assert sorted(r.segment.segment_id for r in got) == ["run-env0-3-3", "run-env0-3-5"]
    assert learner.stale_dropped == 2
    assert [r.segment.iteration for r in learner._held] == [4]
    # Dropped ones are acked at once; the taken and the held ones stay pending until committed.
    assert buffer.pending() == 3
    learner.iteration = learner.policy_version = 4
    buffer.put(make_segment(6, iteration=4))
    assert sorted(r.segment.segment_id for r in learner.gather()) == [
        "run-env0-4-1",
        "run-env0-4-6",
    ]


def test_gather_returns_none_when_stopped_and_keeps_what_it_had():
    buffer = from_url("memory://", stream="gather-stop", group="learner")
    learner = _learner(buffer, segments_per_iteration=2)
    buffer.put(make_segment(0))
    assert learner.gather(stop=lambda: True) is None
    buffer.put(make_segment(1))
    assert len(learner.gather()) == 2


def test_gather_fails_after_the_segment_timeout_naming_what_came_from_where():
    buffer = from_url("memory://", stream="gather-timeout", group="learner")
    learner = _learner(buffer, segments_per_iteration=4)
    learner.loop.segment_timeout_s = 1.0
    buffer.put(make_segment(0, segment_id="run-env0-0-0"))
    buffer.put(make_segment(1, segment_id="run-env0-0-1"))
    buffer.put(make_segment(2, segment_id="run-env-b-0-0"))  # server ids may hold dashes
    with pytest.raises(SegmentTimeout) as info:
        learner.gather()
    message = str(info.value)
    assert "3 of 4 segments for iteration 1 (env-b: 1, env0: 2)" in message
    assert "runner.segment_timeout_s" in message and "'gather-timeout'" in message


def test_gather_waits_past_the_timeout_while_segments_keep_arriving():
    """The deadline counts from the last arrival, not from the start of the iteration: a slow
    collection that makes progress is never cut off."""
    import threading
    import time

    buffer = from_url("memory://", stream="gather-slow", group="learner")
    learner = _learner(buffer, segments_per_iteration=8)
    learner.loop.segment_timeout_s = 3.0

    def trickle() -> None:
        for i in range(8):
            time.sleep(0.5)
            buffer.put(make_segment(i))

    writer = threading.Thread(target=trickle)
    writer.start()
    assert len(learner.gather()) == 8  # 4 s in all, never 3 s without a segment
    writer.join()


# ----------------------------------------------------------------------- build_train_batch


def test_build_train_batch_gae_matches_the_reference(prompts_of):
    """GAE on recomputed values, with the bootstrap value at a time-limit cut on the last step."""
    segments = [
        make_segment(0, rewards=[0.1, 0.2, 0.3, 0.4], truncated=[False, False, False, True]),
        make_segment(1, rewards=[0.0, 1.0, 0.5, 0.0], terminated=[False, True, False, False]),
    ]
    policy = build_tiny_policy()
    seg = stack_segments(segments)
    cfg = AdvantageConfig("gae", gamma=0.9, gae_lambda=0.8)
    batch, stats = build_train_batch(policy, prompts_of, seg, cfg, 1.0, 3)
    values = batch.old_values.view(4, 2)
    _, last = recompute_old(
        policy, seg.bootstrap_images, prompts_of(seg.bootstrap_instructions), None, 1.0, 3
    )
    for n in range(2):  # a plain loop per column
        adv, expected = 0.0, []
        for t in reversed(range(4)):
            term, trunc = bool(seg.terminated[t, n]), bool(seg.truncated[t, n])
            next_value = float(last[n]) if t == 3 else float(values[t + 1, n])
            delta = (
                float(seg.rewards[t, n]) + 0.9 * (0.0 if term else next_value) - float(values[t, n])
            )
            adv = delta + (0.0 if (term or trunc) else 0.9 * 0.8 * adv)
            expected.append(adv)
        expected.reverse()
        got = batch.advantages.view(4, 2)[:, n]
        assert torch.allclose(got, torch.tensor(expected), atol=1e-5), (got, expected)
    assert batch.behaviour_logprobs.shape == batch.old_logprobs.shape
    assert torch.equal(batch.loss_weights, torch.ones(8))
    assert stats["rollout/rewards"] == pytest.approx(float(seg.rewards.mean()))


def test_reward_scale_is_the_same_as_scaled_rewards(prompts_of):
    rewards = [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    policy = build_tiny_policy()

    def batch_of(scale: float, factor: float):
        segs = [make_segment(i, rewards=[factor * r for r in rs]) for i, rs in enumerate(rewards)]
        cfg = AdvantageConfig("gae", reward_scale=scale)
        return build_train_batch(policy, prompts_of, stack_segments(segs), cfg, 1.0, 4)

    scaled, stats = batch_of(0.02, 1.0)
    by_hand, _ = batch_of(1.0, 0.02)
    plain, _ = batch_of(1.0, 1.0)
    assert torch.allclose(scaled.returns, by_hand.returns, atol=1e-6)
    assert torch.allclose(scaled.advantages, by_hand.advantages, atol=1e-6)
    assert not torch.allclose(scaled.returns, plain.returns, atol=1e-3)
    assert stats["rollout/rewards"] == pytest.approx(0.5)  # the env's rewards, unscaled


def test_build_train_batch_grpo_filters_groups_by_success_rate(prompts_of):
    segments = grpo_group(0, [1, None]) + grpo_group(1, [None, None]) + grpo_group(2, [0, 2])
    policy = build_tiny_policy()
    seg = stack_segments(segments)
    keep_mixed = AdvantageConfig("grpo", filter_rewards=True)  # bounds 0.1 .. 0.9
    batch, stats = build_train_batch(policy, prompts_of, seg, keep_mixed, 1.0, 8)
    kept_columns = batch.mask.view(6, 6).any(0).tolist()
    assert kept_columns == [True, True, False, False, False, False]
    assert stats["rollout/groups_kept_fraction"] == pytest.approx(2 / 6)
    keep_all_but_failures = AdvantageConfig(
        "grpo", filter_rewards=True, rewards_lower_bound=0.1, rewards_upper_bound=1.0
    )
    batch, _ = build_train_batch(policy, prompts_of, seg, keep_all_but_failures, 1.0, 8)
    assert batch.mask.view(6, 6).any(0).tolist() == [True, True, False, False, True, True]


def test_seq_mean_token_mean_weights_every_episode_equally(prompts_of):
    terminated = torch.tensor([[False, False], [True, False], [False, False], [False, False]])
    truncated = torch.tensor([[False, False], [False, False], [False, False], [False, True]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    weights = episode_loss_weights(terminated, truncated, mask)
    # Column 0: an episode of 2 decisions, then a piece of 2; column 1: one episode of 4.
    assert weights[:, 0].tolist() == [0.5, 0.5, 0.5, 0.5]
    assert weights[:, 1].tolist() == [0.25] * 4
    mask[3, 0] = False  # a masked decision shortens its piece
    assert episode_loss_weights(terminated, truncated, mask)[:, 0].tolist() == [0.5, 0.5, 1.0, 0.0]
    seg = stack_segments(grpo_group(0, [0, None], t=4))
    batch, _ = build_train_batch(
        build_tiny_policy(), prompts_of, seg,
        AdvantageConfig("grpo", loss_agg_func="seq-mean-token-mean"), 1.0, 8,
    )  # fmt: skip
    # GRPO trains on each env's first episode: 1 decision (success at 0) and 4 (failure).
    assert batch.loss_weights.view(4, 2).sum(0).tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------- runner.resume_dir


def test_resume_dir_starts_a_new_run_from_another_runs_checkpoint(tmp_path):
    first = _learner(from_url("memory://", stream="r1"), 1)
    first.loop.checkpoint_dir = tmp_path / "first"
    first.iteration, first.policy_version = 5, 5
    with torch.no_grad():
        next(p for p in first.policy.parameters() if p.requires_grad).add_(0.5)
    blob = serialize_adapter_distributed(first.policy, 5)
    first.save_checkpoint(blob, optimizer_state(first.policy, first.optimizer))

    second = _learner(from_url("memory://", stream="r2"), 1)
    second.loop.checkpoint_dir = tmp_path / "second"
    second.loop.resume_dir = str(tmp_path / "first")  # a checkpoints root: its latest
    assert second.resume()
    assert (second.iteration, second.policy_version) == (5, 5)
    a = [p for p in first.policy.parameters() if p.requires_grad]
    b = [p for p in second.policy.parameters() if p.requires_grad]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Once the new run has a checkpoint of its own, a restart continues from that one.
    save_checkpoint(tmp_path / "second", CheckpointState(6, 6), blob, {})
    assert resume_source(tmp_path / "second", str(tmp_path / "first")).name == "global_step_6"
    with pytest.raises(ValueError, match="is not a checkpoint"):
        resume_source(tmp_path / "third", str(tmp_path / "missing"))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """A truncated adapter in the newest checkpoint: the learner names the file, says it falls
    back, and resumes from the previous intact checkpoint (it used to fail with a traceback that
    named no file)."""
    writer = _learner(from_url("memory://", stream="c1"), 1)
    writer.loop.checkpoint_dir = tmp_path
    for step in (4, 5):
        writer.iteration = writer.policy_version = step
        blob = serialize_adapter_distributed(writer.policy, step)
        writer.save_checkpoint(blob, optimizer_state(writer.policy, writer.optimizer))
    adapter = tmp_path / "global_step_5" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])

    warnings: list[str] = []
    assert resume_source(tmp_path, None, warn=warnings.append).name == "global_step_4"
    assert str(adapter) in warnings[0] and "falling back" in warnings[0]
    resumed = _learner(from_url("memory://", stream="c2"), 1)
    resumed.loop.checkpoint_dir = tmp_path
    assert resumed.resume() and (resumed.iteration, resumed.policy_version) == (4, 4)

    # With no intact checkpoint left, the error names the directory instead of starting over.
    (tmp_path / "global_step_4" / "state.json").write_text("{")
    with pytest.raises(ValueError, match="no intact checkpoint"):
        resume_source(tmp_path, None)


def test_gather_rejects_segments_of_a_policy_version_never_published():
    """A segment stamped with a version the learner has not published (a foreign push of version
    1000 to a rollout server was trained on) goes to the dead letters with the reason."""
    buffer = from_url("memory://", stream="gather-foreign", group="learner")
    learner = _learner(buffer, segments_per_iteration=1)
    learner.iteration = learner.policy_version = 3
    buffer.put(make_segment(0, iteration=3, policy_version=1000))
    buffer.put(make_segment(1, iteration=3))
    got = learner.gather()
    assert [r.segment.segment_id for r in got] == ["run-env0-3-1"]
    assert learner.foreign_rejected == 1 and buffer.dead_letters() == 1
    assert buffer.pending() == 1  # the taken one; the rejected one is acked


def test_replicas_follow_discovered_targets_keeping_known_clients():
    from services.learner.main import Replicas

    replicas = Replicas([])
    replicas.set_targets(["10.0.0.1:50051", "10.0.0.2:50051"])
    first = {c.target: c for c in replicas.clients}
    replicas.set_targets(["10.0.0.2:50051", "10.0.0.3:50051"])
    assert [c.target for c in replicas.clients] == ["10.0.0.2:50051", "10.0.0.3:50051"]
    assert replicas.clients[0] is first["10.0.0.2:50051"]  # a known replica keeps its channel
    replicas.close()


def test_a_replica_removed_mid_publish_does_not_stop_the_learner():
    """Discovery closes a gone pod's client; a push that was in flight to it then fails (closed
    channel), which must not end training. The same failure on a replica still there does."""
    from services.learner.main import Replicas

    replicas = Replicas([])
    replicas.set_targets(["127.0.0.1:9"])
    (client,) = replicas.clients
    replicas.set_targets([])  # the pod went away: its client is closed
    replicas._publish_to(client, b"adapter", 1)  # no raise
    replicas.set_targets(["127.0.0.1:9"])
    (present,) = replicas.clients
    present.close()  # a closed channel on a replica discovery still lists is a real error
    with pytest.raises(ValueError):
        replicas._publish_to(present, b"adapter", 1)
    replicas.close()


# ------------------------------------------------------------------- recompute_logprobs: false


class _CountingPolicy:
    """The tiny policy with its forwards counted (what the recompute costs)."""

    def __init__(self, policy) -> None:
        self.policy, self.calls = policy, {"evaluate_actions": 0, "forward_actions": 0}

    @property
    def forwards(self) -> int:
        return sum(self.calls.values())

    def __getattr__(self, name):
        attr = getattr(self.policy, name)
        if name in self.calls:

            def counted(*args, **kwargs):
                self.calls[name] += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def test_without_the_recompute_the_rollouts_logprobs_are_the_old_ones(prompts_of):
    """recompute_logprobs false: GRPO runs no forward before the update and trains against the
    rollout's log-probs; GAE still runs the critic's forward (same values as with the
    recompute) but takes the rollout's log-probs."""
    policy = build_tiny_policy()
    grpo_seg = stack_segments(grpo_group(0, [0, None]) + grpo_group(1, [1, None]))
    counting = _CountingPolicy(policy)
    grpo, stats = build_train_batch(
        counting, prompts_of, grpo_seg, AdvantageConfig("grpo"), 1.0, 8, recompute_logprobs=False
    )
    assert counting.forwards == 0
    assert torch.equal(grpo.old_logprobs, grpo.behaviour_logprobs)
    assert "rollout/logprob_mismatch" not in stats
    recomputed, _ = build_train_batch(policy, prompts_of, grpo_seg, AdvantageConfig("grpo"), 1.0, 8)
    assert torch.equal(grpo.advantages, recomputed.advantages)
    assert not torch.allclose(recomputed.old_logprobs, recomputed.behaviour_logprobs)

    gae_seg = stack_segments([make_segment(i, rewards=[0.0, 1.0, 0.0, 1.0]) for i in range(2)])
    counting = _CountingPolicy(policy)
    gae, _ = build_train_batch(
        counting, prompts_of, gae_seg, AdvantageConfig("gae"), 1.0, 4, recompute_logprobs=False
    )
    # Values only (decisions and bootstrap): no forward scores the sampled tokens.
    assert counting.calls == {"evaluate_actions": 0, "forward_actions": 3}
    full, _ = build_train_batch(policy, prompts_of, gae_seg, AdvantageConfig("gae"), 1.0, 4)
    assert torch.equal(gae.old_logprobs, gae.behaviour_logprobs)
    assert torch.allclose(gae.old_values, full.old_values, atol=1e-6)
    assert torch.allclose(gae.advantages, full.advantages, atol=1e-6)


def test_skipping_the_recompute_with_stale_collection_is_refused():
    with pytest.raises(ConfigError, match="algorithm.recompute_logprobs"):
        load_config(None, ["algorithm.recompute_logprobs=false", "algorithm.max_staleness=1"])
    plan = learner_plan(load_config(None, ["algorithm.recompute_logprobs=false"]))
    assert plan.loop.recompute_logprobs is False


@pytest.mark.parametrize("recompute", [True, False])
def test_the_learner_passes_recompute_logprobs_to_the_batch(recompute, prompts_of, tmp_path):
    buffer = from_url("memory://", stream=f"recompute-{recompute}", group="learner")
    policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    learner = Learner(
        policy, prompts_of, make_optimizer(policy, 1e-3, 1e-3), buffer, lambda blob, v: None,
        PPOUpdateConfig(), AdvantageConfig(),
        LoopSettings(2, 10, checkpoint_dir=tmp_path, recompute_logprobs=recompute),
    )  # fmt: skip
    for i in range(2):
        buffer.put(make_segment(i, rewards=[0.0, 1.0, 0.0, 1.0]))
    metrics = learner.train_iteration(learner.gather())
    assert ("rollout/logprob_mismatch" in metrics) is recompute
    assert learner.policy_version == 1


def test_critic_warmup_iterations_publish_the_policy_unchanged(prompts_of, tmp_path):
    """actor.optim.critic_warmup_steps 1: iteration 1 trains the value head alone (the
    published adapter's policy weights are the start's), iteration 2 trains the policy."""
    from safetensors.torch import load as st_load

    from vla_rl.models.lora import serialize_adapter

    buffer = from_url("memory://", stream="critic-warmup", group="learner")
    policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    published: list[dict] = [st_load(serialize_adapter(policy, version=0))]
    learner = Learner(
        policy, prompts_of, make_optimizer(policy, 1e-2, 1e-2), buffer,
        lambda blob, v: published.append(st_load(blob)), PPOUpdateConfig(), AdvantageConfig(),
        LoopSettings(2, 10, checkpoint_dir=tmp_path, critic_warmup_steps=1),
    )  # fmt: skip
    lines = []
    for iteration in range(2):
        for i in range(2):
            buffer.put(make_segment(i, iteration=iteration, policy_version=iteration,
                                    rewards=[0.0, 1.0, 0.0, 1.0]))  # fmt: skip
        metrics = learner.train_iteration(learner.gather())
        lines.append(format_line(metrics, learner.iteration, 10))
        assert metrics["train/critic/warmup"] == float(iteration == 0)
    start, warm, trained = published

    def policy_weights_equal(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a if "value_head" not in k)

    assert policy_weights_equal(start, warm) and not policy_weights_equal(warm, trained)
    assert any(not torch.equal(start[k], warm[k]) for k in start if "value_head" in k)
    assert "critic warm-up" in lines[0] and "critic warm-up" not in lines[1]


# ------------------------------------------- publish beside the next iteration (max_staleness)


class _SlowPublish:
    """A publish that blocks until released, recording which versions started and finished."""

    def __init__(self, fail_version: int | None = None) -> None:
        self.release = threading.Event()
        self.started: list[int] = []
        self.finished: list[int] = []
        self.fail_version = fail_version

    def __call__(self, blob: bytes, version: int) -> None:
        self.started.append(version)
        assert self.release.wait(30), "never released"
        if version == self.fail_version:
            raise RuntimeError(f"replica refused version {version}")
        self.finished.append(version)


def _publishing_learner(publish, tmp_path, max_staleness: int, iterations: int = 2) -> Learner:
    policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    tokenizer = PromptTokenizer(build_tiny_tokenizer(), tiny_config().pad_token_id)
    buffer = from_url("memory://", stream=f"publish-{tmp_path.name}", group="learner")
    for iteration in range(iterations):
        for i in range(2):  # collected by version 0: one version behind at iteration 2
            buffer.put(make_segment(i, iteration=iteration, policy_version=0))
    return Learner(
        policy, tokenizer, make_optimizer(policy, 1e-3, 1e-3), buffer, publish,
        PPOUpdateConfig(), AdvantageConfig(),
        LoopSettings(2, iterations, checkpoint_dir=tmp_path, max_staleness=max_staleness,
                     segment_timeout_s=30),
    )  # fmt: skip


def test_with_max_staleness_the_publish_runs_beside_the_next_iteration(tmp_path):
    publish = _SlowPublish()
    learner = _publishing_learner(publish, tmp_path, max_staleness=1)
    learner.train_iteration(learner.gather())
    # Back from iteration 1 while version 1 is still being pushed; its checkpoint already
    # written (checkpoint before publish, as in the synchronous path), its segments acknowledged.
    assert publish.started == [1] and publish.finished == []
    assert resume_source(tmp_path, None, warn=lambda *a: None) is not None
    assert learner.buffer.pending() == 0
    received = learner.gather()  # the next iteration's segments, gathered meanwhile
    assert len(received) == 2
    publish.release.set()
    learner.train_iteration(received)  # waits for version 1 before pushing version 2
    learner.finish_publish()
    assert publish.started == [1, 2] and publish.finished == [1, 2]
    assert learner.buffer.pending() == 0


def test_on_policy_the_publish_is_done_when_the_iteration_ends(tmp_path):
    publish = _SlowPublish()
    publish.release.set()
    learner = _publishing_learner(publish, tmp_path, max_staleness=0, iterations=1)
    learner.train_iteration(learner.gather())
    assert publish.finished == [1] and learner.buffer.pending() == 0


def test_a_failed_background_publish_fails_the_run_at_the_next_iteration(tmp_path):
    publish = _SlowPublish(fail_version=1)
    publish.release.set()
    learner = _publishing_learner(publish, tmp_path, max_staleness=1)
    with pytest.raises(RuntimeError, match="refused version 1"):
        learner.run()
    assert publish.finished == [] and 2 not in publish.started  # nothing after the failure
    # Iteration 2 trained and checkpointed, but its segments stay unacknowledged: a restart
    # resumes from its checkpoint and publishes it.
    assert learner.iteration == 2 and learner.buffer.pending() == 2


def test_run_returns_after_the_last_background_publish(tmp_path):
    publish = _SlowPublish()
    threading.Timer(0.5, publish.release.set).start()
    learner = _publishing_learner(publish, tmp_path, max_staleness=1)
    learner.run(print_line=lambda line: None)
    assert publish.finished == [1, 2] and learner.buffer.pending() == 0
    assert learner.phase == "done"


def _stopping_learner(tmp_path, save_interval: int, iterations: int = 3) -> Learner:
    """A learner whose buffer holds `iterations` iterations of segments, checkpointing every
    save_interval of at most 10 iterations."""
    policy = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    tokenizer = PromptTokenizer(build_tiny_tokenizer(), tiny_config().pad_token_id)
    buffer = from_url("memory://", stream=f"stop-{tmp_path.name}", group="learner")

    def collect(version: int) -> None:  # the env servers: one iteration per published version
        if version < iterations:
            for i in range(2):
                buffer.put(make_segment(i, iteration=version, policy_version=version))

    collect(0)
    return Learner(
        policy, tokenizer, make_optimizer(policy, 1e-3, 1e-3), buffer, lambda blob, v: collect(v),
        PPOUpdateConfig(), AdvantageConfig(),
        LoopSettings(2, 10, checkpoint_dir=tmp_path, save_interval=save_interval,
                     segment_timeout_s=30),
    )  # fmt: skip


def test_a_stopped_run_checkpoints_its_last_iteration(tmp_path):
    """Stopped after 3 iterations with save_interval 10: the policy of iteration 3 is saved, and
    a restart resumes from it (it used to keep nothing newer than the last multiple of 10)."""
    learner = _stopping_learner(tmp_path, save_interval=10)
    learner.run(stop=lambda: learner.iteration >= 3, print_line=lambda line: None)
    assert learner.iteration == 3 and learner.phase == "done"
    latest = resume_source(tmp_path, None, warn=lambda *a: None)
    assert latest is not None and latest.name == "global_step_3"
    state, _, _ = read_checkpoint(latest)
    assert (state.iteration, state.policy_version) == (3, 3)
    resumed = _stopping_learner(tmp_path, save_interval=10, iterations=0)
    assert resumed.resume() and resumed.iteration == 3
    trained = dict(learner.policy.named_parameters())
    lora = [n for n, p in resumed.policy.named_parameters() if "lora_" in n]
    assert lora and all(torch.equal(resumed.policy.get_parameter(n), trained[n]) for n in lora)


def test_a_run_stopped_before_training_or_just_after_a_checkpoint_writes_nothing_more(tmp_path):
    idle = _stopping_learner(tmp_path / "idle", save_interval=10)
    idle.run(stop=lambda: True, print_line=lambda line: None)
    assert idle.iteration == 0 and not (tmp_path / "idle").exists()
    saved = _stopping_learner(tmp_path / "saved", save_interval=2)
    saved.run(stop=lambda: saved.iteration >= 2, print_line=lambda line: None)
    assert sorted(p.name for p in (tmp_path / "saved").glob("global_step_*")) == ["global_step_2"]
