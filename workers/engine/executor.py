"""Run a :class:`MergePlan` module by module: read the factors it needs, combine, write, free.

The executor gets the plan, the operands' file paths and an output folder. It reports progress through
a callback and checks for cancellation between modules. It never touches the DB or the network.

Every node kind runs. Each node of a step's program evaluates to a value that is either **factored**
(``B``, ``A`` and a scale, ``scale·B@A`` = the node's ΔW) or **dense** (ΔW itself, fp32 on the device):

- ``operand``: factored (the LoRA scale is kept apart so that its dense form is ``s·(B@A)``, exactly as
  ``dense.form_delta`` defines it);
- ``linear``: factored (concatenated factors) when every term is, else dense (``dense.dense_linear``);
- ``svd``: factored truncation (``kernels.truncate_factors*``) or, on a dense input, ``dense.refactor*``;
- ``ties``/``dare``/``dare_ties``/``magnitude_prune``: the dense ΔW of each input goes to
  ``strategies.apply_strategy`` (input weights as ``weights``, keys = the plan operand index for operand
  leaves and :data:`NON_LEAF_KEY_BASE` + the input's position for any other input; ``options.module`` =
  the step's module), and the result is re-factored to the node's ``refactor_rank`` with
  ``dense.refactor``;
- ``orth``: factored through ``kernels.orth_factors`` (dense sides are re-factored to the step's rank
  first).

A 1×1 Conv2d module (``step.kernel == (1, 1)``) runs exactly like a Linear one on the 2-D views of its factors
(the reader squeezes the trailing ``(1, 1)``); the writer gives the output factors their 4-D shapes back.

A step's final value is factored with exactly ``step.rank`` columns: a dense value is re-factored to it, a
smaller rank is padded with zero columns/rows (so the written rank pattern is the plan's) and a larger one
is truncated. Every truncation/re-factoring adds to the retained-energy bookkeeping (kept and total energy
summed over all modules). Re-factoring seeds are ``rng.stable_seed("graft.refactor", module, n)`` with
``n`` the index of the re-factoring within the step, so the same plan gives byte-identical output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

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
    SvdNode,
    TiesNode,
    walk,
)
from workers.engine.dense import LOW_RETAINED_ENERGY, dense_linear, form_delta, refactor, refactor_to_energy
from workers.engine.kernels import (
    Truncation,
    concat_factors,
    orth_factors,
    truncate_factors,
    truncate_factors_to_energy,
)
from workers.engine.peft_config import peft_config
from workers.engine.reader import OperandReader
from workers.engine.rng import stable_seed
from workers.engine.strategies import Strategy, StrategyOptions, apply_strategy
from workers.engine.writer import TORCH_DTYPES, PeftFolderWriter

Progress = Callable[[int, int], None]

NON_LEAF_KEY_BASE = 1_000_000
"""DARE mask key of a strategy input that is not an operand leaf: ``NON_LEAF_KEY_BASE + position`` (its
position among the node's inputs). Operand leaves use their plan operand index, which is always smaller."""

_KNOWN_KINDS = frozenset({"operand", "linear", "svd", "orth", "ties", "dare", "dare_ties", "magnitude_prune"})


class Cancelled(Exception):
    """The caller asked to stop; nothing was written."""


class NotExecutable(Exception):
    """The plan uses a node kind this executor does not know (checked before any file is opened)."""

    code = "not_executable"


@dataclass(frozen=True)
class ExecutionReport:
    weights_path: Path
    seconds: float
    modules: int
    retained_energy: float
    """Share of the exact result's energy kept overall (1.0 when nothing was truncated): Σ kept / Σ total
    over every truncation and re-factoring of every module."""
    warnings: tuple[str, ...] = ()
    """Per-run warnings, e.g. an overall retained energy below ``dense.LOW_RETAINED_ENERGY``."""


def pick_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), else CPU. Every kernel runs on both."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Energy:
    """Retained-energy bookkeeping across the truncations of one plan."""

    def __init__(self) -> None:
        self.kept = 0.0
        self.total = 0.0
        self.low_modules: list[str] = []

    def add(self, cut: Truncation) -> None:
        self.kept += cut.kept_energy
        self.total += cut.total_energy

    @property
    def retained(self) -> float:
        return 1.0 if self.total == 0.0 else min(1.0, self.kept / self.total)


