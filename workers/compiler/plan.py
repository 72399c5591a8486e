"""The plan IR: what the engine runs. Frozen pydantic models, versioned, JSON-serialisable, hashed.

A plan pins every operand to a version id and content hash, so running it again is reproducible and its
hash is a cache key. Each :class:`ModuleStep` describes one output module: its shape, the path that runs
it, its output rank, and a small **program** — a tree of nodes specialised to that module.

Node kinds (``kind`` is the discriminator)::

    operand          scale·B@A of one operand's module (``operand`` indexes ``MergePlan.operands``)
    linear           Σ c·node, exact; factored (concatenated factors) when every node is factored
    svd              best rank-``rank`` approximation, or the smallest rank keeping ``energy`` of ‖ΔW‖²
                     (both set: the energy rule, capped at ``rank``); factored when its input is
    orth             O-LoRA: ``input`` projected onto the orthogonal complement of the column spaces of
                     ``against``; factored when its children are (output rank = the input's rank)
    ties             TIES-merging of weighted inputs                        } dense: run on ΔW per module,
    dare             DARE: random drop (keyed by seed, module, operand)     } then re-factored to
    dare_ties        DARE drop, then TIES sign election                    } ``refactor_rank``
    magnitude_prune  keep the ``density`` share of largest-magnitude entries }

Normal form, as the compiler emits it (the engine may rely on it, and must accept any valid tree):

- select() is resolved, operands missing from the module are removed (a zero delta), nested linear nodes
  are fused, like terms collected (identity by sha256 and scale), zero terms dropped, constants folded;
- linear terms and the inputs of ties/dare/dare_ties and the ``against`` of orth are sorted canonically;
- a step whose program is a pure linear combination has a ``linear`` root over ``operand`` leaves
  (wrapped in ``svd`` when its rank exceeds ``max_rank``); below the root, a ``linear`` with one term of
  coefficient 1 is replaced by that term, and weighted inputs carry the term's coefficient as weight;
- an all-zero result is a step with an empty ``linear`` program (the engine writes rank-1 zeros).

``MergePlan.operands`` is sorted by (sha256, version id), so operand indexes — and DARE's randomness keyed
by them — do not depend on how the expression was spelled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PLAN_VERSION = 1
HASH_DIGITS = 12


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlannedOperand(_Frozen):
    """A pinned operand.

    ``weight`` is the operand's overall linear coefficient in the expression (the lineage edge's
    coefficient); for an operand reached only through non-linear functions, its weight inside the first
    such call (``ties(0.7*code, …)`` → 0.7).
    """

    ref: str
    adapter: str
    version: int
    version_id: int
    sha256: str
    weight: float


class OperandNode(_Frozen):
    """``scale · B @ A`` of operand ``operand``'s factors for this step's module."""

    kind: Literal["operand"] = "operand"
    operand: int = Field(ge=0)
    scale: float
    rank: int = Field(ge=1)


class LinearNode(_Frozen):
    """``Σ coefficient · node``; empty means an all-zero delta."""

    kind: Literal["linear"] = "linear"
    terms: tuple[tuple[float, Node], ...] = ()


class SvdNode(_Frozen):
    """Rank truncation by QR + SVD of the small core (never a full SVD of ΔW)."""

    kind: Literal["svd"] = "svd"
    input: Node
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)


class OrthNode(_Frozen):
    """O-LoRA: ``(I - QQᵀ)·ΔW_input`` with Q an orthonormal basis of the column spaces of ``against``."""

    kind: Literal["orth"] = "orth"
    input: Node
    against: tuple[Node, ...]


class TiesNode(_Frozen):
    """TIES: trim each weighted input to ``density``, elect signs by ``majority``, average agreeing entries."""

    kind: Literal["ties"] = "ties"
    inputs: tuple[tuple[float, Node], ...]
    density: float = Field(gt=0.0, le=1.0)
    majority: Literal["total", "frequency"] = "total"
    refactor_rank: int = Field(ge=1)


class DareNode(_Frozen):
    """DARE: drop entries at random keeping ``density`` (rescaled by 1/density when ``rescale``), then sum."""

    kind: Literal["dare"] = "dare"
    inputs: tuple[tuple[float, Node], ...]
    density: float = Field(gt=0.0, le=1.0)
    seed: int = Field(ge=0)
    rescale: bool = True
    refactor_rank: int = Field(ge=1)


class DareTiesNode(_Frozen):
    """DARE's random drop (rescaled), then TIES's sign election and disjoint mean."""

    kind: Literal["dare_ties"] = "dare_ties"
    inputs: tuple[tuple[float, Node], ...]
    density: float = Field(gt=0.0, le=1.0)
    seed: int = Field(ge=0)
    majority: Literal["total", "frequency"] = "total"
    refactor_rank: int = Field(ge=1)


class MagnitudePruneNode(_Frozen):
    """Keep the ``density`` share of the input's entries with the largest magnitude."""

    kind: Literal["magnitude_prune"] = "magnitude_prune"
    input: Node
    density: float = Field(gt=0.0, le=1.0)
    refactor_rank: int = Field(ge=1)


