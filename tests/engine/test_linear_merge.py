"""Exactness of the linear merge, end to end, and of the engine's truncation kernel and streaming writer.

The merge tests register small random PEFT adapters, compile and run an expression through the real
pipeline (``submit_merge`` → ``run_merge_job``, on PostgreSQL and SQLite), then check every module of the
stored result against ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ computed here, independently, from the input files:
sᵢ = alpha/r (alpha/√r under rsLoRA), with r and alpha looked up per module in rank_pattern/alpha_pattern
the way PEFT does it. The output's own scale is read back from its stored config and must be exactly 1.

Tolerances (relative Frobenius error of ΔW):

- fp32 output: 1e-5 (the brief's bound; the actual error is ~1e-7).
- fp16 output: 1e-3. The engine stores B' = cᵢ·Bᵢ rounded to fp16 (unit roundoff 2⁻¹¹ ≈ 4.9e-4) and
  Aᵢ unchanged, so each entry of ΔW carries at most ~4.9e-4 relative error.
- bf16 output: 8e-3, by the same argument with bf16's unit roundoff 2⁻⁸ ≈ 3.9e-3.
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from sqlalchemy.orm import Session, sessionmaker

from api.merges import submit_merge
from bench.synthetic import PROJECTIONS, TINY
from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.formats.peft import inspect_peft_folder
from registry.models import AdapterVersion
from registry.services.adapters import register_folder
from registry.settings import Settings
from workers.compiler.plan import MergePlan
from workers.engine.kernels import truncate_factors
from workers.engine.writer import PeftFolderWriter
from workers.pipeline import run_merge_job

PEFT_PREFIX = "base_model.model."
TOLERANCE = {"F32": 1e-5, "F16": 1e-3, "BF16": 8e-3}
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# -- the reference: ΔW per module, computed from the files without any Graft code --------------------------


def pattern_lookup(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``,
    where ``name`` is the module's name inside the base model (no ``base_model.model.`` prefix)."""
    name = module.removeprefix(PEFT_PREFIX)
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    rank = int(pattern_lookup(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(pattern_lookup(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", config["r"])))
    return rank, alpha


def module_scale(config: dict[str, Any], module: str) -> float:
    rank, alpha = module_rank_alpha(config, module)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def split_factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (B, A) in float64."""
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    return {
        m: (tensors[f"{m}.lora_B.weight"].to(torch.float64), tensors[f"{m}.lora_A.weight"].to(torch.float64))
        for m in modules
    }


def folder_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A (float64) for every module of a PEFT folder."""
    config = json.loads((folder / "adapter_config.json").read_text())
    factors = split_factors(load_file(str(folder / "adapter_model.safetensors")))
    return {m: module_scale(config, m) * (b @ a) for m, (b, a) in factors.items()}


def folder_ranks(folder: Path) -> dict[str, int]:
    return {m: a.shape[0] for m, (_b, a) in split_factors(load_file(str(folder / "adapter_model.safetensors"))).items()}


def expected_deltas(folders: dict[str, Path], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ ΔWᵢ per module; a module an operand lacks is a zero delta for that operand."""
    deltas = {name: folder_deltas(folders[name]) for name in weights}
    modules = sorted({m for d in deltas.values() for m in d})
    result = {}
    for m in modules:
        total = None
        for name, w in weights.items():
            if m in deltas[name]:
                term = w * deltas[name][m]
                total = term if total is None else total + term
        assert total is not None
        result[m] = total
    return result


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


# -- running a merge through the real pipeline ---------------------------------------------------------------


def merge(
    session: Session,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    tmp_path: Path,
    expression: str,
    name: str = "merged",
    max_rank: int = 1024,
) -> tuple[AdapterVersion, MergePlan]:
    job, plan = submit_merge(session, Settings(home=tmp_path, max_rank=max_rank), expression, name, [])
    session.commit()
    outcome = run_merge_job(job.id, session_factory=sessions, store=store, device="cpu")
    version = repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id]
    return version, plan


def result_deltas(version: AdapterVersion, store: ArtifactStore) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The stored result's ΔW per module (scale read from its own config, which must be 1) and its ranks."""
    tensors = load_file(str(store.path(version.artifact_key)))
    config = version.peft_config
    assert not config.get("use_rslora")
    deltas, ranks = {}, {}
    for m, (b, a) in split_factors(tensors).items():
        rank, alpha = module_rank_alpha(config, m)
        assert rank == a.shape[0] == b.shape[1], f"{m}: config says rank {rank}, tensors have {a.shape[0]}"
        assert alpha == rank, f"{m}: alpha {alpha} != r {rank}, so the scale is not 1"
        assert module_scale(config, m) == 1.0
        deltas[m], ranks[m] = b @ a, rank
    return deltas, ranks


def check_merge(
    version: AdapterVersion,
    store: ArtifactStore,
    folders: dict[str, Path],
    weights: dict[str, float],
    tolerance: float,
) -> dict[str, torch.Tensor]:
    """Every module's ΔW equals Σ wᵢΔWᵢ; the module set is the union; rank = Σ ranks of the live operands."""
    got, ranks = result_deltas(version, store)
    want = expected_deltas(folders, weights)
    assert set(got) == set(want)
    for m in want:
        err = relative_error(got[m], want[m])
        assert err <= tolerance, f"{m}: relative error {err:.3g} > {tolerance:g}"
    live = [name for name, w in weights.items() if w != 0.0]
    operand_ranks = {name: folder_ranks(folders[name]) for name in live}
    for m in want:
        assert ranks[m] == sum(r[m] for r in operand_ranks.values() if m in r), m
    return got


def register_all(session: Session, store: ArtifactStore, folders: dict[str, Path]) -> None:
    for name, folder in folders.items():
        assert register_folder(session, store, folder, name).created


def modules_of(projections: tuple[str, ...], layers: tuple[int, ...] = (0, 1)) -> dict[str, tuple[int, int]]:
    return {m: shape for m, shape in TINY.modules(projections).items() if int(m.split(".")[4]) in layers}


# -- fixed expressions over adapters with rank/alpha patterns and rsLoRA --------------------------------------


@pytest.fixture
def three(make_adapter: Callable[..., Path]) -> dict[str, Path]:
    """Three fp32 adapters exercising r, alpha, rank_pattern, alpha_pattern and rsLoRA, over different modules."""
    return {
        "a": make_adapter(
            "a",
            seed=11,
            rank=4,
            alpha=8,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 40},
        ),
        "b": make_adapter("b", seed=12, rank=3, alpha=5, use_rslora=True, alpha_pattern={"o_proj": 7}),
        "c": make_adapter(
            "c",
            seed=13,
            rank=5,
            alpha=16,
            rank_pattern={"layers.0.self_attn.k_proj": 1},
            modules=modules_of(("q_proj", "k_proj", "gate_proj")),
        ),
    }


@pytest.mark.parametrize(
    ("expression", "weights"),
    [
        ("base + a - b", {"a": 1.0, "b": -1.0}),
        ("0.7*a + 0.3*b", {"a": 0.7, "b": 0.3}),
        ("a/2 - (b - c)*3", {"a": 0.5, "b": -3.0, "c": 3.0}),
        ("-c + 0.25*a", {"c": -1.0, "a": 0.25}),
    ],
)
def test_expression_is_exact(session, sessions, store, tmp_path, three, expression, weights) -> None:  # type: ignore[no-untyped-def]
    register_all(session, store, three)
    version, plan = merge(session, sessions, store, tmp_path, expression)
    assert plan.warnings == ()
    assert {op.adapter: op.weight for op in plan.operands} == pytest.approx(weights)
    assert version.source == "merge" and version.expression == expression
    assert version.dtype == "F32"
    check_merge(version, store, three, weights, TOLERANCE["F32"])


def test_two_a_minus_a_is_a(session, sessions, store, tmp_path, three) -> None:  # type: ignore[no-untyped-def]
    register_all(session, store, three)
    version, plan = merge(session, sessions, store, tmp_path, "2*a - a")
    assert [(op.adapter, op.weight) for op in plan.operands] == [("a", 1.0)]
    got = check_merge(version, store, three, {"a": 1.0}, TOLERANCE["F32"])
    original = folder_deltas(three["a"])
    assert set(got) == set(original)
    for m, delta in original.items():
        assert relative_error(got[m], delta) <= 1e-6, m
    # Folded to one operand: the ranks are a's own, not twice them.
    _got, ranks = result_deltas(version, store)
    assert ranks == folder_ranks(three["a"])


def test_a_minus_a_is_an_all_zero_adapter(session, sessions, store, tmp_path, three) -> None:  # type: ignore[no-untyped-def]
    register_all(session, store, three)
    version, plan = merge(session, sessions, store, tmp_path, "a - a")
    assert plan.operands == ()
    assert any("cancels out" in w for w in plan.warnings)
    got, ranks = result_deltas(version, store)
    assert set(got) == set(folder_deltas(three["a"]))
    for m, delta in got.items():
        assert torch.count_nonzero(delta) == 0, m
        assert ranks[m] == 1, m  # the smallest loadable LoRA module
    assert version.rank == 1


def test_modules_present_in_only_one_operand(session, sessions, store, tmp_path, make_adapter) -> None:  # type: ignore[no-untyped-def]
    folders = {
        "a": make_adapter("a", seed=21, rank=3, alpha=6, modules=modules_of(("q_proj", "v_proj"), layers=(0,))),
        "b": make_adapter(
            "b", seed=22, rank=5, alpha=2, modules=modules_of(("q_proj", "k_proj", "down_proj"), layers=(1,))
        ),
        "c": make_adapter("c", seed=23, rank=2, alpha=4, modules=modules_of(("v_proj", "o_proj"))),
    }
    register_all(session, store, folders)
    weights = {"a": 1.5, "b": -2.0, "c": 0.5}
    version, _plan = merge(session, sessions, store, tmp_path, "1.5*a - 2*b + c/2")
    got = check_merge(version, store, folders, weights, TOLERANCE["F32"])
    union = set(folder_ranks(folders["a"])) | set(folder_ranks(folders["b"])) | set(folder_ranks(folders["c"]))
    assert set(got) == union
    _got, ranks = result_deltas(version, store)
    v0 = "base_model.model.model.layers.0.self_attn.v_proj"
    assert ranks[v0] == 3 + 2  # in a and c
    assert ranks["base_model.model.model.layers.1.self_attn.k_proj"] == 5  # only in b
    assert ranks["base_model.model.model.layers.1.self_attn.o_proj"] == 2  # only in c


def test_mixed_input_dtypes_merge_in_fp32(session, sessions, store, tmp_path, make_adapter) -> None:  # type: ignore[no-untyped-def]
    folders = {
        "a": make_adapter("a", seed=31, rank=4, alpha=8, dtype=torch.float16),
        "b": make_adapter("b", seed=32, rank=6, alpha=3, dtype=torch.bfloat16, use_rslora=True),
    }
    register_all(session, store, folders)
    version, plan = merge(session, sessions, store, tmp_path, "0.6*a - 1.4*b")
    assert plan.dtype == "F32" and version.dtype == "F32"
    check_merge(version, store, folders, {"a": 0.6, "b": -1.4}, TOLERANCE["F32"])


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_inputs_give_half_precision_output(session, sessions, store, tmp_path, make_adapter, dtype):  # type: ignore[no-untyped-def]
    folders = {
        "a": make_adapter("a", seed=41, rank=4, alpha=8, dtype=DTYPES[dtype], rank_pattern={"o_proj": 7}),
        "b": make_adapter("b", seed=42, rank=2, alpha=16, dtype=DTYPES[dtype], alpha_pattern={"mlp.up_proj": 1}),
    }
    register_all(session, store, folders)
    version, plan = merge(session, sessions, store, tmp_path, "base + a - b")
    assert plan.dtype == dtype and version.dtype == dtype
    with safe_open(str(store.path(version.artifact_key)), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {dtype}  # noqa: SIM118
    check_merge(version, store, folders, {"a": 1.0, "b": -1.0}, TOLERANCE[dtype])


def test_rank_cap_truncates_optimally(session, sessions, store, tmp_path, make_adapter) -> None:  # type: ignore[no-untyped-def]
    """Past max_rank the merge is no longer exact: each module is the best rank-cap approximation of Σ wᵢΔWᵢ."""
    folders = {
        "a": make_adapter("a", seed=51, rank=4, alpha=8, modules=modules_of(("q_proj", "down_proj"))),
        "b": make_adapter("b", seed=52, rank=3, alpha=6, modules=modules_of(("q_proj",))),
    }
    register_all(session, store, folders)
    cap = 5
    version, plan = merge(session, sessions, store, tmp_path, "a - 0.5*b", max_rank=cap)
    assert any("max_rank=5" in w for w in plan.warnings)
    got, ranks = result_deltas(version, store)
    want = expected_deltas(folders, {"a": 1.0, "b": -0.5})
    for m, delta in want.items():
        sigma = torch.linalg.svdvals(delta)
        if m.endswith("q_proj"):  # rank 7 > cap: truncated, with the Eckart–Young error
            assert ranks[m] == cap
            optimal = float(sigma[cap:].square().sum().sqrt())
            assert optimal > 0
            assert float(torch.linalg.norm(got[m] - delta)) <= 1.01 * optimal, m
        else:  # rank 4 ≤ cap: untouched and exact
            assert ranks[m] == 4
            assert relative_error(got[m], delta) <= TOLERANCE["F32"], m


# -- random adapters and random expressions -------------------------------------------------------------------


def _random_adapter(rng: random.Random, make_adapter: Callable[..., Path], name: str, dtype: str) -> Path:
    projections = tuple(sorted(rng.sample(PROJECTIONS, rng.randint(1, len(PROJECTIONS)))))
    layers = rng.choice([(0,), (1,), (0, 1), (0, 1)])
    modules = modules_of(projections, layers)
    names = sorted(modules)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for _ in range(rng.randint(0, 2)):
        module = rng.choice(names).removeprefix(PEFT_PREFIX + "model.")
        key = module.rsplit(".", 1)[-1] if rng.random() < 0.5 else module
        if rng.random() < 0.5:
            rank_pattern[key] = rng.randint(1, 8)
        else:
            alpha_pattern[key] = rng.choice([1, 2.5, 12, 64])
    return make_adapter(
        name,
        seed=rng.randrange(1 << 30),
        rank=rng.randint(1, 8),
        alpha=rng.choice([1, 4, 8, 16, 32, 3.5]),
        dtype=DTYPES[dtype],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=rng.random() < 0.3,
        modules=modules,
    )


def _random_expression(rng: random.Random) -> tuple[str, dict[str, float]]:
    x, y, z = (round(rng.uniform(0.1, 3.0), 3) for _ in range(3))
    d = rng.choice([2, 3, 4, 8])
    templates = [
        (f"base + {x}*a - b", {"a": x, "b": -1.0}),
        (f"{x}*a + {y}*b", {"a": x, "b": y}),
        (f"a/{d} - (b - c)*{x}", {"a": 1 / d, "b": -x, "c": x}),
        (f"-{x}*a + b*{y} - c/{d}", {"a": -x, "b": y, "c": -1 / d}),
        (f"{x}*(a + {y}*(b - {z}*c))", {"a": x, "b": x * y, "c": -x * y * z}),
    ]
    return rng.choice(templates)


@pytest.mark.parametrize("seed", range(10))
def test_random_adapters_and_expressions(session, sessions, store, tmp_path, make_adapter, seed) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    shared = rng.choice(["F32", "F32", "F16", "BF16", "mixed"])
    dtypes = [rng.choice(list(DTYPES)) for _ in "abc"] if shared == "mixed" else [shared] * 3
    folders = {name: _random_adapter(rng, make_adapter, name, dtype) for name, dtype in zip("abc", dtypes, strict=True)}
    expression, weights = _random_expression(rng)
    used = {name: folders[name] for name in weights}
    register_all(session, store, used)
    version, plan = merge(session, sessions, store, tmp_path, expression)
    used_dtypes = {dtypes["abc".index(name)] for name in used}
    out_dtype = used_dtypes.pop() if len(used_dtypes) == 1 else "F32"
    assert plan.dtype == out_dtype == version.dtype
    assert {op.adapter: op.weight for op in plan.operands} == pytest.approx(weights)
    check_merge(version, store, used, weights, TOLERANCE[out_dtype])


def test_reference_scale_matches_registry_facts(make_adapter) -> None:  # type: ignore[no-untyped-def]
    """Our reference's per-module (rank, scale) agrees with what the registry stores for the compiler."""
    rng = random.Random(99)
    for index in range(6):
        folder = _random_adapter(rng, make_adapter, f"x{index}", "F32")
        config = json.loads((folder / "adapter_config.json").read_text())
        facts = inspect_peft_folder(folder)
        for m, fact in facts.modules.items():
            assert fact.rank == module_rank_alpha(config, m)[0]
            assert fact.scale == pytest.approx(module_scale(config, m), rel=1e-12)


# -- truncate_factors: Eckart–Young without forming ΔW ----------------------------------------------------------


def _factors(seed: int, out_f: int, in_f: int, inner: int, true_rank: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out_f, inner, generator=g)
    a = torch.randn(inner, in_f, generator=g) / in_f**0.5
    if true_rank is not None and true_rank < inner:
        # B = B₁ C with C of rank true_rank, so B @ A has rank ≤ true_rank.
        b = b[:, :true_rank] @ torch.randn(true_rank, inner, generator=g)
    # A decaying spectrum, so truncation has something to choose.
    b = b * torch.logspace(0, -2, inner)
    return b, a


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    out_f=st.integers(1, 48),
    in_f=st.integers(1, 48),
    inner=st.integers(1, 24),
    rank=st.integers(1, 30),
)
def test_truncation_is_optimal_and_reports_energy(seed, out_f, in_f, inner, rank) -> None:  # type: ignore[no-untyped-def]
    b, a = _factors(seed, out_f, in_f, inner)
    cut = truncate_factors(b, a, rank)
    dense = b.double() @ a.double()
    sigma = torch.linalg.svdvals(dense)
    keep = min(rank, inner, out_f, in_f)
    assert cut.b.shape == (out_f, keep) and cut.a.shape == (keep, in_f)
    energy = sigma.square()
    total = float(energy.sum())
    assert cut.total_energy == pytest.approx(total, rel=1e-4)
    assert cut.retained == pytest.approx(float(energy[:keep].sum()) / total, abs=1e-5)
    optimal = math.sqrt(float(energy[keep:].sum()))
    error = float(torch.linalg.norm(dense - (cut.b @ cut.a).double()))
    noise = 1e-5 * math.sqrt(total)  # fp32 round-off on the scale of ΔW
    assert error <= 1.01 * optimal + noise, f"error {error:.4g} vs optimal {optimal:.4g}"


@pytest.mark.parametrize(("true_rank", "rank"), [(3, 3), (3, 5), (8, 8), (8, 20)])
def test_truncation_is_exact_at_or_above_the_true_rank(true_rank, rank) -> None:  # type: ignore[no-untyped-def]
    b, a = _factors(7, 40, 56, 8, true_rank=true_rank)
    dense = b.double() @ a.double()
    assert int(torch.linalg.matrix_rank(dense, rtol=1e-5))  # fp32 factors: noise at ~1e-7 == true_rank
    cut = truncate_factors(b, a, rank)
    assert relative_error((cut.b @ cut.a).double(), dense) <= 1e-5
    assert cut.retained == pytest.approx(1.0, abs=1e-6)


def test_truncation_drops_the_smallest_directions() -> None:
    """A known spectrum: keeping 2 of σ = (4, 2, 1) keeps (16 + 4) / 21 of the energy and errs by exactly 1."""
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))
    b, a = (u * torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)).float(), v.T.contiguous().float()
    cut = truncate_factors(b, a, 2)
    assert cut.retained == pytest.approx(20 / 21, rel=1e-5)
    assert float(torch.linalg.norm((b @ a) - cut.b @ cut.a)) == pytest.approx(1.0, rel=1e-4)
    # √Σ is split across both factors: their column/row norms are equal.
    assert torch.allclose(torch.linalg.norm(cut.b, dim=0), torch.linalg.norm(cut.a, dim=1), rtol=1e-4)


def test_truncation_of_a_zero_product() -> None:
    cut = truncate_factors(torch.zeros(16, 4), torch.randn(4, 8), 2)
    assert cut.total_energy == 0.0 and cut.retained == 1.0
    assert torch.isfinite(cut.b).all() and torch.isfinite(cut.a).all()
    assert torch.count_nonzero(cut.b @ cut.a) == 0


# -- the streaming writer ---------------------------------------------------------------------------------------

WRITER_SHAPES = [("m.0.q", 8, 3, 5), ("m.0.v", 3, 1, 7), ("m.1.down", 11, 2, 1), ("m.2.o", 6, 9, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_writer_output_loads_with_safetensors(tmp_path, dtype) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(5)
    written = {}
    writer = PeftFolderWriter(tmp_path / "out", dtype)
    for module, out_f, rank, in_f in WRITER_SHAPES:  # odd byte sizes: nothing is 8-byte aligned but the header
        b, a = torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)
        writer.add_module(module, b, a)
        written[f"{module}.lora_A.weight"], written[f"{module}.lora_B.weight"] = a.to(dtype), b.to(dtype)
    metadata = {"format": "pt", "graft.expression": 'base + "a/b"@2 - ünïcode', "graft.parents": json.dumps([1, 2])}
    config = {"r": 2, "lora_alpha": 2, "rank_pattern": {"m\\.0\\.q": 3}}
    weights = writer.finish(config, metadata)

    assert weights == tmp_path / "out" / "adapter_model.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert writer.ranks == {m: r for m, _o, r, _i in WRITER_SHAPES}
    loaded = load_file(str(weights))
    assert set(loaded) == set(written)
    for key, tensor in written.items():
        assert loaded[key].dtype == dtype and loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key], tensor), key
    with safe_open(str(weights), framework="pt") as handle:
        assert handle.metadata() == metadata
        for key in written:
            assert torch.equal(handle.get_tensor(key), written[key])
    with weights.open("rb") as raw:
        (header_len,) = struct.unpack("<Q", raw.read(8))
    assert header_len % 8 == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == config


def test_writer_refuses_mismatched_factors_and_abort_leaves_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    writer = PeftFolderWriter(tmp_path / "out", torch.float32)
    writer.add_module("ok", torch.ones(4, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="bad"):
        writer.add_module("bad", torch.ones(4, 2), torch.ones(3, 3))
    writer.abort()
    assert list((tmp_path / "out").iterdir()) == []
