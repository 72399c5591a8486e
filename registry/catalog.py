"""The registry seen as the compiler's catalog (``workers.compiler.catalog.Catalog``, structurally)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.errors import VersionNotFound
from registry.models import AdapterVersion


@dataclass(frozen=True)
class CatalogEntry:
    """A pinned version with what type checking needs; no tensor data."""

    adapter: str
    version: int
    version_id: int
    sha256: str
    base_model: str
    dtype: str
    task_type: str | None
    modules: dict[str, list[Any]]
    variants: tuple[str, ...] = field(default=())

    @classmethod
    def from_version(cls, version: AdapterVersion) -> CatalogEntry:
        config = version.peft_config
        variants = tuple(name for name, flag in (("dora", "use_dora"), ("lora_bias", "lora_bias")) if config.get(flag))
        task_type = config.get("task_type")
        return cls(
            adapter=version.adapter.name,
            version=version.number,
            version_id=version.id,
            sha256=version.sha256,
            base_model=version.base_model.name,
            dtype=version.dtype,
            task_type=str(task_type) if task_type else None,
            modules=dict(version.modules),
            variants=variants,
        )


VersionKey = tuple[Any, ...]
"""(adapter name, number, then :func:`registry.repositories.get_version_key`)."""


class _EntryCache:
    """Catalog entries by version key, shared by every catalog in the process.

    Versions are immutable, so an entry never goes stale; it is only served after the version's key (name,
    number, id, sha256, base model, creation time, config) was read again in the caller's session, so a version
    that is gone, not visible to that transaction, or whose id was handed out again is never served from here.
    Saves loading and parsing a version's module table (18 kB of JSON for a 7B adapter) on every compile.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[VersionKey, CatalogEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: VersionKey) -> CatalogEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: VersionKey, entry: CatalogEntry) -> None:
        with self._lock:
            self._entries[key] = entry
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


_ENTRIES = _EntryCache(capacity=2048)


class RegistryCatalog:
    """Looks adapters up in the database through one session, caching what it has read."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._numbers: dict[str, list[int]] = {}

    def adapter_names(self) -> Sequence[str]:
        return repo.adapter_names(self._session)

    def version_numbers(self, name: str) -> Sequence[int]:
        if name not in self._numbers:
            self._numbers[name] = repo.version_numbers(self._session, name)
        return self._numbers[name]

    def get(self, name: str, number: int) -> CatalogEntry:
        found = repo.get_version_key(self._session, name, number)
        if found is None:
            raise VersionNotFound(f"adapter {name!r} has no version {number}")
        key = (name, number, *found)
        entry = _ENTRIES.get(key)
        if entry is None:
            version = self._session.get(AdapterVersion, found[0])
            assert version is not None  # just found in this transaction
            entry = CatalogEntry.from_version(version)
            _ENTRIES.put(key, entry)
        return entry
