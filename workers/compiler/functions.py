"""The one function table: every function of the language, with typed parameters, defaults, bounds and docs.

The parser knows nothing of these names; the type checker binds call arguments against this table, and
the lowering pass switches on each entry's ``kind`` (the plan node it becomes). ``graft functions``
prints the table. Adding a function means adding an entry here and its lowering in ``lower.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ParamType = Literal["adapter", "adapters", "float", "int", "str", "bool"]
Kind = Literal["ties", "dare", "dare_ties", "magnitude_prune", "svd", "orth", "lerp", "select"]
REQUIRED: object = object()
"""Marks a parameter without a default."""

MAX_SEED = 2**63 - 1
MAX_RANK_PARAM = 65_536


@dataclass(frozen=True)
class Param:
    """A parameter. Bounds apply to numbers (``low_open``/``high_open`` make them exclusive);
    ``choices`` to strings; ``zero_absorbs`` (adapters) says the call is zero when this argument is zero;
    a zero item of an ``adapters`` list is dropped (``empty_is_identity``: the call then returns its
    first adapter argument unchanged)."""

    name: str
    type: ParamType
    doc: str
    default: object = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    zero_absorbs: bool = False
    empty_is_identity: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def bounds_text(self) -> str:
        """``(0, 1]``, ``≥ 1``, … (empty when unbounded)."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '≥'} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '≤'} {_num(self.high)}"
        return ""

    def in_bounds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def type_text(self) -> str:
        """``float in (0, 1]``, ``"total" | "frequency"``, ``adapter``…"""
        kind = {"adapters": "adapter | (adapter, …)"}.get(self.type, self.type)
        if self.choices:
            kind = " | ".join(f'"{c}"' for c in self.choices)
        bounds = self.bounds_text()
        if bounds.startswith(("(", "[")):
            return f"{kind} in {bounds}"
        return f"{kind} {bounds}".rstrip()

    def describe(self) -> str:
        """``density: float in (0, 1]``-style text for docs and error messages."""
        return f"{self.name}: {self.type_text()}"


@dataclass(frozen=True)
class FunctionSpec:
    """One function. ``variadic`` names a parameter that takes every positional argument (the inputs);
    the other parameters are then keyword-only. Without it, parameters may be given positionally in order.
    At least one of ``requires_one_of`` must be given, and at most one of ``exclusive``."""

    name: str
    kind: Kind
    doc: str
    example: str
    params: tuple[Param, ...]
    variadic: Param | None = None
    min_inputs: int = 1
    requires_one_of: tuple[str, ...] = ()
    exclusive: tuple[str, ...] = ()
    linear: bool = False
    commutative: bool = False
    param_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_names", tuple(p.name for p in self.params))

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def signature(self) -> str:
        """``ties(*inputs, density, majority="total", rank=None)``."""
        parts = [f"*{self.variadic.name}"] if self.variadic is not None else []
        for p in self.params:
            parts.append(p.name if p.required else f"{p.name}={_default_text(p.default)}")
        return f"{self.name}({', '.join(parts)})"


def _num(value: float) -> str:
    if abs(value) < 1e15:
        return f"{value:g}"
    bits = int(value).bit_length()
    return f"2^{bits}-1" if int(value) == 2**bits - 1 else f"2^{bits - 1}"


def _default_text(value: object) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


# -- the table -------------------------------------------------------------------------------------------------

_INPUTS = Param("inputs", "adapter", "adapters to merge; a scalar factor is that input's weight (0.7*code)")
_DENSITY = Param("density", "float", "share of entries kept per input", low=0.0, high=1.0, low_open=True)
_MAJORITY = Param(
    "majority",
    "str",
    "sign election: by total weighted mass, or by count of inputs",
    default="total",
    choices=("total", "frequency"),
)
_SEED = Param(
    "seed", "int", "random seed; randomness is keyed by (seed, module, operand)", default=0, low=0, high=MAX_SEED
)
_REFACTOR_RANK = Param(
    "rank",
    "int",
    "rank the dense result is re-factored to (default: the largest input rank, capped by max_rank)",
    default=None,
    low=1,
    high=MAX_RANK_PARAM,
)
_X = Param("x", "adapter", "the adapter to transform", zero_absorbs=True)

