"""Text → AST with lark. Syntax errors become :class:`CompileError` with the column of the problem."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from lark import (
    Lark,
    Token,
    Transformer,
    Tree,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    v_args,
)
from lark.tree import Meta

from workers.compiler import ast
from workers.compiler.errors import CompileError, Span

MAX_SOURCE_CHARS = 10_000
MAX_DEPTH = 64
BASE_KEYWORD = "base"

_FRIENDLY = {
    "NAME": "an adapter name",
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
    "$END": "the end of the expression",
}


@cache
def _parser() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _tok_span(token: Token) -> Span:
    start = token.start_pos or 0
    return Span(start, token.end_pos if token.end_pos is not None else start + len(token))


class _ToAst(Transformer[Token, ast.Node]):
    def number(self, children: list[Token]) -> ast.Number:
        token = children[0]
        return ast.Number(float(token), _tok_span(token))

    def ref(self, children: list[Token]) -> ast.Node:
        name_tok = children[0]
        version = str(children[1]) if len(children) > 1 else None
        end = children[-1].end_pos or 0
        span = Span(name_tok.start_pos or 0, end)
        if name_tok.type == "STRING":
            return ast.Ref(str(name_tok)[1:-1], version, span)
        if str(name_tok) == BASE_KEYWORD:
            if version is not None:
                raise CompileError(
                    "base_version", '`base` takes no version; pin the model with base("org/model")', span
                )
            return ast.BaseModelRef(None, span)
        return ast.Ref(str(name_tok), version, span)

    def add(self, children: list[ast.Node]) -> ast.Node:
        return ast.BinOp("+", children[0], children[1], _join(children))

    def sub(self, children: list[ast.Node]) -> ast.Node:
        return ast.BinOp("-", children[0], children[1], _join(children))

    def mul(self, children: list[ast.Node]) -> ast.Node:
        return ast.BinOp("*", children[0], children[1], _join(children))

    def div(self, children: list[ast.Node]) -> ast.Node:
        return ast.BinOp("/", children[0], children[1], _join(children))

    def neg(self, children: list[ast.Node]) -> ast.Node:
        inner = children[0]
        return ast.Neg(inner, Span(max(0, inner.span.start - 1), inner.span.end))

    def pos(self, children: list[ast.Node]) -> ast.Node:
        return children[0]

    def kwarg(self, children: list[Any]) -> tuple[str, ast.Node, Span]:
        name_tok, value = children
        return (str(name_tok), value, _tok_span(name_tok))

    @v_args(meta=True)
    def call(self, meta: Meta, children: list[Any]) -> ast.Node:
        name_tok = children[0]
        args: list[ast.Node] = [c for c in children[1:] if not isinstance(c, tuple)]
        kwargs: list[tuple[str, ast.Node, Span]] = [c for c in children[1:] if isinstance(c, tuple)]
        span = Span(meta.start_pos, meta.end_pos)
        if str(name_tok) == BASE_KEYWORD:
            if len(args) != 1 or kwargs or not isinstance(args[0], ast.Ref) or args[0].version is not None:
                raise CompileError("base_call", 'write base("org/model") to pin the base model', span)
            return ast.BaseModelRef(args[0].name, span)
        return ast.Call(str(name_tok), tuple(args), tuple(kwargs), span, _tok_span(name_tok))


def _join(children: list[ast.Node]) -> Span:
    return Span(children[0].span.start, children[-1].span.end)


def _expected(expected: set[str]) -> str:
    names = sorted({_FRIENDLY.get(e, e) for e in expected if not e.startswith("__")})
    return ", ".join(names[:6]) if names else "something else"


def _check_depth(text: str) -> None:
    depth = 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise CompileError(
                    "too_deep",
                    f"parentheses nest deeper than {MAX_DEPTH} levels; flatten the expression",
                    Span(index, index + 1),
                )
        elif char == ")":
            depth = max(0, depth - 1)


def _syntax_error(text: str, exc: UnexpectedInput) -> CompileError:
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        return CompileError("syntax", f"unexpected character {text[pos]!r}", Span(pos, pos + 1))
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        pos = len(text.rstrip())
        expected = _expected(set(getattr(exc, "expected", set()) or set()))
        return CompileError("syntax", f"the expression ends too early; expected {expected}", Span(pos, pos + 1))
    assert isinstance(exc, UnexpectedToken)
    token = exc.token
    span = _tok_span(token)
    return CompileError("syntax", f"unexpected {str(token)!r}; expected {_expected(set(exc.expected))}", span)


def parse(text: str) -> ast.Node:
    """Parse ``text`` into an AST or raise :class:`CompileError` (with ``source`` set)."""
    try:
        if len(text) > MAX_SOURCE_CHARS:
            raise CompileError(
                "too_long",
                f"the expression is {len(text)} characters; the limit is {MAX_SOURCE_CHARS}",
                Span(MAX_SOURCE_CHARS, MAX_SOURCE_CHARS + 1),
            )
        if not text.strip():
            raise CompileError("empty", "the expression is empty; write e.g. `base + code - toxic`", Span(0, 1))
        _check_depth(text)
        try:
            tree: Tree[Token] = _parser().parse(text)
        except UnexpectedInput as exc:
            raise _syntax_error(text, exc) from None
        try:
            result = _ToAst().transform(tree)
        except Exception as exc:  # lark wraps errors raised in callbacks
            inner = getattr(exc, "orig_exc", exc)
            if isinstance(inner, CompileError):
                raise inner from None
            raise
        return result
    except CompileError as error:
        raise error.with_source(text) from None
    except RecursionError:
        raise CompileError("too_deep", "the expression nests too deeply; flatten it", Span(0, 1), text) from None
