"""Every query the registry runs. Functions take a session and never commit."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, case, func, literal, or_, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, contains_eager, joinedload

from registry.models import Adapter, AdapterVersion, ApiToken, BaseModel, LineageEdge, MergeJob, Publication


def get_adapter(session: Session, name: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.name == name))


def adapter_names(session: Session) -> list[str]:
    return list(session.scalars(select(Adapter.name).order_by(Adapter.name)))


def list_adapters(session: Session) -> Sequence[Adapter]:
    return session.scalars(select(Adapter).options(joinedload(Adapter.versions)).order_by(Adapter.name)).unique().all()


def get_or_create_base_model(session: Session, name: str) -> BaseModel:
    found = session.scalar(select(BaseModel).where(BaseModel.name == name))
    if found is not None:
        return found
    created = BaseModel(name=name)
    session.add(created)
    session.flush()
    return created


def version_numbers(session: Session, adapter_name: str) -> list[int]:
    query = (
        select(AdapterVersion.number).join(Adapter).where(Adapter.name == adapter_name).order_by(AdapterVersion.number)
    )
    return list(session.scalars(query))


def next_version_number(session: Session, adapter_id: int) -> int:
    current = session.scalar(select(func.max(AdapterVersion.number)).where(AdapterVersion.adapter_id == adapter_id))
    return (current or 0) + 1


# ``AdapterVersion.number`` is a 32-bit INTEGER column: no version has a larger number, and PostgreSQL refuses to
# compare the column with one ("integer out of range").
MAX_VERSION_NUMBER = 2**31 - 1


def get_version(session: Session, adapter_name: str, number: int | None) -> AdapterVersion | None:
    """The version ``number`` of an adapter, or its latest when ``number`` is None."""
    if number is not None and number > MAX_VERSION_NUMBER:
        return None
    query = (
        select(AdapterVersion)
        .join(Adapter)
        .options(joinedload(AdapterVersion.adapter), joinedload(AdapterVersion.base_model))
        .where(Adapter.name == adapter_name)
    )
    if number is None:
        query = query.order_by(AdapterVersion.number.desc()).limit(1)
    else:
        query = query.where(AdapterVersion.number == number)
    return session.scalar(query)


def get_version_key(session: Session, adapter_name: str, number: int) -> tuple[Any, ...] | None:
    """What identifies version ``number`` of an adapter, without loading its module table; None if absent.

    ``(id, sha256, base model id, created_at, config as canonical JSON)``: with the name and number this
    pins one immutable version's content even where a database hands an id out again after a rollback (SQLite).
    """
    if number > MAX_VERSION_NUMBER:
        return None
    query = (
        select(
            AdapterVersion.id,
            AdapterVersion.sha256,
            AdapterVersion.base_model_id,
            AdapterVersion.created_at,
            AdapterVersion.peft_config,
        )
        .join(Adapter)
        .where(Adapter.name == adapter_name, AdapterVersion.number == number)
    )
    row = session.execute(query).one_or_none()
    if row is None:
        return None
    return (row[0], row[1], row[2], row[3], json.dumps(row[4], sort_keys=True))


def get_versions_by_ids(session: Session, ids: Sequence[int]) -> dict[int, AdapterVersion]:
    query = (
        select(AdapterVersion)
        .options(joinedload(AdapterVersion.adapter), joinedload(AdapterVersion.base_model))
        .where(AdapterVersion.id.in_(list(ids)))
    )
    return {v.id: v for v in session.scalars(query)}


@dataclass(frozen=True)
class VersionRef:
    """What names and describes a version in a lineage graph; ``published`` says a publication succeeded."""

    id: int
    adapter: str
    number: int
    source: str
    expression: str | None
    sha256: str
    published: bool

    @property
    def ref(self) -> str:
        return f"{self.adapter}@{self.number}"


def version_refs(session: Session, ids: Sequence[int]) -> dict[int, VersionRef]:
    """:class:`VersionRef` rows by id, in one query of plain columns.

    No ORM entities, module tables or PEFT configs: on a 7B layout those are ~18 kB of JSON per version, and
    loading full rows for a 100-node lineage graph cost ten times the recursive walk itself.
    """
    if not ids:
        return {}
    published = (
        select(Publication.id)
        .where(Publication.version_id == AdapterVersion.id, Publication.status == "published")
        .exists()
    )
    query = (
        select(
            AdapterVersion.id,
            Adapter.name,
            AdapterVersion.number,
            AdapterVersion.source,
            AdapterVersion.expression,
            AdapterVersion.sha256,
            published,
        )
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        # The ids are integers from the database: rendered inline, a 100-id list costs half as much as
        # 100 bound parameters (which the driver re-parses for every new list length).
        .where(AdapterVersion.id.in_(bindparam("ids", [int(i) for i in ids], expanding=True, literal_execute=True)))
    )
    return {row[0]: VersionRef(*row) for row in session.execute(query)}


def count_versions_with_key(session: Session, artifact_key: str) -> int:
    return session.scalar(select(func.count()).where(AdapterVersion.artifact_key == artifact_key)) or 0


@dataclass(frozen=True)
class EdgeRow:
    """One lineage edge reached by a walk, with its distance from the starting version."""

    child_id: int
    parent_id: int
    coefficient: float
    role: str
    strategy: str
    depth: int


@functools.cache
def _walk_statement(direction: str) -> Select[int, int, float, str, str, int]:
    """The recursive walk for one direction, built once; ``version_id`` and ``max_depth`` are bound per call."""
    edge = LineageEdge.__table__.alias("e")
    near, far = (edge.c.child_id, edge.c.parent_id) if direction == "up" else (edge.c.parent_id, edge.c.child_id)
    seed = select(
        edge.c.child_id,
        edge.c.parent_id,
        edge.c.coefficient,
        edge.c.role,
        edge.c.strategy,
        literal(1).label("depth"),
        far.label("frontier"),
    ).where(near == bindparam("version_id"))
    walk = seed.cte("walk", recursive=True)
    step = LineageEdge.__table__.alias("s")
    s_near, s_far = (step.c.child_id, step.c.parent_id) if direction == "up" else (step.c.parent_id, step.c.child_id)
    walk = walk.union(
        select(
            step.c.child_id,
            step.c.parent_id,
            step.c.coefficient,
            step.c.role,
            step.c.strategy,
            (walk.c.depth + 1).label("depth"),
            s_far.label("frontier"),
        ).where(s_near == walk.c.frontier, walk.c.depth < bindparam("max_depth"))
    )
    return select(
        walk.c.child_id, walk.c.parent_id, walk.c.coefficient, walk.c.role, walk.c.strategy, walk.c.depth
    ).order_by(walk.c.depth, walk.c.child_id, walk.c.parent_id)


def walk_lineage(session: Session, version_id: int, direction: str, max_depth: int = 64) -> list[EdgeRow]:
    """All edges above (``up``: ancestors) or below (``down``: descendants) a version, in one recursive query."""
    statement = _walk_statement("up" if direction == "up" else "down")
    rows = session.execute(statement, {"version_id": version_id, "max_depth": max_depth})
    seen: dict[tuple[int, int, str], EdgeRow] = {}
    for child_id, parent_id, coefficient, role, strategy, depth in rows:
        seen.setdefault((child_id, parent_id, role), EdgeRow(child_id, parent_id, coefficient, role, strategy, depth))
    return list(seen.values())


def get_job(session: Session, job_id: str) -> MergeJob | None:
    return session.get(MergeJob, job_id)


# -- publications and Hub provenance (issue 6) -------------------------------------------------------


def get_publication(session: Session, version_id: int, endpoint: str, repo_id: str) -> Publication | None:
    """The publication of a version to one repo on one Hub, if it was ever attempted."""
    return session.scalar(
        select(Publication).where(
            Publication.version_id == version_id, Publication.endpoint == endpoint, Publication.repo_id == repo_id
        )
    )


def get_publication_by_id(session: Session, publication_id: int) -> Publication | None:
    return session.get(Publication, publication_id)


def publications_of_version(session: Session, version_id: int) -> list[Publication]:
    """Every publication of a version, oldest first."""
    query = select(Publication).where(Publication.version_id == version_id).order_by(Publication.id)
    return list(session.scalars(query))


def latest_published(session: Session, version_ids: Sequence[int]) -> dict[int, Publication]:
    """For each version id that has been published, its most recent successful publication."""
    if not version_ids:
        return {}
    query = (
        select(Publication)
        .where(Publication.version_id.in_(list(version_ids)), Publication.status == "published")
        .order_by(Publication.version_id, Publication.published_at, Publication.id)
    )
    found: dict[int, Publication] = {}
    for publication in session.scalars(query):
        found[publication.version_id] = publication  # later rows win: the newest publication
    return found


def parent_edges(session: Session, version_id: int) -> list[LineageEdge]:
    """The direct parents of a version (one edge per operand), in insertion order."""
    query = select(LineageEdge).where(LineageEdge.child_id == version_id).order_by(LineageEdge.id)
    return list(session.scalars(query))


def job_of_version(session: Session, version_id: int) -> MergeJob | None:
    """The merge job whose result is this version, if the version came from a merge."""
    query = select(MergeJob).where(MergeJob.result_version_id == version_id).order_by(MergeJob.created_at).limit(1)
    return session.scalar(query)


# -- the service (issue 5): API tokens, adapter search, job queries ---------------------------------------


def get_token_by_hash(session: Session, token_hash: str) -> ApiToken | None:
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash))


def get_token(session: Session, token_id: int) -> ApiToken | None:
    return session.get(ApiToken, token_id)


def list_tokens(session: Session) -> Sequence[ApiToken]:
    return session.scalars(select(ApiToken).order_by(ApiToken.id)).all()


@dataclass(frozen=True)
class AdapterRow:
    """An adapter seen through its latest version, with how many versions it has."""

    latest: AdapterVersion
    versions: int


def _has_tag(session: Session, tag: str) -> ColumnElement[bool]:
    if session.get_bind().dialect.name == "postgresql":
        return type_coerce(Adapter.tags, JSONB).contains([tag])
    values = func.json_each(Adapter.tags).table_valued("value")
    return select(literal(1)).select_from(values).where(values.c.value == tag).exists()


def search_adapters(
    session: Session,
    *,
    base_model: str | None = None,
    tag: str | None = None,
    rank_min: int | None = None,
    rank_max: int | None = None,
    text: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[AdapterRow], int]:
    """One page of adapters (by name) whose latest version matches every filter given, and the total count.

    ``base_model`` is exact; ``tag`` is one of the adapter's tags; the rank range is inclusive and applies to
    the latest version; ``text`` is a case-insensitive substring of the name or the description.
    """
    latest = (
        select(
            AdapterVersion.adapter_id.label("adapter_id"),
            func.max(AdapterVersion.number).label("number"),
            func.count().label("versions"),
        )
        .group_by(AdapterVersion.adapter_id)
        .subquery("latest")
    )
    conditions: list[ColumnElement[bool]] = []
    if base_model is not None:
        conditions.append(BaseModel.name == base_model)
    if tag is not None:
        conditions.append(_has_tag(session, tag))
    if rank_min is not None:
        conditions.append(AdapterVersion.rank >= rank_min)
    if rank_max is not None:
        conditions.append(AdapterVersion.rank <= rank_max)
    if text:
        conditions.append(
            or_(Adapter.name.icontains(text, autoescape=True), Adapter.description.icontains(text, autoescape=True))
        )
    query = (
        select(AdapterVersion, latest.c.versions)
        .join(latest, and_(AdapterVersion.adapter_id == latest.c.adapter_id, AdapterVersion.number == latest.c.number))
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .join(BaseModel, BaseModel.id == AdapterVersion.base_model_id)
        .where(*conditions)
    )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.execute(
        query.options(contains_eager(AdapterVersion.adapter), contains_eager(AdapterVersion.base_model))
        .order_by(Adapter.name)
        .limit(limit)
        .offset(offset)
    )
    return [AdapterRow(version, int(count)) for version, count in page], int(total)


def get_job_by_idempotency_key(session: Session, key: str) -> MergeJob | None:
    return session.scalar(select(MergeJob).where(MergeJob.idempotency_key == key))


def get_job_for_update(session: Session, job_id: str) -> MergeJob | None:
    """The job row, locked until the transaction ends (PostgreSQL; SQLite serialises writers anyway)."""
    return session.scalar(
        select(MergeJob).where(MergeJob.id == job_id).with_for_update().execution_options(populate_existing=True)
    )


def find_finished_job(session: Session, plan_hash: str, target_name: str) -> MergeJob | None:
    """The earliest succeeded job that ran the same plan into the same adapter, if its result still exists."""
    return session.scalar(
        select(MergeJob)
        .where(
            MergeJob.plan_hash == plan_hash,
            MergeJob.target_name == target_name,
            MergeJob.status == "succeeded",
            MergeJob.result_version_id.is_not(None),
        )
        .order_by(MergeJob.created_at, MergeJob.id)
        .limit(1)
    )


def list_jobs(
    session: Session, *, status: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[MergeJob], int]:
    """One page of jobs, newest first, and the total count."""
    conditions = [MergeJob.status == status] if status else []
    total = session.scalar(select(func.count()).select_from(MergeJob).where(*conditions)) or 0
    jobs = session.scalars(
        select(MergeJob)
        .options(joinedload(MergeJob.result_version).joinedload(AdapterVersion.adapter))
        .where(*conditions)
        .order_by(MergeJob.created_at.desc(), MergeJob.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(jobs), int(total)


def job_status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(MergeJob.status, func.count()).group_by(MergeJob.status))
    return {str(status): int(count) for status, count in rows}


def merge_seconds_histogram(session: Session, buckets: Sequence[float]) -> tuple[list[int], int, float]:
    """Engine seconds of merges that ran and succeeded: cumulative counts per bucket bound, count and sum."""
    columns = [func.coalesce(func.sum(case((MergeJob.engine_seconds <= bound, 1), else_=0)), 0) for bound in buckets]
    row = session.execute(
        select(
            *columns, func.count(MergeJob.engine_seconds), func.coalesce(func.sum(MergeJob.engine_seconds), 0.0)
        ).where(MergeJob.status == "succeeded", MergeJob.reused_from.is_(None), MergeJob.engine_seconds.is_not(None))
    ).one()
    values = list(row)
    return [int(v) for v in values[: len(buckets)]], int(values[-2]), float(values[-1])


def claim_next_queued_job(session: Session) -> str | None:
    """Mark the oldest queued job ``running`` and return its id; None when nothing is queued.

    The conditional update makes the claim atomic: of two runners racing for one job, one gets it.
    """
    job_id = session.scalar(
        select(MergeJob.id).where(MergeJob.status == "queued").order_by(MergeJob.created_at, MergeJob.id).limit(1)
    )
    if job_id is None:
        return None
    claimed = session.execute(
        update(MergeJob).where(MergeJob.id == job_id, MergeJob.status == "queued").values(status="running")
    )
    return job_id if getattr(claimed, "rowcount", 0) == 1 else None


def requeue_running_jobs(session: Session) -> list[str]:
    """Put every ``running`` job back in the queue (after a crash of the only process that runs jobs)."""
    ids = list(session.scalars(select(MergeJob.id).where(MergeJob.status == "running")))
    if ids:
        session.execute(update(MergeJob).where(MergeJob.id.in_(ids)).values(status="queued"))
    return ids


def lock_adapter(session: Session, name: str) -> Adapter | None:
    """The adapter row, locked until the transaction ends (so that version numbers are taken in turn)."""
    return session.scalar(select(Adapter).where(Adapter.name == name).with_for_update())
