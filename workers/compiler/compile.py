"""Resolve, type-check and lower an AST into a :class:`MergePlan`.

Everything here is exact linear algebra on ΔW: each operand contributes ``weight · scale · B @ A`` per
module, and the plan concatenates the scaled factors (rank = the sum of ranks). No tensor is opened.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from workers.compiler import ast
from workers.compiler.catalog import Catalog, OperandInfo
from workers.compiler.errors import CompileError, Span
from workers.compiler.parser import parse
from workers.compiler.plan import MergePlan, ModuleStep, PlannedOperand, Term

MAX_OPERANDS = 256
_VERSION_NUMBER = re.compile(r"^v?(\d+)$")
_BARE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_FLOAT_DTYPES = {"F16", "BF16", "F32"}


@dataclass
class _Linear:
    """An adapter-valued expression: operand key → weight (a linear combination of ΔW)."""

    weights: dict[tuple[str, int], float] = field(default_factory=dict)

    def scaled(self, factor: float) -> _Linear:
        return _Linear({k: w * factor for k, w in self.weights.items()})

    def plus(self, other: _Linear, sign: float) -> _Linear:
        merged = dict(self.weights)
        for key, weight in other.weights.items():
            merged[key] = merged.get(key, 0.0) + sign * weight
        return _Linear(merged)


_Value = float | _Linear


class _Checker:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.operands: dict[tuple[str, int], OperandInfo] = {}
        self.spans: dict[tuple[str, int], Span] = {}
        self.base_pins: list[tuple[str, Span]] = []

    # -- resolution ------------------------------------------------------------------------------
    def resolve(self, ref: ast.Ref) -> tuple[str, int]:
        numbers = list(self.catalog.version_numbers(ref.name))
        if not numbers:
            names = list(self.catalog.adapter_names())
            close = difflib.get_close_matches(ref.name, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else "; `graft list` shows the registered adapters"
            raise CompileError("unknown_adapter", f"unknown adapter {ref.name!r}{hint}", ref.span)
        if ref.version is None or ref.version == "latest":
            number = numbers[-1]
        else:
            match = _VERSION_NUMBER.match(ref.version)
            if match is None:
                raise CompileError(
                    "unknown_version",
                    f"unknown version {ref.version!r} of {ref.name!r}; write @N or @latest "
                    f"(versions: {', '.join(map(str, numbers))})",
                    ref.span,
                )
            number = int(match.group(1))
            if number not in numbers:
                raise CompileError(
                    "unknown_version",
                    f"adapter {ref.name!r} has no version {number}; it has {', '.join(map(str, numbers))}",
                    ref.span,
                )
        key = (ref.name, number)
        if key not in self.operands:
            if len(self.operands) >= MAX_OPERANDS:
                raise CompileError(
                    "too_many_operands", f"more than {MAX_OPERANDS} distinct operands; merge in stages", ref.span
                )
            info = self.catalog.get(ref.name, number)
            if info.variants:
                raise CompileError(
                    "unsupported_adapter",
                    f"{ref.name}@{number} is a {'/'.join(info.variants)} adapter, which Graft cannot merge yet",
                    ref.span,
                )
            self.operands[key] = info
            self.spans[key] = ref.span
        return key

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, node: ast.Node) -> _Value:
        if isinstance(node, ast.Number):
            if not math.isfinite(node.value):
                raise CompileError("bad_number", "this number is too large to be a weight", node.span)
            return node.value
        if isinstance(node, ast.Ref):
            return _Linear({self.resolve(node): 1.0})
        if isinstance(node, ast.BaseModelRef):
            if node.model is not None:
                self.base_pins.append((node.model, node.span))
            return _Linear()
        if isinstance(node, ast.Neg):
            value = self.evaluate(node.operand)
            return -value if isinstance(value, float) else value.scaled(-1.0)
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        raise CompileError(
            "unknown_function",
            f"unknown function {node.name!r}; only +, -, * and / are available so far",
            node.name_span,
        )

    def _binop(self, node: ast.BinOp) -> _Value:
        left, right = self.evaluate(node.left), self.evaluate(node.right)
        if node.op in "+-":
            sign = 1.0 if node.op == "+" else -1.0
            if isinstance(left, _Linear) and isinstance(right, _Linear):
                return left.plus(right, sign)
            if isinstance(left, float) and isinstance(right, float):
                return left + sign * right
            number = node.left if isinstance(left, float) else node.right
            raise CompileError(
                "type_error",
                f"cannot {'add' if sign > 0 else 'subtract'} a number and an adapter; "
                "scale the adapter instead, e.g. 0.5*code",
                number.span,
            )
        if node.op == "*":
            if isinstance(left, _Linear) and isinstance(right, _Linear):
                raise CompileError(
                    "type_error", "cannot multiply two adapters; multiply an adapter by a number", node.span
                )
            if isinstance(left, float) and isinstance(right, float):
                return left * right
            return left.scaled(right) if isinstance(left, _Linear) else right.scaled(left)  # type: ignore[union-attr,arg-type]
        # division
        if isinstance(right, _Linear):
            raise CompileError("type_error", "cannot divide by an adapter; divide by a number", node.right.span)
        if right == 0.0:
            raise CompileError("division_by_zero", "division by zero", node.right.span)
        return left / right if isinstance(left, float) else left.scaled(1.0 / right)


def _display(name: str, number: int) -> str:
    shown = name if _BARE_NAME.match(name) and name != "base" else f'"{name}"'
    return f"{shown}@{number}"


def _format_weight(weight: float) -> str:
    return f"{weight:.12g}"


def normalize(weights: Sequence[tuple[str, int, float]]) -> str:
    """A canonical spelling of a linear combination: ``0.7*code@1 + 0.3*math@1 - toxic@2``."""
    if not weights:
        return "base"
    parts: list[str] = []
    for index, (name, number, weight) in enumerate(weights):
        magnitude = abs(weight)
        term = _display(name, number) if magnitude == 1.0 else f"{_format_weight(magnitude)}*{_display(name, number)}"
        if index == 0:
            parts.append(term if weight >= 0 else f"-{term}")
        else:
            parts.append(f"{'+' if weight >= 0 else '-'} {term}")
    return " ".join(parts)


def compile_expression(text: str, catalog: Catalog, *, max_rank: int = 1024) -> MergePlan:
    """Compile ``text`` against ``catalog`` into a pinned plan, or raise :class:`CompileError`."""
    try:
        return _compile(text, catalog, max_rank)
    except CompileError as error:
        raise error.with_source(text) from None


def _compile(text: str, catalog: Catalog, max_rank: int) -> MergePlan:
    tree = parse(text)
    checker = _Checker(catalog)
    value = checker.evaluate(tree)
    if isinstance(value, float):
        raise CompileError("type_error", "the expression is a number; it must be an adapter, e.g. 0.5*code", tree.span)
    if not checker.operands:
        raise CompileError(
            "no_operands", "the expression names no adapter; `base` alone is the base model itself", tree.span
        )

    infos = checker.operands
    first_key = next(iter(infos))
    base_model = infos[first_key].base_model
    for key, info in infos.items():
        if info.base_model != base_model:
            raise CompileError(
                "base_mismatch",
                f"{_display(*key)} is for base model {info.base_model!r}, but {_display(*first_key)} is for "
                f"{base_model!r}; all operands must share a base model",
                checker.spans[key],
            )
    for model, span in checker.base_pins:
        if model != base_model:
            raise CompileError(
                "base_mismatch", f"base is pinned to {model!r}, but the operands are for {base_model!r}", span
            )

    warnings: list[str] = []
    live = [(key, w) for key, w in value.weights.items() if w != 0.0]
    if not live:
        warnings.append("the expression cancels out: the result is an empty (all-zero) adapter")
    operands = tuple(
        PlannedOperand(
            ref=_display(*key),
            adapter=key[0],
            version=key[1],
            version_id=infos[key].version_id,
            sha256=infos[key].sha256,
            weight=weight,
        )
        for key, weight in live
    )
    index_of = {key: i for i, (key, _w) in enumerate(live)}

    shapes: dict[str, tuple[int, int, tuple[str, int]]] = {}
    for key, info in infos.items():
        for module, row in info.modules.items():
            out_f, in_f = int(row[0]), int(row[1])
            seen = shapes.setdefault(module, (out_f, in_f, key))
            if seen[:2] != (out_f, in_f):
                raise CompileError(
                    "shape_mismatch",
                    f"module {module!r} is {out_f}x{in_f} in {_display(*key)} but {seen[0]}x{seen[1]} in "
                    f"{_display(*seen[2])}; the adapters were trained on different architectures",
                    checker.spans[key],
                )

    steps: list[ModuleStep] = []
    truncated = 0
    for module in sorted(shapes):
        out_f, in_f, _ = shapes[module]
        terms = tuple(
            Term(
                operand=index_of[key],
                coefficient=weight * float(infos[key].modules[module][3]),
                rank=int(infos[key].modules[module][2]),
            )
            for key, weight in live
            if module in infos[key].modules
        )
        rank = sum(t.rank for t in terms)
        cap = None
        if rank > max_rank:
            cap, truncated = max_rank, truncated + 1
        steps.append(
            ModuleStep(
                module=module,
                out_features=out_f,
                in_features=in_f,
                terms=terms,
                rank=max(1, min(rank, max_rank)),
                truncate_to=cap,
            )
        )
    if truncated:
        warnings.append(f"{truncated} module(s) exceed max_rank={max_rank}; they are truncated by SVD (not exact)")

    dtypes = {info.dtype for info in infos.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in _FLOAT_DTYPES else "F32"
    task_types = {info.task_type for info in infos.values()}
    return MergePlan(
        expression=text,
        normalized=normalize([(key[0], key[1], w) for key, w in live]),
        base_model=base_model,
        dtype=dtype,
        task_type=task_types.pop() if len(task_types) == 1 else None,
        operands=operands,
        steps=tuple(steps),
        warnings=tuple(warnings),
    )
