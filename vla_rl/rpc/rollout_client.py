"""Client side of RolloutService, shared by env servers, the learner and evaluation tools."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
import numpy as np

from vla_rl.rpc.client import DEFAULT_DEADLINE_S, make_channel
from vla_rl.rpc.gen.v1 import rollout_pb2, rollout_pb2_grpc
from vla_rl.rpc.tensors import from_tensor, to_tensor

ADAPTER_CHUNK_BYTES = 1 << 20


class RolloutError(RuntimeError):
    """An Act call that failed; carries the gRPC status code name and the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"rollout service answered {code.name}: {details}")
        self.code = code


@dataclass
class Actions:
    action_tokens: np.ndarray  # int64 [B, K]
    actions: np.ndarray  # float32 [B, C, 7]
    logprobs: np.ndarray  # float32 [B, K]
    policy_version: int


def decode_act_reply(reply: rollout_pb2.ActReply) -> Actions:
    return Actions(
        from_tensor(reply.action_tokens, expect_dtype="int64", expect_ndim=2, copy=True),
        from_tensor(reply.actions, expect_dtype="float32", expect_ndim=3, copy=True),
        from_tensor(reply.logprobs, expect_dtype="float32", expect_ndim=2, copy=True),
        int(reply.policy_version),
    )


def adapter_chunks(blob: bytes, version: int, chunk_bytes: int = ADAPTER_CHUNK_BYTES) -> Iterator:
    """The PushAdapter request stream: header fields on the first chunk, data split after."""
    digest = hashlib.sha256(blob).hexdigest()
    for start in range(0, max(len(blob), 1), chunk_bytes):
        first = start == 0
        yield rollout_pb2.AdapterChunk(
            version=version if first else 0,
            sha256=digest if first else "",
            total_bytes=len(blob) if first else 0,
            data=blob[start : start + chunk_bytes],
        )


class RolloutClient:
    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = make_channel(target)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self.channel)

    def act_async(
        self,
        images: np.ndarray,
        instructions: list[str],
        temperature: float = 1.0,
        *,
        greedy: bool = False,
        top_k: int = 0,
        seed: int | None = None,
    ) -> Future:
        """Future[Actions] for one batch (a unary Act; several in flight pipeline the stages)."""
        req = rollout_pb2.ActRequest(
            images=to_tensor(np.ascontiguousarray(images)),
            instructions=list(instructions),
            temperature=temperature,
            top_k=top_k,
            greedy=greedy,
        )
        if seed is not None:
            req.seed = seed
        call = self.stub.Act.future(req, timeout=DEFAULT_DEADLINE_S["act"])
        out: Future = Future()

        def done(c: grpc.Future) -> None:
            try:
                out.set_result(decode_act_reply(c.result()))
            except grpc.RpcError as e:
                out.set_exception(RolloutError(e.code(), e.details()))
            except Exception as e:  # noqa: BLE001 - handed to whoever waits on the future
                out.set_exception(e)

        call.add_done_callback(done)
        return out

    def act(self, images: np.ndarray, instructions: list[str], **kw) -> Actions:
        return self.act_async(images, instructions, **kw).result()

    def policy(self) -> rollout_pb2.PolicyInfo:
        return self.stub.GetPolicy(
            rollout_pb2.GetPolicyRequest(), timeout=DEFAULT_DEADLINE_S["status"]
        )

    def push_adapter(self, blob: bytes, version: int) -> rollout_pb2.PushAdapterReply:
        return self.stub.PushAdapter(
            adapter_chunks(blob, version), timeout=DEFAULT_DEADLINE_S["push_adapter"]
        )

    def close(self) -> None:
        self.channel.close()
