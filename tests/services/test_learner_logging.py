"""The learner's metric backends: TensorBoard and W&B (offline mode, the real library)."""

from __future__ import annotations

from pathlib import Path

from services.learner.main import learner_plan, make_metric_logger
from vla_rl.config import load_config, to_dict


def test_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        None,
        [
            f"runner.logger.log_path={tmp_path}",
            "runner.logger.experiment_name=logs",
            "runner.logger.logger_backends=[tensorboard,wandb]",
        ],
    )
    Path(cfg.run_dir).mkdir(parents=True)
    log_metrics, close = make_metric_logger(learner_plan(cfg).logger, to_dict(cfg))
    log_metrics({"train/actor/approx_kl": 0.01, "env/success_once": 0.25}, 1)
    log_metrics({"train/actor/approx_kl": 0.02, "env/success_once": 0.5}, 2)
    close()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(cfg.run_dir) / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("env/success_once")] == [0.25, 0.5]
    runs = list((Path(cfg.run_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run holds no history file"
