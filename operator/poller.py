"""Reading progress.json and checkpoint manifests from the resources' run roots.

One `StorageReader` serves every resource: S3 clients are shared per (endpoint, addressing style,
region) and use the operator's OWN credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the
operator process), never a user's Secret. Reads are cheap in the steady state: one GET of
progress.json per resource and poll, plus one LIST of checkpoints/ when progress changed (or
every few rounds); a manifest is read once per checkpoint and cached.

`spec.storage.endpoint` is chosen by whoever creates the resource, so one namespace must not be
able to stall or exhaust the poller of all (issue 14, item 6):

* every read is time-boxed (`read_timeout`: connect and socket timeouts, one attempt, and a
  wall-clock limit on the whole body even when a server trickles bytes);
* every object is size-capped (`max_object_bytes`): a larger one is refused by name, unread;
* resources are isolated: a round waits at most `round_budget` for its reads, a resource whose
  previous read is still running is not read again (its result arrives in a later round), and
  one endpoint has at most `per_endpoint` reads in flight, so a hanging endpoint holds at most
  that many threads and everybody else keeps being read every interval;
* the S3 client cache is an LRU of at most `max_clients` endpoints (evicted clients are closed);
* a checkpoint folder without its manifest (still being written) is retried after
  `incomplete_backoff` rounds, not every round;
* `allowed_endpoints` (the chart's `storage.allowedEndpoints`) restricts which endpoints the
  operator calls with its credentials at all.

Checkpoint listing is tinv.api.storage's `list_checkpoints` (with the manifests already known and
this reader's limited read passed in).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Hashable

from tinv.api.storage import (
    PROGRESS_FILE,
    NotFound,
    S3Settings,
    Store,
    StorageError,
    TooLarge,
    join,
    list_checkpoints,
)

from .policy import endpoint_allowed
from .registry import compact
from .status import StorageView

log = logging.getLogger("tinv.operator.poller")

#: List checkpoints at least every this many rounds even when progress.json did not change.
LIST_EVERY = 4


class EndpointRefused(StorageError):
    """The endpoint is not in the operator's allow-list: the operator will not call it."""


