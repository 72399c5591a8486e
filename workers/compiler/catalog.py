"""What the compiler needs to know about adapters, as protocols the registry satisfies.

The compiler never imports the registry: whoever calls :func:`~workers.compiler.compile_expression` hands
it an object with this shape (``registry.catalog.RegistryCatalog`` in production).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable


class OperandInfo(Protocol):
    """One pinned adapter version, as far as type checking needs it. No tensor data."""

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
    def dtype(self) -> str:
        """Storage dtype of the factors: ``F32``, ``F16``, ``BF16`` (``F64`` is read as F32)."""
        ...

    @property
    def task_type(self) -> str | None: ...
    @property
    def variants(self) -> Sequence[str]:
        """LoRA variants present (``dora``, ``lora_bias``); the compiler refuses them for now."""
        ...

    @property
    def modules(self) -> Mapping[str, Sequence[float]]:
        """Module name → ``[out_features, in_features, rank, scale]``, then ``kh, kw`` for a conv module.

        A 4-element row is a Linear layer (2-D factors); ``[out, in, rank, scale, 1, 1]`` is a Conv2d with a
        1×1 kernel (4-D factors, same ΔW as the 2-D product).
        """
        ...


class Catalog(Protocol):
    """Name lookup. Adapter names are case-sensitive; version numbers start at 1."""

    def adapter_names(self) -> Sequence[str]:
        """Every registered adapter name (for 'did you mean' suggestions; only called on errors)."""
        ...

    def version_numbers(self, name: str) -> Sequence[int]:
        """Version numbers of ``name``, ascending; empty when the adapter does not exist."""
        ...

    def get(self, name: str, number: int) -> OperandInfo:
        """The version ``number`` of ``name`` (which :meth:`version_numbers` listed)."""
        ...


@runtime_checkable
class TaggedCatalog(Protocol):
    """Optional: a catalog that also knows version tags (``code@stable``).

    Catalogs without this method still compile every expression; a tag then gives ``unknown_version``.
    """

    def version_for_tag(self, name: str, tag: str) -> int | None:
        """The version number that ``tag`` names for adapter ``name``, or None."""
        ...
