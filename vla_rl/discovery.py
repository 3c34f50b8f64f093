"""Rollout replicas from a Kubernetes Service's EndpointSlices: list them, then watch for
changes, and list again when the API server says the watch's resourceVersion is gone (410). Every
change of the ready set calls `on_change(sorted host:port targets)`; the learner pushes its
current policy to a replica that appears (learner main: Replicas.set_targets).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"
GRPC_PORT_NAME = "grpc"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""What Kubernetes mounts in every pod: token, ca.crt and namespace of its service account."""


def slice_targets(endpoint_slice: Any, default_port: int) -> set[str]:
    """host:port of the ready endpoints of one EndpointSlice (ready unset counts as ready, as
    Kubernetes defines it); the port named "grpc" if the slice has one."""
    port = default_port
    for p in endpoint_slice.ports or []:
        if p.name == GRPC_PORT_NAME and p.port:
            port = int(p.port)
    targets = set()
    for endpoint in endpoint_slice.endpoints or []:
        conditions = endpoint.conditions
        if conditions is not None and conditions.ready is False:
            continue
        for address in endpoint.addresses or []:
            host = f"[{address}]" if ":" in address else address
            targets.add(f"{host}:{port}")
    return targets


class EndpointSliceWatcher:
    """Keeps the ready endpoints of `service` in `namespace` and reports every change."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        service: str,
        on_change: Callable[[list[str]], None],
        default_port: int = 50051,
        watch_timeout_s: int = 30,
    ) -> None:
        self.api = api  # kubernetes.client.DiscoveryV1Api
        self.namespace, self.service = namespace, service
        self.on_change = on_change
        self.default_port = default_port
        self.watch_timeout_s = watch_timeout_s
        self.slices: dict[str, set[str]] = {}
        self.targets: list[str] = []
        self.relists = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="endpointslices", daemon=True)

    @property
    def selector(self) -> str:
        return f"{SERVICE_LABEL}={self.service}"

    def start(self) -> EndpointSliceWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        targets = sorted(set().union(*self.slices.values())) if self.slices else []
        if targets != self.targets:
            self.targets = targets
            log.info("rollout replicas of service %s: %s", self.service, targets or "none")
            self.on_change(list(targets))

    def list_now(self) -> str:
        """List every slice; returns the list's resourceVersion to watch from."""
        reply = self.api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector
        )
        self.slices = {
            s.metadata.name: slice_targets(s, self.default_port) for s in reply.items or []
        }
        self._publish()
        return reply.metadata.resource_version

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        version = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self.list_now()
                stream = watch.Watch().stream(
                    self.api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=version,
                    timeout_seconds=self.watch_timeout_s,
                )
                for event in stream:
                    obj = event["object"]
                    version = obj.metadata.resource_version or version
                    if event["type"] == "DELETED":
                        self.slices.pop(obj.metadata.name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self.slices[obj.metadata.name] = slice_targets(obj, self.default_port)
                    self._publish()
                    if self._stop.is_set():
                        return
            except ApiException as e:
                if e.status == 410:  # our resourceVersion was compacted away: list again
                    log.info("EndpointSlice watch expired (410 Gone); listing again")
                else:
                    log.warning("EndpointSlice watch failed (%s); listing again in 2 s", e.status)
                    self._stop.wait(2.0)
                version = None
                self.relists += 1
            except Exception as e:  # noqa: BLE001 - the API server may be briefly unreachable
                log.warning("EndpointSlice watch failed (%s); listing again in 2 s", e)
                self._stop.wait(2.0)
                version = None
                self.relists += 1


def in_cluster_watcher(
    service: str,
    on_change: Callable[[list[str]], None],
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
    watch_timeout_s: int = 30,
) -> EndpointSliceWatcher:
    """A started watcher for `service` in this pod's namespace, with its service account: the
    API server from KUBERNETES_SERVICE_HOST/PORT, verified with the account's CA, and its token
    (re-read as the kubelet rotates it)."""
    from pathlib import Path

    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    account = Path(service_account_dir)
    configuration = client.Configuration()
    InClusterConfigLoader(
        token_filename=str(account / "token"), cert_filename=str(account / "ca.crt")
    ).load_and_set(configuration)
    namespace = (account / "namespace").read_text().strip()
    api = client.DiscoveryV1Api(client.ApiClient(configuration))
    return EndpointSliceWatcher(
        api, namespace, service, on_change, watch_timeout_s=watch_timeout_s
    ).start()
