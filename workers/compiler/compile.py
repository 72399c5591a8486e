"""The compiler's entry point: text → AST → pinned, typed expression → per-module programs → MergePlan.

Stages, one module each: ``parser`` (syntax and limits), ``resolve`` (pinning, base model, shapes,
refusals), ``check`` (types, arity, bounds; constants folded, like terms collected), ``lower`` (per-module
programs, ranks, paths, max_rank), ``cost``. No tensor file is opened and nothing here imports torch or
the database: the catalog is handed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from workers.compiler.catalog import Catalog
from workers.compiler.check import Checker
from workers.compiler.cost import estimate_cost
from workers.compiler.errors import CompileError, Span
from workers.compiler.lower import ModuleLowering, Notes, OperandTable, ProgramMemo
from workers.compiler.parser import parse
from workers.compiler.plan import (
    DareNode,
    DareTiesNode,
    LinearNode,
    MagnitudePruneNode,
    MergePlan,
    ModuleStep,
    Node,
    OperandNode,
    OrthNode,
    PlannedOperand,
    SvdNode,
    TiesNode,
    operand_nodes,
)
from workers.compiler.resolve import Resolved, Resolver
from workers.compiler.texpr import Linear, operand_weights, outermost_strategy

DEFAULT_MAX_RANK = 1024
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
CANCELLED = "the expression cancels out: the result is an empty (all-zero) adapter"
ZERO_EVERYWHERE = "the expression is zero in every module: the result is an empty (all-zero) adapter"


def compile_expression(text: str, catalog: Catalog, *, max_rank: int = DEFAULT_MAX_RANK) -> MergePlan:
    """Compile ``text`` against ``catalog`` into a pinned plan, or raise :class:`CompileError`.

    Any text at all gives a plan or a ``CompileError`` (errors from the catalog itself propagate).
    """
    if max_rank < 1:
        raise ValueError("max_rank must be at least 1")
    try:
        return _compile(text, catalog, max_rank)
    except CompileError as error:
        raise error.with_source(text) from None
    except RecursionError:  # a safety net: the parser's limits keep every pass far from the limit
        raise CompileError("too_deep", "the expression nests too deeply; flatten it", Span(0, 1), text) from None


def _compile(text: str, catalog: Catalog, max_rank: int) -> MergePlan:
    tree = parse(text)
    resolver = Resolver(catalog, text)
    root = Checker(resolver).check(tree)
    resolver.finish(tree.span)
    assert resolver.base_model is not None

    # Operand indexes follow content, not spelling: sorted by (sha256, version id).
    ordered = sorted(resolver.operands.values(), key=lambda r: (r.info.sha256, r.info.version_id))
    notes = Notes(max_rank)
    steps = _lower(root, resolver, ordered, notes)
    warnings = notes.warnings()
    if steps:
        normalized = root.text
        kept, steps = _drop_unused(ordered, steps)
    else:
        warnings.insert(0, CANCELLED if root.is_zero else ZERO_EVERYWHERE)
        # Spelled with every operand, so that the normalised text compiles to these same (zero) modules.
        normalized = " + ".join(f"0*{key.ref}" for key in sorted(resolver.operands, key=lambda k: k.ref))
        steps = [
            ModuleStep(
                module=m,
                out_features=o,
                in_features=i,
                kernel=resolver.kernels.get(m),
                path="factored",
                rank=1,
                program=LinearNode(),
            )
            for m, (o, i, _k) in sorted(resolver.shapes.items())
        ]
        kept = []
    described = kept or ordered
    weights = operand_weights(root)
    dtypes = {r.dtype for r in described}
    task_types = {r.info.task_type for r in described}
    return MergePlan(
        expression=text,
        normalized=normalized,
        strategy=outermost_strategy(root),
        base_model=resolver.base_model,
        dtype=dtypes.pop() if len(dtypes) == 1 else "F32",
        task_type=task_types.pop() if len(task_types) == 1 else None,
        max_rank=max_rank,
        operands=tuple(_planned(r, weights.get(r.key, 0.0)) for r in kept),
        steps=tuple(steps),
        warnings=tuple(warnings),
        cost=estimate_cost(steps, [_ITEMSIZE[r.dtype] for r in kept]),
    )


def _lower(root: Linear, resolver: Resolver, ordered: list[Resolved], notes: Notes) -> list[ModuleStep]:
    """One step per module (sorted by name) where the expression is not zero."""
    table = OperandTable((r.leaf, i, r.info.sha256, r.modules) for i, r in enumerate(ordered))
    modules = sorted(resolver.shapes)
    kernels = resolver.kernels
    memo = ProgramMemo(root, table, modules)
    steps: list[ModuleStep] = []
    for module in modules:
        out_f, in_f, _first = resolver.shapes[module]
        lowered = memo.lower(ModuleLowering(module, out_f, in_f, table, notes), root)
        if lowered is not None:
            path: Literal["factored", "dense"] = "dense" if lowered.dense else "factored"
            steps.append(
                ModuleStep(
                    module=module,
                    out_features=out_f,
                    in_features=in_f,
                    kernel=kernels.get(module),
                    path=path,
                    rank=lowered.rank,
                    program=lowered.program,
                )
            )
    return steps


def _drop_unused(ordered: list[Resolved], steps: list[ModuleStep]) -> tuple[list[Resolved], list[ModuleStep]]:
    """The operands some program uses, and the steps renumbered to index only those."""
    programs = {id(step.program): step.program for step in steps}  # modules often share one program
    used = sorted({node.operand for program in programs.values() for node in operand_nodes(program)})
    kept = [ordered[i] for i in used]
    if len(kept) == len(ordered):
        return kept, steps
    remap = {old: new for new, old in enumerate(used)}
    reindexed = {key: _reindex(program, remap) for key, program in programs.items()}  # still shared
    return kept, [step.model_copy(update={"program": reindexed[id(step.program)]}) for step in steps]


def _planned(resolved: Resolved, weight: float) -> PlannedOperand:
    info = resolved.info
    return PlannedOperand(
        ref=resolved.key.ref,
        adapter=info.adapter,
        version=info.version,
        version_id=info.version_id,
        sha256=info.sha256,
        weight=weight,
    )


def _reindex(node: Node, remap: Mapping[int, int]) -> Node:
    """``node`` with operand indexes renumbered (after operands that cancelled everywhere were dropped)."""
    if isinstance(node, OperandNode):
        return node.model_copy(update={"operand": remap[node.operand]})
    if isinstance(node, LinearNode):
        return node.model_copy(update={"terms": tuple((c, _reindex(n, remap)) for c, n in node.terms)})
    if isinstance(node, SvdNode | MagnitudePruneNode):
        return node.model_copy(update={"input": _reindex(node.input, remap)})
    if isinstance(node, OrthNode):
        against = tuple(_reindex(a, remap) for a in node.against)
        return node.model_copy(update={"input": _reindex(node.input, remap), "against": against})
    assert isinstance(node, TiesNode | DareNode | DareTiesNode)
    return node.model_copy(update={"inputs": tuple((w, _reindex(n, remap)) for w, n in node.inputs)})
