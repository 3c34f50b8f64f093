"""The rollout server's dynamic batcher on the real torch engine (tiny checkpoint): requests with
the same sampling settings share one engine call, also when requests with other settings
(greedy evaluation beside sampled training) arrive in between."""

from __future__ import annotations

import numpy as np
import pytest

from services.rollout_server.batcher import DynamicBatcher
from services.rollout_server.engines.torch_engine import TorchEngine
from vla_rl.models.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return TorchEngine(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt"))


def _obs(n: int = 1):
    images = np.random.default_rng(0).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    return images, ["pick up the red cube"] * n


def test_held_requests_are_batched_together(engine):
    # A long wait, so every request below is queued before the first engine call ends.
    batcher = DynamicBatcher(engine, max_batch_size=64, max_wait_ms=500)
    try:
        futures = [batcher.submit(*_obs(), greedy=True)]  # evaluation
        futures += [batcher.submit(*_obs(), temperature=1.0) for _ in range(8)]  # training
        futures += [batcher.submit(*_obs(), greedy=True) for _ in range(3)]  # evaluation
        outputs = [f.result(timeout=120) for f in futures]
    finally:
        batcher.close()
    assert all(o.action_tokens.shape[0] == 1 for o in outputs)
    # The 4 greedy requests in one call, then the 8 held sampled ones in one call (before the
    # fix: 8 calls of one observation each).
    assert list(batcher.batch_sizes) == [4, 8]
    assert batcher.most_requests_merged == 8


def test_held_requests_respect_the_batch_limit(engine):
    batcher = DynamicBatcher(engine, max_batch_size=3, max_wait_ms=500)
    try:
        futures = [batcher.submit(*_obs(), greedy=True)]
        futures += [batcher.submit(*_obs(), temperature=1.0) for _ in range(5)]
        for f in futures:
            f.result(timeout=120)
    finally:
        batcher.close()
    assert list(batcher.batch_sizes) == [1, 3, 2]


def test_a_request_larger_than_the_batch_limit_runs_in_slices(engine):
    """One request of 10 observations with max_batch_size 4: three engine calls (it was one
    forward pass of all 10), and the same greedy actions as one call of the whole batch."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 224, 224, 3), dtype=np.uint8)
    instructions = ["pick up the red cube"] * 10
    batcher = DynamicBatcher(engine, max_batch_size=4, max_wait_ms=0)
    try:
        out = batcher.submit(images, instructions, greedy=True).result(timeout=120)
    finally:
        batcher.close()
    assert list(batcher.batch_sizes) == [4, 4, 2]
    whole = engine.act(images, instructions, greedy=True)
    np.testing.assert_array_equal(out.action_tokens, whole.action_tokens)
    np.testing.assert_allclose(out.logprobs, whole.logprobs, atol=1e-5)
    assert out.policy_version == whole.policy_version
