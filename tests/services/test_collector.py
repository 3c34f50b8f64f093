"""The env server's collection loop against a real rollout server (subprocess, torch engine) and
real ManiSkill3 envs: segment layout, pipeline stages, GRPO groups and OFT action chunks."""

from __future__ import annotations

import numpy as np
import pytest

from services.env_server.collector import CollectionConfig, Collector
from services.env_server.env_pool import EnvPoolConfig
from tests.helpers.procs import ServiceProcess
from vla_rl.buffer.memory import MemoryBuffer
from vla_rl.models import tiny_config
from vla_rl.models.tiny import write_tiny_checkpoint
from vla_rl.rpc.rollout_client import RolloutClient

pytestmark = pytest.mark.slow


def _rollout(tmp_path_factory, name: str, config):
    root = tmp_path_factory.mktemp(name)
    ckpt = write_tiny_checkpoint(root / "ckpt", config, seed=0)
    proc = ServiceProcess("services.rollout_server.main", ["--checkpoint", str(ckpt)], root, name)
    proc.wait_healthy()
    return proc


@pytest.fixture(scope="module")
def openvla_rollout(tmp_path_factory):
    proc = _rollout(tmp_path_factory, "openvla", tiny_config())
    client = RolloutClient(proc.target)
    yield client
    client.close()
    proc.stop()


@pytest.fixture(scope="module")
def oft_rollout(tmp_path_factory):
    proc = _rollout(tmp_path_factory, "oft", tiny_config(decoding="parallel", action_chunk=2))
    client = RolloutClient(proc.target)
    yield client
    client.close()
    proc.stop()


def _collect(client: RolloutClient, **kw) -> list:
    pool = EnvPoolConfig(
        task_ids=kw.pop("task_ids", ["PickCube-v1"]),
        num_envs=kw.pop("num_envs", 2),
        max_episode_steps=kw.pop("max_episode_steps", 3),
        worker_mode="in_process",
    )
    config = CollectionConfig(
        run_id="t", server_id="env0", pool=pool, max_staleness=5, action_chunk=1, **kw
    )
    config.action_chunk = int(client.policy().action_chunk)
    config.__post_init__()
    buffer = MemoryBuffer(stream=f"s{id(config)}")
    collector = Collector(
        config,
        act=client.act_async,
        current_version=lambda: int(client.policy().policy_version),
        buffer=buffer,
    )
    stats = collector.run()
    assert stats.state == "idle", stats.error
    got = buffer.take(100, timeout_s=1.0)
    return sorted((r.segment for r in got), key=lambda s: s.segment_id)


def test_segments_with_two_pipeline_stages(openvla_rollout):
    segments = _collect(openvla_rollout, pipeline_stage_num=2, iterations=2)
    assert [s.segment_id for s in segments] == [
        "t-env0-0-0",
        "t-env0-0-1",
        "t-env0-1-0",
        "t-env0-1-1",
    ]
    for s in segments:
        assert s.images.shape == (3, 224, 224, 3) and s.action_tokens.shape == (3, 7)
        assert s.behaviour_logprobs.shape == (3, 7) and (s.behaviour_logprobs < 0).all()
        assert s.policy_version == 0 and s.group_id == -1
        # The time limit falls on the segment's last step, where the bootstrap image is the
        # final observation of the episode (not the auto-reset one).
        assert s.truncated.tolist() == [False, False, True] or s.terminated.any()
        assert s.bootstrap_image.shape == (224, 224, 3)
        assert [e["episode_len"] for e in s.episodes] == [3] or s.terminated.any()
    # Different envs and iterations start from different scenes.
    firsts = [s.images[0] for s in segments]
    assert not np.array_equal(firsts[0], firsts[1]) and not np.array_equal(firsts[0], firsts[2])


def test_grpo_group_members_share_their_start(openvla_rollout):
    segments = _collect(openvla_rollout, group_size=2, iterations=1, num_envs=4)
    assert [s.group_id for s in segments] == [0, 0, 1, 1]
    np.testing.assert_array_equal(segments[0].images[0], segments[1].images[0])
    np.testing.assert_array_equal(segments[2].images[0], segments[3].images[0])
    assert not np.array_equal(segments[0].images[0], segments[2].images[0])


def test_oft_chunks_step_the_env_c_times(oft_rollout):
    segments = _collect(oft_rollout, iterations=1, num_envs=1, max_episode_steps=4)
    (s,) = segments
    assert s.action_tokens.shape == (2, 14)  # 4 env steps = 2 decisions of 2 actions
    assert s.truncated.tolist() == [False, True] or s.terminated.any()
    assert [e["episode_len"] for e in s.episodes] == [4] or s.terminated.any()


