"""Publications: the registry's side of publishing a version to a Hub repo as one commit tagged ``v{N}``.

The Hub client lives in ``workers/publisher.py``; this module only decides *what* is published and records
*how it went*, so it never imports ``huggingface_hub``. Like every service it flushes and never commits.

The life of a publication row (one per version, Hub and repo)::

    prepare_publication ──► pending ──record_attempt (per try)──► record_published ──► published
                                  └─────────────────────────────► record_failed ─────► failed
                                                                    (publishing again retries a failed row)

:class:`PublishBundle` is a plain, detached description of the version (config, parents, plan, provenance)
that the publisher turns into files; building it here keeps the worker free of ORM objects.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.errors import InvalidInput, NotFound
from registry.models import AdapterVersion, Publication
from registry.services.adapters import hub_origin
from registry.settings import Settings

STATUSES = ("pending", "published", "failed")
PROVENANCE_FILE = "graft.json"
PROVENANCE_VERSION = 1

# Hugging Face repo ids: ``namespace/name``, each part of letters, digits, '-', '_', '.', at most 96 characters,
# not starting or ending with '-' or '.', and without '--' or '..'.
_REPO_PART = re.compile(r"^[A-Za-z0-9_.\-]{1,96}$")
_PIPELINE_BY_TASK = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def tag_for(number: int) -> str:
    """The Hub tag of version ``number``: ``v{N}``."""
    return f"v{number}"


def check_repo_id(repo_id: str) -> str:
    """Validate a ``namespace/name`` Hub repo id, or raise :class:`InvalidInput` saying how to fix it."""
    parts = repo_id.split("/")
    ok = len(parts) == 2 and all(
        _REPO_PART.match(part) and not part.startswith(("-", ".")) and not part.endswith(("-", ".")) for part in parts
    )
    if not ok or "--" in repo_id or ".." in repo_id:
        raise InvalidInput(
            f"invalid Hub repo {repo_id!r}: write namespace/name with letters, digits, '-', '_' and '.' "
            "(no '--' or '..', at most 96 characters each)"
        )
    return repo_id


def default_repo_id(namespace: str | None, adapter_name: str) -> str:
    """``{namespace}/{adapter name}``; a name that already reads ``org/name`` is used as is without a namespace."""
    if namespace is None:
        if adapter_name.count("/") == 1:
            return check_repo_id(adapter_name)
        raise InvalidInput(
            f"no Hub repo for {adapter_name!r}: set GRAFT_HUB_NAMESPACE or pass the repo explicitly (--repo ORG/NAME)"
        )
    name = adapter_name.replace("/", "-")
    try:
        return check_repo_id(f"{namespace}/{name}")
    except InvalidInput:
        raise InvalidInput(
            f"adapter name {adapter_name!r} does not make a valid Hub repo name; pass one with --repo ORG/NAME"
        ) from None


@dataclass(frozen=True)
class HubTarget:
    """Where a version goes: a Hub (``https://…`` or ``file://…`` for the local folder) and a repo id."""

    endpoint: str
    repo_id: str
    local: bool

    @property
    def label(self) -> str:
        return f"{self.repo_id} on {self.endpoint}"


def hub_target(settings: Settings, adapter_name: str, repo_id: str | None = None) -> HubTarget:
    """The target for ``adapter_name`` under ``settings``: an explicit repo, else ``{namespace}/{name}``."""
    chosen = check_repo_id(repo_id) if repo_id else default_repo_id(settings.resolved_hub_namespace, adapter_name)
    if settings.hub_is_local:
        return HubTarget(f"file://{settings.resolved_hub_local_dir.resolve()}", chosen, local=True)
    return HubTarget(settings.resolved_hub_endpoint, chosen, local=False)


@dataclass(frozen=True)
class PublishedRef:
    """A version's place on a Hub: repo, tag, commit and the URL of that revision."""

    endpoint: str
    repo_id: str
    tag: str
    commit_oid: str | None
    url: str | None

    @classmethod
    def of(cls, publication: Publication) -> PublishedRef:
        return cls(publication.endpoint, publication.repo_id, publication.tag, publication.commit_oid, publication.url)

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "repo_id": self.repo_id,
            "revision": self.tag,
            "commit": self.commit_oid,
            "url": self.url,
        }


@dataclass(frozen=True)
class ParentInfo:
    """One operand of a merged version, with where it was published (if it was)."""

    ref: str
    sha256: str
    coefficient: float
    role: str
    strategy: str
    published: PublishedRef | None