Node = Annotated[
    OperandNode | LinearNode | SvdNode | OrthNode | TiesNode | DareNode | DareTiesNode | MagnitudePruneNode,
    Field(discriminator="kind"),
]
DENSE_KINDS = frozenset({"ties", "dare", "dare_ties", "magnitude_prune"})
"""Node kinds that need the dense ΔW of their inputs (a step containing one runs on the dense path)."""


class ModuleStep(_Frozen):
    """One output module: its shape, how it runs, its output rank and its program.

    ``kernel`` is ``(1, 1)`` when the module is a Conv2d with a 1×1 kernel: the operands' factors are read as
    their 2-D views and the output factors are written 4-D, A as (rank, in, 1, 1) and B as (out, rank, 1, 1).
    It is None (and absent from the plan's JSON and hash, so Linear plans are unchanged) for a Linear layer.
    """

    module: str
    out_features: int
    in_features: int
    kernel: tuple[int, int] | None = Field(
        default=None,
        exclude_if=lambda kernel: kernel is None,
        description="(1, 1) for a 1×1 Conv2d module (4-D factors); absent for a Linear layer.",
    )
    path: Literal["factored", "dense"]
    rank: int = Field(description="Output rank of this module (1 for an all-zero module).")
    program: Node


class Cost(_Frozen):
    """Estimated resources for the whole plan (see ``workers.compiler.cost``); feeds queue routing."""

    bytes_read: int
    flops: int
    peak_bytes: int
    device_class: Literal["cpu", "gpu"]


class MergePlan(_Frozen):
    plan_version: Literal[1] = 1
    expression: str
    normalized: str
    strategy: str = Field(description="'linear', or the outermost non-linear function (lineage label).")
    base_model: str
    dtype: str
    task_type: str | None
    max_rank: int
    operands: tuple[PlannedOperand, ...]
    steps: tuple[ModuleStep, ...]
    warnings: tuple[str, ...] = ()
    cost: Cost

    def canonical_payload(self) -> dict[str, object]:
        """What the hash covers: the semantics, not the spelling.

        Programs are already canonical; operand indexes are replaced by sha256 (content identity) and
        floats rounded to 12 significant digits. The expression text, lineage weights, warnings and cost
        are not covered. A conv module's step carries its kernel before the program; a Linear step's list is
        exactly what it was before conv modules existed.
        """
        shas = [op.sha256 for op in self.operands]
        # Steps often share one program object (the compiler reuses it across modules): canonicalise each
        # once, keyed by identity (the plan holds every program alive, so ids are not reused).
        programs: dict[int, list[object]] = {}
        for step in self.steps:
            if id(step.program) not in programs:
                programs[id(step.program)] = canonical_node(step.program, shas)
        return {
            "v": self.plan_version,
            "base": self.base_model,
            "dtype": self.dtype,
            "task": self.task_type,
            "steps": [
                [s.module, s.out_features, s.in_features, s.path, s.rank, programs[id(s.program)]]
                if s.kernel is None
                else [s.module, s.out_features, s.in_features, s.path, s.rank, list(s.kernel), programs[id(s.program)]]
                for s in self.steps
            ],
        }

    def hash(self) -> str:
        """sha256 of ``json.dumps(canonical_payload(), sort_keys=True, separators=(",", ":"))``.

        Built piecewise, byte for byte that same text: a program shared by many steps is encoded once.
        """
        encode = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
        payload = self.canonical_payload()
        steps = payload["steps"]
        assert isinstance(steps, list)
        encoded: dict[int, str] = {}
        parts: list[str] = []
        for *head, program in steps:
            text = encoded.get(id(program))
            if text is None:
                text = encoded[id(program)] = encode(program)
            parts.append(encode(head)[:-1] + "," + text + "]")  # the step's list, program last
        # A placeholder spliced in afterwards: JSON escapes every quote inside strings, so '"steps":0'
        # occurs only as the key itself.
        blob = encode({**payload, "steps": 0}).replace('"steps":0', '"steps":[' + ",".join(parts) + "]", 1)
        return hashlib.sha256(blob.encode()).hexdigest()


