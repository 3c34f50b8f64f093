"""The rollout server as a real subprocess on loopback (torch engine, tiny checkpoint)."""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from tests.helpers.procs import ServiceProcess
from vla_rl.models import ActionTokenizer, load_policy
from vla_rl.models.config import tiny_config
from vla_rl.models.lora import LoRASettings, apply_lora, serialize_adapter
from vla_rl.models.tiny import write_tiny_checkpoint
from vla_rl.rpc.gen.v1 import rollout_pb2
from vla_rl.rpc.rollout_client import RolloutClient, adapter_chunks
from vla_rl.rpc.tensors import to_tensor


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    ckpt = write_tiny_checkpoint(root / "ckpt", seed=3)
    proc = ServiceProcess(
        "services.rollout_server.main",
        ["--checkpoint", str(ckpt), "--engine", "torch", "--max-wait-ms", "50"],
        root,
        "rollout",
    )
    try:
        proc.wait_healthy()
        yield proc, ckpt
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    c = RolloutClient(server[0].target)
    yield c
    c.close()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def _lora_copy(ckpt, scale: float = 0.05):
    policy = load_policy(ckpt)
    apply_lora(policy, LoRASettings(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    return policy


def test_act_returns_tokens_actions_and_logprobs(client):
    out = client.act(_images(3), ["pick up the red cube"] * 3, temperature=1.0)
    assert out.action_tokens.shape == (3, 7) and out.logprobs.shape == (3, 7)
    assert out.actions.shape == (3, 1, 7)
    assert ((out.action_tokens >= 31744) & (out.action_tokens < 32000)).all()
    assert (out.logprobs <= 0).all() and np.isfinite(out.logprobs).all()
    expected = ActionTokenizer().decode(out.action_tokens.reshape(3, 1, 7))
    np.testing.assert_allclose(out.actions[..., :6], expected[..., :6], atol=1e-6)  # q01=-1 q99=1
    info = client.policy()
    assert info.engine == "torch" and info.action_chunk == 1 and info.action_dim == 7


def test_greedy_matches_the_local_policy(client, server):
    _, ckpt = server
    images = _images(2, seed=5)
    out = client.act(images, ["push the cube", "pick up the red cube"], greedy=True)
    policy = load_policy(ckpt)
    from vla_rl.models import PromptTokenizer, load_tokenizer

    prompts = PromptTokenizer(load_tokenizer(ckpt))(["push the cube", "pick up the red cube"])
    local = policy.generate(policy.pixel_values(torch.from_numpy(images)), prompts, greedy=True)
    np.testing.assert_array_equal(out.action_tokens, local.action_tokens.numpy())


def _most_requests_merged(log_path) -> int:
    """The most requests one engine call served, as the server's batcher logs it (0: none yet)."""
    found = re.findall(r"dynamic batching: (\d+) requests", log_path.read_text(errors="replace"))
    return max(map(int, found), default=0)


def test_concurrent_calls_are_batched(client, server):
    proc, _ = server
    images = _images(4, seed=1)
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(client.act, images[i % 4 : i % 4 + 1], ["push the cube"], greedy=True)
            for i in range(8)
        ]
        outs = [f.result() for f in futures]
    # Each caller gets its own row back: equal images give equal greedy tokens.
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out.action_tokens, outs[i % 4].action_tokens)
    # The calls shared engine forwards: one engine call served several of these one-observation
    # requests (the other tests of this module send their requests one at a time).
    assert _most_requests_merged(proc.log_path) > 1, proc.log()


@pytest.mark.parametrize(
    "images, instructions, needle",
    [
        (np.zeros((1, 100, 100, 3), np.uint8), ["push the cube"], "shape"),
        (np.zeros((1, 224, 224, 3), np.float32), ["push the cube"], "uint8"),
        (np.zeros((2, 224, 224, 3), np.uint8), ["push the cube"], "instructions"),
        (np.zeros((1, 224, 224, 3), np.uint8), ["   "], "empty"),
    ],
)
def test_bad_act_requests_are_invalid_argument(client, images, instructions, needle):
    req = rollout_pb2.ActRequest(images=to_tensor(images), instructions=instructions)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Act(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


@pytest.mark.parametrize("temperature", [1e-45, 1e-3, 1e9, float("nan")])
def test_sampling_temperature_out_of_range_is_invalid_argument(client, temperature):
    req = rollout_pb2.ActRequest(
        images=to_tensor(_images(1)), instructions=["push the cube"], temperature=temperature
    )
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Act(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in err.value.details()
    # The server still serves.
    assert client.act(_images(1), ["push the cube"], greedy=True).action_tokens.shape[0] == 1


def test_push_adapter_switches_version_and_refuses_bad_ones(client, server):
    _, ckpt = server
    trained = _lora_copy(ckpt)
    before = client.policy().policy_version
    blob = serialize_adapter(trained, before + 1)

    # A corrupted stream: the checksum does not match.
    chunks = list(adapter_chunks(blob, before + 1, chunk_bytes=4096))
    chunks[1] = rollout_pb2.AdapterChunk(data=b"x" * len(chunks[1].data))
    with pytest.raises(grpc.RpcError) as err:
        client.stub.PushAdapter(iter(chunks), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in err.value.details()

    # An adapter for another base model.
    other = load_policy(write_tiny_checkpoint(ckpt.parent / "other", tiny_config(hidden_size=32)))
    apply_lora(other, LoRASettings(rank=4, alpha=8))
    with pytest.raises(grpc.RpcError) as err:
        client.push_adapter(serialize_adapter(other, before + 1), before + 1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert client.policy().policy_version == before  # still serving the old one

    # A blob stamped with another version than its stream announces is refused before it is
    # loaded: the server keeps serving the old version (it used to switch, then refuse).
    with pytest.raises(grpc.RpcError) as err:
        client.push_adapter(serialize_adapter(trained, before + 5), before + 1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "says version" in err.value.details()
    assert client.policy().policy_version == before

    reply = client.push_adapter(blob, before + 1)
    assert reply.policy_version == before + 1
    assert reply.sha256 == hashlib.sha256(blob).hexdigest()
    info = client.policy()
    assert info.policy_version == before + 1 and info.adapter_sha256 == reply.sha256

    images = _images(2, seed=9)
    out = client.act(images, ["push the cube"] * 2, greedy=True)
    assert out.policy_version == before + 1
    from vla_rl.models import PromptTokenizer, load_tokenizer

    prompts = PromptTokenizer(load_tokenizer(ckpt))(["push the cube"] * 2)
    with torch.no_grad():
        local = trained.generate(
            trained.pixel_values(torch.from_numpy(images)), prompts, greedy=True
        )
    np.testing.assert_array_equal(out.action_tokens, local.action_tokens.numpy())

    # The same version again is refused: versions only move forward.
    with pytest.raises(grpc.RpcError) as err:
        client.push_adapter(blob, before + 1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_act_stream_replies_in_order(client):
    images = _images(3, seed=2)
    requests = [
        rollout_pb2.ActRequest(
            request_id=f"r{i}",
            images=to_tensor(images[i : i + 1]),
            instructions=["push the cube"],
            greedy=True,
        )
        for i in range(3)
    ]
    replies = list(client.stub.ActStream(iter(requests), timeout=60))
    assert [r.request_id for r in replies] == ["r0", "r1", "r2"]
    unary = client.act(images, ["push the cube"] * 3, greedy=True)
    from vla_rl.rpc.rollout_client import decode_act_reply

    streamed = np.concatenate([decode_act_reply(r).action_tokens for r in replies])
    np.testing.assert_array_equal(streamed, unary.action_tokens)
