"""The expression compiler: text → AST → pinned, typed expression → MergePlan. Pure Python.

Public surface: :func:`compile_expression`, :class:`CompileError` (with :class:`Span`), the plan IR
(:class:`MergePlan`) and the function table (:data:`FUNCTIONS`).
"""

from workers.compiler.compile import DEFAULT_MAX_RANK, compile_expression
from workers.compiler.errors import CompileError, Span
from workers.compiler.functions import FUNCTIONS, FunctionSpec
from workers.compiler.plan import MergePlan

__all__ = ["DEFAULT_MAX_RANK", "FUNCTIONS", "CompileError", "FunctionSpec", "MergePlan", "Span", "compile_expression"]