def canon_float(value: float) -> float:
    """Round away float noise (0.1 + 0.2) so that equal expressions hash alike."""
    return float(f"{value:.{HASH_DIGITS}g}") + 0.0  # + 0.0 turns -0.0 into 0.0


def canonical_node(node: Node, shas: list[str]) -> list[object]:
    """A JSON-ready canonical form of ``node`` with operand identity by content hash."""
    if isinstance(node, OperandNode):
        return ["operand", shas[node.operand], canon_float(node.scale), node.rank]
    if isinstance(node, LinearNode):
        return ["linear", [[canon_float(c), canonical_node(n, shas)] for c, n in node.terms]]
    if isinstance(node, SvdNode):
        energy = None if node.energy is None else canon_float(node.energy)
        return ["svd", canonical_node(node.input, shas), node.rank, energy]
    if isinstance(node, OrthNode):
        return ["orth", canonical_node(node.input, shas), [canonical_node(a, shas) for a in node.against]]
    if isinstance(node, MagnitudePruneNode):
        return ["magnitude_prune", canonical_node(node.input, shas), canon_float(node.density), node.refactor_rank]
    inputs = [[canon_float(w), canonical_node(n, shas)] for w, n in node.inputs]
    if isinstance(node, TiesNode):
        return ["ties", inputs, canon_float(node.density), node.majority, node.refactor_rank]
    if isinstance(node, DareNode):
        return ["dare", inputs, canon_float(node.density), node.seed, node.rescale, node.refactor_rank]
    return ["dare_ties", inputs, canon_float(node.density), node.seed, node.majority, node.refactor_rank]


def children(node: Node) -> Iterator[Node]:
    """The direct child nodes of ``node``."""
    if isinstance(node, LinearNode):
        yield from (n for _c, n in node.terms)
    elif isinstance(node, SvdNode | MagnitudePruneNode):
        yield node.input
    elif isinstance(node, OrthNode):
        yield node.input
        yield from node.against
    elif isinstance(node, TiesNode | DareNode | DareTiesNode):
        yield from (n for _w, n in node.inputs)


def operand_nodes(node: Node) -> list[OperandNode]:
    """Every operand leaf under ``node`` (with repeats), without generator overhead: plans can be large."""
    if isinstance(node, OperandNode):
        return [node]
    if isinstance(node, LinearNode):
        found = [n for _c, n in node.terms if isinstance(n, OperandNode)]
        if len(found) == len(node.terms):
            return found
        for _c, n in node.terms:
            if not isinstance(n, OperandNode):
                found.extend(operand_nodes(n))
        return found
    found = []
    for child in children(node):
        found.extend(operand_nodes(child))
    return found


def walk(node: Node) -> Iterator[Node]:
    """``node`` and all its descendants, parents first."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(list(children(current))))


for _model in (LinearNode, SvdNode, OrthNode, TiesNode, DareNode, DareTiesNode, MagnitudePruneNode, ModuleStep):
    _model.model_rebuild()
