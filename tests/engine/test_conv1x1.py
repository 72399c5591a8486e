"""Merging adapters with LoRA on 1×1 convolutions, end to end.

For a 1×1 Conv2d, ΔW[out, in, 1, 1] = s·B.view(out, r) @ A.view(r, in): the engine reads the 4-D factors as
their 2-D views, runs the same kernels, and writes the result's factors back as (R, in, 1, 1) / (out, R, 1, 1).

The merge tests register synthetic PEFT adapters over the tiny Llama layout with some modules stored as 1×1 conv
LoRA, run expressions through the real pipeline (``submit_merge`` → ``run_merge_job``, PostgreSQL and SQLite) and
check every module of the stored result against ΔW computed here from the input files with plain torch. The PEFT
test builds a real ``nn.Module`` with a ``Conv2d(in, out, 1)`` and a ``Linear``, trains nothing: it makes two LoRA
adapters with ``peft.get_peft_model``, registers them with the CLI, merges, exports, and loads the result with
``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from api.cli import app
from api.merges import submit_merge
from bench.synthetic import TINY
from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.formats.peft import inspect_peft_folder
from registry.services.adapters import register_folder
from registry.settings import Settings
from workers.analyze import analyze_versions
from workers.compiler.plan import MergePlan
from workers.engine import strategies
from workers.engine.reader import as_matrix
from workers.engine.writer import PeftFolderWriter
from workers.pipeline import run_merge_job

PEFT_PREFIX = "base_model.model."
# q_proj (64×64, like SD's proj_in/proj_out) and down_proj (64×128) of both layers are 1×1 convs.
CONV = frozenset(name for name in TINY.modules() if name.endswith(("q_proj", "down_proj")))
ADAPTERS: dict[str, dict[str, Any]] = {
    "a": {"seed": 1, "rank": 8, "alpha": 16.0},
    "b": {"seed": 2, "rank": 6, "alpha": 6.0, "rank_pattern": {"down_proj": 4}},
}
Deltas = dict[str, torch.Tensor]


def read_output(weights: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (B, A)}`` of a PEFT file, as stored (4-D for conv modules)."""
    tensors = load_file(str(weights))
    return {
        key.removesuffix(".lora_A.weight"): (tensors[key.replace("lora_A", "lora_B")], tensors[key])
        for key in tensors
        if key.endswith(".lora_A.weight")
    }


def dense(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B @ A in float64 over the 2-D views (out, r) @ (r, in), whatever the factors' layout."""
    return b.double().reshape(b.shape[0], b.shape[1]) @ a.double().reshape(a.shape[0], a.shape[1])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(got - expected) / torch.linalg.matrix_norm(expected))


def best_error(expected: torch.Tensor, rank: int) -> float:
    return float(torch.linalg.svdvals(expected)[rank:].square().sum().sqrt())


class Env:
    """Two registered adapters with conv modules and their ΔW per module (from the files, scale folded in)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        tmp_path: Path,
        make_adapter: Callable[..., Path],
    ) -> None:
        self.sessions, self.store, self.settings = sessions, store, Settings(home=tmp_path / "home")
        self.deltas: dict[str, Deltas] = {}
        with session_scope(sessions) as session:
            for name, kwargs in ADAPTERS.items():
                folder = make_adapter(name, conv_modules=CONV, **kwargs)
                register_folder(session, store, folder, name, tags=[])
                config = json.loads((folder / "adapter_config.json").read_text())
                out: Deltas = {}
                for module, (b, a) in read_output(folder / "adapter_model.safetensors").items():
                    assert (b.dim() == 4) == (module in CONV)
                    rank = 4 if module.endswith("down_proj") and name == "b" else config["r"]
                    assert a.shape[0] == rank
                    out[module] = config["lora_alpha"] / rank * dense(b, a)
                self.deltas[name] = out

    def merge(self, expression: str, name: str) -> tuple[MergePlan, dict[str, tuple[torch.Tensor, torch.Tensor]], Any]:
        """Compile, commit and run through the pipeline; the plan, the stored factors and the version's rows."""
        with self.sessions() as session:
            job, plan = submit_merge(session, self.settings, expression, name, [])
            session.commit()
            job_id = job.id
        outcome = run_merge_job(job_id, session_factory=self.sessions, store=self.store, device="cpu")
        with self.sessions() as session:
            version = repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id]
            path, rows = self.store.path(version.artifact_key), dict(version.modules)
        return plan, read_output(path), rows


@pytest.fixture
def env(sessions, store, tmp_path, make_adapter) -> Env:  # type: ignore[no-untyped-def]
    return Env(sessions, store, tmp_path, make_adapter)


