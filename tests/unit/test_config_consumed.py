"""Every config key takes effect or is refused.

The test walks every leaf field of the config dataclasses. For each it changes the value (from a
context where the new value is legal) and checks that what `vla-rl train` would start changes:
the launch plan (service flags, StartCollection requests, evaluation arguments, the tiny model
and the buffer to start) or what the learner builds from the resolved config (`learner_plan`).
Keys kept only so RLinf's configs load must refuse every other value with a ConfigError that
names them. A new field that nothing reads fails here until it is wired or refused.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import get_type_hints

import pytest

from services.learner.main import learner_plan
from vla_rl.config import ConfigError, TrainConfig, load_config
from vla_rl.launch import buffer_kind, launch_plan, tiny_model_spec

GRPO = ["algorithm.adv_type=grpo", "algorithm.loss_type=actor", "algorithm.group_size=2"]
OFT = ["actor.model.model_type=openvla_oft", "actor.model.num_action_chunks=2"]
EVAL = ["runner.val_check_interval=1"]  # evaluation runs, so env.eval's keys are read
ENV_GPU = ['cluster.component_placement={"actor,rollout": cpu, env: "0"}']

# key -> (overrides of the context, the changed value). Keys not listed take the automatic
# change in `_auto_change`.
PROBES: dict[str, tuple[list[str], object]] = {
    "cluster.component_placement": ([], {"actor,rollout,env": "0"}),
    "runner.resume_dir": ([], "/tmp/some-run/checkpoints"),
    "runner.logger.logger_backends": ([], ["tensorboard", "wandb"]),
    "runner.val_check_interval": (["runner.max_epochs=4"], 2),
    "runner.save_interval": (["runner.max_epochs=4"], 2),
    "algorithm.adv_type": ([], None),  # joint change: see JOINT
    "algorithm.loss_type": ([], None),
    "algorithm.group_size": (GRPO + ["env.train.total_num_envs=4"], 4),
    "algorithm.normalize_advantages": ([], False),
    "algorithm.clip_ratio_c": ([], 3.0),
    "algorithm.value_clip": ([], None),
    "algorithm.huber_delta": ([], 10.0),
    "algorithm.logprob_type": ([], "token_level"),
    "algorithm.entropy_type": ([], "token_level"),
    "algorithm.loss_agg_func": ([], "seq-mean-token-mean"),
    "algorithm.kl_estimator": ([], "k1"),
    "algorithm.filter_rewards": (GRPO, True),
    "algorithm.behaviour_weight_cap": ([], None),
    "algorithm.max_staleness": ([], 1),
    "env.train.task_ids": ([], ["PushCube-v1"]),
    "env.train.task_modules": ([], ["my_tasks"]),
    "env.train.total_num_envs": ([], 4),
    "env.train.num_servers": ([], 2),
    "env.train.max_episode_steps": ([], 16),
    "env.train.max_steps_per_rollout_epoch": ([], 4),
    "env.train.sim_backend": (ENV_GPU, "gpu"),
    "env.train.control_mode": ([], None),
    "env.train.image_size": ([], 128),
    "env.train.reward_mode": ([], "sparse"),
    "env.train.video_cfg.info_on_video": (["env.train.video_cfg.save_video=true"], False),
    "env.train.video_cfg.video_base_dir": (["env.train.video_cfg.save_video=true"], "/tmp/v"),
    "env.eval.task_ids": (EVAL, ["PushCube-v1"]),
    "env.eval.task_modules": (EVAL, ["my_tasks"]),
    "env.eval.total_num_envs": (EVAL, 4),
    "env.eval.num_servers": (EVAL + ["env.train.num_servers=2"], 2),
    "env.eval.ignore_terminations": (EVAL, True),
    "env.eval.max_episode_steps": (EVAL, 16),
    "env.eval.max_steps_per_rollout_epoch": (EVAL, 4),
    "env.eval.sim_backend": (EVAL + ENV_GPU, "gpu"),
    "env.eval.control_mode": (EVAL, None),
    "env.eval.image_size": (EVAL, 128),
    "env.eval.reward_mode": (EVAL, "sparse"),
    "env.eval.seed": (EVAL, 7),
    "env.eval.video_cfg.save_video": ([], True),
    "env.eval.video_cfg.info_on_video": (["env.eval.video_cfg.save_video=true"], False),
    "env.eval.video_cfg.video_base_dir": (["env.eval.video_cfg.save_video=true"], "/tmp/v"),
    "env.train.video_cfg.save_video": ([], True),
    "rollout.engine": ([], "vllm"),
    "rollout.weight_sync": (["rollout.engine=vllm"], "lora"),
    "rollout.pipeline_stage_num": ([], 2),
    "rollout.replicas": ([], 2),
    "rollout.addresses": ([], ["10.0.0.1:50052"]),
    "rollout.precision": ([], "bf16"),
    "rollout.sampling_params.temperature_eval": (EVAL, 0.0),
    "actor.model.model_type": ([], None),
    "actor.model.model_path": ([], "/data/openvla-7b"),
    "actor.model.num_action_chunks": (OFT, 4),
    "actor.model.unnorm_key": ([], "bridge_orig"),
    "actor.model.precision": ([], "bf16"),
    "actor.model.action_dim": ([], 6),
    "actor.lora.targets": ([], ["llm"]),
    "actor.micro_batch_size": ([], 4),
    "actor.global_batch_size": ([], 8),
    "actor.fsdp_config.world_size": ([], 2),
    "actor.fsdp_config.backend": ([], "gloo"),
    "actor.fsdp_config.sharding_strategy": ([], "shard_grad_op"),
    "actor.checkpoint_dir": ([], "/tmp/ckpt"),
    "buffer.backend": ([], "memory"),
    "buffer.url": ([], "redis://10.0.0.2:6379/0"),
    "buffer.stream": ([], "other:segments"),
    "buffer.group": ([], "other"),
    "buffer.maxlen": ([], None),
}

# Keys whose meaning is a combination: the change below (from the default context) must show.
JOINT: dict[str, list[str]] = {
    "algorithm.adv_type": GRPO,
    "algorithm.loss_type": GRPO,
    "actor.model.model_type": OFT,
}

# RLinf's keys kept so its configs load; only the default is supported, every other value is
# refused (the reason is in the field's docstring and in the error).
REFUSED: dict[str, tuple[list[str], object]] = {
    "cluster.num_nodes": ([], 2),
    "env.train.auto_reset": ([], False),
    "env.eval.auto_reset": ([], False),
    "env.train.env_type": ([], "libero"),
    "env.eval.env_type": ([], "libero"),
    "rollout.sampling_params.top_k": ([], 50),
    "actor.lora.path": ([], "/data/sft-lora"),
    "algorithm.reward_type": (OFT, "action_level"),
}


def leaf_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _get(cfg: TrainConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _auto_change(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, str):
        return value + "-changed"
    raise AssertionError(f"no automatic change for {value!r}: add the key to PROBES")


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def observe(cfg: TrainConfig) -> dict:
    """What `vla-rl train` would start for this config (minus the live side effects: ports come
    from a counter, the model and buffer are named rather than created)."""
    ports = itertools.count(50000)
    plan = launch_plan(
        cfg,
        num_gpus=8,
        model_path=cfg.actor.model.model_path or "/run/tiny_model",
        buffer_url=cfg.buffer.url or f"{buffer_kind(cfg, redis_installed=True)}://local",
        port=lambda kind: next(ports),
    )
    return {
        "tiny_model": tiny_model_spec(cfg),
        "buffer": buffer_kind(cfg, redis_installed=True),
        "rollout": plan.rollout,
        "env": plan.env,
        "learner_process": plan.learner,
        "collection": plan.collection,
        "evaluation": plan.evaluation,
        "evaluation_servers": plan.evaluation_servers,
        "learner": learner_plan(plan.config),
    }


def test_every_leaf_is_probed_or_refused():
    keys = set(leaf_keys())
    listed = set(PROBES) | set(REFUSED)
    assert not listed - keys, f"probes for keys that do not exist: {sorted(listed - keys)}"
    for key in sorted(keys - listed):
        _auto_change(_get(TrainConfig(), key))  # raises if the key needs an explicit probe


@pytest.mark.parametrize("key", [k for k in leaf_keys() if k not in REFUSED])
def test_changing_a_key_changes_what_is_started(key):
    context, new = PROBES.get(key, ([], None))
    base = load_config(None, context)
    if key in JOINT:
        changed = load_config(None, context + JOINT[key])
    else:
        if key not in PROBES:
            new = _auto_change(_get(base, key))
        changed = load_config(None, context + [f"{key}={_yaml(new)}"])
        assert _get(changed, key) != _get(base, key), "the probe does not change the key"
    before, after = observe(base), observe(changed)
    assert before != after, f"{key} changed but nothing vla-rl train starts or computes did"


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_unsupported_values_are_refused_naming_the_key(key):
    context, value = REFUSED[key]
    load_config(None, context)  # the default is accepted
    with pytest.raises(ConfigError) as err:
        load_config(None, context + [f"{key}={_yaml(value)}"])
    assert key in str(err.value)


@pytest.mark.parametrize("engine", ["torch", "vllm"])
def test_rollout_flags_from_the_plan_reach_the_engine(engine):
    """The last hop of rollout.* keys: the flags launch_plan writes, parsed by the rollout server,
    become the engine's constructor arguments (rollout.precision once never reached vLLM)."""
    from services.rollout_server.main import engine_options, parse_args

    cfg = load_config(None, [f"rollout.engine={engine}", "rollout.precision=bf16"])
    (rollout,) = observe(cfg)["rollout"]
    args = parse_args(rollout.args[2:])  # after "-m services.rollout_server.main"
    options = engine_options(args)
    assert options.get("precision", options.get("dtype")) in ("bf16", "bfloat16")
    if engine == "vllm":
        assert options["gpu_memory_utilization"] == cfg.rollout.gpu_memory_utilization
        assert options["max_batch_size"] == cfg.rollout.max_batch_size


def test_task_modules_reach_the_env_servers_allow_list():
    """env.*.task_modules become every env server's --task-modules: a server imports only the
    modules it was started with, whatever a request names."""
    import argparse

    cfg = load_config(
        None, ["env.train.task_modules=[my_tasks]", "env.eval.task_modules=[my_eval_tasks]"]
    )
    for env in observe(cfg)["env"]:
        flags = argparse.ArgumentParser()
        flags.add_argument("--task-modules", nargs="*", default=[])
        parsed, _ = flags.parse_known_args(env.args[2:])
        assert parsed.task_modules == ["my_eval_tasks", "my_tasks"]
    assert all("--task-modules" not in e.args for e in observe(load_config(None, []))["env"])
