"""benchmarks/inprocess_loop.py's baseline (the loop without the services) must train the same
config the same way, or the price of the services it measures means nothing."""

from __future__ import annotations

import pytest

from benchmarks.inprocess_loop import in_process, in_process_config, steady_rate


@pytest.mark.slow
def test_the_loop_in_one_process_trains_the_tiny_default(tmp_path):
    """Two iterations of the embedded default (2 envs x 8 steps) through the services' own
    pieces in this process: each iteration trains on all its env steps and the engine ends up
    serving the learner's last version, pushed without gRPC."""
    # A broken in-process publish would leave the collectors waiting: fail within a minute.
    overrides = ["runner.max_epochs=2", "runner.logger.experiment_name=t",
                 "runner.segment_timeout_s=60"]  # fmt: skip
    r = in_process(overrides, 0, tmp_path)
    assert r["env_steps"] == [16.0, 16.0]
    assert r["served_policy_version"] == 2
    assert r["steady_env_steps_per_s"] == pytest.approx(16.0 / r["iteration_s"][1])
    assert (tmp_path / "t" / "checkpoints" / "global_step_2").is_dir()


def test_the_steady_rate_leaves_out_the_first_iteration():
    assert steady_rate([10, 20, 20], [100.0, 2.0, 2.0]) == 10.0
    with pytest.raises(SystemExit, match="at least 2 iterations"):
        steady_rate([10], [1.0])


@pytest.mark.parametrize("override", ["runner.val_check_interval=1", "runner.resume_dir=/tmp/x"])
def test_what_the_in_process_loop_would_ignore_is_refused(override, tmp_path):
    with pytest.raises(SystemExit, match=override.split("=")[0]):
        in_process_config([override], 0, tmp_path)
