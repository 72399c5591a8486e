"""Compile errors: a stable code, a message saying how to fix it, and the span it is about."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Half-open character range ``[start, end)`` in the expression text (0-based)."""

    start: int
    end: int

    @property
    def column(self) -> int:
        """1-based column of the first character, as editors count."""
        return self.start + 1


class CompileError(Exception):
    """An expression could not be compiled. ``code`` is stable; ``span`` points into the source."""

    def __init__(self, code: str, message: str, span: Span, source: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.span = span
        self.source = source

    def with_source(self, source: str) -> CompileError:
        self.source = source
        return self

    def render(self) -> str:
        """The message, the source line and a caret under the offending column(s)."""
        if not self.source:
            return f"error[{self.code}]: {self.message}"
        start = min(self.span.start, len(self.source))
        width = max(1, min(self.span.end, len(self.source)) - start)
        line_start = self.source.rfind("\n", 0, start) + 1
        line_end = self.source.find("\n", start)
        line = self.source[line_start : line_end if line_end != -1 else len(self.source)]
        pad = " " * (start - line_start)
        return (
            f"error[{self.code}]: {self.message}\n"
            f"  {line}\n"
            f"  {pad}{'^' * min(width, max(1, len(line) - (start - line_start)))}"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "start": self.span.start,
            "end": self.span.end,
            "column": self.span.column,
            "rendered": self.render(),
        }

    def __str__(self) -> str:
        return self.render()
