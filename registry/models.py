"""SQLAlchemy 2 models of the registry. Versions are immutable once written.

Alembic owns the schema (``migrations/``); nothing in a production path calls ``create_all``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so that migrations (and SQLite batch mode) can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class BaseModel(Base):
    """A base model that adapters apply to, e.g. ``meta-llama/Llama-2-7b-hf``."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Adapter(Base):
    """A named adapter; its content lives in immutable :class:`AdapterVersion` rows."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[str]] = mapped_column(JsonType, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    versions: Mapped[list[AdapterVersion]] = relationship(back_populates="adapter", order_by="AdapterVersion.number")


class AdapterVersion(Base):
    """One immutable version of an adapter: the artifact, its shape facts and where it came from.

    ``modules`` maps each LoRA module name to ``[out_features, in_features, rank, scale]`` so that the
    compiler can type-check an expression without opening any tensor file.
    """

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "number", name="uq_adapter_versions_adapter_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    base_revision: Mapped[str | None] = mapped_column(String(100), nullable=True)
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(default=False)
    target_modules: Mapped[list[str]] = mapped_column(JsonType, default=list)
    modules: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    peft_config: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    format: Mapped[str] = mapped_column(String(20), default="peft")
    dtype: Mapped[str] = mapped_column(String(20))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    artifact_key: Mapped[str] = mapped_column(String(300))
    source: Mapped[str] = mapped_column(String(20))  # upload | hub | merge
    expression: Mapped[str | None] = mapped_column(Text, nullable=True)
    plan_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # Where a version ingested from a Hub came from (source "hub"): the revision asked for, pinned to a commit.
    hub_endpoint: Mapped[str | None] = mapped_column(String(300), nullable=True)
    hub_repo: Mapped[str | None] = mapped_column(String(300), nullable=True)
    hub_revision: Mapped[str | None] = mapped_column(String(300), nullable=True)
    hub_commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    adapter: Mapped[Adapter] = relationship(back_populates="versions")
    base_model: Mapped[BaseModel] = relationship()

    @property
    def ref(self) -> str:
        """The pinned reference, ``name@N``."""
        return f"{self.adapter.name}@{self.number}"


class LineageEdge(Base):
    """``child`` was made from ``parent``, with this coefficient, role and strategy."""

    __tablename__ = "lineage_edges"
    __table_args__ = (UniqueConstraint("child_id", "parent_id", "role", name="uq_lineage_edges_child_parent_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    coefficient: Mapped[float] = mapped_column(Float)
    role: Mapped[str] = mapped_column(String(40), default="operand")
    strategy: Mapped[str] = mapped_column(String(40), default="linear")


class MergeJob(Base):
    """A submitted expression, its compiled plan, and how running it went."""

    __tablename__ = "merge_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    expression: Mapped[str] = mapped_column(Text)
    target_name: Mapped[str] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(JsonType, default=list)
    plan: Mapped[dict[str, Any]] = mapped_column(JsonType)
    plan_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(60), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    engine_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # What the run itself found: the share of the exact result's energy kept by re-factoring/truncation
    # (1.0 when exact) and warnings such as low retained energy. The plan's own warnings stay in ``plan``.
    retained_energy: Mapped[float | None] = mapped_column(Float, nullable=True)
    run_warnings: Mapped[list[str]] = mapped_column(JsonType, default=list, server_default="[]")
    result_version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"), nullable=True, index=True)
    # The service (issue 5): a retried submission with the same key gets this job back; a cancel asked of a
    # running job is honoured between modules; a job answered from an earlier one names it.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reused_from: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    result_version: Mapped[AdapterVersion | None] = relationship()


class Publication(Base):
    """One version published to one Hub repo: a single commit tagged ``v{N}``.

    ``status`` is ``pending`` (being published, or interrupted), ``published`` (``commit_oid`` and ``url`` are
    set) or ``failed`` (``error_code``/``error_message`` say why; publishing again retries it). ``attempts``
    counts tries against the Hub. ``endpoint`` names the Hub (``https://…``, or ``file://…`` for the local
    folder). The Hub token is never stored here.
    """

    __tablename__ = "publications"
    __table_args__ = (
        UniqueConstraint("version_id", "endpoint", "repo_id", name="uq_publications_version_endpoint_repo"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    endpoint: Mapped[str] = mapped_column(String(300))
    repo_id: Mapped[str] = mapped_column(String(300))
    tag: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    commit_oid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(60), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    published_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    version: Mapped[AdapterVersion] = relationship()


class ApiToken(Base):
    """A bearer token for the REST API. Only its sha256 is stored; the token itself is shown once, at creation.

    ``scope`` is ``read``, ``write`` or ``admin``; each includes the ones before it.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
