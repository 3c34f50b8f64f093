"""Evaluation episodes through the services: EnvService Reset/Step sessions on an env server,
greedy (or low-temperature) actions from a rollout replica, one MP4 per episode.

    result = evaluate(env_target, rollout_target, ["PickCube-v1"], episodes=4, max_steps=50,
                      video_dir="runs/x/video/eval")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from vla_rl.rpc.client import DEFAULT_DEADLINE_S, make_channel
from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc
from vla_rl.rpc.rollout_client import RolloutClient
from vla_rl.rpc.tensors import from_tensor, to_tensor


@dataclass
class EvalResult:
    episodes: list[dict] = field(default_factory=list)
    """Per episode: episode, task_id, seed, success_once, episode_len, return, policy_version,
    video."""

    def metrics(self) -> dict[str, float]:
        """Means over the episodes, named like the training metrics under eval/."""
        n = max(len(self.episodes), 1)
        return {
            f"eval/{key}": sum(float(e[key]) for e in self.episodes) / n
            for key in ("success_once", "episode_len", "return")
        }


def annotate(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame with one line of text on a dark band at the top (OpenCV ships with ManiSkill)."""
    import cv2

    out = frame.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1], 14), (0, 0, 0), thickness=-1)
    cv2.putText(out, text, (2, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1)
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> None:
    """MP4 (mpeg4) through OpenCV's bundled encoder: no ffmpeg child process, which gRPC's fork
    handlers in this process would disturb."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def evaluate(
    env_target: str,
    rollout_target: str,
    task_ids: list[str],
    episodes: int,
    max_steps: int,
    seed: int = 1000,
    video_dir: str | Path | None = None,
    info_on_video: bool = True,
    temperature: float | None = None,
    *,
    env_type: str = "maniskill",
    image_size: int = 224,
    control_mode: str | None = "pd_ee_delta_pose",
    reward_mode: str = "normalized_dense",
    task_modules: list[str] | tuple[str, ...] = (),
    max_episode_steps: int | None = None,
    sim_backend: str = "cpu",
    first_episode: int = 0,
    ignore_terminations: bool = False,
) -> EvalResult:
    """Run episodes first_episode .. first_episode + episodes - 1 (episode ep plays task
    task_ids[ep % len(task_ids)] from seed seed + ep) to success, termination, the env's time
    limit or `max_steps`. temperature None means greedy. Splitting N episodes into contiguous
    chunks (first_episode 0, k, 2k, ...) over several env servers plays exactly the episodes one
    call with N would.

    env_type, image_size, control_mode, reward_mode, task_modules, max_episode_steps and
    sim_backend configure the env server's session env as env.eval's keys of the same names do:
    control_mode None means the task's default controller (which must take the policy's
    actions, PolicyInfo.action_dim, or Reset fails with INVALID_ARGUMENT); task_modules are
    imported by the env server to register tasks; max_episode_steps None keeps the task's own
    time limit, else the server truncates the episode at that step; sim_backend "gpu" is
    FAILED_PRECONDITION on an env server that cannot run GPU physics; ignore_terminations plays
    each episode to its time limit or max_steps (success_once is the same; episode_len, return
    and videos are longer).
    """
    if first_episode < 0:
        raise ValueError(f"first_episode must be >= 0, got {first_episode}")
    result = EvalResult()
    rollout = RolloutClient(rollout_target)
    channel = make_channel(env_target)
    env = env_pb2_grpc.EnvServiceStub(channel)
    session = ""
    try:
        action_dim = int(rollout.policy().action_dim)
        for ep in range(first_episode, first_episode + episodes):
            task_id = task_ids[ep % len(task_ids)]
            reply = env.Reset(
                env_pb2.ResetRequest(
                    task_id=task_id,
                    seed=seed + ep,
                    session_id=session,
                    env_type=env_type,
                    image_size=image_size,
                    # Always set: "" asks for the task's default (unset would mean pd_ee_delta_pose).
                    control_mode=control_mode or "",
                    reward_mode=reward_mode,
                    task_modules=list(task_modules),
                    max_episode_steps=max_episode_steps or 0,
                    sim_backend=sim_backend,
                    action_dim=action_dim,
                    ignore_terminations=ignore_terminations,
                ),
                timeout=DEFAULT_DEADLINE_S["reset"],
            )
            session = reply.session_id
            image = from_tensor(reply.image, expect_dtype="uint8", copy=True)
            instruction = reply.instruction
            frames = [image]
            total, success, steps, version = 0.0, False, 0, -1
            while steps < max_steps:
                act = rollout.act(
                    image[None],
                    [instruction],
                    greedy=temperature is None,
                    temperature=temperature or 1.0,
                )
                version = act.policy_version
                step = env.Step(
                    env_pb2.StepRequest(session_id=session, action=to_tensor(act.actions[0])),
                    timeout=DEFAULT_DEADLINE_S["step"],
                )
                steps += act.actions.shape[1]
                total += step.reward
                success |= step.success
                image = from_tensor(step.image, expect_dtype="uint8", copy=True)
                label = f"{task_id} step {steps} r {total:.2f}" + (" success" if success else "")
                frames.append(annotate(image, label) if info_on_video else image)
                if step.terminated or step.truncated:
                    break
            video = None
            if video_dir is not None:
                video = Path(video_dir) / f"episode{ep:03d}_{task_id}_seed{seed + ep}.mp4"
                write_video(video, frames)
            result.episodes.append(
                {
                    "episode": ep,
                    "task_id": task_id,
                    "seed": seed + ep,
                    "success_once": success,
                    "episode_len": steps,
                    "return": total,
                    "policy_version": version,
                    "video": str(video) if video else None,
                }
            )
    finally:
        if session:  # free the server's env (a server holds at most 8 sessions)
            try:
                env.CloseSession(
                    env_pb2.CloseSessionRequest(session_id=session),
                    timeout=DEFAULT_DEADLINE_S["status"],
                )
            except grpc.RpcError:
                pass  # an older server (UNIMPLEMENTED) or a lost one: the session expires
        rollout.close()
        channel.close()
    return result
