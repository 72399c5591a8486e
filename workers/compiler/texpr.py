"""The typed expression: resolved, module-independent, with constants folded and like terms collected.

Every adapter-valued expression is a :class:`Linear` — a sorted, collected combination ``Σ c·atom`` whose
atoms are pinned operands (:class:`Leaf`) or function applications (:class:`Apply`). ``lerp`` is already
expanded; everything else stays a call. Each atom has a canonical ``text`` (pinned refs, every parameter
spelled out, commutative inputs sorted): it is the identity used to collect like terms, and the pieces of
the plan's normalised expression.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

from workers.compiler.ast import format_name, quote
from workers.compiler.functions import FunctionSpec

ZERO_RELATIVE = 1e-12
"""A collected coefficient this small relative to the largest term that fed it is zero (0.1+0.2-0.3)."""


def format_scalar(value: float | int) -> str:
    """A number in canonical text: 12 significant digits, ints as ints."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = f"{value:.12g}"
    return text if text != "-0" else "0"


@dataclass(frozen=True)
class OperandKey:
    """A pinned reference: adapter name and version number."""

    name: str
    number: int

    @property
    def ref(self) -> str:
        return format_name(self.name, str(self.number))


@dataclass(frozen=True, eq=False)
class Leaf:
    """A pinned operand."""

    key: OperandKey
    text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", self.key.ref)


@dataclass(frozen=True, eq=False)
class Apply:
    """A function call with every parameter bound (defaults filled in, in table order).

    ``inputs`` holds the variadic adapter arguments (ties, dare, dare_ties), sorted when commutative.
    """

    spec: FunctionSpec
    inputs: tuple[Linear, ...]
    args: tuple[tuple[str, ArgValue], ...]
    text: str = field(init=False)

    def __post_init__(self) -> None:
        parts = [i.text for i in self.inputs]
        for name, value in self.args:
            if value is None:
                continue
            param = self.spec.param(name)
            if param is not None and param.type == "adapter" and isinstance(value, Linear):
                parts.append(value.text)
            else:
                parts.append(f"{name}={_format_arg(value)}")
        object.__setattr__(self, "text", f"{self.spec.name}({', '.join(parts)})")

    def arg(self, name: str) -> ArgValue:
        for key, value in self.args:
            if key == name:
                return value
        raise KeyError(name)


def _format_arg(value: Linear | tuple[Linear, ...] | int | float | str | bool) -> str:
    if isinstance(value, Linear):
        return value.text
    if isinstance(value, tuple):
        return value[0].text if len(value) == 1 else f"({', '.join(v.text for v in value)})"
    if isinstance(value, str):
        return quote(value)
    return format_scalar(value)


Atom = Leaf | Apply


@dataclass(frozen=True, eq=False)
class Linear:
    """``Σ coefficient · atom``: atoms distinct, sorted by text, no zero coefficient. Empty is zero."""

    terms: tuple[tuple[float, Atom], ...] = ()

    @cached_property
    def text(self) -> str:
        """Canonical text (computed on first use: intermediate values rarely need it)."""
        return _linear_text(self.terms)

    @staticmethod
    def of(atom: Atom) -> Linear:
        return Linear(((1.0, atom),))

    @property
    def is_zero(self) -> bool:
        return not self.terms

    def scaled(self, factor: float) -> Linear:
        if factor == 0.0:
            return Linear()
        return Linear(tuple((c * factor, a) for c, a in self.terms))

    def coefficients(self) -> Iterator[float]:
        return (c for c, _a in self.terms)


ArgValue = Linear | tuple[Linear, ...] | int | float | str | bool | None
"""A bound argument: an adapter, a tuple of adapters, a number, a string, a flag, or None (not given)."""