@dataclass(frozen=True)
class PollLimits:
    read_timeout: float = 10.0
    max_object_bytes: int = 1 << 20
    max_clients: int = 32
    per_endpoint: int = 4
    incomplete_backoff: int = 4
    allowed_endpoints: tuple[str, ...] = ()  # empty: any endpoint

    @classmethod
    def from_config(cls, config: Any) -> "PollLimits":
        return cls(
            read_timeout=config.storage_read_timeout,
            max_object_bytes=config.storage_max_object_bytes,
            max_clients=config.storage_max_clients,
            per_endpoint=max(1, config.poll_workers // 4),
            allowed_endpoints=tuple(config.allowed_storage_endpoints),
        )


@dataclass
class Target:
    """One resource to read this round."""

    key: Hashable
    root: str
    storage: dict[str, Any] | None
    checkpoints: bool


@dataclass
class _Cache:
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    incomplete: dict[str, int] = field(default_factory=dict)  # uuid -> round of the last attempt
    progress_stamp: Any = None
    rounds_since_list: int = 0
    listed: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # oversized manifests of the last listing, by name
    last: StorageView | None = None  # the last good view: a failed read keeps showing it, with the error


class StorageReader:
    def __init__(self, env: dict[str, str] | None = None, limits: PollLimits | None = None, workers: int = 16):
        self._env = env
        self.limits = limits or PollLimits()
        self._stores: OrderedDict[tuple[Any, ...], Store] = OrderedDict()
        self._caches: dict[Any, _Cache] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tinv-poll")
        self._inflight: dict[Hashable, tuple[Future, tuple[Any, ...]]] = {}
        self._per_endpoint: dict[tuple[Any, ...], int] = {}
        self._done: dict[Hashable, StorageView] = {}  # finished after their round's budget
        self.rounds = 0

    # ------------------------------------------------------------------ clients
    @staticmethod
    def _endpoint_key(storage: dict[str, Any] | None) -> tuple[Any, ...]:
        storage = storage or {}
        return (storage.get("endpoint"), storage.get("addressingStyle", "auto"), storage.get("region"))

    def store_for(self, storage: dict[str, Any] | None) -> Store:
        storage = storage or {}
        endpoint = storage.get("endpoint")
        if not endpoint_allowed(endpoint, self.limits.allowed_endpoints):
            raise EndpointRefused(f"spec.storage.endpoint {endpoint} is not in the operator's allowed endpoints "
                                  f"({', '.join(self.limits.allowed_endpoints)}): not read")
        key = self._endpoint_key(storage)
        evicted: list[Store] = []
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                settings = S3Settings.from_spec(None, self._env)
                settings.endpoint = endpoint or settings.endpoint
                settings.addressing_style = storage.get("addressingStyle") or "auto"
                settings.region = storage.get("region") or settings.region
                t = self.limits.read_timeout
                settings.connect_timeout, settings.read_timeout, settings.retries = min(5.0, t), t, 0  # one attempt: the next round retries
                store = self._stores[key] = Store(settings)
                while len(self._stores) > self.limits.max_clients:
                    evicted.append(self._stores.popitem(last=False)[1])
            else:
                self._stores.move_to_end(key)
        for old in evicted:
            _close(old)
        return store

    @property
    def clients(self) -> int:
        return len(self._stores)

    def forget(self, key: Any) -> None:
        with self._lock:
            self._caches.pop(key, None)
            self._done.pop(key, None)

    def _cache(self, key: Any) -> _Cache:
        with self._lock:
            return self._caches.setdefault(key, _Cache())

    # ------------------------------------------------------------------ one resource
    def read(self, key: Any, root: str, storage: dict[str, Any] | None, *, checkpoints: bool, force_list: bool = False) -> StorageView:
        """Progress (and, for jobs, complete checkpoints) of one run root. Never raises; a failed
        read keeps the last good progress and checkpoints and says what failed."""
        if root.startswith("pvc://"):
            return StorageView(unsupported=f"{root}: the operator cannot read pvc:// storage; progress comes from the termination message")
        cache = self._cache(key)
        view = StorageView()
        limits = self.limits
        try:
            store = self.store_for(storage)

            def get(uri: str) -> Any:
                # compact: kept for every resource until the next round, and manifests for longer
                return compact(store.read_json(uri, max_bytes=limits.max_object_bytes, timeout=limits.read_timeout))

            try:
                view.progress = get(join(root, PROGRESS_FILE))
            except NotFound:
                view.progress = None
            except ValueError:
                view.progress = None  # a half-written local file: read it next round
            if checkpoints:
                stamp = _stamp(view.progress)
                cache.rounds_since_list += 1
                if force_list or stamp != cache.progress_stamp or cache.rounds_since_list >= LIST_EVERY or not cache.manifests:
                    cache.listed = self._list(store, root, cache, get)
                    cache.progress_stamp = stamp
                    cache.rounds_since_list = 0
                view.checkpoints = list(cache.listed)
                if cache.refused:
                    view.error = "; ".join(cache.refused)  # the other checkpoints are listed all the same
            cache.last = view
        except TooLarge as err:
            log.warning("refused an oversized object: %s", err)
            view = _stale(cache, str(err))
        except StorageError as err:
            view = _stale(cache, str(err))
        except Exception as err:  # noqa: BLE001 - a bug or an unexpected client error must not stop polling
            view = _stale(cache, f"{type(err).__name__}: {err}")
        return view

    def _list(self, store: Store, root: str, cache: _Cache, get: Any) -> list[dict[str, Any]]:
        backoff = self.limits.incomplete_backoff
        rounds = self.rounds
        refused: list[str] = []

        def read_manifest(uuid: str, uri: str) -> Any:
            tried = cache.incomplete.get(uuid)
            if tried is not None and rounds - tried < backoff:
                raise NotFound(uri)  # seen without its manifest recently: not fetched again yet
            try:
                manifest = get(uri)
            except TooLarge as err:
                log.warning("refused an oversized manifest: %s", err)
                refused.append(str(err))  # tried again at the next listing: refusing costs one HEAD-sized read
                raise NotFound(uri) from None
            except (NotFound, ValueError):
                cache.incomplete[uuid] = rounds
                raise NotFound(uri) from None
            cache.incomplete.pop(uuid, None)
            if isinstance(manifest, dict):
                manifest = {**manifest, "uuid": manifest.get("uuid") or uuid}
                cache.manifests[uuid] = manifest
            return manifest

        found = list_checkpoints(store, root, known=cache.manifests, read=read_manifest)
        cache.refused = refused
        present = {m["uri"].rstrip("/").rsplit("/", 1)[-1] for m in found} | set(cache.incomplete)
        for gone in set(cache.manifests) - present:
            cache.manifests.pop(gone, None)
        return found

    # ------------------------------------------------------------------ a round over all resources
    async def poll(self, targets: list[Target], budget: float) -> list[tuple[Hashable, StorageView]]:
        """Read every target that has no read in flight, on this reader's threads; return what
        finished within `budget` seconds, plus what finished late since the last round."""
        self.rounds += 1
        loop = asyncio.get_running_loop()
        started: list[asyncio.Future] = []
        for t in targets:
            # the per-endpoint limit is for endpoints a resource chose; file:// roots and the
            # operator's own default endpoint are not limited
            endpoint = self._endpoint_key(t.storage) if (t.storage or {}).get("endpoint") and t.root.startswith("s3://") else None
            with self._lock:
                if t.key in self._inflight:
                    continue  # still reading from the last round(s): isolation, not a second thread
                if endpoint is not None:
                    if self._per_endpoint.get(endpoint, 0) >= self.limits.per_endpoint:
                        continue  # this endpoint is slow: it gets no more threads until a read returns
                    self._per_endpoint[endpoint] = self._per_endpoint.get(endpoint, 0) + 1
                fut = self._pool.submit(self.read, t.key, t.root, t.storage, checkpoints=t.checkpoints)
                self._inflight[t.key] = (fut, endpoint)
            fut.add_done_callback(lambda f, key=t.key: self._finished(key, f))
            started.append(asyncio.wrap_future(fut, loop=loop))
        if started:
            await asyncio.wait(started, timeout=budget)
        with self._lock:
            done, self._done = self._done, {}
        return list(done.items())

    def _finished(self, key: Hashable, fut: Future) -> None:
        with self._lock:
            _, endpoint = self._inflight.pop(key, (None, None))
            if endpoint is not None:
                self._per_endpoint[endpoint] = max(0, self._per_endpoint.get(endpoint, 1) - 1)
            if not fut.cancelled() and fut.exception() is None and key in self._caches:
                self._done[key] = fut.result()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def delete_prefix(self, root: str, storage: dict[str, Any] | None) -> None:
        self.store_for(storage).delete_prefix(root)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            stores, self._stores = list(self._stores.values()), OrderedDict()
        for store in stores:
            _close(store)


def not_running(phase: str | None, job: dict[str, Any] | None) -> bool:
    """A suspended resource, or one whose Job is suspended with no pods (queued in Kueue, or
    pre-empted): no trainer writes to its storage, so polling it every round is wasted work."""
    return phase == "Suspended" or bool(job and job.get("suspend") and not job.get("active"))


def _stale(cache: _Cache, error: str) -> StorageView:
    last = cache.last or StorageView()
    return replace(last, checkpoints=list(last.checkpoints), error=error)


def _close(store: Store) -> None:
    client = getattr(store, "_client", None)
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - best effort
            pass


def _stamp(progress: Any) -> Any:
    if not isinstance(progress, dict):
        return None
    return (progress.get("updatedAt") or progress.get("updated_at"), progress.get("step"), str(progress.get("latestCheckpoint") or progress.get("latest_checkpoint")))

