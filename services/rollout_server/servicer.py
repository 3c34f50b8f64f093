"""RolloutService: proto in, engine (through the dynamic batcher), proto out."""

from __future__ import annotations

import hashlib
import logging
import threading

import grpc
import numpy as np

from vla_rl.models import ActionNormalizer, ActionTokenizer
from vla_rl.models.lora import adapter_metadata
from vla_rl.rpc.gen.v1 import rollout_pb2, rollout_pb2_grpc
from vla_rl.rpc.server import map_errors, status_of
from vla_rl.rpc.tensors import from_tensor, to_tensor

from . import metrics
from .batcher import DynamicBatcher
from .engines.base import AdapterError, Engine, EngineOutput, validate_batch

log = logging.getLogger("vla_rl.rollout_server")

MAX_ADAPTER_BYTES = 2 << 30


def _temperature(req: rollout_pb2.ActRequest) -> float:
    """0 is proto3's "unset": sample at 1.0. Anything else is checked as given (NaN, negative
    and tiny values are refused by validate_batch)."""
    return req.temperature if req.temperature != 0 else 1.0


def decode_actions(
    action_tokens: np.ndarray,
    tokenizer: ActionTokenizer,
    normalizer: ActionNormalizer,
    action_dim: int,
) -> np.ndarray:
    """Action tokens [B, C * action_dim] -> the env's actions, float32 [B, C, action_dim]
    (bins -> [-1, 1] -> the dataset's units by norm_stats). Non-finite actions are an error."""
    b, k = action_tokens.shape
    normalized = tokenizer.decode(action_tokens.reshape(b, k // action_dim, action_dim))
    actions = normalizer.unnormalize(normalized).astype(np.float32)
    if not np.isfinite(actions).all():
        raise RuntimeError("the policy produced non-finite actions")
    return actions


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(
        self,
        engine: Engine,
        batcher: DynamicBatcher,
        normalizer: ActionNormalizer,
        image_size: int,
        base_model_id: str,
        action_dim: int = 7,
        min_policy_version: int = 0,
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.normalizer = normalizer
        self.tokenizer = ActionTokenizer()
        self.image_size = image_size
        self.base_model_id = base_model_id
        self.action_dim = action_dim
        self.adapter_sha256 = ""
        self._push_lock = threading.Lock()
        # A server restarted mid-run must not serve the base weights as if they were the
        # current policy: Act is UNAVAILABLE (clients retry) until the learner has pushed this.
        self.min_policy_version = min_policy_version

    # -- helpers: proto <-> domain --------------------------------------------------------------
    def _parse(self, req: rollout_pb2.ActRequest) -> tuple[np.ndarray, list[str]]:
        images = from_tensor(
            req.images,
            expect_dtype="uint8",
            expect_shape=(None, self.image_size, self.image_size, 3),
            copy=True,
        )
        instructions = list(req.instructions)
        validate_batch(
            images, instructions, self.image_size, _temperature(req), req.top_k, req.greedy
        )
        return images, instructions

    def _reply(self, req: rollout_pb2.ActRequest, out: EngineOutput) -> rollout_pb2.ActReply:
        actions = decode_actions(
            out.action_tokens, self.tokenizer, self.normalizer, self.action_dim
        )
        return rollout_pb2.ActReply(
            request_id=req.request_id,
            action_tokens=to_tensor(out.action_tokens.astype(np.int64)),
            actions=to_tensor(actions),
            logprobs=to_tensor(out.logprobs.astype(np.float32)),
            policy_version=out.policy_version,
        )

    def _act(self, req: rollout_pb2.ActRequest) -> rollout_pb2.ActReply:
        images, instructions = self._parse(req)
        future = self.batcher.submit(
            images,
            instructions,
            temperature=_temperature(req),
            top_k=req.top_k,
            greedy=req.greedy,
            seed=req.seed if req.HasField("seed") else None,
        )
        return self._reply(req, future.result())

    def _check_policy(self, context: grpc.ServicerContext) -> None:
        served = self.engine.policy_version
        if served < self.min_policy_version:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"restarted: waiting for the learner to push policy version "
                f">= {self.min_policy_version} (serving {served})",
            )

    # -- RPCs ---------------------------------------------------------------------------------
    def _answer(self, request, context) -> rollout_pb2.ActReply:
        """One Act request, timed and counted by status for /metrics (Act and ActStream)."""
        with metrics.REQUEST_SECONDS.time():
            try:
                self._check_policy(context)
                reply = self._act(request)
            except Exception as e:
                metrics.REQUESTS.labels(status_of(e, context).name).inc()
                raise
        metrics.REQUESTS.labels("OK").inc()
        metrics.ACTIONS.inc(len(request.instructions))
        return reply

    @map_errors
    def Act(self, request, context):
        return self._answer(request, context)

    @map_errors
    def ActStream(self, request_iterator, context):
        for request in request_iterator:
            yield self._answer(request, context)

    @map_errors
    def PushAdapter(self, request_iterator, context):
        try:
            reply = self._push_adapter(request_iterator, context)
        except Exception:
            metrics.ADAPTER_PUSHES.labels("refused").inc()
            raise
        metrics.ADAPTER_PUSHES.labels("loaded").inc()
        return reply

    def _push_adapter(self, request_iterator, context) -> rollout_pb2.PushAdapterReply:
        header = None
        parts: list[bytes] = []
        received = 0
        for chunk in request_iterator:
            if header is None:
                if chunk.version <= 0 or len(chunk.sha256) != 64 or chunk.total_bytes <= 0:
                    raise ValueError("the first chunk must carry version > 0, sha256, total_bytes")
                if chunk.total_bytes > MAX_ADAPTER_BYTES:
                    raise ValueError(f"adapter of {chunk.total_bytes} bytes is too large")
                header = (chunk.version, chunk.sha256, chunk.total_bytes)
            elif (chunk.version or chunk.sha256 or chunk.total_bytes) and (
                chunk.version,
                chunk.sha256,
                chunk.total_bytes,
            ) != header:
                raise ValueError("a later chunk's header fields disagree with the first chunk")
            received += len(chunk.data)
            if received > header[2]:
                raise ValueError(f"received more than the announced {header[2]} bytes")
            parts.append(chunk.data)
        if header is None:
            raise ValueError("empty adapter stream")
        version, digest, total = header
        if received != total:
            raise ValueError(f"adapter stream ended after {received} of {total} bytes")
        blob = b"".join(parts)
        if hashlib.sha256(blob).hexdigest() != digest:
            raise ValueError("adapter sha256 does not match its bytes")
        # Before the engine loads anything: a blob of another version than the stream announced
        # is refused with the served version unchanged (it used to be loaded, then refused).
        try:
            stamped = int(adapter_metadata(blob)["policy_version"])
        except (ValueError, TypeError, KeyError) as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"adapter refused: {e}")
        if stamped != version:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"adapter blob says version {stamped}, the stream said {version}",
            )
        with self._push_lock:
            try:
                with metrics.ADAPTER_LOAD_SECONDS.time():
                    loaded = self.engine.load_adapter(blob)
            except AdapterError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"adapter refused: {e}")
            if loaded != version:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"adapter blob says version {loaded}, the stream said {version}",
                )
            self.adapter_sha256 = digest
        log.info("serving policy version %d (sha256 %s)", loaded, digest[:12])
        return rollout_pb2.PushAdapterReply(policy_version=loaded, sha256=digest)

    @map_errors
    def GetPolicy(self, request, context):
        return rollout_pb2.PolicyInfo(
            policy_version=self.engine.policy_version,
            base_model_id=self.base_model_id,
            engine=self.engine.name,
            action_chunk=self.engine.action_chunk,
            action_dim=self.action_dim,
            adapter_sha256=self.adapter_sha256,
        )
