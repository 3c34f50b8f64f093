"""The training config: example files, overrides, error messages, placement, cross-section checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from vla_rl.config import (
    AlgorithmConfig,
    ConfigError,
    TrainConfig,
    dump_yaml,
    load_config,
    parse_placement,
    resolve_placement,
    tiny_cpu_default,
    to_dict,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "embodiment" / "config"
EXAMPLES = sorted(CONFIG_DIR.glob("*.yaml"))
NAMED = [f"maniskill_{a}_{m}" for a in ("ppo", "grpo") for m in ("openvla", "openvlaoft")]


def error_of(path=None, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value


# ------------------------------------------------------------------------------------- examples


def test_the_named_examples_are_all_there():
    assert {p.stem for p in EXAMPLES} >= {*NAMED, "tiny_cpu_ppo"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg.runner.logger.experiment_name == path.stem
    dumped = tmp_path / "resolved.yaml"
    dump_yaml(cfg, dumped)
    assert load_config(dumped) == cfg


def test_tiny_example_is_the_embedded_default():
    assert load_config(CONFIG_DIR / "tiny_cpu_ppo.yaml") == tiny_cpu_default() == load_config()
    cfg = tiny_cpu_default()
    assert cfg.actor.model.model_path is None
    assert cfg.cluster.resolve(num_gpus=0) == {"env": "cpu", "rollout": "cpu", "actor": "cpu"}
    assert cfg.rollout.engine == "torch" and cfg.buffer.backend == "auto"
    assert cfg.env.train.task_ids == ["PickCube-v1"] and cfg.env.train.total_num_envs == 2
    assert cfg.runner.max_epochs == 2


def test_named_examples_carry_rlinf_settings():
    ppo = load_config(CONFIG_DIR / "maniskill_ppo_openvla.yaml")
    algo = ppo.algorithm
    assert (algo.adv_type, algo.loss_type, algo.group_size) == ("gae", "actor_critic", 1)
    assert (algo.gamma, algo.gae_lambda, algo.value_clip, algo.clip_ratio_c) == (
        0.99,
        0.95,
        0.2,
        3.0,
    )
    assert (algo.clip_ratio_low, algo.clip_ratio_high, algo.huber_delta) == (0.2, 0.2, 10.0)
    assert ppo.actor.lora.rank == 32 and ppo.actor.model.precision == "bf16"
    assert (ppo.actor.optim.lr, ppo.actor.optim.value_lr) == (1e-4, 3e-3)
    assert (ppo.actor.micro_batch_size, ppo.actor.global_batch_size) == (80, 640)
    assert ppo.rollout.precision == "bf16"  # follows actor.model.precision
    assert ppo.rollout.sampling_params.temperature_eval == 0.6
    assert ppo.decisions_per_iteration == 128 * 160
    assert ppo.actor_world_size(num_gpus=8) == 8

    oft = load_config(CONFIG_DIR / "maniskill_ppo_openvlaoft.yaml")
    assert oft.actor.model.model_type == "openvla_oft" and oft.actor.model.num_action_chunks == 8
    assert oft.rollout.engine == "torch" and oft.algorithm.logprob_type == "token_level"
    assert oft.decisions_per_iteration == 128 * 160 // 8

    grpo = load_config(CONFIG_DIR / "maniskill_grpo_openvla.yaml")
    assert (grpo.algorithm.adv_type, grpo.algorithm.group_size) == ("grpo", 8)
    assert grpo.actor.optim.lr == 1e-5 and grpo.rollout.sampling_params.top_k == 0
    assert grpo.algorithm.normalize_advantages is False  # group advantages are normalised already
    assert ppo.algorithm.normalize_advantages is True

    grpo_oft = load_config(CONFIG_DIR / "maniskill_grpo_openvlaoft.yaml")
    assert grpo_oft.cluster.resolve(8)["env"] == list(range(8))


# ------------------------------------------------------------------------------------ overrides


def test_overrides_apply_with_yaml_types():
    cfg = load_config(
        CONFIG_DIR / "tiny_cpu_ppo.yaml",
        [
            "actor.optim.lr=1e-5",
            "actor.optim.clip_grad=1",
            "env.train.task_ids=[PickCube-v1,PushCube-v1]",
            "runner.max_epochs=5",
            "algorithm.normalize_advantages=false",
            "actor.model.model_path=/data/openvla-7b",
            "actor.model.unnorm_key=bridge_orig",
            "runner.resume_dir=null",
            "cluster.component_placement={actor: 0, 'rollout,env': cpu}",
        ],
    )
    assert cfg.actor.optim.lr == 1e-5 and isinstance(cfg.actor.optim.lr, float)
    assert cfg.actor.optim.clip_grad == 1.0 and isinstance(cfg.actor.optim.clip_grad, float)
    assert cfg.env.train.task_ids == ["PickCube-v1", "PushCube-v1"]
    assert cfg.runner.max_epochs == 5 and cfg.algorithm.normalize_advantages is False
    assert cfg.actor.model.model_path == "/data/openvla-7b"
    assert cfg.runner.resume_dir is None
    assert cfg.cluster.resolve(1) == {"actor": [0], "rollout": "cpu", "env": "cpu"}


def test_overrides_change_derived_paths_and_round_trip(tmp_path):
    cfg = load_config(None, ["runner.logger.log_path=/tmp/x", "runner.logger.experiment_name=e"])
    assert cfg.actor.checkpoint_dir == "/tmp/x/e/checkpoints"
    assert cfg.env.eval.video_cfg.video_base_dir == "/tmp/x/e/video/eval"
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["actor"]["optim"]["lr"] == cfg.actor.optim.lr


@pytest.mark.parametrize("item", ["noequals", "a..b=1", "=3"])
def test_malformed_override(item):
    assert "key=value" in str(error_of(None, [item]))


def test_override_below_a_value_names_the_value():
    err = error_of(CONFIG_DIR / "tiny_cpu_ppo.yaml", ["runner.max_epochs.x=1"])
    assert err.key == "runner.max_epochs" and "not a section" in str(err)


# --------------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("actr.model.model_path=/x", "actr", "actor"),
        ("actor.optim.lrr=1e-5", "actor.optim.lrr", "actor.optim.lr"),
        ("env.train.total_num_env=4", "env.train.total_num_env", "env.train.total_num_envs"),
        ("runner.logger.zzz=1", "runner.logger.zzz", None),
    ],
)
def test_unknown_override_key_names_it(override, key, suggestion):
    err = error_of(None, [override])
    assert err.key == key
    assert "unknown key" in str(err) and "override" in str(err)
    if suggestion:
        assert repr(suggestion) in str(err)


def test_unknown_keys_in_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rolout:\n  engine: torch\nactor:\n  optim:\n    betas: 0.9\n")
    err = error_of(path)
    assert err.key == "rolout" and "'rollout'" in str(err) and str(path) in str(err)
    assert "'actor.optim.betas'" in str(err)  # every unknown key in one error


def test_unknown_key_inside_a_mapping_override():
    err = error_of(None, ["actor.optim={lr: 1e-5, lrr: 2}"])
    assert err.key == "actor.optim.lrr"


# ---------------------------------------------------------------------------------- type errors


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("actor.optim.lr=abc", "actor.optim.lr", "a number"),
        ("runner.max_epochs=1.5", "runner.max_epochs", "an integer"),
        ("runner.max_epochs=true", "runner.max_epochs", "an integer"),
        ("algorithm.normalize_advantages=1", "algorithm.normalize_advantages", "a boolean"),
        ("env.train.task_ids=PickCube-v1", "env.train.task_ids", "a list of a string"),
        ("env.train.task_ids=[1]", "env.train.task_ids[0]", "a string"),
        ("runner.logger.experiment_name=null", "runner.logger.experiment_name", "not be null"),
        ("actor.model.model_path=[a]", "actor.model.model_path", "a string or null"),
        ("actor.optim=3", "actor.optim", "a section"),
    ],
)
def test_type_errors_name_key_and_type(override, key, expected):
    err = error_of(None, [override])
    assert err.key == key and expected in str(err)


@pytest.mark.parametrize(
    "override, key",
    [
        ("algorithm.adv_type=ppo2", "algorithm.adv_type"),
        ("rollout.engine=sglang", "rollout.engine"),
        ("env.eval.sim_backend=cuda", "env.eval.sim_backend"),
        ("actor.lora.targets=[llm,head]", "actor.lora.targets[1]"),
        ("runner.logger.logger_backends=[swanlab]", "runner.logger.logger_backends[0]"),
        ("buffer.backend=kafka", "buffer.backend"),
        ("rollout.addresses=[nohost]", "rollout.addresses[0]"),
        ("algorithm.clip_ratio_c=0.5", "algorithm.clip_ratio_c"),
        ("algorithm.reward_scale=0", "algorithm.reward_scale"),
    ],
)
def test_bad_values_name_the_dotted_key(override, key):
    assert error_of(None, [override]).key == key


def test_a_reward_scale_with_grpo_is_refused_as_it_would_do_nothing():
    grpo = ["algorithm.adv_type=grpo", "algorithm.loss_type=actor", "algorithm.group_size=2"]
    err = error_of(None, [*grpo, "algorithm.reward_scale=0.02"])
    assert err.key == "algorithm.reward_scale" and "no effect" in str(err)


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError) as info:
        AlgorithmConfig(adv_type="ppo2")
    assert info.value.key == "adv_type" and "'gae'" in str(info.value)


# -------------------------------------------------------------------------------------- aliases


def test_rlinf_spellings_are_accepted():
    cfg = load_config(
        None,
        [
            "rollout.backend=huggingface",
            "actor.model.lora_rank=16",
            "actor.model.is_lora=true",
            "algorithm.adv_type=embodied_gae",
            "env.train.simulator_type=maniskill",
        ],
    )
    assert cfg.rollout.engine == "torch" and cfg.actor.lora.rank == 16
    assert cfg.algorithm.adv_type == "gae"
    assert "backend" not in to_dict(cfg)["rollout"]


def test_alias_conflicts_and_full_finetuning_are_refused():
    assert error_of(None, ["rollout.backend=vllm", "rollout.engine=torch"]).key == "rollout.backend"
    assert error_of(None, ["actor.model.is_lora=false"]).key == "actor.model.is_lora"


# ------------------------------------------------------------------------------------ placement


def test_placement_parsing():
    assert parse_placement({"actor,rollout,env": "all"}) == {
        "actor": "all",
        "rollout": "all",
        "env": "all",
    }
    assert parse_placement({"actor": "0-3", "rollout": "0,2", "env": "cpu"}) == {
        "actor": (0, 1, 2, 3),
        "rollout": (0, 2),
        "env": "cpu",
    }
    assert parse_placement({"actor": 1})["rollout"] == "cpu"  # left out: CPU
    assert parse_placement({" actor , rollout ": "0-1,4"})["rollout"] == (0, 1, 4)


def test_placement_resolution():
    placement = {"actor": "all", "env": "0-1", "rollout": "2"}
    assert resolve_placement(placement, 4) == {"actor": [0, 1, 2, 3], "env": [0, 1], "rollout": [2]}
    assert resolve_placement({"actor,rollout,env": "cpu"}, 0)["actor"] == "cpu"


@pytest.mark.parametrize(
    "placement, num_gpus, key, words",
    [
        ({"actor": "0-3"}, 2, "cluster.component_placement.actor", "[2, 3]"),
        ({"rollout": "all"}, 0, "cluster.component_placement.rollout", "has none"),
        ({"env": "1"}, 0, "cluster.component_placement.env", "has none"),
        ({"actr": "0"}, 1, "cluster.component_placement.actr", "'actor'"),
        ({"actor,rollout": "0", "actor": "1"}, 2, "cluster.component_placement.actor", "twice"),
        ({"actor": "3-1"}, 4, "cluster.component_placement.actor", "ascending"),
        ({"actor": "gpu0"}, 4, "cluster.component_placement.actor", "GPU rank"),
        ({"actor": "0,0"}, 4, "cluster.component_placement.actor", "more than once"),
        ({"env": "0-3:0-7"}, 4, "cluster.component_placement.env", "not supported"),
    ],
)
def test_impossible_placements(placement, num_gpus, key, words):
    with pytest.raises(ConfigError) as info:
        resolve_placement(placement, num_gpus)
    assert info.value.key == key and words in str(info.value)


def test_bad_placement_in_config_names_the_key():
    err = error_of(None, ["cluster.component_placement={reward: 0}"])
    assert err.key == "cluster.component_placement.reward"


# ------------------------------------------------------------------------------ cross-section


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["actor.model.model_type=openvla_oft"], "actor.model.num_action_chunks"),
        (["actor.model.num_action_chunks=8"], "actor.model.num_action_chunks"),
        (
            [
                "actor.model.model_type=openvla_oft",
                "actor.model.num_action_chunks=8",
                "rollout.engine=vllm",
            ],
            "rollout.engine",
        ),
        (
            ["actor.model.model_type=openvla_oft", "actor.model.num_action_chunks=3"],
            "env.train.max_steps_per_rollout_epoch",
        ),
        (["algorithm.group_size=2"], "algorithm.group_size"),
        (["algorithm.adv_type=grpo"], "algorithm.loss_type"),
        (["algorithm.adv_type=grpo", "algorithm.loss_type=actor"], "algorithm.group_size"),
        (["algorithm.loss_type=actor"], "algorithm.loss_type"),
        (
            ["algorithm.adv_type=grpo", "algorithm.loss_type=actor", "algorithm.group_size=4"],
            "env.train.total_num_envs",
        ),
        (["algorithm.filter_rewards=true"], "algorithm.filter_rewards"),
        (["rollout.pipeline_stage_num=4"], "env.train.total_num_envs"),
        (
            [
                "rollout.pipeline_stage_num=2",
                "env.train.total_num_envs=4",
                "env.eval.total_num_envs=3",
            ],
            "env.eval.total_num_envs",
        ),
        (["env.train.num_servers=2", "env.train.total_num_envs=3"], "env.train.total_num_envs"),
        (["env.train.sim_backend=gpu"], "env.train.sim_backend"),
        (["actor.fsdp_config.backend=nccl"], "actor.fsdp_config.backend"),
        (["actor.global_batch_size=12"], "actor.global_batch_size"),
        (
            [
                "cluster.component_placement={actor: 0-1}",
                "actor.fsdp_config.world_size=4",
                "actor.micro_batch_size=4",
            ],
            "actor.fsdp_config.world_size",
        ),
        (["rollout.addresses=[a:1,b:2]", "rollout.replicas=3"], "rollout.replicas"),
        (["buffer.backend=memory", "buffer.url=redis://localhost:6379/0"], "buffer.url"),
        (["buffer.backend=redis", "buffer.url=memory://localhost:7000"], "buffer.url"),
        (["buffer.url=http://localhost"], "buffer.url"),
        (
            ["algorithm.rewards_lower_bound=0.9", "algorithm.rewards_upper_bound=0.1"],
            "algorithm.rewards_lower_bound",
        ),
    ],
)
def test_cross_section_errors(overrides, key):
    assert error_of(None, overrides).key == key


def test_consistent_grpo_and_oft_settings_load():
    grpo = load_config(
        None,
        [
            "algorithm.adv_type=grpo",
            "algorithm.loss_type=actor",
            "algorithm.group_size=2",
            "algorithm.filter_rewards=true",
            "actor.model.model_type=openvla_oft",
            "actor.model.num_action_chunks=4",
            "cluster.component_placement={env: 0, 'actor,rollout': cpu}",
            "env.train.sim_backend=gpu",
        ],
    )
    assert grpo.decisions_per_iteration == 2 * 8 // 4
    cfg = load_config(None, ["rollout.addresses=[rollout-0:50051,rollout-1:50051]"])
    assert cfg.rollout.replicas == 2
    cfg = load_config(None, ["buffer.backend=memory", "buffer.url=memory://127.0.0.1:7000"])
    assert cfg.buffer.url == "memory://127.0.0.1:7000"


# ---------------------------------------------------------------------------------- composition


def test_defaults_composition(tmp_path):
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "push.yaml").write_text("task_ids: [PushCube-v1]\ntotal_num_envs: 4\n")
    (tmp_path / "base.yaml").write_text("runner:\n  max_epochs: 7\n  seed: 3\n")
    (tmp_path / "main.yaml").write_text(
        "defaults:\n  - base\n  - env/push@env.train\n"
        "runner:\n  seed: 5\nenv:\n  train:\n    total_num_envs: 6\n"
    )
    cfg = load_config(tmp_path / "main.yaml")
    assert (cfg.runner.max_epochs, cfg.runner.seed) == (7, 5)
    assert cfg.env.train.task_ids == ["PushCube-v1"] and cfg.env.train.total_num_envs == 6

    (tmp_path / "self_first.yaml").write_text("defaults: [_self_, base]\nrunner:\n  seed: 5\n")
    assert load_config(tmp_path / "self_first.yaml").runner.seed == 3

    (tmp_path / "loop.yaml").write_text("defaults: [loop]\n")
    assert "includes itself" in str(error_of(tmp_path / "loop.yaml"))


def test_missing_file():
    assert "not found" in str(error_of("/nonexistent/config.yaml"))


def test_default_config_is_a_fresh_object():
    a, b = tiny_cpu_default(), tiny_cpu_default()
    a.env.train.task_ids.append("PushCube-v1")
    assert b.env.train.task_ids == ["PickCube-v1"] and b == TrainConfig()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_the_experiment_flags_make_a_config_that_loads(algorithm):
    """`vla-rl experiment` / rl_gain.py turn their flags into train overrides: every one must load
    and land where it says (--max-staleness is algorithm.max_staleness, which overlaps collection
    with the update)."""
    import argparse

    from vla_rl.experiment import add_arguments, env_overrides, rl_overrides, setup_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    group = ["--group-size", "2", "--envs-per-server", "2"] if algorithm == "grpo" else []
    args = parser.parse_args(["--algorithm", algorithm, "--max-staleness", "1", *group])
    setup = setup_from_args(args, work="/tmp/x")
    overrides = [
        *env_overrides(setup),
        *rl_overrides(setup, algorithm, args.group_size, args.lr, args.update_epochs,
                      args.mini_batches, args.micro_batch, args.temperature,
                      max_staleness=args.max_staleness),
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    assert cfg.algorithm.max_staleness == 1
    assert cfg.algorithm.adv_type == ("grpo" if algorithm == "grpo" else "gae")


def test_rl_gain_set_overrides_land_last(tmp_path):
    """benchmarks/rl_gain.py's --set passes any train key through (a GPU run's one-off setting,
    e.g. GRPO without the learner's recompute) and wins over the flags' own overrides; a bad key
    still fails at load, before any minutes go into a run."""
    from benchmarks.rl_gain import parse_args, train_overrides

    args = parse_args(["rl", "--base", "/tmp/base", "--model", "openvlaoft", "--algorithm", "grpo",
                       "--group-size", "8", "--envs", "8", "--envs-per-server", "8",
                       "--set", "algorithm.recompute_logprobs=false",
                       "--set", "actor.optim.lr=0.002"])  # fmt: skip
    overrides = train_overrides(args, tmp_path / "runs", "grpo_openvlaoft")
    assert overrides[-2:] == ["algorithm.recompute_logprobs=false", "actor.optim.lr=0.002"]
    cfg = load_config(None, overrides)
    assert cfg.algorithm.recompute_logprobs is False
    assert cfg.actor.optim.lr == 0.002  # --lr's default (1e-4) came earlier and lost
    assert cfg.algorithm.group_size == 8 and cfg.env.train.total_num_envs == 64
    bad = parse_args(["rl", "--base", "/tmp/base", "--set", "algorithm.no_such_key=1"])
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(None, train_overrides(bad, tmp_path / "runs", "ppo_openvla"))


def test_critic_warmup_needs_the_critic():
    from vla_rl.config import ConfigError, load_config

    cfg = load_config(None, ["actor.optim.critic_warmup_steps=3"])
    assert cfg.actor.optim.critic_warmup_steps == 3
    grpo = ["algorithm.adv_type=grpo", "algorithm.loss_type=actor", "algorithm.group_size=2",
            "algorithm.normalize_advantages=false", "actor.optim.critic_warmup_steps=3"]  # fmt: skip
    with pytest.raises(ConfigError, match="actor.optim.critic_warmup_steps"):
        load_config(None, grpo)
    with pytest.raises(ConfigError, match="critic_warmup_steps"):
        load_config(None, ["actor.optim.critic_warmup_steps=-1"])
    with pytest.raises(ConfigError, match="value_coef 0.0"):  # a critic that is never trained
        load_config(None, ["actor.optim.critic_warmup_steps=3", "algorithm.value_coef=0"])
