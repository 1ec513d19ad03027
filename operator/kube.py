"""A small, thread-safe Kubernetes REST client for the operator's writes and its watches of Jobs and pods
(kopf watches the resources).

Raw JSON in and out (no model deserialisation: it is slow at 1,000 resources), one connection
pool shared by the operator's worker threads, a client-side request counter for metrics and
benchmarks, and errors classified into retryable (409 conflict, 429, 5xx, network) and permanent
(400/422 invalid, 403 forbidden, 404).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any

from tinv.api.models import GROUP, PLURALS, VERSION

log = logging.getLogger("tinv.operator")

RETRYABLE = {409, 429, 500, 502, 503, 504}
#: Accept header asking the apiserver for an object's metadata only (no spec, data or status).
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class ApiError(Exception):
    """An API request failed: `status` (0 for network errors), `reason` and the server's message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"HTTP {status} {reason}: {message}" if status else f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.status == 0 or self.status in RETRYABLE

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"


def _api_error(exc: Exception) -> ApiError:
    status = getattr(exc, "status", 0) or 0
    body = getattr(exc, "body", None)
    reason, message = getattr(exc, "reason", "") or type(exc).__name__, str(exc)
    if body:
        try:
            doc = json.loads(body)
            reason = doc.get("reason") or reason
            message = doc.get("message") or message
        except (ValueError, TypeError):
            message = str(body)[:500]
    return ApiError(int(status), str(reason), str(message))


def path_for(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    """REST path of an object of the kinds the operator touches."""
    if kind in PLURALS:
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURALS[kind]}"
    elif kind == "Job":
        base = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    elif kind in ("ConfigMap", "Service", "Event", "Pod", "Secret"):
        base = f"/api/v1/namespaces/{namespace}/{kind.lower()}s"
    else:
        raise ValueError(f"unsupported kind {kind}")
    if name:
        base += f"/{name}"
    if sub:
        base += f"/{sub}"
    return base


def _resource_of(path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if "namespaces" in parts:
        i = parts.index("namespaces")
        rest = parts[i + 2 :]
        if not rest:
            return "namespaces"
        return rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    return parts[-1] if parts else ""


class Kube:
    """`request()` plus the handful of verbs the operator uses. Thread-safe."""

    def __init__(self, api_client: Any, metrics: Any = None, timeout: float = 30.0):
        self.api = api_client
        self.metrics = metrics
        self.timeout = timeout
        self.counts: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None, metrics: Any = None, pool_size: int = 32) -> "Kube":
        """In-cluster credentials when running in a pod, else KUBECONFIG / ~/.kube/config."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            if kubeconfig:
                raise config.ConfigException("explicit kubeconfig")
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        return cls(client.ApiClient(configuration), metrics)

    def _count(self, verb: str, path: str, code: int) -> None:
        resource = _resource_of(path)
        key = (verb, resource, code)
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
        if self.metrics is not None:
            self.metrics.api_requests.labels(verb, resource, str(code)).inc()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        accept: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        resp = self._call(method, path, body, content_type=content_type, accept=accept, query=query, timeout=self.timeout)
        data = resp.data if hasattr(resp, "data") else resp.read()
        if not data:
            return {}
        try:
            return json.loads(data)
        except ValueError:
            return {}

    def stream(self, path: str, *, query: list[tuple[str, str]] | None = None, read_timeout: float = 60.0) -> Any:
        """A GET whose body is read as it arrives (a watch): the raw response, iterated line by line
        and closed by the caller. `read_timeout`: the most seconds between two chunks."""
        return self._call("GET", path, None, query=query, timeout=(10.0, read_timeout))

    def _call(self, method: str, path: str, body: Any, *, content_type: str = "application/json", accept: str = "application/json",
              query: list[tuple[str, str]] | None = None, timeout: Any = None) -> Any:
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            resp = self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=timeout,
            )
        except ApiException as exc:
            err = _api_error(exc)
            self._count(method, path, err.status)
            raise err from None
        except (OSError, socket.timeout) as exc:
            self._count(method, path, 0)
            raise ApiError(0, "NetworkError", str(exc)) from None
        except Exception as exc:  # urllib3 errors (MaxRetryError, ProtocolError ...)
            if type(exc).__module__.startswith("urllib3"):
                self._count(method, path, 0)
                raise ApiError(0, "NetworkError", str(exc)) from None
            raise
        self._count(method, path, getattr(resp, "status", 200))
        return resp

    # ------------------------------------------------------------------ verbs
    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def metadata(self, path: str) -> dict[str, Any]:
        """GET an object as PartialObjectMetadata: its metadata only, never its data. This is how the
        operator checks that a Secret exists without reading it (docs/architecture.md: it never reads Secrets)."""
        return self.request("GET", path, accept=METADATA_ONLY)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, propagation: str = "Background") -> dict[str, Any]:
        return self.request("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