FUNCTIONS: dict[str, FunctionSpec] = {
    spec.name: spec
    for spec in (
        FunctionSpec(
            name="ties",
            kind="ties",
            doc="TIES-merging: trim each input to its top `density` entries, elect a sign per entry, "
            "average the entries that agree.",
            example="ties(0.7*code, 0.3*math, density=0.5)",
            variadic=_INPUTS,
            params=(_DENSITY, _MAJORITY, _REFACTOR_RANK),
            commutative=True,
        ),
        FunctionSpec(
            name="dare",
            kind="dare",
            doc="DARE: drop entries at random, keeping `density` of them (rescaled by 1/density), then sum.",
            example="dare(code, math, density=0.3, seed=7)",
            variadic=_INPUTS,
            params=(
                _DENSITY,
                _SEED,
                Param("rescale", "bool", "divide kept entries by density", default=True),
                _REFACTOR_RANK,
            ),
            commutative=True,
        ),
        FunctionSpec(
            name="dare_ties",
            kind="dare_ties",
            doc="DARE's random drop followed by TIES's sign election and disjoint mean.",
            example="dare_ties(code, math, density=0.3, seed=7)",
            variadic=_INPUTS,
            params=(_DENSITY, _SEED, _MAJORITY, _REFACTOR_RANK),
            commutative=True,
        ),
        FunctionSpec(
            name="magnitude_prune",
            kind="magnitude_prune",
            doc="Keep the `density` share of an adapter's ΔW entries with the largest magnitude.",
            example="magnitude_prune(code, density=0.2)",
            params=(_X, _DENSITY, _REFACTOR_RANK),
        ),
        FunctionSpec(
            name="svd",
            kind="svd",
            doc="Truncate to `rank`, or to the smallest rank keeping `energy` of ‖ΔW‖² "
            "(exact QR + small SVD, optimal by Eckart–Young).",
            example="svd(code + math, rank=16)",
            params=(
                _X,
                Param("rank", "int", "rank to keep", default=None, low=1, high=MAX_RANK_PARAM),
                Param("energy", "float", "share of ‖ΔW‖² to keep", default=None, low=0.0, high=1.0, low_open=True),
            ),
            requires_one_of=("rank", "energy"),
            exclusive=("rank", "energy"),
        ),
        FunctionSpec(
            name="lerp",
            kind="lerp",
            doc="Linear interpolation (1-t)·a + t·b; exact.",
            example="lerp(code, math, 0.3)",
            params=(
                Param("a", "adapter", "the adapter at t=0"),
                Param("b", "adapter", "the adapter at t=1"),
                Param("t", "float", "interpolation parameter", low=0.0, high=1.0),
            ),
            linear=True,
        ),
        FunctionSpec(
            name="select",
            kind="select",
            doc="Keep an adapter only in some layers and/or modules; zero elsewhere.",
            example='select(code, layers="0-15") + select(math, layers="16-31")',
            params=(
                _X,
                Param("layers", "str", 'layer indices: "0-15", "3", "0,2,8-11"', default=None),
                Param("modules", "str", 'module names or globs: "q_proj|v_proj", "mlp.*"', default=None),
            ),
            requires_one_of=("layers", "modules"),
            linear=True,
        ),
        FunctionSpec(
            name="orth",
            kind="orth",
            doc="O-LoRA: project an adapter onto the orthogonal complement of the others' column spaces.",
            example="orth(code, against=(math, toxic))",
            params=(
                _X,
                Param("against", "adapters", "adapters whose column spaces are removed", empty_is_identity=True),
            ),
        ),
    )
}


def lookup(name: str) -> FunctionSpec | None:
    """The table entry for ``name``, or None."""
    return FUNCTIONS.get(name)


def function_names() -> list[str]:
    return sorted(FUNCTIONS)