def _video_frames(path) -> list[np.ndarray]:
    """RGB frames of an MP4, read back with OpenCV."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        ok, frame = capture.read()
    capture.release()
    return frames


def test_training_video_is_env0_observations(openvla_rollout, tmp_path):
    """One MP4 per iteration of env 0 of stage 0: its segment's T images, then the bootstrap
    image (T+1 frames, mpeg4 is lossy), with the step/reward/success band when info_on_video."""
    plain, labelled = tmp_path / "plain", tmp_path / "labelled"
    segments = _collect(
        openvla_rollout, pipeline_stage_num=2, iterations=2, video_dir=str(plain),
        info_on_video=False,
    )  # fmt: skip
    assert sorted(p.name for p in (plain / "env0").iterdir()) == [
        "iter00000_env0.mp4",
        "iter00001_env0.mp4",
    ]
    for iteration in (0, 1):
        (seg,) = [s for s in segments if s.segment_id == f"t-env0-{iteration}-0"]
        expected = [*seg.images, seg.bootstrap_image]
        frames = _video_frames(plain / "env0" / f"iter{iteration:05d}_env0.mp4")
        assert len(frames) == len(seg.images) + 1 == 4
        for got, want in zip(frames, expected, strict=True):
            assert np.abs(got.astype(int) - want.astype(int)).mean() < 8
        # Env 0's scene, not env 1's (of stage 1).
        (other,) = [s for s in segments if s.segment_id == f"t-env0-{iteration}-1"]
        own_diff = np.abs(frames[0].astype(int) - seg.images[0].astype(int)).mean()
        assert own_diff < np.abs(frames[0].astype(int) - other.images[0].astype(int)).mean()

    segments = _collect(
        openvla_rollout, iterations=1, num_envs=1, video_dir=str(labelled), info_on_video=True
    )
    frames = _video_frames(labelled / "env0" / "iter00000_env0.mp4")
    want = [*segments[0].images, segments[0].bootstrap_image]
    assert len(frames) == 4
    for got, ref in zip(frames, want, strict=True):
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff[:14].mean() > 50 and diff[20:].mean() < 8  # the text band, the scene below


def test_no_training_video_without_video_dir(openvla_rollout, tmp_path, monkeypatch):
    import services.env_server.collector as collector

    written = []
    monkeypatch.setattr(collector, "write_video", lambda path, frames: written.append(path))
    monkeypatch.chdir(tmp_path)
    for video_dir in ("", None):
        _collect(openvla_rollout, iterations=1, num_envs=1, video_dir=video_dir)
    assert written == [] and list(tmp_path.rglob("*")) == []


def _collect_with_dying_worker(client: RolloutClient, kill_on_calls: set[int]):
    """Collect 2 iterations of 2 envs in subprocess workers; before the Act calls numbered in
    kill_on_calls (from 0), env worker 1 is killed as the kernel's OOM killer would (SIGKILL)."""
    import os
    import signal

    from services.env_server.env_pool import EnvPool

    pools: list[EnvPool] = []

    def make_pool(cfg: EnvPoolConfig) -> EnvPool:
        pools.append(EnvPool(cfg))
        return pools[-1]

    calls = {"n": 0}
    first_pids: list[int] = []

    def act(images, instructions, temperature):
        if calls["n"] in kill_on_calls:
            proc = pools[0]._backend.procs[1]
            first_pids.append(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=10)
        calls["n"] += 1
        return client.act_async(images, instructions, temperature)

    pool = EnvPoolConfig(
        task_ids=["PickCube-v1"], num_envs=2, max_episode_steps=3, worker_mode="subprocess"
    )
    config = CollectionConfig(
        run_id="t", server_id="env0", pool=pool, max_staleness=5, action_chunk=1, iterations=2
    )
    buffer = MemoryBuffer(stream=f"s{id(config)}")
    collector = Collector(
        config,
        act=act,
        current_version=lambda: int(client.policy().policy_version),
        buffer=buffer,
        make_pool=make_pool,
    )
    return collector.run(), buffer, first_pids


def test_a_dead_env_worker_is_replaced_and_its_iteration_collected_again(openvla_rollout):
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("vla_rl_env_worker_restarts_total") or 0.0
    # Call 1 is iteration 0's second decision: the step after it finds worker 1 dead.
    stats, buffer, killed = _collect_with_dying_worker(openvla_rollout, kill_on_calls={1})
    assert stats.state == "idle", stats.error
    assert REGISTRY.get_sample_value("vla_rl_env_worker_restarts_total") == before + 1
    segments = sorted(
        (r.segment for r in buffer.take(100, timeout_s=1.0)), key=lambda s: s.segment_id
    )
    # Both iterations whole, each segment once: the interrupted iteration was collected again.
    assert [s.segment_id for s in segments] == [
        "t-env0-0-0",
        "t-env0-0-1",
        "t-env0-1-0",
        "t-env0-1-1",
    ]
    assert all(s.action_tokens.shape == (3, 7) for s in segments)
    assert len(killed) == 1


def test_an_env_worker_that_keeps_dying_fails_the_collection(openvla_rollout, monkeypatch):
    from services.env_server import collector as collector_module

    monkeypatch.setattr(collector_module, "MAX_WORKER_RESTARTS", 1)
    # Killed in iteration 0's first attempt (before its Act call 1) and again in its second
    # attempt, whose Act calls are 2, 3 and 4 (call 4 is its third decision).
    stats, buffer, killed = _collect_with_dying_worker(openvla_rollout, kill_on_calls={1, 4})
    assert stats.state == "failed"
    assert "env workers died in 2 attempts at one iteration" in stats.error
    assert "env worker 1 (PickCube-v1)" in stats.error
    assert buffer.take(100, timeout_s=0.2) == []
    assert len(killed) == 2