@dataclass(frozen=True)
class PublishBundle:
    """Everything the publisher needs about one version, detached from the session."""

    publication_id: int
    version_id: int
    adapter: str
    number: int
    tag: str
    target: HubTarget
    description: str
    task_tags: tuple[str, ...]
    base_model: str
    base_revision: str | None
    rank: int
    dtype: str
    module_count: int
    target_modules: tuple[str, ...]
    task_type: str | None
    sha256: str
    artifact_key: str
    peft_config: dict[str, Any]
    source: str
    expression: str | None
    plan_hash: str | None
    plan: dict[str, Any] | None
    parents: tuple[ParentInfo, ...] = ()
    hub_origin: dict[str, str | None] | None = None
    retained_energy: float | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def ref(self) -> str:
        return f"{self.adapter}@{self.number}"

    @property
    def merged(self) -> bool:
        return self.source == "merge"

    @property
    def strategy(self) -> str | None:
        if self.plan is not None:
            return str(self.plan.get("strategy", "linear"))
        return self.parents[0].strategy if self.parents else None

    @property
    def strategy_parameters(self) -> dict[str, Any]:
        """The plan's strategy parameters, e.g. ``{"ties.density": 0.5}`` (see :func:`plan_parameters`)."""
        return plan_parameters(self.plan) if self.plan is not None else {}

    @property
    def pipeline_tag(self) -> str | None:
        return _PIPELINE_BY_TASK.get((self.task_type or "").upper())

    def adapter_config_bytes(self) -> bytes:
        """``adapter_config.json`` exactly as ``graft export`` writes it (sorted keys: stable bytes)."""
        return json.dumps(self.peft_config, indent=2, sort_keys=True).encode("utf-8")

    def provenance(self) -> dict[str, Any]:
        """The content of ``graft.json``: a pure function of the version, so republishing is byte-identical.

        It deliberately holds no Hub URLs (those change when parents get published); the model card does.
        """
        return {
            "graft_provenance": PROVENANCE_VERSION,
            "adapter": self.adapter,
            "version": self.number,
            "ref": self.ref,
            "sha256": self.sha256,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "source": self.source,
            "expression": self.expression,
            "plan_hash": self.plan_hash,
            "plan": self.plan,
            "parents": [
                {
                    "ref": p.ref,
                    "sha256": p.sha256,
                    "coefficient": p.coefficient,
                    "role": p.role,
                    "strategy": p.strategy,
                }
                for p in self.parents
            ],
            "hub_origin": self.hub_origin,
            "retained_energy": self.retained_energy,
        }

    def provenance_bytes(self) -> bytes:
        return (json.dumps(self.provenance(), indent=2, sort_keys=True) + "\n").encode("utf-8")


_CHILD_KEYS = frozenset({"input", "inputs", "terms", "against"})
_EXACT_KINDS = frozenset({"operand", "linear"})


def _plan_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every node of a step's program tree (``{"kind": …}`` dicts; weighted children are ``[w, node]`` pairs)."""
    if isinstance(node, dict):
        if "kind" in node:
            yield node
        for key in _CHILD_KEYS & node.keys():
            yield from _plan_nodes(node[key])
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _plan_nodes(item)


def plan_parameters(plan: dict[str, Any]) -> dict[str, Any]:
    """The parameters of the plan's non-linear nodes, as ``{"kind.param": value}``.

    A parameter that differs between modules is listed with all its values, sorted. Steps in the older
    ``terms``/``truncate_to`` form contribute ``svd.rank`` for their rank cap.
    """
    seen: dict[str, set[str]] = {}
    values: dict[str, Any] = {}
    for step in plan.get("steps", []):
        nodes = list(_plan_nodes(step.get("program")))
        if step.get("truncate_to"):
            nodes.append({"kind": "svd", "rank": step["truncate_to"]})
        for node in nodes:
            kind = str(node.get("kind"))
            if kind in _EXACT_KINDS:
                continue
            for key, value in node.items():
                if key == "kind" or key in _CHILD_KEYS or value is None:
                    continue
                name = f"{kind}.{key}"
                if json.dumps(value, sort_keys=True) not in seen.setdefault(name, set()):
                    seen[name].add(json.dumps(value, sort_keys=True))
                    values.setdefault(name, []).append(value)
    return {k: v[0] if len(v) == 1 else sorted(v, key=str) for k, v in sorted(values.items())}


def _retained_energy(plan: dict[str, Any] | None, recorded_energy: float | None) -> float | None:
    """Known retained energy: 1.0 for an exact merge (only linear combinations, no rank truncation).

    Otherwise what the run recorded on its job, else unknown.
    """
    if plan is None:
        return None
    exact = all(
        not step.get("truncate_to")
        and step.get("path", "factored") == "factored"
        and all(node.get("kind") in _EXACT_KINDS for node in _plan_nodes(step.get("program")))
        for step in plan.get("steps", [])
    )
    if exact:
        return 1.0
    return recorded_energy


