"""The expression AST: frozen dataclasses, each carrying the span of source it came from.

Sums and products are n-ary (``a + b - c`` is one :class:`Sum`), and runs of unary signs are collapsed, so
the tree's depth is bounded by the nesting of parentheses and calls (which the parser limits), never by
the length of the expression. :func:`unparse` turns a tree back into text that parses to the same tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workers.compiler.errors import Span

BARE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
BARE_VERSION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class Number:
    """A numeric literal; ``value`` is an ``int`` for integer literals, else a ``float``."""

    value: int | float
    span: Span


@dataclass(frozen=True)
class Ref:
    """A name: an adapter reference, or — where a parameter wants text — a quoted string.

    ``version`` is None for latest, else the text after ``@`` (``3``, ``v3``, ``latest``, a tag).
    ``quoted`` says the name was written in quotes (``"acme/code-lora"``).
    """

    name: str
    version: str | None
    quoted: bool
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
class Sum:
    """``items[0] ± items[1] ± …``; each item is ``(op, node)`` with op ``+`` or ``-`` (the first is ``+``)."""

    items: tuple[tuple[str, Node], ...]
    span: Span


@dataclass(frozen=True)
class Product:
    """``items[0] */ items[1] */ …``; each item is ``(op, node)`` with op ``*`` or ``/`` (the first is ``*``)."""

    items: tuple[tuple[str, Node], ...]
    span: Span


@dataclass(frozen=True)
class Keyword:
    """``name=value`` inside a call; ``span`` covers the name."""

    name: str
    value: Node
    span: Span


@dataclass(frozen=True)
class Call:
    """``name(args…, kw=value…)``. The parser does not know which names are functions."""

    name: str
    args: tuple[Node, ...]
    kwargs: tuple[Keyword, ...]
    span: Span
    name_span: Span
    positional_after_keyword: Span | None = None


@dataclass(frozen=True)
class Tuple:
    """``(a, b)``: only meaningful as an argument (``against=(a, b)``)."""

    items: tuple[Node, ...]
    span: Span


Node = Number | Ref | BaseModelRef | Neg | Sum | Product | Call | Tuple


# -- unparse -------------------------------------------------------------------------------------------------

_SUM, _PRODUCT, _UNARY, _ATOM = 1, 2, 3, 4


def format_number(value: int | float) -> str:
    """A literal that parses back to ``value`` (ints stay ints; floats use the shortest round-trip form)."""
    return str(value) if isinstance(value, int) else repr(float(value))


def quote(text: str) -> str:
    """``text`` in double quotes (single quotes when it contains a double quote)."""
    return f"'{text}'" if '"' in text else f'"{text}"'


def format_name(name: str, version: str | None = None, *, quoted: bool = False) -> str:
    """A reference as it would be written: bare when possible (and not forced ``quoted``), else quoted."""
    bare = not quoted and BARE_NAME.match(name) is not None and name != "base"
    shown = name if bare else quote(name)
    if version is None:
        return shown
    return f"{shown}@{version if BARE_VERSION.match(version) else quote(version)}"


def _precedence(node: Node) -> int:
    if isinstance(node, Sum):
        return _SUM
    if isinstance(node, Product):
        return _PRODUCT
    if isinstance(node, Neg) or (isinstance(node, Number) and node.value < 0):
        return _UNARY
    return _ATOM


def _wrap(node: Node, minimum: int) -> str:
    text = unparse(node)
    return f"({text})" if _precedence(node) < minimum else text


def unparse(node: Node) -> str:
    """Text that parses back to an equivalent tree (the same values and structure; spans differ)."""
    if isinstance(node, Number):
        return format_number(node.value)
    if isinstance(node, Ref):
        return format_name(node.name, node.version, quoted=node.quoted)
    if isinstance(node, BaseModelRef):
        return "base" if node.model is None else f"base({quote(node.model)})"
    if isinstance(node, Neg):
        if isinstance(node.operand, Neg):  # the parser collapses runs of signs; so does the printer
            return unparse(node.operand.operand)
        return "-" + _wrap(node.operand, _ATOM)
    if isinstance(node, Sum):
        parts = [_wrap(node.items[0][1], _PRODUCT)]
        parts += [f"{op} {_wrap(item, _PRODUCT)}" for op, item in node.items[1:]]
        return " ".join(parts)
    if isinstance(node, Product):
        parts = [_wrap(node.items[0][1], _UNARY)]
        parts += [f"{op}{_wrap(item, _UNARY)}" for op, item in node.items[1:]]
        return "".join(parts)
    if isinstance(node, Call):
        args = [unparse(a) for a in node.args] + [f"{k.name}={unparse(k.value)}" for k in node.kwargs]
        return f"{node.name}({', '.join(args)})"
    inner = ", ".join(unparse(item) for item in node.items)
    return f"({inner},)" if len(node.items) == 1 else f"({inner})"