def _linear_text(terms: tuple[tuple[float, Atom], ...]) -> str:
    parts: list[str] = []
    for index, (coefficient, atom) in enumerate(terms):
        magnitude = abs(coefficient)
        term = atom.text if magnitude == 1.0 else f"{format_scalar(magnitude)}*{atom.text}"
        if index == 0:
            parts.append(term if coefficient > 0 else f"-{term}")
        else:
            parts.append(f"{'+' if coefficient > 0 else '-'} {term}")
    return " ".join(parts)


class _Slot:
    __slots__ = ("atom", "coefficient", "largest")

    def __init__(self, atom: Atom, coefficient: float) -> None:
        self.atom = atom
        self.coefficient = coefficient
        self.largest = abs(coefficient)


class LinearBuilder:
    """Accumulates ``Σ factor · Linear``, collecting like terms (by atom text) and dropping zeros."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    def add(self, value: Linear, factor: float = 1.0) -> LinearBuilder:
        for coefficient, atom in value.terms:
            self.add_atom(atom, coefficient * factor)
        return self

    def add_atom(self, atom: Atom, coefficient: float) -> None:
        slot = self._slots.get(atom.text)
        if slot is None:
            self._slots[atom.text] = _Slot(atom, coefficient)
        else:
            slot.coefficient += coefficient
            slot.largest = max(slot.largest, abs(coefficient))

    @property
    def finite(self) -> bool:
        """False when a collected coefficient overflowed (``1e308*a + 1e308*a``) or became NaN (``inf - inf``)."""
        return all(math.isfinite(slot.coefficient) for slot in self._slots.values())

    def build(self) -> Linear:
        terms = tuple(
            (slot.coefficient, slot.atom)
            for _text, slot in sorted(self._slots.items())
            if slot.coefficient != 0.0 and abs(slot.coefficient) > ZERO_RELATIVE * slot.largest
        )
        return Linear(terms)


def linear_sum(parts: Iterable[tuple[float, Linear]]) -> Linear:
    """``Σ factor · value``, collected."""
    builder = LinearBuilder()
    for factor, value in parts:
        builder.add(value, factor)
    return builder.build()


def all_finite(value: Linear) -> bool:
    return all(math.isfinite(c) for c in value.coefficients())


# -- analyses used by the plan ----------------------------------------------------------------------------------


def adapter_args(apply: Apply) -> Iterator[Linear]:
    """Every adapter-valued argument of a call: inputs, then adapter and adapters parameters."""
    yield from apply.inputs
    for _name, value in apply.args:
        if isinstance(value, Linear):
            yield value
        elif isinstance(value, tuple):
            yield from value


def operand_weights(root: Linear) -> dict[OperandKey, float]:
    """Each operand's lineage weight: its total linear coefficient (through ``select``); for an operand
    reached only through non-linear calls, its coefficient inside the first such call."""
    linear: dict[OperandKey, float] = {}
    inner: dict[OperandKey, float] = {}

    def visit(value: Linear, factor: float, through_linear: bool) -> None:
        for coefficient, atom in value.terms:
            if isinstance(atom, Leaf):
                if through_linear:
                    linear[atom.key] = linear.get(atom.key, 0.0) + factor * coefficient
                else:
                    inner.setdefault(atom.key, factor * coefficient)
            elif atom.spec.linear:
                for arg in adapter_args(atom):
                    visit(arg, factor * coefficient, through_linear)
            else:
                for arg in adapter_args(atom):
                    visit(arg, 1.0, False)

    visit(root, 1.0, True)
    weights = dict(inner)
    for key, weight in linear.items():
        if abs(weight) > ZERO_RELATIVE or key not in weights:
            weights[key] = weight
    return weights


def outermost_strategy(root: Linear) -> str:
    """``linear``, or the name of the outermost non-linear function (breadth first, canonical order)."""
    level = [root]
    while level:
        following: list[Linear] = []
        for value in level:
            for _c, atom in value.terms:
                if isinstance(atom, Apply):
                    if not atom.spec.linear:
                        return atom.spec.name
                    following.extend(adapter_args(atom))
        level = following
    return "linear"
