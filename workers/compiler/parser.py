"""Text → AST with lark (LALR, AST built in reduce callbacks). Every failure is a :class:`CompileError`.

Limits are checked before parsing: at most :data:`MAX_SOURCE_CHARS` characters and :data:`MAX_DEPTH`
levels of parentheses. The parser never recurses in Python, so no input raises ``RecursionError``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from workers.compiler import ast
from workers.compiler.errors import CompileError, Span

MAX_SOURCE_CHARS = 10_000
MAX_DEPTH = 64
BASE_KEYWORD = "base"
_MAX_EXACT_INT = 2**64

_FRIENDLY = {
    "NAME": "a name",
    "STRING": "a quoted name",
    "NUMBER": "a number",
    "VERSION": "a version",
    "LPAR": "'('",
    "RPAR": "')'",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "COMMA": "','",
    "EQUAL": "'='",
    "AT": "'@'",
    "$END": "the end",
}


@cache
def _parser() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", transformer=_ToAst(), maybe_placeholders=False)


def _tok_span(token: Token) -> Span:
    start = token.start_pos or 0
    return Span(start, token.end_pos if token.end_pos is not None else start + len(token))


def _number(token: Token) -> int | float:
    """The value of a NUMBER token: an exact ``int`` for integer literals up to 2**64, else a ``float``."""
    text = str(token).replace("_", "")
    percent = text.endswith("%")
    text = text.rstrip("%")
    value: int | float
    try:
        if text[:2].lower() in ("0x", "0o", "0b"):
            value = int(text, 0)
            if value > _MAX_EXACT_INT:
                value = float(value)
        elif any(c in text for c in ".eE") or len(text) > 19:
            value = float(text)
        else:
            value = int(text)
    except (ValueError, OverflowError):
        value = float("inf")
    if percent:
        value = value / 100
    if not math.isfinite(value):
        raise CompileError("bad_number", f"{str(token)!r} is too large to be a number", _tok_span(token))
    return value


def _unquote(token: Token) -> str:
    return str(token)[1:-1]


class _Items:
    """An operator chain being built by the left-recursive rules (``terms``, ``factors``)."""

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[str, ast.Node]]) -> None:
        self.items = items


class _ArgList:
    __slots__ = ("args",)

    def __init__(self, args: list[ast.Node | ast.Keyword]) -> None:
        self.args = args


class _ToAst(Transformer[Token, Any]):
    """Reduce callbacks: each receives already-built children and returns an AST node."""

    # -- operator chains ------------------------------------------------------------------------------
    def terms(self, children: list[Any]) -> _Items:
        return self._chain(children, "+")

    def factors(self, children: list[Any]) -> _Items:
        return self._chain(children, "*")

    @staticmethod
    def _chain(children: list[Any], first_op: str) -> _Items:
        if len(children) == 1:
            return _Items([(first_op, children[0])])
        chain, op, node = children
        chain.items.append((str(op), node))
        return chain  # type: ignore[no-any-return]

    def sum(self, children: list[Any]) -> ast.Node:
        return self._close(children[0], ast.Sum)

    def product(self, children: list[Any]) -> ast.Node:
        return self._close(children[0], ast.Product)

    @staticmethod
    def _close(chain: _Items, kind: type[ast.Sum] | type[ast.Product]) -> ast.Node:
        if len(chain.items) == 1:
            return chain.items[0][1]
        span = chain.items[0][1].span.join(chain.items[-1][1].span)
        return kind(tuple(chain.items), span)

    # -- unary ------------------------------------------------------------------------------------------
    def neg(self, children: list[Any]) -> ast.Node:
        sign, operand = children
        span = _tok_span(sign).join(operand.span)
        if isinstance(operand, ast.Neg):  # runs of signs collapse: the tree stays shallow
            return _respan(operand.operand, span)
        return ast.Neg(operand, span)

    def pos(self, children: list[Any]) -> ast.Node:
        sign, operand = children
        return _respan(operand, _tok_span(sign).join(operand.span))

    # -- atoms ------------------------------------------------------------------------------------------
    def number(self, children: list[Token]) -> ast.Number:
        return ast.Number(_number(children[0]), _tok_span(children[0]))

    def group(self, children: list[Any]) -> ast.Node:
        return children[1]  # type: ignore[no-any-return]

    def items(self, children: list[Any]) -> list[ast.Node]:
        if isinstance(children[0], list):
            return [*children[0], children[2]]
        return [children[0], children[2]]

    def tuple(self, children: list[Any]) -> ast.Tuple:
        inner = [c for c in children[1:-1] if not isinstance(c, Token)]
        nodes: list[ast.Node] = inner[0] if inner and isinstance(inner[0], list) else inner
        return ast.Tuple(tuple(nodes), _tok_span(children[0]).join(_tok_span(children[-1])))

    def ref(self, children: list[Token]) -> ast.Node:
        name_tok = children[0]
        span = _tok_span(name_tok).join(_tok_span(children[-1]))
        version = None
        if len(children) == 3:
            version = _unquote(children[2]) if children[2].type == "STRING" else str(children[2])
        if name_tok.type == "STRING":
            return ast.Ref(_unquote(name_tok), version, True, span)
        if str(name_tok) == BASE_KEYWORD:
            if version is not None:
                raise CompileError(
                    "base_version", '`base` takes no version; pin the base model with base("org/model")', span
                )
            return ast.BaseModelRef(None, span)
        return ast.Ref(str(name_tok), version, False, span)

    # -- calls ------------------------------------------------------------------------------------------
    def kwarg(self, children: list[Any]) -> ast.Keyword:
        name_tok, _eq, value = children
        return ast.Keyword(str(name_tok), value, _tok_span(name_tok))

    def args(self, children: list[Any]) -> _ArgList:
        if len(children) == 1:
            return _ArgList([children[0]])
        children[0].args.append(children[2])
        return children[0]  # type: ignore[no-any-return]

    def call(self, children: list[Any]) -> ast.Node:
        name_tok = children[0]
        span = _tok_span(name_tok).join(_tok_span(children[-1]))
        arg_list: list[ast.Node | ast.Keyword] = children[2].args if isinstance(children[2], _ArgList) else []
        args: list[ast.Node] = []
        kwargs: list[ast.Keyword] = []
        misplaced: Span | None = None
        for arg in arg_list:
            if isinstance(arg, ast.Keyword):
                kwargs.append(arg)
            else:
                if kwargs and misplaced is None:
                    misplaced = arg.span
                args.append(arg)
        if str(name_tok) == BASE_KEYWORD:
            model = args[0] if len(args) == 1 and not kwargs else None
            if not isinstance(model, ast.Ref) or not model.quoted or model.version is not None:
                raise CompileError("base_call", 'write base("org/model") to pin the base model', span)
            return ast.BaseModelRef(model.name, span)
        return ast.Call(str(name_tok), tuple(args), tuple(kwargs), span, _tok_span(name_tok), misplaced)


def _respan(node: ast.Node, span: Span) -> ast.Node:
    """``node`` with a wider span (a sign in front of it)."""
    return replace(node, span=span)


# -- errors ---------------------------------------------------------------------------------------------------


def _expected(expected: set[str]) -> str:
    names = sorted({_FRIENDLY.get(e, e) for e in expected if not e.startswith("__")})
    return ", ".join(names[:7]) if names else "something else"


def _previous_char(text: str, pos: int) -> str:
    stripped = text[:pos].rstrip()
    return stripped[-1] if stripped else ""


def _syntax_error(text: str, exc: UnexpectedInput) -> CompileError:
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        char = text[pos]
        span = Span(pos, pos + 1)
        if char in "\"'":
            return CompileError("syntax", f"this quote ({char}) is never closed on its line", span)
        if char in "[]":
            return CompileError("syntax", "use parentheses for a tuple: against=(a, b)", span)
        if char == "%":
            return CompileError("syntax", "'%' must follow a number directly, as in 30% (which is 0.3)", span)
        if char == "@":
            return CompileError("syntax", "'@' must follow an adapter name, as in code@2", span)
        return CompileError("syntax", f"unexpected character {char!r}", span)
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        pos = len(text.rstrip())
        expected = _expected(set(getattr(exc, "expected", set()) or set()))
        return CompileError("syntax", f"the expression ends too early; expected {expected}", Span(pos, pos + 1))
    assert isinstance(exc, UnexpectedToken)
    token = exc.token
    span = _tok_span(token)
    hint = ""
    starts_operand = token.type in ("NAME", "VERSION", "STRING", "LPAR", "NUMBER")
    if starts_operand and _previous_char(text, span.start) not in "+-*/(,=@":
        hint = " (a missing operator? write e.g. 0.5*code)"
    return CompileError("syntax", f"unexpected {str(token)!r}; expected {_expected(set(exc.expected))}{hint}", span)


def _check_depth(text: str) -> None:
    """Refuse more than :data:`MAX_DEPTH` nested parentheses (quoted text does not count)."""
    depth = 0
    quote = ""
    for index, char in enumerate(text):
        if quote:
            if char == quote or char == "\n":
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise CompileError(
                    "too_deep",
                    f"parentheses and calls nest deeper than {MAX_DEPTH} levels; flatten the expression",
                    Span(index, index + 1),
                )
        elif char == ")":
            depth = max(0, depth - 1)


def parse(text: str) -> ast.Node:
    """Parse ``text`` into an AST, or raise :class:`CompileError` (with ``source`` set)."""
    try:
        if len(text) > MAX_SOURCE_CHARS:
            raise CompileError(
                "too_long",
                f"the expression is {len(text)} characters long; the limit is {MAX_SOURCE_CHARS}. "
                "Merge in stages: register an intermediate result and refer to it by name",
                Span(MAX_SOURCE_CHARS, MAX_SOURCE_CHARS + 1),
            )
        if not text.strip():
            raise CompileError("empty", "the expression is empty; write e.g. `base + code - toxic`", Span(0, 1))
        _check_depth(text)
        try:
            node: ast.Node = _parser().parse(text)  # type: ignore[assignment]  # the transformer returns AST
        except UnexpectedInput as exc:
            raise _syntax_error(text, exc) from None
        except CompileError:
            raise
        except Exception as exc:  # lark wraps errors raised inside callbacks
            inner = getattr(exc, "orig_exc", None)
            if isinstance(inner, CompileError):
                raise inner from None
            raise
        return node
    except CompileError as error:
        raise error.with_source(text) from None
