"""Rollout replica discovery from EndpointSlices, against a fake Kubernetes API server on
loopback that speaks the real protocol (list, watch as a stream of JSON events, 410 Gone for a
compacted resourceVersion) to the real `kubernetes` client: replicas that appear, become unready
or go away are reported, a 410 makes the watcher list again without losing changes, the
in-cluster path reaches an HTTPS API server with the pod's service account (CA, token,
namespace), and the learner's Replicas push the current policy to a real rollout server as soon
as it appears."""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

from vla_rl.discovery import SERVICE_LABEL, EndpointSliceWatcher  # noqa: E402

NAMESPACE, SERVICE = "rl", "run-vla-rl-rollout"
PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"


class FakeAPIServer:
    """EndpointSlices of one namespace with a resourceVersion counter and an event log."""

    def __init__(self, tls: dict | None = None, token: str | None = None) -> None:
        """`tls`: tests/helpers/tls.py's files, to serve HTTPS as a real API server does;
        `token`: every request must carry it as a bearer token (401 otherwise)."""
        self.version = 1
        self.token = token
        self.authorized = 0
        self.slices: dict[str, dict] = {}
        self.events: list[tuple[int, str, dict]] = []
        self.oldest = 0  # watches from an older resourceVersion get 410 Gone
        self.lists = 0
        self.cond = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if fake.token is not None:
                    # The auth scheme is case-insensitive (RFC 7235): the client sends "bearer".
                    scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                    if scheme.lower() != "bearer" or token != fake.token:
                        self.send_error(401)
                        return
                    fake.authorized += 1
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path != PATH or query.get("labelSelector") != f"{SERVICE_LABEL}={SERVICE}":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if query.get("watch") in ("true", "1", "True"):
                    fake.stream(self.wfile, int(query["resourceVersion"]),
                                float(query.get("timeoutSeconds", 5)))  # fmt: skip
                else:
                    self.wfile.write(json.dumps(fake.listing()).encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls["server"], tls["server_key"])
            self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
            scheme = "https"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.port = self.http.server_address[1]
        self.host = f"{scheme}://127.0.0.1:{self.port}"

    def listing(self) -> dict:
        with self.cond:
            self.lists += 1
            return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": list(self.slices.values())}  # fmt: skip

    def stream(self, out, since: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            if since < self.oldest:
                gone = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": "too old resource version",
                    "reason": "Expired",
                    "code": 410,
                }
                out.write((json.dumps({"type": "ERROR", "object": gone}) + "\n").encode())
                return
            while time.monotonic() < deadline:
                for version, kind, obj in self.events:
                    if version > since:
                        out.write((json.dumps({"type": kind, "object": obj}) + "\n").encode())
                        out.flush()
                        since = version
                self.cond.wait(0.1)

    def put(self, name: str, endpoints: list[tuple[str, bool | None]], port: int = 50051) -> None:
        with self.cond:
            self.version += 1
            kind = "MODIFIED" if name in self.slices else "ADDED"
            obj = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": NAMESPACE,
                             "resourceVersion": str(self.version),
                             "labels": {SERVICE_LABEL: SERVICE}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip]} | ({} if ready is None else
                              {"conditions": {"ready": ready}}) for ip, ready in endpoints],
                "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
            }  # fmt: skip
            self.slices[name] = obj
            self.events.append((self.version, kind, obj))
            self.cond.notify_all()

    def delete(self, name: str) -> None:
        with self.cond:
            self.version += 1
            obj = dict(self.slices.pop(name))
            obj["metadata"] = {**obj["metadata"], "resourceVersion": str(self.version)}
            self.events.append((self.version, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the event log: watches from before now get 410 Gone."""
        with self.cond:
            self.oldest = self.version + 1
            self.events.clear()
            self.cond.notify_all()

    def close(self) -> None:
        self.http.shutdown()


@pytest.fixture
def api_server():
    server = FakeAPIServer()
    yield server
    server.close()


def _client(host: str):
    from kubernetes import client

    config = client.Configuration()
    config.host = host
    return client.DiscoveryV1Api(client.ApiClient(config))


def _expect(changes: queue.Queue, targets: list[str], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        try:
            seen.append(changes.get(timeout=0.2))
        except queue.Empty:
            continue
        if seen[-1] == targets:
            return
    raise AssertionError(f"never reported {targets}; reported {seen}")


def test_replicas_appear_become_unready_and_go_away(api_server):
    api_server.put("a", [("10.0.0.1", True), ("10.0.0.2", None)])
    changes: queue.Queue = queue.Queue()
    watcher = EndpointSliceWatcher(_client(api_server.host), NAMESPACE, SERVICE, changes.put,
                                   watch_timeout_s=2).start()  # fmt: skip
    try:
        _expect(changes, ["10.0.0.1:50051", "10.0.0.2:50051"])  # from the first list
        api_server.put("b", [("10.0.1.7", True)])  # a new replica, by watch
        _expect(changes, ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.1.7:50051"])
        api_server.put("a", [("10.0.0.1", False), ("10.0.0.2", True)])  # one not ready
        _expect(changes, ["10.0.0.2:50051", "10.0.1.7:50051"])
        api_server.delete("b")
        _expect(changes, ["10.0.0.2:50051"])
        assert watcher.relists == 0 and api_server.lists == 1
    finally:
        watcher.stop()


def test_a_410_gone_lists_again_and_keeps_up(api_server):
    api_server.put("a", [("10.0.0.1", True)])
    changes: queue.Queue = queue.Queue()
    watcher = EndpointSliceWatcher(_client(api_server.host), NAMESPACE, SERVICE, changes.put,
                                   watch_timeout_s=1).start()  # fmt: skip
    try:
        _expect(changes, ["10.0.0.1:50051"])
        # Changes made while the event log is compacted: the watch from the old version is
        # answered 410, and only a new list can show them.
        api_server.compact()
        api_server.put("c", [("10.0.2.9", True)])
        api_server.compact()
        _expect(changes, ["10.0.0.1:50051", "10.0.2.9:50051"], timeout_s=15)
        assert watcher.relists >= 1 and api_server.lists >= 2
        api_server.put("a", [("10.0.0.1", True), ("10.0.0.5", True)])  # watching again
        _expect(changes, ["10.0.0.1:50051", "10.0.0.5:50051", "10.0.2.9:50051"])
    finally:
        watcher.stop()


def test_in_cluster_the_pods_service_account_reaches_the_api_server(tmp_path, monkeypatch):
    """What the learner's pod runs (vla_rl.discovery.in_cluster_watcher): the API server from
    KUBERNETES_SERVICE_HOST/PORT over HTTPS verified with the service account's ca.crt, its
    token on every request, the namespace from its file."""
    from tests.helpers.tls import write_tls_files
    from vla_rl.discovery import in_cluster_watcher

    tls = write_tls_files(tmp_path)
    server = FakeAPIServer(tls=tls, token="sa-token-1")
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("sa-token-1")
    (account / "ca.crt").write_bytes(tls["ca"].read_bytes())
    (account / "namespace").write_text(NAMESPACE + "\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    server.put("a", [("10.0.0.1", True)])
    changes: queue.Queue = queue.Queue()
    # A short watch, as the tests above use: with the 30 s default, the watched change did not
    # reach on_change within _expect's 10 s from this fake (HTTP/1.0 bodies, not chunked).
    watcher = in_cluster_watcher(SERVICE, changes.put, service_account_dir=str(account),
                                 watch_timeout_s=2)  # fmt: skip
    try:
        _expect(changes, ["10.0.0.1:50051"])
        server.put("b", [("10.0.1.7", True)])
        _expect(changes, ["10.0.0.1:50051", "10.0.1.7:50051"])
        assert server.authorized >= 2  # the list and the watch, each with the token
    finally:
        watcher.stop()
        server.close()


def _wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def test_a_replica_that_appears_gets_the_current_policy_without_a_resync(api_server, tmp_path):
    """Issue 11: the learner publishes version 3 to the one replica there is; a second one
    appears through an EndpointSlice event and serves version 3 before the learner's resync (it
    runs only while the learner waits for segments) is ever called; when it goes, its client is
    closed."""
    from services.learner.main import Replicas
    from tests.helpers.procs import ServiceProcess
    from vla_rl.models import load_policy
    from vla_rl.models.lora import LoRASettings, apply_lora, serialize_adapter
    from vla_rl.models.tiny import write_tiny_checkpoint
    from vla_rl.rpc.rollout_client import RolloutClient

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=3)
    servers = [
        ServiceProcess("services.rollout_server.main",
                       ["--checkpoint", str(ckpt), "--engine", "torch"], tmp_path, f"rollout{i}")
        for i in range(2)
    ]  # fmt: skip
    replicas = Replicas([])
    replicas.resync = lambda: pytest.fail("resync was called")  # only the new path may push
    watcher = None
    try:
        first, second = servers
        for server in servers:
            server.wait_healthy()
        api_server.put("a", [("127.0.0.1", True)], port=first.port)
        watcher = EndpointSliceWatcher(_client(api_server.host), NAMESPACE, SERVICE,
                                       replicas.set_targets, watch_timeout_s=2).start()  # fmt: skip
        _wait_for(lambda: [c.target for c in replicas.clients] == [first.target], "first listed")

        policy = load_policy(ckpt)
        apply_lora(policy, LoRASettings(rank=4, alpha=8))
        replicas.publish(serialize_adapter(policy, 3), 3)
        probe = RolloutClient(second.target)
        try:
            assert replicas.clients[0].policy().policy_version == 3
            assert probe.policy().policy_version == 0  # the base, before it is discovered

            api_server.put("b", [("127.0.0.1", True)], port=second.port)  # appears, by watch
            _wait_for(lambda: probe.policy().policy_version == 3, "the new replica at version 3")
        finally:
            probe.close()
        assert replicas.resynced == 1
        (client,) = [c for c in replicas.clients if c.target == second.target]

        api_server.delete("b")
        _wait_for(lambda: [c.target for c in replicas.clients] == [first.target], "b removed")
        with pytest.raises(ValueError, match="closed channel"):
            client.policy()
    finally:
        if watcher is not None:
            watcher.stop()
        replicas.close()
        for server in servers:
            assert server.stop() == 0, server.log()
