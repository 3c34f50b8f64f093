"""Service-test fixtures: a real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from vla_rl.launch import free_port

_START_TIMEOUT_S = 10.0


class RedisServer:
    """A redis-server child process without persistence, in its own directory."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = directory / "redis.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self._proc = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],  # fmt: skip
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + _START_TIMEOUT_S
        try:
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session; tests get a flushed one through `redis_url`."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = None
    for attempt in range(3):  # the free port may be taken between choosing it and binding it
        server = RedisServer(executable, tmp_path_factory.mktemp(f"redis{attempt}"))
        if server.wait_ready():
            break
        server.stop()
        server = None
    if server is None:
        pytest.fail("redis-server did not answer PING; see redis.log in the pytest tmp dirs")
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server):
    """`redis://127.0.0.1:<port>/0` of a running redis-server, emptied before the test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
