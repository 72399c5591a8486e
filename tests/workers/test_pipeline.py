"""The merge pipeline end to end: submit → run → recorded version with lineage; idempotence; failures.

A failed merge must leave no version, no lineage, no blob and nothing in the store's scratch folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.merges import submit_merge
from registry import repositories as repo
from registry.artifacts import ArtifactStore, sha256_file
from registry.db import session_scope
from registry.errors import Conflict, MergeFailed
from registry.models import AdapterVersion, LineageEdge, MergeJob
from registry.services.adapters import register_folder
from registry.settings import Settings
from workers.engine.executor import Cancelled
from workers.pipeline import run_merge_job

BASE = "graft-demo/tiny-llama"
MODULES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (16, 12),
    "base_model.model.model.layers.0.self_attn.v_proj": (8, 12),
    "base_model.model.model.layers.1.mlp.down_proj": (12, 20),
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def leaves(sessions, store, make_adapter) -> dict[str, int]:
    """code (rank 4, alpha 8) and toxic (rank 2, alpha 8), registered and committed: name → version id."""
    ids = {}
    with session_scope(sessions) as session:
        for name, seed, rank in (("code", 1, 4), ("toxic", 2, 2)):
            folder = make_adapter(name, seed=seed, rank=rank, alpha=8.0, modules=MODULES)
            ids[name] = register_folder(session, store, folder, name, tags=[name]).version.id
    return ids


def submit(sessions: sessionmaker[Session], settings: Settings, expression: str, name: str, tags=()) -> str:
    with session_scope(sessions) as session:
        job, plan = submit_merge(session, settings, expression, name, list(tags))
        assert job.plan_hash == plan.hash()
        return job.id


def load_job(sessions: sessionmaker[Session], job_id: str) -> MergeJob:
    with sessions() as session:
        job = session.get(MergeJob, job_id)
        assert job is not None
        session.expunge(job)
        return job


def count(sessions: sessionmaker[Session], model) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def blobs(store: ArtifactStore) -> set[Path]:
    objects = store.root / "objects"
    return {p for p in objects.rglob("*") if p.is_file()} if objects.exists() else set()


def scratch_leftovers(store: ArtifactStore) -> list[Path]:
    tmp = store.root / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def delta(path: Path, modules: dict[str, list], module: str) -> torch.Tensor:
    """ΔW = scale · B @ A of one module of a stored artifact, in float64."""
    with safe_open(str(path), framework="pt") as handle:
        a = handle.get_tensor(f"{module}.lora_A.weight").double()
        b = handle.get_tensor(f"{module}.lora_B.weight").double()
    return modules[module][3] * (b @ a)


# -- success ------------------------------------------------------------------------------------------------


def test_merge_end_to_end(sessions, store, settings, leaves):
    job_id = submit(sessions, settings, "base + code - toxic", "detox", tags=["safety"])
    queued = load_job(sessions, job_id)
    assert (queued.status, queued.attempts, queued.result_version_id) == ("queued", 0, None)
    assert queued.engine_seconds is None
    blobs_before = blobs(store)

    seen: list[tuple[int, int]] = []
    outcome = run_merge_job(job_id, session_factory=sessions, store=store, progress=lambda d, t: seen.append((d, t)))

    assert not outcome.reused
    assert outcome.job_id == job_id
    assert seen == [(1, 3), (2, 3), (3, 3)]
    job = load_job(sessions, job_id)
    assert job.status == "succeeded"
    assert job.attempts == 1
    assert job.result_version_id == outcome.version_id
    assert job.engine_seconds is not None and job.engine_seconds > 0
    assert job.engine_seconds == pytest.approx(outcome.engine_seconds)
    assert (job.progress_done, job.progress_total) == (3, 3)
    assert job.error_code is None and job.error_message is None

    with sessions() as session:
        version = repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id]
        assert version.ref == "detox@1"
        assert version.source == "merge"
        assert version.expression == "base + code - toxic"
        assert version.plan_hash == job.plan_hash
        assert version.base_model.name == BASE
        assert version.adapter.tags == ["safety"]
        assert version.rank == 4 + 2  # exact linear merge: ranks add up
        edges = session.scalars(select(LineageEdge).where(LineageEdge.child_id == version.id)).all()
        code, toxic = (repo.get_versions_by_ids(session, [leaves[n]])[leaves[n]] for n in ("code", "toxic"))
        modules = {"code": code.modules, "toxic": toxic.modules, "merged": version.modules}
        artifact, key = store.path(version.artifact_key), version.artifact_key
        sha = version.sha256

    assert {(e.parent_id, e.coefficient, e.role, e.strategy) for e in edges} == {
        (leaves["code"], 1.0, "operand", "linear"),
        (leaves["toxic"], -1.0, "operand", "linear"),
    }
    # the artifact: stored content-addressed, with provenance, and its ΔW is code's minus toxic's
    assert blobs(store) == blobs_before | {artifact}
    assert sha256_file(artifact) == sha and key.endswith(f"{sha}.safetensors")
    with safe_open(str(artifact), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["graft.plan_hash"] == job.plan_hash
    assert {p["ref"]: p["weight"] for p in json.loads(metadata["graft.parents"])} == {"code@1": 1.0, "toxic@1": -1.0}
    code_path, toxic_path = (store.path(f"objects/{s[:2]}/{s}.safetensors") for s in (code.sha256, toxic.sha256))
    for module in MODULES:
        expected = delta(code_path, modules["code"], module) - delta(toxic_path, modules["toxic"], module)
        got = delta(artifact, modules["merged"], module)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), module
    assert scratch_leftovers(store) == []


def test_the_job_records_retained_energy_and_run_warnings(sessions, store, settings, leaves):
    exact = run_merge_job(submit(sessions, settings, "code - toxic", "exact"), session_factory=sessions, store=store)
    assert exact.retained_energy == 1.0 and exact.warnings == ()
    job_id = submit(sessions, settings, "ties(code, toxic, density=0.5, rank=1)", "lossy")
    lossy = run_merge_job(job_id, session_factory=sessions, store=store)
    job = load_job(sessions, job_id)
    assert job.retained_energy == pytest.approx(lossy.retained_energy)
    assert 0.0 < job.retained_energy < 0.5
    assert job.run_warnings and "energy" in job.run_warnings[0]
    again = run_merge_job(job_id, session_factory=sessions, store=store)
    assert again.reused and again.retained_energy == job.retained_energy and again.warnings == tuple(job.run_warnings)


def test_scalars_become_edge_coefficients(sessions, store, settings, leaves):
    job_id = submit(sessions, settings, "0.7*code + toxic/4 - 0.2*code", "mix")
    outcome = run_merge_job(job_id, session_factory=sessions, store=store)
    with sessions() as session:
        edges = session.scalars(select(LineageEdge).where(LineageEdge.child_id == outcome.version_id)).all()
    coefficients = {e.parent_id: e.coefficient for e in edges}
    assert coefficients.keys() == {leaves["code"], leaves["toxic"]}  # like terms collapse into one edge
    assert coefficients[leaves["code"]] == pytest.approx(0.5)
    assert coefficients[leaves["toxic"]] == pytest.approx(0.25)


def test_running_a_finished_job_again_returns_the_same_version(sessions, store, settings, leaves):
    job_id = submit(sessions, settings, "base + code - toxic", "detox")
    first = run_merge_job(job_id, session_factory=sessions, store=store)
    versions, edges, stored = count(sessions, AdapterVersion), count(sessions, LineageEdge), blobs(store)

    again = run_merge_job(job_id, session_factory=sessions, store=store)

    assert again.reused is True
    assert again.version_id == first.version_id
    assert again.engine_seconds == pytest.approx(first.engine_seconds)
    assert count(sessions, AdapterVersion) == versions
    assert count(sessions, LineageEdge) == edges
    assert blobs(store) == stored
    job = load_job(sessions, job_id)
    assert (job.status, job.attempts) == ("succeeded", 1)


def test_a_second_job_with_the_same_expression_adds_a_version(sessions, store, settings, leaves):
    first = run_merge_job(submit(sessions, settings, "code - toxic", "detox"), session_factory=sessions, store=store)
    second = run_merge_job(submit(sessions, settings, "code - toxic", "detox"), session_factory=sessions, store=store)
    with sessions() as session:
        found = repo.get_versions_by_ids(session, [first.version_id, second.version_id])
        assert [found[first.version_id].number, found[second.version_id].number] == [1, 2]
        assert found[first.version_id].sha256 == found[second.version_id].sha256
    assert len(blobs(store)) == 3  # code, toxic and one merged blob shared by both versions


# -- failures ---------------------------------------------------------------------------------------------


def assert_failed_cleanly(sessions, store, job_id, before, status="failed") -> MergeJob:
    versions, edges, stored = before
    job = load_job(sessions, job_id)
    assert job.status == status
    assert job.attempts == 1
    assert job.result_version_id is None
    assert count(sessions, AdapterVersion) == versions, "a failed merge leaves no version"
    assert count(sessions, LineageEdge) == edges, "a failed merge leaves no lineage"
    assert blobs(store) == stored, "a failed merge leaves no blob"
    assert scratch_leftovers(store) == [], "a failed merge leaves no scratch files"
    return job


def snapshot(sessions, store):
    return count(sessions, AdapterVersion), count(sessions, LineageEdge), blobs(store)


def test_truncated_operand_fails_the_job_and_leaves_nothing(sessions, store, settings, leaves):
    job_id = submit(sessions, settings, "base + code - toxic", "detox")
    with sessions() as session:
        toxic = session.get(AdapterVersion, leaves["toxic"])
        path = store.path(toxic.artifact_key)
    path.write_bytes(path.read_bytes()[:100])
    before = snapshot(sessions, store)

    with pytest.raises(Exception):  # noqa: B017 - whatever the reader raises, the job must record it
        run_merge_job(job_id, session_factory=sessions, store=store)

    job = assert_failed_cleanly(sessions, store, job_id, before)
    assert job.error_code and job.error_message
    with sessions() as session:
        assert repo.get_adapter(session, "detox") is None


def test_silently_corrupted_operand_is_refused_by_its_pinned_hash(sessions, store, settings, leaves):
    """Same length, one flipped bit in the tensor data: only the pinned sha256 can tell."""
    job_id = submit(sessions, settings, "code - toxic", "detox")
    with sessions() as session:
        path = store.path(session.get(AdapterVersion, leaves["toxic"]).artifact_key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    before = snapshot(sessions, store)

    with pytest.raises(MergeFailed, match="does not match its sha256"):
        run_merge_job(job_id, session_factory=sessions, store=store)

    job = assert_failed_cleanly(sessions, store, job_id, before)
    assert job.error_code == "merge_failed"


def test_failed_job_cannot_be_rerun(sessions, store, settings, leaves):
    job_id = submit(sessions, settings, "code - toxic", "detox")
    with sessions() as session:
        path = store.path(session.get(AdapterVersion, leaves["code"]).artifact_key)
    path.write_bytes(b"")
    with pytest.raises(Exception):  # noqa: B017
        run_merge_job(job_id, session_factory=sessions, store=store)
    failed = load_job(sessions, job_id)

    with pytest.raises(MergeFailed) as info:
        run_merge_job(job_id, session_factory=sessions, store=store)
    assert info.value.code == "merge_failed"
    assert "failed" in info.value.message
    again = load_job(sessions, job_id)
    assert (again.status, again.attempts, again.error_code) == ("failed", 1, failed.error_code)


def test_failure_after_storing_removes_the_new_blob(sessions, store, settings, leaves, make_adapter):
    # The target name already belongs to an adapter of another base model: the engine runs and the blob is
    # stored, then recording the version is refused. The blob must go, and the job says why.
    with session_scope(sessions) as session:
        other = make_adapter("other", seed=9, rank=2, modules=MODULES, base_model="other/base")
        register_folder(session, store, other, "taken")
    job_id = submit(sessions, settings, "code - toxic", "taken")
    before = snapshot(sessions, store)

    with pytest.raises(Conflict) as info:
        run_merge_job(job_id, session_factory=sessions, store=store)

    assert info.value.code == "conflict"
    job = assert_failed_cleanly(sessions, store, job_id, before)
    assert job.error_code == "conflict"
    assert "other/base" in (job.error_message or "")
    with sessions() as session:
        assert repo.version_numbers(session, "taken") == [1]


def test_failure_after_storing_keeps_a_blob_that_a_version_uses(sessions, store, settings, leaves, make_adapter):
    # Same as above, but the merged bytes already exist (an earlier identical merge): that blob must stay.
    first = run_merge_job(submit(sessions, settings, "code - toxic", "detox"), session_factory=sessions, store=store)
    with session_scope(sessions) as session:
        other = make_adapter("other", seed=9, rank=2, modules=MODULES, base_model="other/base")
        register_folder(session, store, other, "taken")
    job_id = submit(sessions, settings, "code - toxic", "taken")
    before = snapshot(sessions, store)

    with pytest.raises(Exception):  # noqa: B017
        run_merge_job(job_id, session_factory=sessions, store=store)

    assert_failed_cleanly(sessions, store, job_id, before)
    with sessions() as session:
        kept = session.get(AdapterVersion, first.version_id)
        assert store.exists(kept.artifact_key)


def test_cancelled_job_leaves_nothing(sessions, store, settings, leaves):
    job_id = submit(sessions, settings, "base + code - toxic", "detox")
    before = snapshot(sessions, store)
    calls = iter([False, True])  # let the first module run, then cancel

    with pytest.raises(Cancelled):
        run_merge_job(job_id, session_factory=sessions, store=store, should_cancel=lambda: next(calls))

    assert_failed_cleanly(sessions, store, job_id, before, status="cancelled")
    with sessions() as session:
        assert repo.get_adapter(session, "detox") is None
