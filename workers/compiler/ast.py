"""The expression AST: frozen dataclasses, each carrying the span of source it came from."""

from __future__ import annotations

from dataclasses import dataclass

from workers.compiler.errors import Span


@dataclass(frozen=True)
class Number:
    value: float
    span: Span


@dataclass(frozen=True)
class Ref:
    """An adapter reference. ``version`` is None for latest, else the text after ``@``."""

    name: str
    version: str | None
    span: Span


@dataclass(frozen=True)
class BaseModelRef:
    """The ``base`` keyword: the base model itself, a zero delta, optionally pinned to a model id."""

    model: str | None
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: Node
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * /
    left: Node
    right: Node
    span: Span


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Node, ...]
    kwargs: tuple[tuple[str, Node, Span], ...]
    span: Span
    name_span: Span


Node = Number | Ref | BaseModelRef | Neg | BinOp | Call