@dataclass
class _Factored:
    """``scale · B @ A``."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float = 1.0

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.b if self.scale == 1.0 else self.scale * self.b), self.a


@dataclass
class _Dense:
    delta: torch.Tensor


_Value = _Factored | _Dense


@dataclass
class _Step:
    """Evaluation context of one module."""

    step: ModuleStep
    reader: OperandReader
    device: torch.device
    energy: _Energy
    refactors: int = 0
    kept: float = 0.0
    total: float = 0.0

    def seed(self) -> int:
        self.refactors += 1
        return stable_seed("graft.refactor", self.step.module, self.refactors)

    def account(self, cut: Truncation) -> None:
        self.energy.add(cut)
        self.kept += cut.kept_energy
        self.total += cut.total_energy

    def zeros(self) -> _Factored:
        return _Factored(
            torch.zeros(self.step.out_features, 1, device=self.device),
            torch.zeros(1, self.step.in_features, device=self.device),
        )

    def dense(self, value: _Value) -> torch.Tensor:
        if isinstance(value, _Dense):
            return value.delta
        return form_delta(value.b, value.a, value.scale)

    def refactored(self, delta: torch.Tensor, rank: int) -> _Factored:
        cut = refactor(delta, rank, seed=self.seed())
        self.account(cut)
        return _Factored(cut.b, cut.a)

    def factored(self, value: _Value, rank: int) -> _Factored:
        """``value`` in factored form (a dense value is re-factored to ``rank``)."""
        if isinstance(value, _Factored):
            return value
        return self.refactored(value.delta, rank)

    # -- nodes ----------------------------------------------------------------------------------------------

    def eval(self, node: Node) -> _Value:
        if isinstance(node, OperandNode):
            b, a = self.reader.factors(node.operand, self.step.module)
            return _Factored(b, a, node.scale)
        if isinstance(node, LinearNode):
            return self._linear(node)
        if isinstance(node, SvdNode):
            return self._svd(node)
        if isinstance(node, OrthNode):
            return self._orth(node)
        return self._strategy(node)

    def _linear(self, node: LinearNode) -> _Value:
        if not node.terms:
            return self.zeros()
        values = [(coefficient, self.eval(term)) for coefficient, term in node.terms]
        if all(isinstance(v, _Factored) for _c, v in values):
            terms = []
            for coefficient, value in values:
                assert isinstance(value, _Factored)
                terms.append((coefficient * value.scale, value.b, value.a))  # one multiply per B
            b, a = concat_factors(terms)
            return _Factored(b, a)
        return _Dense(dense_linear([(coefficient, self.dense(value)) for coefficient, value in values]))

    def _svd(self, node: SvdNode) -> _Value:
        value = self.eval(node.input)
        cut: Truncation
        if isinstance(value, _Dense):
            if node.energy is not None:
                cut = refactor_to_energy(value.delta, node.energy, max_rank=node.rank, seed=self.seed())
            else:
                cut = refactor(value.delta, node.rank or self.step.rank, seed=self.seed())
        else:
            b, a = value.folded()
            if node.energy is not None:
                cut = truncate_factors_to_energy(b, a, node.energy, max_rank=node.rank)
            else:
                cut = truncate_factors(b, a, node.rank if node.rank is not None else b.shape[1])
        self.account(cut)
        return _Factored(cut.b, cut.a)

    def _orth(self, node: OrthNode) -> _Value:
        source = self.factored(self.eval(node.input), self.step.rank)
        against = [self.factored(self.eval(other), self.step.rank).b for other in node.against]
        b, a = orth_factors(*source.folded(), against)
        return _Factored(b, a)

    def _strategy(self, node: TiesNode | DareNode | DareTiesNode | MagnitudePruneNode) -> _Value:
        module = self.step.module
        if isinstance(node, MagnitudePruneNode):
            pairs: tuple[tuple[float, Node], ...] = ((1.0, node.input),)
            strategy = Strategy.MAGNITUDE_PRUNE
            options = StrategyOptions(density=node.density, module=module)
        elif isinstance(node, TiesNode):
            pairs = node.inputs
            strategy = Strategy.TIES
            options = StrategyOptions(density=node.density, majority=node.majority, module=module)
        elif isinstance(node, DareNode):
            pairs = node.inputs
            strategy = Strategy.DARE
            options = StrategyOptions(density=node.density, seed=node.seed, rescale=node.rescale, module=module)
        else:
            pairs = node.inputs
            strategy = Strategy.DARE_TIES
            options = StrategyOptions(density=node.density, seed=node.seed, majority=node.majority, module=module)
        inputs: list[torch.Tensor] = []
        weights: list[float] = []
        keys: list[int] = []
        for position, (weight, child) in enumerate(pairs):
            inputs.append(self.dense(self.eval(child)))  # freshly formed: the kernel may reuse it
            weights.append(weight)
            keys.append(child.operand if isinstance(child, OperandNode) else NON_LEAF_KEY_BASE + position)
        merged = apply_strategy(strategy, inputs, weights, keys=keys, options=options, reuse_inputs=True)
        del inputs
        return self.refactored(merged, node.refactor_rank)

    # -- the step -------------------------------------------------------------------------------------------

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's output factors, with exactly ``step.rank`` columns."""
        rank = self.step.rank
        value = self.factored(self.eval(self.step.program), rank)
        b, a = value.folded()
        if b.shape[1] > rank:
            cut = truncate_factors(b, a, rank)
            self.account(cut)
            b, a = cut.b, cut.a
        if b.shape[1] < rank:
            missing = rank - b.shape[1]
            b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
            a = torch.cat([a, a.new_zeros(missing, a.shape[1])], dim=0)
        if self.total > 0.0 and self.kept / self.total < LOW_RETAINED_ENERGY:
            self.energy.low_modules.append(self.step.module)
        return b.to(torch.float32), a.to(torch.float32)


