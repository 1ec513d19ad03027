"""Reading progress.json and checkpoint manifests from the resources' run roots.

One `StorageReader` serves every resource: S3 clients are shared per (endpoint, addressing style,
region) and use the operator's OWN credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the
operator process), never a user's Secret. Reads are cheap in the steady state: one GET of
progress.json per resource and poll, plus one LIST of checkpoints/ when progress changed (or
every few rounds); a manifest is read once per checkpoint and cached.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from tinv.api.storage import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    PROGRESS_FILE,
    NotFound,
    S3Settings,
    Store,
    StorageError,
    join,
)

from .status import StorageView

#: List checkpoints at least every this many rounds even when progress.json did not change.
LIST_EVERY = 4


@dataclass
class _Cache:
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress_stamp: Any = None
    rounds_since_list: int = 0
    listed: list[dict[str, Any]] = field(default_factory=list)


class StorageReader:
    def __init__(self, env: dict[str, str] | None = None):
        self._env = env
        self._stores: dict[tuple[Any, ...], Store] = {}
        self._caches: dict[Any, _Cache] = {}
        self._lock = threading.Lock()

    def store_for(self, storage: dict[str, Any] | None) -> Store:
        storage = storage or {}
        key = (storage.get("endpoint"), storage.get("addressingStyle", "auto"), storage.get("region"))
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                settings = S3Settings.from_spec(None, self._env)
                settings.endpoint = storage.get("endpoint") or settings.endpoint
                settings.addressing_style = storage.get("addressingStyle") or "auto"
                settings.region = storage.get("region") or settings.region
                store = self._stores[key] = Store(settings)
            return store

    def forget(self, key: Any) -> None:
        with self._lock:
            self._caches.pop(key, None)

    def _cache(self, key: Any) -> _Cache:
        with self._lock:
            return self._caches.setdefault(key, _Cache())

    def read(self, key: Any, root: str, storage: dict[str, Any] | None, *, checkpoints: bool, force_list: bool = False) -> StorageView:
        """Progress (and, for jobs, complete checkpoints) of one run root. Never raises."""
        if root.startswith("pvc://"):
            return StorageView(unsupported=f"{root}: the operator cannot read pvc:// storage; progress comes from the termination message")
        cache = self._cache(key)
        view = StorageView()
        try:
            store = self.store_for(storage)
            try:
                view.progress = store.read_json(join(root, PROGRESS_FILE))
            except NotFound:
                view.progress = None
            except ValueError:
                view.progress = None  # a half-written local file: read it next round
            if checkpoints:
                stamp = _stamp(view.progress)
                cache.rounds_since_list += 1
                if force_list or stamp != cache.progress_stamp or cache.rounds_since_list >= LIST_EVERY or not cache.manifests:
                    cache.listed = self._list(store, root, cache)
                    cache.progress_stamp = stamp
                    cache.rounds_since_list = 0
                view.checkpoints = list(cache.listed)
        except StorageError as err:
            view.error = str(err)
        except Exception as err:  # noqa: BLE001 - a bug or an unexpected client error must not stop polling
            view.error = f"{type(err).__name__}: {err}"
        return view

    @staticmethod
    def _list(store: Store, root: str, cache: _Cache) -> list[dict[str, Any]]:
        base = join(root, CHECKPOINTS_DIR)
        uuids = store.children(base)
        found = []
        for uuid in uuids:
            manifest = cache.manifests.get(uuid)
            if manifest is None:
                try:
                    manifest = store.read_json(join(base, uuid, MANIFEST_FILE))
                except (NotFound, ValueError):
                    continue  # still being written (its manifest comes last)
                if not isinstance(manifest, dict):
                    continue
                manifest = {**manifest, "uuid": manifest.get("uuid") or uuid, "uri": join(base, uuid)}
                cache.manifests[uuid] = manifest
            found.append(manifest)
        for gone in set(cache.manifests) - set(uuids):
            cache.manifests.pop(gone, None)
        return found

    def delete_prefix(self, root: str, storage: dict[str, Any] | None) -> None:
        self.store_for(storage).delete_prefix(root)


def _stamp(progress: Any) -> Any:
    if not isinstance(progress, dict):
        return None
    return (progress.get("updatedAt") or progress.get("updated_at"), progress.get("step"), str(progress.get("latestCheckpoint") or progress.get("latest_checkpoint")))
