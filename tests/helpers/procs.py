"""Start the project's services as real subprocesses on free loopback ports, for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from vla_rl.launch import free_port
from vla_rl.rpc.client import wait_for_health

REPO = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """`python -m MODULE ARGS --port N` with its log in a file; stop() sends SIGTERM."""

    def __init__(
        self,
        module: str,
        args: list[str],
        log_dir: Path,
        name: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        # One torch thread by default: tests run several services on 2 cores.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        try:
            wait_for_health(self.target, timeout_s=timeout_s)
        except TimeoutError as e:
            raise RuntimeError(f"{self.log_path.name} did not come up:\n{self.log()}") from e

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
