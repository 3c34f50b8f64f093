"""`${key}` interpolation in the config loader, `vla-rl train --print-config` and `--help`."""

from __future__ import annotations

import dataclasses
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import pytest
import yaml

from vla_rl.cli import main
from vla_rl.config import (
    AlgorithmConfig,
    ConfigError,
    TrainConfig,
    describe_config,
    dump_yaml,
    field_docs,
    load_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "embodiment" / "config"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path=None, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value


# ---------------------------------------------------------------------------------- interpolation


def test_whole_value_reference_keeps_the_type(tmp_path):
    path = write(
        tmp_path,
        """
        algorithm:
          gae_lambda: ${algorithm.gamma}
          gamma: 0.9
        runner:
          seed: ${env.train.seed}
        env:
          train:
            seed: 7
            task_ids: [PushCube-v1, StackCube-v1]
          eval:
            task_ids: ${env.train.task_ids}
        """,
    )
    cfg = load_config(path)
    assert cfg.algorithm.gae_lambda == 0.9
    assert cfg.runner.seed == 7 and type(cfg.runner.seed) is int
    assert cfg.env.eval.task_ids == ["PushCube-v1", "StackCube-v1"]


def test_whole_section_reference(tmp_path):
    path = write(
        tmp_path,
        """
        env:
          train: {task_ids: [PushCube-v1], seed: 5}
          eval: ${env.train}
        """,
    )
    cfg = load_config(path)
    assert cfg.env.eval.task_ids == ["PushCube-v1"] and cfg.env.eval.seed == 5


def test_reference_inside_text_is_substituted_as_text(tmp_path):
    path = write(
        tmp_path,
        """
        runner:
          seed: 3
          logger:
            log_path: /tmp/vla
            experiment_name: ppo_seed${runner.seed}_${actor.fsdp_config.gradient_checkpointing}
        actor:
          checkpoint_dir: ${runner.logger.log_path}/ckpt
        """,
    )
    cfg = load_config(path)
    assert cfg.runner.logger.experiment_name == "ppo_seed3_false"
    assert cfg.actor.checkpoint_dir == "/tmp/vla/ckpt"


def test_references_chain_in_any_order(tmp_path):
    path = write(
        tmp_path,
        """
        algorithm:
          clip_ratio_high: ${algorithm.clip_ratio_low}
          clip_ratio_low: ${algorithm.value_clip}
          value_clip: 0.3
        """,
    )
    algo = load_config(path).algorithm
    assert algo.clip_ratio_high == algo.clip_ratio_low == algo.value_clip == 0.3


def test_reference_to_a_key_only_the_dataclass_sets(tmp_path):
    # env.eval is left out: its default is the eval section's own (seed 1000 unless changed).
    cfg = load_config(None, ["runner.max_epochs=${env.eval.seed}"])
    assert cfg.runner.max_epochs == TrainConfig().env.eval.seed
    assert cfg.runner.max_epochs != 2
    path = write(
        tmp_path,
        """
        runner:
          logger:
            experiment_name: lr${actor.optim.lr}_rank${actor.lora.rank}
        """,
    )
    defaults = TrainConfig()
    assert load_config(path).runner.logger.experiment_name == (
        f"lr{defaults.actor.optim.lr}_rank{defaults.actor.lora.rank}"
    )


def test_default_of_a_section_given_in_part_is_the_one_it_is_built_with():
    # A section written in the config is built from its class defaults: the reference agrees.
    cfg = load_config(None, ["env.eval.total_num_envs=4", "runner.seed=${env.eval.seed}"])
    assert cfg.runner.seed == cfg.env.eval.seed


def test_references_in_overrides_and_override_order():
    cfg = load_config(None, ["algorithm.gae_lambda=${algorithm.gamma}", "algorithm.gamma=0.5"])
    assert cfg.algorithm.gae_lambda == 0.5


def test_references_see_overrides_defaults_files_and_aliases(tmp_path):
    write(tmp_path, "algorithm:\n  gamma: 0.7\n", name="base.yaml")
    path = write(
        tmp_path,
        """
        defaults: [base, _self_]
        algorithm:
          gae_lambda: ${algorithm.gamma}
        rollout:
          backend: torch
        runner:
          logger:
            experiment_name: run_${rollout.engine}
        """,
    )
    cfg = load_config(path)
    assert cfg.algorithm.gae_lambda == 0.7
    assert cfg.runner.logger.experiment_name == "run_torch"
    assert load_config(path, ["algorithm.gamma=0.8"]).algorithm.gae_lambda == 0.8


@pytest.mark.parametrize("via_file", [True, False])
def test_cycle_is_an_error_naming_the_key(tmp_path, via_file):
    overrides = [
        "algorithm.gamma=${algorithm.gae_lambda}",
        "algorithm.gae_lambda=${algorithm.gamma}",
    ]
    if via_file:
        err = error_of(
            write(
                tmp_path,
                """
                algorithm:
                  gamma: ${algorithm.gae_lambda}
                  gae_lambda: ${algorithm.gamma}
                """,
            )
        )
    else:
        err = error_of(overrides=overrides)
    assert err.key in ("algorithm.gamma", "algorithm.gae_lambda")
    assert "cycle" in str(err) and "algorithm.gamma" in str(err)


def test_self_reference_is_a_cycle():
    err = error_of(overrides=["runner.seed=${runner.seed}"])
    assert err.key == "runner.seed" and "cycle" in str(err)


@pytest.mark.parametrize("via_file", [True, False])
def test_missing_reference_names_the_key_and_the_path(tmp_path, via_file):
    if via_file:
        err = error_of(write(tmp_path, "runner:\n  seed: ${runner.sed}\n"))
    else:
        err = error_of(overrides=["runner.seed=${runner.sed}"])
    assert err.key == "runner.seed"
    assert "runner.sed" in err.detail


def test_missing_reference_inside_text_names_the_key():
    err = error_of(overrides=["runner.logger.experiment_name=run_${algorithm.nope}"])
    assert err.key == "runner.logger.experiment_name" and "algorithm.nope" in err.detail


def test_reference_below_a_plain_mapping_does_not_fall_back_to_its_default():
    # component_placement is replaced as a whole, so its default entries are gone.
    err = error_of(
        overrides=[
            "cluster.component_placement={env: cpu}",
            "runner.logger.experiment_name=${cluster.component_placement.actor,rollout,env}",
        ]
    )
    assert err.key == "runner.logger.experiment_name"


@pytest.mark.parametrize(
    "value, words",
    [
        ("run_${env.train.task_ids}", "list"),
        ("run_${env.train}", "section"),
        ("${}", "dotted key"),
        ("${runner..seed}", "dotted key"),
    ],
)
def test_bad_references_name_the_key(value, words):
    err = error_of(overrides=[f"runner.logger.experiment_name={value}"])
    assert err.key == "runner.logger.experiment_name" and words in err.detail


def test_unknown_keys_stay_errors_with_references():
    err = error_of(overrides=["runner.bogus=${runner.seed}"])
    assert err.key == "runner.bogus" and "unknown key" in err.detail
    # A section put where another kind of section goes brings keys that are unknown there.
    err = error_of(overrides=["env.eval=${actor.lora}"])
    assert err.key.startswith("env.eval.") and "unknown key" in err.detail


def test_escaped_reference_is_literal_text_and_round_trips(tmp_path):
    path = write(tmp_path, "runner:\n  logger:\n    experiment_name: '\\${runner.seed}'\n")
    cfg = load_config(path)
    assert cfg.runner.logger.experiment_name == "${runner.seed}"
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_no_references_changes_nothing():
    assert load_config(CONFIG_DIR / "tiny_cpu_ppo.yaml") == TrainConfig()


# ----------------------------------------------------------------------------------- print-config


def test_print_config_prints_the_resolved_config_and_starts_nothing(capsys, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("--print-config started training")

    monkeypatch.setattr("vla_rl.launch.train", no_training)
    path = CONFIG_DIR / "maniskill_ppo_openvla.yaml"
    overrides = ["runner.max_epochs=7", "algorithm.gae_lambda=${algorithm.gamma}"]
    assert main(["train", "--config", str(path), "--print-config", *overrides]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    printed = yaml.safe_load(out)
    assert printed["runner"]["max_epochs"] == 7
    assert printed["algorithm"]["gae_lambda"] == printed["algorithm"]["gamma"]
    assert "${" not in out
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(out)
    assert load_config(dumped) == load_config(path, overrides)


def test_print_config_of_the_default_run(capsys, tmp_path):
    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(out)
    assert load_config(tmp_path / "printed.yaml") == TrainConfig()


@pytest.mark.parametrize(
    "overrides", [["runner.bogus=1"], ["runner.seed=${runner.missing}"], ["runner.seed=x"]]
)
def test_print_config_reports_config_errors(capsys, overrides):
    assert main(["train", "--print-config", *overrides]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("config error: runner.")


# ------------------------------------------------------------------------------------------- help


def section_of(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        return next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def walk(cls, prefix=""):
    """(section class, dotted prefix) of every section, and (class, field, dotted key) of leaves."""
    sections, leaves = [], []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        section = section_of(hints[f.name])
        if section is None:
            leaves.append((cls, f, key))
        else:
            sections.append((section, key))
            more_sections, more_leaves = walk(section, key)
            sections += more_sections
            leaves += more_leaves
    return sections, leaves


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def train_help():
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    return buffer.getvalue()


def test_help_explains_a_key_with_its_docstring(train_help):
    assert "--print-config" in train_help
    gamma = AlgorithmConfig().gamma
    assert (
        f"  algorithm.gamma (float, default {gamma}): Discount factor per decision." in train_help
    )


def test_help_lists_every_leaf_key_with_its_docstring(train_help):
    sections, leaves = walk(TrainConfig)
    assert len(leaves) > 50
    text = flat(train_help)
    for cls, f, key in leaves:
        doc = field_docs(cls).get(f.name)
        assert doc, f"{key} has no docstring in the schema"
        assert f"\n  {key} (" in train_help, key
        assert flat(doc) in text, key
    for cls, prefix in sections:
        assert f"\n{prefix}: " in train_help, prefix
        assert flat(cls.__doc__) in text, prefix
    assert "(undocumented)" not in train_help


def test_help_lines_are_wrapped():
    assert max(len(line) for line in describe_config().splitlines()) <= 100


@dataclass
class _Documented:
    """A section."""

    plain: int = 1
    """One line."""
    multi: list[str] = dataclasses.field(default_factory=list)
    """First line,
    second line."""
    bare: float = 2.0

    def method(self) -> None:
        """Not a field."""


def test_field_docs_reads_the_literals_after_fields():
    assert field_docs(_Documented) == {"plain": "One line.", "multi": "First line,\nsecond line."}
    assert field_docs(AlgorithmConfig)["gamma"] == "Discount factor per decision."


def test_collect_demos_passes_its_flags_to_the_env_servers_collector(capfd):
    from vla_rl.cli import main

    assert main(["collect-demos", "--help"]) == 0
    assert "--task" in capfd.readouterr().out
    assert main(["collect-demos", "--task", "NoSuchTask-v9", "--episodes", "1", "--out", "/tmp/x"])
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag"])


def test_a_section_given_in_part_keeps_its_own_defaults():
    """env.eval's default seed is 1000 (not the training envs' 0). Overriding any other env.eval
    key used to rebuild the section from EnvSectionConfig's class defaults, so evaluation quietly
    replayed the training starts from seed 0."""
    assert TrainConfig().env.eval.seed == 1000
    cfg = load_config(None, ["env.eval.num_servers=1"])
    assert cfg.env.eval.seed == 1000
    assert cfg.env.train.seed == 0
    assert load_config(None, ["env.eval.seed=7"]).env.eval.seed == 7
    # An interpolation sees the same default.
    ref = load_config(None, ["env.eval.num_servers=1", "runner.max_epochs=${env.eval.seed}"])
    assert ref.runner.max_epochs == 1000
