"""The learner as the Helm chart runs it over several pods: one torchrun per node with a static
rendezvous at node 0 (--nnodes, --node_rank, --master_addr), here two "nodes" of one process
each on loopback (gloo). Global rank 0 serves the LearnerService; the first process of every
other node answers grpc.health on its own port, so an orchestrator's probes see every pod
alive; SIGTERM to each node's torchrun ends the job."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from tests.e2e.test_shutdown import TINY
from tests.services.conftest import RedisServer
from tests.unit.test_fsdp import _torchrun
from vla_rl.attach import learner_status
from vla_rl.config import dump_yaml, load_config
from vla_rl.launch import free_port
from vla_rl.models import tiny_config
from vla_rl.models.tiny import write_tiny_checkpoint
from vla_rl.rpc.client import wait_for_health
from vla_rl.rpc.gen.v1 import learner_pb2, learner_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_two_node_learner_rendezvous_serves_on_rank_0_and_health_on_every_node(tmp_path):
    redis_server = RedisServer(shutil.which("redis-server"), tmp_path)
    nodes: list[subprocess.Popen] = []
    try:
        assert redis_server.wait_ready(), (tmp_path / "redis.log").read_text()
        model = write_tiny_checkpoint(tmp_path / "model", tiny_config(), seed=0)
        cfg = load_config(None, [
            f"runner.logger.log_path={tmp_path}", "runner.logger.experiment_name=run",
            "runner.max_epochs=2", *TINY, "actor.fsdp_config.world_size=2",
            f"actor.model.model_path={model}", f"buffer.url={redis_server.url}",
        ])  # fmt: skip
        config = tmp_path / "config.yaml"
        dump_yaml(cfg, config)
        master, ports = free_port(), [free_port(), free_port()]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for rank, port in enumerate(ports):
            cmd = [*_torchrun(), "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                   "--master_addr=127.0.0.1", f"--master_port={master}",
                   "-m", "services.learner.main", "--config", str(config),
                   "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]  # fmt: skip
            log = (tmp_path / f"node{rank}.log").open("wb")
            nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip

        def logs() -> str:
            return "".join((tmp_path / f"node{r}.log").read_text(errors="replace")[-2000:]
                           for r in range(2))  # fmt: skip

        for port in ports:
            try:
                wait_for_health(f"127.0.0.1:{port}", timeout_s=120)
            except TimeoutError as e:
                raise AssertionError(f"{e}\n{logs()}") from None
        status = learner_status(f"127.0.0.1:{ports[0]}")
        assert status is not None and status.iteration == 0, logs()
        with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                learner_pb2_grpc.LearnerServiceStub(channel).GetStatus(
                    learner_pb2.LearnerStatusRequest(), timeout=5
                )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "2 processes" not in logs()  # still waiting for segments, not done

        for node in nodes:
            os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            node.wait(timeout=60)
    finally:
        for node in nodes:
            if node.poll() is None:
                try:
                    os.killpg(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                node.wait()
        redis_server.stop()
