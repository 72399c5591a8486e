"""Lowering: the typed expression → one program per module, in the plan's normal form.

For each module, the pass resolves ``select``, removes operands that lack the module (a zero delta),
fuses nested linear combinations, collects like terms (identity: sha256 and scale), drops zero terms,
sorts commutative operands canonically, computes every node's output rank and decides the path:
``dense`` when a node needs the dense ΔW (TIES, DARE, DARE-TIES, magnitude pruning), else ``factored``.
A result above ``max_rank`` is wrapped in an ``svd`` node, with a warning.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from operator import itemgetter
from typing import Literal

from workers.compiler.plan import (
    DareNode,
    DareTiesNode,
    LinearNode,
    MagnitudePruneNode,
    Node,
    OperandNode,
    OrthNode,
    SvdNode,
    TiesNode,
    canon_float,
)
from workers.compiler.selectors import layer_matches, module_matches
from workers.compiler.texpr import ZERO_RELATIVE, Apply, Leaf, Linear


@dataclass(frozen=True, eq=False)
class Lowered:
    """A lowered node with what its parents need: output rank, whether it runs dense, canonical key.

    ``terms`` is set for linear nodes (their lowered terms), so that parents can fuse or unwrap them; their
    key is built only when a parent asks (a root's never is). Keys name operands by sha256 and scale, so
    sorting by key orders terms the same way however the expression was spelled.
    """

    node: Node
    rank: int
    dense: bool
    terms: tuple[tuple[float, Lowered], ...] | None = None
    fixed_key: str = ""

    @cached_property
    def key(self) -> str:
        if self.terms is None:
            return self.fixed_key
        return "L(" + "+".join(f"{_fmt(c)}*{t.key}" for c, t in self.terms) + ")"


@dataclass(frozen=True)
class ModuleProgram:
    """A module's lowered program: the root node, its output rank and path.

    ``truncated``: whether it was wrapped in an ``svd`` node for exceeding ``max_rank`` (counted in
    :class:`Notes` once per module, also when the program is reused).
    """

    program: Node
    rank: int
    dense: bool
    truncated: bool = False


class Notes:
    """Warnings gathered across modules, reported once each (with counts)."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self.truncated = 0
        self.capped: Counter[str] = Counter()
        self.selects_seen: set[str] = set()
        self.selects_matched: set[str] = set()

    def warnings(self) -> list[str]:
        found: list[str] = []
        if self.truncated:
            found.append(
                f"{self.truncated} module(s) exceed max_rank={self.max_rank} and are truncated by SVD "
                "(not exact; the retained energy is reported after the merge)"
            )
        for what, count in sorted(self.capped.items()):
            found.append(f"{what} is capped at max_rank={self.max_rank} in {count} module(s)")
        for text in sorted(self.selects_seen - self.selects_matched):
            found.append(f"{text} keeps no module: it contributes nothing")
        return found


def _fmt(value: float) -> str:
    return repr(canon_float(value))


class _OperandRecord:
    __slots__ = ("index", "modules", "nodes", "sha256")

    def __init__(self, index: int, sha256: str, modules: Mapping[str, Sequence[float]]) -> None:
        self.index = index
        self.sha256 = sha256
        self.modules = modules
        self.nodes: dict[tuple[float, int], Lowered] = {}


class OperandTable:
    """What lowering needs of the pinned operands, shared by every module of one compilation.

    Operand nodes do not name their module, so one immutable node serves every module where the operand
    has the same scale and rank (the common case): a 200-operand, 224-module plan holds 200 of them.
    """

    def __init__(self, operands: Iterable[tuple[Leaf, int, str, Mapping[str, Sequence[float]]]]) -> None:
        """``operands``: (leaf, index in ``MergePlan.operands``, sha256, module rows) for each operand."""
        self._records = {leaf.text: _OperandRecord(index, sha, modules) for leaf, index, sha, modules in operands}

    def module_rows(self, leaves: Iterable[Leaf]) -> list[Mapping[str, Sequence[float]]]:
        """The module rows (module → [out, in, rank, scale]) of each of ``leaves``."""
        return [self._records[leaf.text].modules for leaf in leaves]

    def lowered(self, leaf: Leaf, module: str) -> Lowered | None:
        record = self._records[leaf.text]
        row = record.modules.get(module)
        if row is None:
            return None
        rank, scale = int(row[2]), float(row[3])
        found = record.nodes.get((scale, rank))
        if found is None:
            node = OperandNode(operand=record.index, scale=scale, rank=rank)
            found = Lowered(node, rank, False, None, f"o:{record.sha256}:{_fmt(scale)}:{rank}")
            record.nodes[(scale, rank)] = found
        return found


_ABSENT = (None, None, None, None)
"""Stands for the row of a module that an operand lacks (its rank and scale read None)."""


class ProgramMemo:
    """Reuses one program across the modules where the expression lowers identically.

    Only for a pure linear combination of operands (no function call), the common case: its program
    depends on nothing but each operand's (rank, scale) in the module — not on the module's name or shape
    — so modules with the same (rank, scale) per operand share one program object (programs are
    immutable). A 7B layout has 224 modules but typically a handful of distinct signatures.
    """

    def __init__(self, root: Linear, operands: OperandTable, modules: Sequence[str]) -> None:
        leaves = [atom for _c, atom in root.terms if isinstance(atom, Leaf)]
        self.enabled = len(leaves) == len(root.terms)
        self._programs: dict[tuple[object, ...], ModuleProgram | None] = {}
        self._signatures: dict[str, tuple[object, ...]] = {}
        if self.enabled and leaves:
            # A module's signature: every operand's rank and scale there. Built one operand at a time with
            # C-level map (plans can hold hundreds of thousands of terms), keeping only the columns that
            # vary across modules: a constant one distinguishes no module (usually none varies).
            columns: list[list[object]] = []
            wanted = set(modules)
            for rows in operands.module_rows(leaves):
                if rows.keys() >= wanted and all(len(set(map(itemgetter(i), rows.values()))) == 1 for i in (2, 3)):
                    continue  # in every module, with one rank and one scale: the usual adapter
                found = list(map(rows.get, modules, repeat(_ABSENT)))
                for column in (list(map(itemgetter(2), found)), list(map(itemgetter(3), found))):
                    if len(set(column)) > 1:
                        columns.append(column)
            if columns:
                self._signatures = dict(zip(modules, zip(*columns, strict=True), strict=True))

    def lower(self, lowering: ModuleLowering, root: Linear) -> ModuleProgram | None:
        """``lowering.root(root)``, reusing the program of an earlier module with the same signature.

        Only the varying columns are kept, so a module without an entry has the empty signature.
        """
        if not self.enabled:
            return lowering.root(root)
        signature = self._signatures.get(lowering.module, ())
        if signature not in self._programs:
            self._programs[signature] = lowering.root(root)
        else:
            found = self._programs[signature]
            if found is not None and found.truncated:
                lowering.notes.truncated += 1  # what lowering.root would have counted
        return self._programs[signature]


class ModuleLowering:
    """Lowers the typed expression for one module (of shape ``out_features × in_features``)."""

    def __init__(self, module: str, out_features: int, in_features: int, operands: OperandTable, notes: Notes) -> None:
        self.module = module
        self.full_rank = min(out_features, in_features)
        self._operands = operands
        self._notes = notes

    @property
    def notes(self) -> Notes:
        return self._notes

    # -- entry point ---------------------------------------------------------------------------------------
    def root(self, value: Linear) -> ModuleProgram | None:
        """The module's program, or None when the expression is zero in this module."""
        lowered = self.linear(value)
        if lowered is None:
            return None
        root = lowered
        assert root.terms is not None
        if len(root.terms) == 1 and root.terms[0][0] == 1.0 and not isinstance(root.terms[0][1].node, OperandNode):
            root = root.terms[0][1]  # a single non-linear call stays itself
        max_rank = self._notes.max_rank
        if root.rank > max_rank:
            self._notes.truncated += 1
            root = Lowered(SvdNode(input=root.node, rank=max_rank), max_rank, root.dense)
            return ModuleProgram(root.node, root.rank, root.dense, truncated=True)
        return ModuleProgram(root.node, root.rank, root.dense)

    # -- linear combinations -------------------------------------------------------------------------------
    def linear(self, value: Linear) -> Lowered | None:
        """Σ c·atom in this module: missing operands dropped, nested linears fused, like terms collected."""
        found: list[tuple[str, float, Lowered]] = []
        flat = True
        for coefficient, atom in value.terms:
            lowered = self._leaf(atom) if isinstance(atom, Leaf) else self._apply(atom)
            if lowered is not None:
                found.append((lowered.key, coefficient, lowered))
                flat = flat and lowered.terms is None
        if not found:
            return None
        if flat and len({key for key, _c, _l in found}) == len(found):
            # The common case, with nothing to fuse or collect: the typed expression's coefficients are
            # already collected and non-zero.
            found.sort(key=lambda item: item[0])
            terms = [(c, lowered) for _key, c, lowered in found]
        else:
            terms = _collected(found)
            if not terms:
                return None
        rank = sum(lowered.rank for _c, lowered in terms)
        dense = any(lowered.dense for _c, lowered in terms)
        # Built from validated nodes and finite floats: skip re-validating hundreds of terms.
        node = LinearNode.model_construct(terms=tuple((c, lowered.node) for c, lowered in terms))
        return Lowered(node, rank, dense, tuple(terms))

    def _leaf(self, leaf: Leaf) -> Lowered | None:
        return self._operands.lowered(leaf, self.module)

    def _input(self, value: Linear) -> Lowered | None:
        """An argument in a single-node slot: a one-term, coefficient-1 linear is unwrapped."""
        lowered = self.linear(value)
        if lowered is not None and lowered.terms is not None and len(lowered.terms) == 1:
            coefficient, only = lowered.terms[0]
            if coefficient == 1.0:
                return only
        return lowered

    def _weighted(self, values: tuple[Linear, ...]) -> list[tuple[float, Lowered]]:
        """Weighted inputs: a one-term linear ``c·X`` becomes ``(c, X)``; missing inputs are dropped."""
        found: list[tuple[float, Lowered]] = []
        for value in values:
            lowered = self.linear(value)
            if lowered is None:
                continue
            assert lowered.terms is not None
            found.append(lowered.terms[0] if len(lowered.terms) == 1 else (1.0, lowered))
        found.sort(key=lambda pair: (pair[1].key, canon_float(pair[0])))
        return found

    # -- function calls ------------------------------------------------------------------------------------
    def _apply(self, apply: Apply) -> Lowered | None:
        kind = apply.spec.kind
        if kind == "select":
            return self._select(apply)
        if kind == "svd":
            return self._svd(apply)
        if kind == "orth":
            return self._orth(apply)
        return self._dense(apply)

    def _select(self, apply: Apply) -> Lowered | None:
        self._notes.selects_seen.add(apply.text)
        layers, modules = apply.arg("layers"), apply.arg("modules")
        if isinstance(layers, str) and not layer_matches(self.module, layers):
            return None
        if isinstance(modules, str) and not module_matches(self.module, modules):
            return None
        x = apply.arg("x")
        assert isinstance(x, Linear)
        lowered = self.linear(x)
        if lowered is not None:
            self._notes.selects_matched.add(apply.text)
        return lowered

    def _svd(self, apply: Apply) -> Lowered | None:
        x, rank, energy = apply.arg("x"), apply.arg("rank"), apply.arg("energy")
        assert isinstance(x, Linear) and (rank is None or isinstance(rank, int))
        assert energy is None or isinstance(energy, float)
        inner = self._input(x)
        if inner is None:
            return None
        max_rank = self._notes.max_rank
        if rank is not None and rank > max_rank:
            self._notes.capped[f"svd rank={rank}"] += 1
            rank = max_rank
        elif rank is None and inner.rank > max_rank:
            self._notes.capped["svd(energy=…)"] += 1
            rank = max_rank
        out_rank = min(inner.rank, self.full_rank, rank if rank is not None else inner.rank)
        node = SvdNode(input=inner.node, rank=rank, energy=energy)
        key = f"svd({inner.key}|{rank}|{None if energy is None else _fmt(energy)})"
        return Lowered(node, max(1, out_rank), inner.dense, None, key)

    def _orth(self, apply: Apply) -> Lowered | None:
        x, against = apply.arg("x"), apply.arg("against")
        assert isinstance(x, Linear) and isinstance(against, tuple)
        inner = self._input(x)
        if inner is None:
            return None
        others = [lowered for value in against if (lowered := self._input(value)) is not None]
        if not others:
            return inner  # nothing to project away in this module
        others.sort(key=lambda item: item.key)
        node = OrthNode(input=inner.node, against=tuple(o.node for o in others))
        key = f"orth({inner.key}|{','.join(o.key for o in others)})"
        return Lowered(node, inner.rank, inner.dense or any(o.dense for o in others), None, key)

    def _dense(self, apply: Apply) -> Lowered | None:
        kind = apply.spec.kind
        if kind == "magnitude_prune":
            x = apply.arg("x")
            assert isinstance(x, Linear)
            single = self._input(x)
            inputs = [] if single is None else [(1.0, single)]
        else:
            inputs = self._weighted(apply.inputs)
        if not inputs:
            return None
        rank = self._refactor_rank(apply, inputs)
        density = apply.arg("density")
        assert isinstance(density, float)
        pairs = tuple((w, lowered.node) for w, lowered in inputs)
        params = "|".join(f"{name}={value!r}" for name, value in apply.args if not isinstance(value, Linear))
        key = f"{kind}({';'.join(f'{_fmt(w)}*{lowered.key}' for w, lowered in inputs)}|{params}|{rank})"
        node: Node
        if kind == "ties":
            node = TiesNode(inputs=pairs, density=density, majority=_majority(apply), refactor_rank=rank)
        elif kind == "dare":
            seed, rescale = apply.arg("seed"), apply.arg("rescale")
            assert isinstance(seed, int) and isinstance(rescale, bool)
            node = DareNode(inputs=pairs, density=density, seed=seed, rescale=rescale, refactor_rank=rank)
        elif kind == "dare_ties":
            seed = apply.arg("seed")
            assert isinstance(seed, int)
            node = DareTiesNode(inputs=pairs, density=density, seed=seed, majority=_majority(apply), refactor_rank=rank)
        else:
            node = MagnitudePruneNode(input=inputs[0][1].node, density=density, refactor_rank=rank)
        return Lowered(node, rank, True, None, key)

    def _refactor_rank(self, apply: Apply, inputs: list[tuple[float, Lowered]]) -> int:
        """The explicit ``rank=``, else the largest input rank; capped by max_rank and the module's shape."""
        explicit = apply.arg("rank")
        assert explicit is None or isinstance(explicit, int)
        max_rank = self._notes.max_rank
        if explicit is not None and explicit > max_rank:
            self._notes.capped[f"{apply.spec.name} rank={explicit}"] += 1
        wanted = explicit if explicit is not None else max(lowered.rank for _w, lowered in inputs)
        return max(1, min(wanted, max_rank, self.full_rank))


class _Slot:
    """A like term being collected: running coefficient and the largest contribution (for zero tests)."""

    __slots__ = ("coefficient", "largest", "lowered")

    def __init__(self, coefficient: float, lowered: Lowered) -> None:
        self.coefficient = coefficient
        self.largest = abs(coefficient)
        self.lowered = lowered


def _collected(found: list[tuple[str, float, Lowered]]) -> list[tuple[float, Lowered]]:
    """Fuse nested linear terms, collect like terms by key, drop (near-)zero ones, sort by key."""
    slots: dict[str, _Slot] = {}

    def add(key: str, coefficient: float, lowered: Lowered) -> None:
        slot = slots.get(key)
        if slot is None:
            slots[key] = _Slot(coefficient, lowered)
        else:
            slot.coefficient += coefficient
            slot.largest = max(slot.largest, abs(coefficient))

    for key, coefficient, lowered in found:
        if lowered.terms is not None:
            for inner_c, inner in lowered.terms:
                add(inner.key, coefficient * inner_c, inner)
        else:
            add(key, coefficient, lowered)
    return [
        (slot.coefficient, slot.lowered)
        for _key, slot in sorted(slots.items())
        if slot.coefficient != 0.0 and abs(slot.coefficient) > ZERO_RELATIVE * slot.largest
    ]


def _majority(apply: Apply) -> Literal["total", "frequency"]:
    value = apply.arg("majority")
    if value == "frequency":
        return "frequency"
    assert value == "total"
    return "total"
