"""Name resolution: each reference is pinned to a version (id and sha256) and checked against the others.

As operands arrive, the resolver enforces the operand limit, refuses LoRA variants it cannot merge,
and checks that every operand shares one base model and agrees on the shape of every module it has.
Errors point at the reference that introduced the conflict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from workers.compiler import ast
from workers.compiler.catalog import Catalog, OperandInfo, TaggedCatalog
from workers.compiler.errors import CompileError, Span, did_you_mean
from workers.compiler.functions import FUNCTIONS
from workers.compiler.parser import BASE_KEYWORD
from workers.compiler.texpr import Leaf, OperandKey

MAX_OPERANDS = 256
_NUMBERED = re.compile(r"^v?(\d+)$")
_VARIANT_NAMES = {"dora": "DoRA (use_dora)", "lora_bias": "lora_bias"}
_FLOAT_DTYPES = {"F16", "BF16", "F32"}


@dataclass(frozen=True)
class Resolved:
    """A pinned operand with its facts and where it was first named."""

    key: OperandKey
    info: OperandInfo
    leaf: Leaf
    span: Span
    modules: Mapping[str, Sequence[float]]
    """Module name → ``[out_features, in_features, rank, scale]`` (+ ``kh, kw`` for a conv module; the catalog's
    rows, as given)."""

    @property
    def dtype(self) -> str:
        return self.info.dtype if self.info.dtype in _FLOAT_DTYPES else "F32"


class Resolver:
    """Pins references against a :class:`Catalog`; one instance per compilation."""

    def __init__(self, catalog: Catalog, source: str = "") -> None:
        """``source`` is the expression text, used only to word suggestions."""
        self._catalog = catalog
        self._source = source
        self.operands: dict[OperandKey, Resolved] = {}
        self.shapes: dict[str, tuple[int, int, OperandKey]] = {}
        self.kernels: dict[str, tuple[int, int]] = {}
        """The modules that are convolutions (module → kernel, ``(1, 1)``); absent: a Linear layer."""
        self.base_model: str | None = None
        self.base_pins: list[tuple[str, Span]] = []
        self._numbers: dict[str, list[int]] = {}

    def leaf(self, ref: ast.Ref) -> Leaf:
        """The pinned leaf for ``ref`` (the same object for every reference to one version)."""
        key = OperandKey(ref.name, self._version(ref))
        found = self.operands.get(key)
        if found is not None:
            return found.leaf
        if len(self.operands) >= MAX_OPERANDS:
            raise CompileError(
                "too_many_operands",
                f"more than {MAX_OPERANDS} distinct adapters; merge in stages (register an intermediate result)",
                ref.span,
            )
        info = self._catalog.get(key.name, key.number)
        resolved = Resolved(key, info, Leaf(key), ref.span, info.modules)
        self._admit(resolved)
        self.operands[key] = resolved
        return resolved.leaf

    def pin_base(self, model: str, span: Span) -> None:
        """Record ``base("org/model")``; checked against the operands by :meth:`finish`."""
        self.base_pins.append((model, span))

    def finish(self, whole: Span) -> None:
        """Checks that need every operand: at least one adapter, and the base pins agree with it."""
        if not self.operands:
            raise CompileError(
                "no_operands", "the expression names no adapter; `base` alone is the base model itself", whole
            )
        for model, span in self.base_pins:
            if model != self.base_model:
                raise CompileError(
                    "base_mismatch",
                    f"base is pinned to {model!r}, but the adapters are for {self.base_model!r}",
                    span,
                )

    # -- versions ---------------------------------------------------------------------------------------
    def _numbers_of(self, ref: ast.Ref) -> list[int]:
        numbers = self._numbers.get(ref.name)
        if numbers is None:
            numbers = list(self._catalog.version_numbers(ref.name))
            self._numbers[ref.name] = numbers
        if not numbers:
            raise CompileError("unknown_adapter", self._unknown_adapter_message(ref), ref.span)
        return numbers

    def _version(self, ref: ast.Ref) -> int:
        numbers = self._numbers_of(ref)
        if ref.version is None or ref.version == "latest":
            return numbers[-1]
        listed = ", ".join(map(str, numbers))
        match = _NUMBERED.match(ref.version)
        if match is not None:
            number = int(match.group(1))
            if number not in numbers:
                raise CompileError(
                    "unknown_version",
                    f"adapter {ref.name!r} has no version {number}; it has {listed} (latest: {numbers[-1]})",
                    ref.span,
                )
            return number
        tagged = (
            self._catalog.version_for_tag(ref.name, ref.version) if isinstance(self._catalog, TaggedCatalog) else None
        )
        if tagged is None or tagged not in numbers:
            raise CompileError(
                "unknown_version",
                f"adapter {ref.name!r} has no version or tag {ref.version!r}{did_you_mean(ref.version, ['latest'])}; "
                f"write @N, @vN or @latest (versions: {listed})",
                ref.span,
            )
        return tagged

    # -- compatibility ----------------------------------------------------------------------------------
    def _admit(self, new: Resolved) -> None:
        info = new.info
        if info.variants:
            kinds = " and ".join(_VARIANT_NAMES.get(v, v) for v in info.variants)
            raise CompileError(
                "unsupported_adapter",
                f"{new.key.ref} is a {kinds} adapter; Graft cannot merge those yet. Use a plain LoRA adapter",
                new.span,
            )
        if self.base_model is None:
            self.base_model = info.base_model
        elif info.base_model != self.base_model:
            first = next(iter(self.operands.values()))
            raise CompileError(
                "base_mismatch",
                f"{new.key.ref} is for base model {info.base_model!r}, but {first.key.ref} is for "
                f"{self.base_model!r}; all adapters in an expression must share a base model",
                new.span,
            )
        shapes, kernels = self.shapes, self.kernels
        for module, row in new.modules.items():
            seen = shapes.get(module)
            kernel = (int(row[4]), int(row[5])) if len(row) > 4 else None
            if seen is None:
                shapes[module] = (int(row[0]), int(row[1]), new.key)
                if kernel is not None:
                    kernels[module] = kernel
            elif seen[0] != row[0] or seen[1] != row[1]:
                raise CompileError(
                    "shape_mismatch",
                    f"module {module!r} is {int(row[0])}x{int(row[1])} in {new.key.ref} but "
                    f"{seen[0]}x{seen[1]} in {seen[2].ref}; the adapters were trained on different architectures",
                    new.span,
                )
            elif kernels.get(module) != kernel:
                raise CompileError(
                    "kernel_mismatch",
                    f"module {module!r} is {_layer(kernel)} in {new.key.ref} but {_layer(kernels.get(module))} in "
                    f"{seen[2].ref}; the adapters were trained on different architectures",
                    new.span,
                )

    def _unknown_adapter_message(self, ref: ast.Ref) -> str:
        name = ref.name
        if name in FUNCTIONS:
            return f"{name!r} is a function, not an adapter; call it, e.g. {FUNCTIONS[name].example}"
        names = list(self._catalog.adapter_names())
        unquoted = _unquoted_name(self._source, ref.span, names) if not ref.quoted else None
        if unquoted is not None:
            return (
                f"unknown adapter {name!r}; did you mean the adapter {unquoted!r}? A name with '-' or '/' "
                f'must be quoted: "{unquoted}"'
            )
        hint = did_you_mean(name, [*names, BASE_KEYWORD])
        return f"unknown adapter {name!r}{hint or '; `graft list` shows the registered adapters'}"


def _layer(kernel: tuple[int, int] | None) -> str:
    return "a Linear layer" if kernel is None else f"a {kernel[0]}×{kernel[1]} Conv2d"


_NAME_CHAR = re.compile(r"[A-Za-z0-9_.\-/]")


def _unquoted_name(source: str, span: Span, names: list[str]) -> str | None:
    """A registered name that the text around ``span`` spells without quotes (``acme/code-lora``), or None."""
    start, end = span.start, span.end
    while start > 0 and _NAME_CHAR.match(source[start - 1]):
        start -= 1
    while end < len(source) and _NAME_CHAR.match(source[end]):
        end += 1
    word = source[start:end].strip()
    return word if word != source[span.start : span.end] and word in names else None
