"""Running jobs for a task or the embedded runner: cancellation between modules, recovery after a crash,
atomic claims. On PostgreSQL and SQLite (the root conftest's ``sessions``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.merges import submit_merge
from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.models import AdapterVersion, MergeJob
from registry.services import merges
from registry.services.adapters import register_folder
from registry.settings import Settings
from workers import jobs
from workers.embedded import EmbeddedRunner
from workers.jobs import execute_job


@pytest.fixture
def submit(sessions: sessionmaker[Session], store: ArtifactStore, make_adapter, tmp_path: Path):  # type: ignore[no-untyped-def]
    with session_scope(sessions) as session:
        for seed, name in enumerate(("code", "toxic"), start=1):
            register_folder(session, store, make_adapter(name, seed=seed), name)

    def make(expression: str, name: str) -> str:
        with session_scope(sessions) as session:
            job, _plan = submit_merge(session, Settings(home=tmp_path / "home"), expression, name, [])
            return job.id

    return make


def job_row(sessions: sessionmaker[Session], job_id: str) -> MergeJob:
    with sessions() as session:
        job = session.get(MergeJob, job_id)
        assert job is not None
        return job


def versions_of(sessions: sessionmaker[Session], name: str) -> list[int]:
    with sessions() as session:
        return repo.version_numbers(session, name)


def test_a_cancel_is_honoured_between_modules(
    sessions: sessionmaker[Session], store: ArtifactStore, submit, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = submit("base + code - toxic", "detox")
    record = jobs.JobMonitor.progress

    def progress_then_cancel(self: jobs.JobMonitor, done: int, total: int) -> None:
        record(self, done, total)
        if done == 3:  # someone presses cancel while module 3 was being written
            with session_scope(sessions) as session:
                merges.request_cancel(session, job_id)

    monkeypatch.setattr(jobs.JobMonitor, "progress", progress_then_cancel)
    result = execute_job(job_id, sessions=sessions, store=store, device="cpu", progress_interval=0.0)
    assert result.status == "cancelled"
    job = job_row(sessions, job_id)
    assert job.status == "cancelled" and job.progress_done == 3 and job.result_version_id is None
    assert versions_of(sessions, "detox") == []
    assert list((store.root / "tmp").iterdir()) == []  # scratch removed
    # A redelivered task leaves a cancelled job alone.
    assert execute_job(job_id, sessions=sessions, store=store).status == "cancelled"


def test_a_job_cancelled_before_it_starts_never_runs(sessions: sessionmaker[Session], store, submit) -> None:
    job_id = submit("code", "c")
    with session_scope(sessions) as session:
        session.get(MergeJob, job_id).cancel_requested = True  # type: ignore[union-attr]
    assert execute_job(job_id, sessions=sessions, store=store).status == "cancelled"
    assert job_row(sessions, job_id).attempts == 0
    assert execute_job("no-such-job", sessions=sessions, store=store).status == "missing"


def test_the_monitor_throttles_database_writes(sessions: sessionmaker[Session], submit) -> None:
    job_id = submit("code", "c")
    now = [0.0]
    monitor = jobs.JobMonitor(sessions, job_id, interval=1.0, clock=lambda: now[0])
    monitor.progress(1, 10)
    now[0] = 0.5
    monitor.progress(2, 10)  # within the interval: not written
    assert job_row(sessions, job_id).progress_done == 1
    monitor.progress(10, 10)  # the last module is always written
    assert job_row(sessions, job_id).progress_done == 10
    assert monitor.should_cancel() is False
    with session_scope(sessions) as session:
        merges.request_cancel(session, job_id)
    assert monitor.should_cancel() is False  # polled less than an interval ago
    now[0] = 2.0
    assert monitor.should_cancel() is True


def test_the_embedded_runner_recovers_orphans_and_drains_the_queue(
    sessions: sessionmaker[Session], store: ArtifactStore, submit
) -> None:
    orphan = submit("code - toxic", "orphan")
    fresh = submit("code + toxic", "fresh")
    with session_scope(sessions) as session:  # a process died while running the orphan
        job = session.get(MergeJob, orphan)
        assert job is not None
        job.status, job.attempts = "running", 1

    runner = EmbeddedRunner(sessions, store, device="cpu", progress_interval=0.0)
    assert runner.recover() == [orphan]
    results = {r.job_id: r for r in (runner.run_once(), runner.run_once()) if r is not None}
    assert runner.run_once() is None
    assert {job_id: r.status for job_id, r in results.items()} == {orphan: "succeeded", fresh: "succeeded"}
    assert job_row(sessions, orphan).attempts == 2 and job_row(sessions, fresh).attempts == 1
    assert versions_of(sessions, "orphan") == [1] and versions_of(sessions, "fresh") == [1]


def test_a_claim_is_atomic_and_a_second_delivery_records_no_second_version(
    sessions: sessionmaker[Session], store: ArtifactStore, submit
) -> None:
    job_id = submit("code", "once")
    with session_scope(sessions) as session:
        assert repo.claim_next_queued_job(session) == job_id
    with session_scope(sessions) as session:
        assert repo.claim_next_queued_job(session) is None
    assert execute_job(job_id, sessions=sessions, store=store).status == "succeeded"
    assert execute_job(job_id, sessions=sessions, store=store).status == "succeeded"
    with sessions() as session:
        count = session.scalar(select(func.count()).select_from(AdapterVersion).where(AdapterVersion.source == "merge"))
    assert count == 1