def check_layout(plan: MergePlan, out: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: dict[str, Any]) -> None:
    """Conv modules come back 4-D with a (1, 1) kernel (in the plan, the file and the new version's facts)."""
    assert set(out) == {step.module for step in plan.steps} == set(TINY.modules())
    for step in plan.steps:
        b, a = out[step.module]
        r, o, i = step.rank, step.out_features, step.in_features
        if step.module in CONV:
            assert step.kernel == (1, 1)
            assert tuple(a.shape) == (r, i, 1, 1) and tuple(b.shape) == (o, r, 1, 1)
            assert rows[step.module][4:] == [1, 1]
        else:
            assert step.kernel is None
            assert tuple(a.shape) == (r, i) and tuple(b.shape) == (o, r)
            assert len(rows[step.module]) == 4


def test_a_minus_b_is_exact_on_conv_modules(env: Env) -> None:
    plan, out, rows = env.merge("a - b", "diff")
    check_layout(plan, out, rows)
    for module, (b, a) in out.items():
        expected = env.deltas["a"][module] - env.deltas["b"][module]
        assert relative_error(dense(b, a), expected) <= 1e-5, module
        assert a.shape[0] == (12 if module.endswith("down_proj") else 14)  # ranks add up


def test_svd_of_a_sum_is_the_best_low_rank_approximation(env: Env) -> None:
    plan, out, rows = env.merge("svd(a + b, rank=4)", "low")
    check_layout(plan, out, rows)
    for module, (b, a) in out.items():
        expected = env.deltas["a"][module] + env.deltas["b"][module]
        error = float(torch.linalg.matrix_norm(dense(b, a) - expected))
        norm = float(torch.linalg.matrix_norm(expected))
        assert a.shape[0] == 4
        assert error <= best_error(expected, 4) + 1e-5 * norm, module  # Eckart–Young, to rounding


@pytest.mark.parametrize("rank", [None, 64])
def test_ties_on_conv_modules_is_the_dense_ties(env: Env, rank: int | None) -> None:
    """At rank 64 (each module's full rank) the re-factoring is exact; at the default rank, near-optimal."""
    expression = "ties(a, b, density=0.5)" if rank is None else f"ties(a, b, density=0.5, rank={rank})"
    plan, out, rows = env.merge(expression, "tied")
    check_layout(plan, out, rows)
    for step in plan.steps:
        module = step.module
        inputs = [env.deltas[name][module].float() for name in ("a", "b")]
        expected = strategies.ties(inputs, density=0.5).double()
        b, a = out[module]
        norm = float(torch.linalg.matrix_norm(expected))
        if rank is None:
            error = float(torch.linalg.matrix_norm(dense(b, a) - expected))
            assert error <= 1.01 * best_error(expected, step.rank) + 1e-6 * norm, module
        else:
            assert step.rank == min(step.out_features, step.in_features)
            assert relative_error(dense(b, a), expected) <= 1e-5, module


def test_a_merged_conv_adapter_merges_again(env: Env) -> None:
    """The result's facts record the kernels, so it is a conv adapter like any upload."""
    env.merge("0.5*a", "half")
    plan, out, rows = env.merge("half - a", "again")
    check_layout(plan, out, rows)
    for module, (b, a) in out.items():
        expected = -0.5 * env.deltas["a"][module]
        assert relative_error(dense(b, a), expected) <= 1e-5, module


def test_analyze_reads_conv_modules_and_skips_layer_kind_mismatches(
    env: Env, make_adapter: Callable[..., Path]
) -> None:
    report = analyze_versions(["a", "b"], session_factory=env.sessions, store=env.store, conflict_density=0.5)
    assert report["shared_modules"] == len(TINY.modules())
    q0 = next(row for row in report["modules"] if row["module"] in CONV)
    a, b = env.deltas["a"][q0["module"]], env.deltas["b"][q0["module"]]
    cosine = float((a * b).sum() / (a.norm() * b.norm()))
    assert q0["cosines"][0][1] == pytest.approx(cosine, abs=1e-6)
    with session_scope(env.sessions) as session:  # the same shapes, all Linear
        register_folder(session, env.store, make_adapter("lin", seed=3), "lin", tags=[])
    report = analyze_versions(["a", "lin"], session_factory=env.sessions, store=env.store)
    assert report["shared_modules"] == len(TINY.modules()) - len(CONV)


