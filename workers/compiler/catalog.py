"""What the compiler needs to know about adapters, as protocols the registry satisfies.

The compiler never imports the registry: whoever calls :func:`compile_expression` hands it an object
with this shape (``registry.catalog.RegistryCatalog`` in production, a dict-backed one in tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class OperandInfo(Protocol):
    """One pinned adapter version, as far as type checking needs it."""

    @property
    def adapter(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def version_id(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def base_model(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def task_type(self) -> str | None: ...
    @property
    def variants(self) -> Sequence[str]:
        """LoRA variants present (``dora``, ``lora_bias``); the compiler refuses them for now."""
        ...

    @property
    def modules(self) -> Mapping[str, Sequence[float]]:
        """Module name → ``[out_features, in_features, rank, scale]``."""
        ...


class Catalog(Protocol):
    def adapter_names(self) -> Sequence[str]:
        """Every registered adapter name (for 'did you mean' suggestions)."""
        ...

    def version_numbers(self, name: str) -> Sequence[int]:
        """Version numbers of ``name``, ascending; empty when the adapter does not exist."""
        ...

    def get(self, name: str, number: int) -> OperandInfo:
        """The version ``number`` of ``name`` (which :meth:`version_numbers` listed)."""
        ...
