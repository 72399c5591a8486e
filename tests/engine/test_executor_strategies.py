"""The executor runs every node kind: dense strategies (TIES, DARE, magnitude pruning) re-factored to low rank,
svd over them, and orth — through the real registry, compiler and pipeline, checked module by module against
an independent dense computation with the kernels of ``workers.engine.strategies``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from api.cli import app
from api.merges import submit_merge
from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.services.adapters import register_folder
from registry.settings import Settings
from workers.compiler.plan import MergePlan
from workers.engine import strategies
from workers.engine.dense import LOW_RETAINED_ENERGY, form_delta
from workers.engine.executor import execute_plan
from workers.pipeline import run_merge_job

ADAPTERS = {"code": {"seed": 1, "rank": 8, "alpha": 16.0}, "math": {"seed": 2, "rank": 6, "alpha": 6.0}}
Deltas = dict[str, torch.Tensor]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_factors(weights: Path) -> Factors:
    tensors = load_file(str(weights))
    return {
        key.removesuffix(".lora_A.weight"): (tensors[key.replace("lora_A", "lora_B")], tensors[key])
        for key in tensors
        if key.endswith(".lora_A.weight")
    }


class Env:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, tmp_path: Path, make_adapter) -> None:  # type: ignore[no-untyped-def]
        self.sessions, self.store, self.tmp_path = sessions, store, tmp_path
        self.settings = Settings(home=tmp_path / "home")
        self.inputs: dict[str, Factors] = {}
        with session_scope(sessions) as session:
            for name, kwargs in ADAPTERS.items():
                folder = make_adapter(name, **kwargs)
                register_folder(session, store, folder, name, tags=[])
                scale = float(kwargs["alpha"]) / int(kwargs["rank"])
                self.inputs[name] = {
                    m: (b * scale, a) for m, (b, a) in read_factors(folder / "adapter_model.safetensors").items()
                }

    def delta(self, name: str, module: str) -> torch.Tensor:
        b, a = self.inputs[name][module]
        return form_delta(b, a)

    def merge(self, expression: str, name: str) -> tuple[MergePlan, Factors]:
        """Compile, commit and run through the pipeline; return the plan and the stored factors."""
        with self.sessions() as session:
            job, plan = submit_merge(session, self.settings, expression, name, [])
            session.commit()
            job_id = job.id
        outcome = run_merge_job(job_id, session_factory=self.sessions, store=self.store, device="cpu")
        with self.sessions() as session:
            version = repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id]
            path = self.store.path(version.artifact_key)
        return plan, read_factors(path)

    def paths(self, plan: MergePlan) -> list[Path]:
        with self.sessions() as session:
            versions = repo.get_versions_by_ids(session, [op.version_id for op in plan.operands])
            return [self.store.path(versions[op.version_id].artifact_key) for op in plan.operands]


@pytest.fixture
def env(sessions, store, tmp_path, make_adapter) -> Env:  # type: ignore[no-untyped-def]
    return Env(sessions, store, tmp_path, make_adapter)


def best_error(expected: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(expected.double())
    return float(s[rank:].square().sum().sqrt())


def check_ranks(plan: MergePlan, out: Factors) -> None:
    assert set(out) == {step.module for step in plan.steps}
    for step in plan.steps:
        b, a = out[step.module]
        assert b.shape == (step.out_features, step.rank) and a.shape == (step.rank, step.in_features)


def test_ties_is_the_best_low_rank_approximation_of_the_dense_ties(env: Env) -> None:
    plan, out = env.merge("ties(code, math, density=0.5)", "t")
    check_ranks(plan, out)
    for step in plan.steps:
        expected = strategies.ties([env.delta("code", step.module), env.delta("math", step.module)], density=0.5)
        b, a = out[step.module]
        error = float(torch.linalg.matrix_norm((b.double() @ a.double()) - expected.double()))
        assert error <= 1.01 * best_error(expected, step.rank) + 1e-6 * float(torch.linalg.matrix_norm(expected))


def test_magnitude_prune_at_density_one_is_the_input(env: Env) -> None:
    plan, out = env.merge("magnitude_prune(code, density=1.0)", "p")
    check_ranks(plan, out)
    for step in plan.steps:
        assert step.rank >= ADAPTERS["code"]["rank"]
        b, a = out[step.module]
        expected = env.delta("code", step.module)
        torch.testing.assert_close(b @ a, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_dare_at_density_one_is_the_sum(env: Env) -> None:
    plan, out = env.merge("dare(code, math, density=1.0, seed=1, rank=14)", "d")  # rank(code + math) = 8 + 6
    check_ranks(plan, out)
    for step in plan.steps:
        b, a = out[step.module]
        expected = env.delta("code", step.module) + env.delta("math", step.module)
        torch.testing.assert_close(b @ a, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_svd_of_ties(env: Env) -> None:
    plan, out = env.merge("svd(ties(code, math, density=0.5), rank=4)", "s")
    check_ranks(plan, out)
    for step in plan.steps:
        assert step.rank == 4
        expected = strategies.ties([env.delta("code", step.module), env.delta("math", step.module)], density=0.5)
        b, a = out[step.module]
        error = float(torch.linalg.matrix_norm((b.double() @ a.double()) - expected.double()))
        assert error <= 1.02 * best_error(expected, 4) + 1e-6 * float(torch.linalg.matrix_norm(expected))


def test_orth_projects_out_the_other_column_space(env: Env) -> None:
    plan, out = env.merge("orth(code, against=(math,))", "o")
    check_ranks(plan, out)
    for step in plan.steps:
        b, a = out[step.module]
        b_math = env.inputs["math"][step.module][0]
        q = torch.linalg.qr(b_math).Q
        assert float(torch.linalg.matrix_norm(q.T @ b)) <= 1e-5 * float(torch.linalg.matrix_norm(b))
        code = env.delta("code", step.module)
        torch.testing.assert_close(b @ a, code - q @ (q.T @ code), rtol=0, atol=1e-5 * float(code.abs().max()))


def test_same_plan_twice_is_byte_identical_and_reports_retained_energy(env: Env) -> None:
    expression = "0.5*ties(code, math, density=0.5) + dare(code, math, density=0.7, seed=3)"
    with env.sessions() as session:
        _job, plan = submit_merge(session, env.settings, expression, "twice", [])
    paths = env.paths(plan)
    first = execute_plan(plan, paths, env.tmp_path / "one", device=torch.device("cpu"))
    second = execute_plan(plan, paths, env.tmp_path / "two", device=torch.device("cpu"))
    assert first.weights_path.read_bytes() == second.weights_path.read_bytes()
    assert 0.0 < first.retained_energy < 1.0 and first.retained_energy == second.retained_energy
    assert first.warnings == second.warnings


def test_low_retained_energy_warns(env: Env) -> None:
    with env.sessions() as session:
        _job, plan = submit_merge(session, env.settings, "ties(code, math, density=0.5, rank=1)", "low", [])
    report = execute_plan(plan, env.paths(plan), env.tmp_path / "low", device=torch.device("cpu"))
    assert report.retained_energy < LOW_RETAINED_ENERGY
    assert any("energy" in w for w in report.warnings)
    assert not math.isnan(report.retained_energy)


def test_cli_merge_ties(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_adapter) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "cli-home"
    monkeypatch.setenv("GRAFT_HOME", str(home))
    monkeypatch.delenv("GRAFT_DATABASE_URL", raising=False)
    monkeypatch.delenv("GRAFT_ARTIFACTS_DIR", raising=False)
    runner = CliRunner()
    for name, kwargs in ADAPTERS.items():
        result = runner.invoke(app, ["register", str(make_adapter(name, **kwargs)), "--name", name])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["merge", "ties(code, math, density=0.5)", "--name", "t", "--device", "cpu"])
    assert result.exit_code == 0, result.output