def test_the_writer_and_reader_round_trip_1x1_factors(tmp_path: Path) -> None:
    writer = PeftFolderWriter(tmp_path / "out", torch.float32)
    b, a = torch.randn(6, 3), torch.randn(3, 5)
    writer.add_module("base_model.model.conv", b, a, kernel=(1, 1))
    writer.add_module("base_model.model.linear", b, a)
    with pytest.raises(ValueError, match="only 1×1 conv factors can be written, not a 3×3 kernel"):
        writer.add_module("base_model.model.bad", b, a, kernel=(3, 3))
    weights = writer.finish({"peft_type": "LORA", "r": 3, "lora_alpha": 3, "base_model_name_or_path": "m"}, {})
    out = read_output(weights)
    assert tuple(out["base_model.model.conv"][1].shape) == (3, 5, 1, 1)
    assert tuple(out["base_model.model.conv"][0].shape) == (6, 3, 1, 1)
    assert torch.equal(as_matrix(out["base_model.model.conv"][1], "A"), a)
    assert torch.equal(as_matrix(out["base_model.model.conv"][0], "B"), b)
    assert tuple(out["base_model.model.linear"][1].shape) == (3, 5)
    with pytest.raises(ValueError, match="only 2-D factors and 1×1 conv factors"):
        as_matrix(torch.zeros(3, 5, 3, 3), "x.lora_A.weight")
    assert inspect_peft_folder(tmp_path / "out").modules["base_model.model.conv"].kernel == (1, 1)


# -- real PEFT: a Conv2d(in, out, 1) and a Linear ------------------------------------------------------------


class ConvNet(torch.nn.Module):
    """A 1×1 conv feeding a Linear over the channels, the shape of SD's ``proj_in`` → attention projection."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = torch.nn.Conv2d(8, 16, 1)
        self.to_q = torch.nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q(self.proj_in(x).permute(0, 2, 3, 1))


def base_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def peft_adapter(folder: Path, seed: int, **config: Any) -> dict[str, torch.Tensor]:
    """A PEFT LoRA on both layers with random (non-zero) factors, saved to ``folder``; its ΔW per module."""
    from peft import LoraConfig, get_peft_model

    model = base_net()
    torch.manual_seed(seed)
    lora = get_peft_model(model, LoraConfig(target_modules=["proj_in", "to_q"], init_lora_weights=False, **config))
    lora.save_pretrained(str(folder))
    deltas = {}
    for name in ("proj_in", "to_q"):
        layer = lora.base_model.model.get_submodule(name)
        deltas[name] = layer.get_delta_weight("default").detach().double()
    assert deltas["proj_in"].shape == (16, 8, 1, 1)
    return deltas


@pytest.fixture
def graft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GRAFT_DATABASE_URL", raising=False)
    monkeypatch.delenv("GRAFT_ARTIFACTS_DIR", raising=False)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, f"graft {' '.join(args)}: exit {result.exit_code}\n{result.output}"
        return result.stdout

    yield run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("expression", "weights"),
    [("0.7*a + 0.3*b", {"a": 0.7, "b": 0.3}), ("a - 0.5*b", {"a": 1.0, "b": -0.5})],
)
def test_peft_loads_a_merged_1x1_conv_adapter(
    graft: Callable[..., str], tmp_path: Path, expression: str, weights: dict[str, float]
) -> None:
    from peft import PeftModel

    deltas = {
        "a": peft_adapter(tmp_path / "a", seed=1, r=4, lora_alpha=8),
        "b": peft_adapter(tmp_path / "b", seed=2, r=2, lora_alpha=6, use_rslora=True),
    }
    for name in ("a", "b"):
        graft("register", str(tmp_path / name), "--name", name, "--base-model", "tiny/conv-net")
    merged = json.loads(graft("merge", expression, "--name", "merged", "--json", "--device", "cpu"))
    assert merged["version"]["ref"] == "merged@1"
    export = tmp_path / "export"
    graft("export", "merged@1", str(export))

    tensors = load_file(str(export / "adapter_model.safetensors"))
    assert tuple(tensors["base_model.model.proj_in.lora_A.weight"].shape) == (6, 8, 1, 1)
    assert tuple(tensors["base_model.model.proj_in.lora_B.weight"].shape) == (16, 6, 1, 1)
    assert tuple(tensors["base_model.model.to_q.lora_A.weight"].shape) == (6, 16)

    model = PeftModel.from_pretrained(base_net(), str(export)).eval()
    assert isinstance(model.base_model.model.proj_in.base_layer, torch.nn.Conv2d)
    expected = {name: sum(w * deltas[key][name] for key, w in weights.items()) for name in ("proj_in", "to_q")}
    for name, delta in expected.items():
        layer = model.base_model.model.get_submodule(name)
        assert layer.scaling["default"] == 1.0
        got = layer.get_delta_weight("default").double()
        assert relative_error(got.flatten(1), delta.flatten(1)) <= 1e-5, name

    hand = base_net()
    with torch.no_grad():
        hand.proj_in.weight += expected["proj_in"].float()
        hand.to_q.weight += expected["to_q"].float()
        x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(3))
        got, want, plain = model(x), hand(x), base_net()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - plain).abs().max() > 1e-2  # not vacuous: the adapter moves the output