def check_executable(plan: MergePlan) -> None:
    """Raise :class:`NotExecutable` when a step needs a node kind (or a conv kernel) this executor does not know."""
    for step in plan.steps:
        if step.kernel is not None and step.kernel != (1, 1):
            kh, kw = step.kernel
            raise NotExecutable(f"conv modules with a {kh}×{kw} kernel are not executable (module {step.module})")
        for node in walk(step.program):
            if node.kind not in _KNOWN_KINDS:
                raise NotExecutable(f"strategy {node.kind!r} is not executable (module {step.module})")


def _warnings(energy: _Energy, modules: int) -> tuple[str, ...]:
    found = []
    if energy.retained < LOW_RETAINED_ENERGY:
        found.append(
            f"the result keeps {energy.retained:.1%} of the exact result's energy overall "
            f"(below {LOW_RETAINED_ENERGY:.0%}): the output rank is too small for what the strategy produced"
        )
    if energy.low_modules:
        shown = ", ".join(energy.low_modules[:3]) + (" …" if len(energy.low_modules) > 3 else "")
        found.append(
            f"{len(energy.low_modules)} of {modules} module(s) keep less than {LOW_RETAINED_ENERGY:.0%} "
            f"of their energy: {shown}"
        )
    return tuple(found)


def execute_plan(
    plan: MergePlan,
    operand_paths: list[Path],
    out_dir: Path,
    *,
    device: torch.device | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> ExecutionReport:
    """Write the plan's result as a PEFT folder in ``out_dir``; ``operand_paths[i]`` is operand i's weights."""
    if len(operand_paths) != len(plan.operands):
        raise ValueError(f"plan has {len(plan.operands)} operands but {len(operand_paths)} paths were given")
    check_executable(plan)
    device = device or pick_device()
    started = time.perf_counter()
    writer = PeftFolderWriter(out_dir, TORCH_DTYPES[plan.dtype])
    energy = _Energy()
    try:
        with torch.inference_mode(), OperandReader(operand_paths, device) as reader:
            for index, step in enumerate(plan.steps):
                if should_cancel is not None and should_cancel():
                    raise Cancelled(f"cancelled before module {index + 1} of {len(plan.steps)}")
                b, a = _Step(step, reader, device, energy).run()
                writer.add_module(step.module, b, a, kernel=step.kernel)
                del b, a
                if progress is not None:
                    progress(index + 1, len(plan.steps))
        metadata = {
            "format": "pt",
            "graft.expression": plan.expression,
            "graft.normalized": plan.normalized,
            "graft.plan_hash": plan.hash(),
            "graft.parents": json.dumps(
                [{"ref": o.ref, "sha256": o.sha256, "weight": o.weight} for o in plan.operands]
            ),
        }
        weights = writer.finish(peft_config(plan.base_model, plan.task_type, writer.ranks), metadata)
    except BaseException:
        writer.abort()
        raise
    return ExecutionReport(
        weights_path=weights,
        seconds=time.perf_counter() - started,
        modules=len(plan.steps),
        retained_energy=energy.retained,
        warnings=_warnings(energy, len(plan.steps)),
    )
