"""The expression compiler: text → AST → pinned, type-checked operands → MergePlan. Pure Python."""

from workers.compiler.compile import compile_expression
from workers.compiler.errors import CompileError, Span
from workers.compiler.plan import MergePlan

__all__ = ["CompileError", "MergePlan", "Span", "compile_expression"]
