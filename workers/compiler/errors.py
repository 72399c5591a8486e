"""Compile errors: a stable code, a message saying how to fix it, and the span it is about.

Every failure of the compiler — syntax, names, types, bounds, limits — is a :class:`CompileError`. Codes
are stable identifiers (tests, the API and the CLI rely on them); messages are for people.

Codes: ``syntax``, ``empty``, ``too_long``, ``too_deep``, ``too_many_operands``, ``bad_number``,
``division_by_zero``, ``unknown_adapter``, ``unknown_version``, ``unknown_function``, ``arity``,
``missing_argument``, ``unknown_keyword``, ``duplicate_argument``, ``conflicting_arguments``,
``type_error``, ``out_of_bounds``, ``bad_value``, ``no_operands``, ``base_version``, ``base_call``,
``base_mismatch``, ``shape_mismatch``, ``kernel_mismatch``, ``unsupported_adapter``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Half-open character range ``[start, end)`` in the expression text (0-based offsets)."""

    start: int
    end: int

    @property
    def column(self) -> int:
        """1-based position of the first character (``start + 1``): the column, for one-line text."""
        return self.start + 1

    def join(self, other: Span) -> Span:
        """The smallest span covering both."""
        return Span(min(self.start, other.start), max(self.end, other.end))


class CompileError(Exception):
    """An expression could not be compiled. ``code`` is stable; ``span`` points into the source."""

    def __init__(self, code: str, message: str, span: Span, source: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.span = span
        self.source = source

    def with_source(self, source: str) -> CompileError:
        """Attach the expression text (for rendering); returns ``self``."""
        self.source = source
        return self

    @property
    def line(self) -> int:
        """1-based line of the span's start."""
        return self.source.count("\n", 0, min(self.span.start, len(self.source))) + 1

    @property
    def column(self) -> int:
        """1-based column of the span's start within its line (as editors count)."""
        line_start = self.source.rfind("\n", 0, min(self.span.start, len(self.source))) + 1
        return self.span.start - line_start + 1

    def render(self) -> str:
        """Three lines: ``error[code]: message``, the source line, and a caret under the span."""
        if not self.source:
            return f"error[{self.code}]: {self.message}"
        start = min(self.span.start, len(self.source))
        line_start = self.source.rfind("\n", 0, start) + 1
        line_end = self.source.find("\n", start)
        line = self.source[line_start : line_end if line_end != -1 else len(self.source)]
        offset = start - line_start
        width = max(1, min(self.span.end, line_start + len(line)) - start)
        return f"error[{self.code}]: {self.message}\n  {line}\n  {' ' * offset}{'^' * width}"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (the API's error body)."""
        return {
            "code": self.code,
            "message": self.message,
            "start": self.span.start,
            "end": self.span.end,
            "line": self.line,
            "column": self.column,
            "rendered": self.render(),
        }

    def __str__(self) -> str:
        return self.render()


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to ``word`` (a case-insensitive exact match first), or None."""
    pool = list(dict.fromkeys(candidates))
    lowered = {c.lower(): c for c in pool}
    if word.lower() in lowered and lowered[word.lower()] != word:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or the empty string."""
    match = suggest(word, candidates)
    return f" (did you mean {match!r}?)" if match is not None else ""
