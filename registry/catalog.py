"""The registry seen as the compiler's catalog (``workers.compiler.catalog.Catalog``, structurally)."""

from __future__ import annotations

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
        version = repo.get_version(self._session, name, number)
        if version is None:
            raise VersionNotFound(f"adapter {name!r} has no version {number}")
        return CatalogEntry.from_version(version)