def build_bundle(session: Session, version: AdapterVersion, publication: Publication) -> PublishBundle:
    """Describe ``version`` for publishing to ``publication``'s target (reads parents, plan and their publications)."""
    edges = repo.parent_edges(session, version.id)
    parents = repo.get_versions_by_ids(session, [e.parent_id for e in edges])
    published = repo.latest_published(session, [e.parent_id for e in edges])
    job = repo.job_of_version(session, version.id)
    plan = dict(job.plan) if job is not None else None
    config = dict(version.peft_config)
    task_type = config.get("task_type")
    target = HubTarget(publication.endpoint, publication.repo_id, local=publication.endpoint.startswith("file://"))
    origin = hub_origin(version)
    return PublishBundle(
        publication_id=publication.id,
        version_id=version.id,
        adapter=version.adapter.name,
        number=version.number,
        tag=publication.tag,
        target=target,
        description=version.adapter.description,
        task_tags=tuple(version.adapter.tags),
        base_model=version.base_model.name,
        base_revision=version.base_revision,
        rank=version.rank,
        dtype=version.dtype,
        module_count=len(version.modules),
        target_modules=tuple(version.target_modules),
        task_type=str(task_type) if task_type else None,
        sha256=version.sha256,
        artifact_key=version.artifact_key,
        peft_config=config,
        source=version.source,
        expression=version.expression,
        plan_hash=version.plan_hash,
        plan=plan,
        parents=tuple(
            ParentInfo(
                ref=parents[e.parent_id].ref,
                sha256=parents[e.parent_id].sha256,
                coefficient=e.coefficient,
                role=e.role,
                strategy=e.strategy,
                published=PublishedRef.of(published[e.parent_id]) if e.parent_id in published else None,
            )
            for e in edges
        ),
        hub_origin=origin,
        retained_energy=_retained_energy(plan, job.retained_energy if job is not None else None),
        warnings=tuple(str(w) for w in (plan or {}).get("warnings", [])),
    )


def prepare_publication(session: Session, version: AdapterVersion, target: HubTarget) -> Publication:
    """The publication row of ``version`` on ``target``, created ``pending`` if missing.

    A ``published`` row is returned unchanged (publishing is idempotent); a ``failed`` or interrupted one is
    reset to ``pending`` so that this call retries it. The caller commits.
    """
    publication = repo.get_publication(session, version.id, target.endpoint, target.repo_id)
    if publication is None:
        try:
            with session.begin_nested():  # a savepoint: losing the race to a concurrent publisher is fine
                publication = Publication(
                    version_id=version.id,
                    endpoint=target.endpoint,
                    repo_id=target.repo_id,
                    tag=tag_for(version.number),
                    status="pending",
                    attempts=0,
                )
                session.add(publication)
                session.flush()
            return publication
        except IntegrityError:
            publication = repo.get_publication(session, version.id, target.endpoint, target.repo_id)
            if publication is None:
                raise
    if publication.status != "published":
        publication.status = "pending"
        publication.error_code = publication.error_message = None
    session.flush()
    return publication


def load_publication(session: Session, publication_id: int) -> Publication:
    publication = repo.get_publication_by_id(session, publication_id)
    if publication is None:
        raise NotFound(f"no publication {publication_id}")
    return publication


def record_attempt(session: Session, publication_id: int) -> int:
    """Count one more try against the Hub; returns the new count."""
    publication = load_publication(session, publication_id)
    publication.attempts += 1
    session.flush()
    return publication.attempts


def record_published(session: Session, publication_id: int, commit_oid: str, url: str) -> Publication:
    """Mark the publication done: the tag points at ``commit_oid``; ``url`` shows that revision."""
    publication = load_publication(session, publication_id)
    publication.status = "published"
    publication.commit_oid = commit_oid
    publication.url = url
    publication.error_code = publication.error_message = None
    publication.published_at = dt.datetime.now(dt.UTC)
    session.flush()
    return publication


def record_failed(session: Session, publication_id: int, code: str, message: str) -> Publication:
    """Mark the publication failed with a typed code and a message (already redacted by the caller)."""
    publication = load_publication(session, publication_id)
    publication.status = "failed"
    publication.error_code = code
    publication.error_message = message
    session.flush()
    return publication


def describe_publication(publication: Publication) -> dict[str, Any]:
    """A JSON-ready description of a publication (CLI and API)."""
    return {
        "id": publication.id,
        "version_id": publication.version_id,
        "endpoint": publication.endpoint,
        "repo_id": publication.repo_id,
        "tag": publication.tag,
        "status": publication.status,
        "commit": publication.commit_oid,
        "url": publication.url,
        "attempts": publication.attempts,
        "error_code": publication.error_code,
        "error_message": publication.error_message,
        "published_at": publication.published_at.isoformat() if publication.published_at else None,
    }
