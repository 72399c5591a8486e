"""Every query the registry runs. Functions take a session and never commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, literal, select
from sqlalchemy.orm import Session, joinedload

from registry.models import Adapter, AdapterVersion, BaseModel, LineageEdge, MergeJob


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


def get_version(session: Session, adapter_name: str, number: int | None) -> AdapterVersion | None:
    """The version ``number`` of an adapter, or its latest when ``number`` is None."""
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


def get_versions_by_ids(session: Session, ids: Sequence[int]) -> dict[int, AdapterVersion]:
    query = (
        select(AdapterVersion)
        .options(joinedload(AdapterVersion.adapter), joinedload(AdapterVersion.base_model))
        .where(AdapterVersion.id.in_(list(ids)))
    )
    return {v.id: v for v in session.scalars(query)}


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


def walk_lineage(session: Session, version_id: int, direction: str, max_depth: int = 64) -> list[EdgeRow]:
    """All edges above (``up``: ancestors) or below (``down``: descendants) a version, in one recursive query."""
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
    ).where(near == version_id)
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
        ).where(s_near == walk.c.frontier, walk.c.depth < max_depth)
    )
    rows = session.execute(
        select(
            walk.c.child_id, walk.c.parent_id, walk.c.coefficient, walk.c.role, walk.c.strategy, walk.c.depth
        ).order_by(walk.c.depth, walk.c.child_id, walk.c.parent_id)
    )
    seen: dict[tuple[int, int, str], EdgeRow] = {}
    for child_id, parent_id, coefficient, role, strategy, depth in rows:
        seen.setdefault((child_id, parent_id, role), EdgeRow(child_id, parent_id, coefficient, role, strategy, depth))
    return list(seen.values())


def get_job(session: Session, job_id: str) -> MergeJob | None:
    return session.get(MergeJob, job_id)
