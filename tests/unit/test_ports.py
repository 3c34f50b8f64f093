"""The launcher's port choice: ports are picked when a run is planned and bound minutes later,
so a picked port must not be one an outgoing connection can take meanwhile (the kernel's
ephemeral range) nor one already handed to another child of the run."""

from __future__ import annotations

import socket

from vla_rl import launch


def test_ports_are_distinct_and_below_the_ephemeral_range():
    low, _ = launch.ephemeral_port_range()
    ports = [launch.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    if low > 2048:
        assert all(1024 <= p < low for p in ports), sorted(ports)[-5:]


def test_a_port_someone_listens_on_is_not_picked(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        # Force the search below the range to land on the busy port first.
        picks = iter([busy, busy, busy + 1 if busy + 1 < 65536 else busy - 1])
        monkeypatch.setattr(launch, "ephemeral_port_range", lambda: (busy + 2, 65535))
        monkeypatch.setattr(launch.random.SystemRandom, "randrange", lambda self, a, b: next(picks))
        port = launch.free_port()
    assert port != busy
