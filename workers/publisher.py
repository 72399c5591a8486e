"""Publishing an adapter version to a Hub as ONE commit tagged ``v{N}``, exactly once.

:func:`publish_version` is the whole use case, callable from the CLI, a Celery task on the ``publish`` queue,
or an API handler. It is idempotent and safe to run again at any point, concurrently too:

1. Record (or reuse) the ``publications`` row; a ``published`` row returns at once.
2. Against the Hub, one *try* is :func:`publish_once`:

   - create the repo if missing;
   - if tag ``v{N}`` exists: same content → done; other content → :class:`PublishConflict`;
   - if ``main``'s head already holds this content (an earlier try committed, then lost the answer or died
     before tagging) → reuse that commit;
   - else one ``create_commit`` guarded by ``parent_commit=head`` (a moved head re-reads the refs);
   - tag the commit ``v{N}`` (a tag created meanwhile re-reads the refs).

   "Same content" compares ``adapter_config.json``, ``adapter_model.safetensors`` and ``graft.json`` (all
   pure functions of the version); the model card may differ, as parents' links change when they get published.
3. Tries are repeated with exponential backoff on 5xx answers, timeouts and network errors; every try is
   counted on the row. The outcome (commit, URL) or the failure (typed code, redacted message) is recorded.

The Hub token only ever goes to ``HfApi``; it is never stored, logged or put in an error message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.errors import GraftError, HubError, PublishConflict, VersionNotFound
from registry.formats.peft import CONFIG_FILE, WEIGHTS_FILE
from registry.services import publications as pubs
from registry.settings import Settings
from workers.hub import Digest, HubBackend, HubFile, ParentMoved, TagExists, digest_of, open_backend, with_retries
from workers.model_card import render_model_card

log = logging.getLogger("graft.publisher")
README = "README.md"
COMPARED_FILES = (CONFIG_FILE, WEIGHTS_FILE, pubs.PROVENANCE_FILE)
MAX_RACES = 5  # re-reads of the refs after losing a race to another writer, per try


@dataclass(frozen=True)
class PublishOutcome:
    """Where a version was published. ``reused`` is True when nothing had to be written this time."""

    publication_id: int
    ref: str
    repo_id: str
    endpoint: str
    tag: str
    commit: str
    url: str
    attempts: int
    reused: bool
    local: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "publication_id": self.publication_id,
            "ref": self.ref,
            "repo_id": self.repo_id,
            "endpoint": self.endpoint,
            "tag": self.tag,
            "commit": self.commit,
            "url": self.url,
            "attempts": self.attempts,
            "reused": self.reused,
            "local": self.local,
            "status": "published",
        }


def commit_files(bundle: pubs.PublishBundle, store: ArtifactStore) -> list[HubFile]:
    """The four files of the commit: PEFT config and weights, model card, provenance."""
    weights = store.path(bundle.artifact_key)
    if not weights.is_file():
        raise HubError(f"the artifact of {bundle.ref} is missing from the store ({bundle.artifact_key})")
    return [
        HubFile(CONFIG_FILE, bundle.adapter_config_bytes()),
        HubFile(WEIGHTS_FILE, weights),
        HubFile(README, render_model_card(bundle).encode("utf-8")),
        HubFile(pubs.PROVENANCE_FILE, bundle.provenance_bytes()),
    ]


def same_content(remote: dict[str, Digest], local: dict[str, Digest]) -> bool:
    """True when every compared file exists remotely with the same bytes."""
    return all(path in remote and remote[path].matches(local[path]) for path in COMPARED_FILES)


def publish_once(backend: HubBackend, bundle: pubs.PublishBundle, files: list[HubFile]) -> tuple[str, bool]:
    """One idempotent try; returns ``(commit, reused)``. See the module docstring for the steps."""
    repo_id, tag = bundle.target.repo_id, bundle.tag
    local = {f.path: digest_of(f) for f in files if f.path in COMPARED_FILES}
    backend.ensure_repo(repo_id)
    for _ in range(MAX_RACES):
        refs = backend.refs(repo_id)
        if tag in refs.tags:
            tagged = refs.tags[tag]
            if same_content(backend.files_at(repo_id, tagged), local):
                return tagged, True
            raise PublishConflict(
                f"{repo_id} already has tag {tag} at commit {tagged[:12]} with other content than {bundle.ref}; "
                "delete that tag on the Hub, or publish to another repo (--repo ORG/NAME)"
            )
        reused = refs.head is not None and same_content(backend.files_at(repo_id, refs.head), local)
        if reused and refs.head is not None:
            commit = refs.head
        else:
            try:
                commit = backend.commit(
                    repo_id,
                    files,
                    message=f"Graft: publish {bundle.ref}",
                    description=_commit_description(bundle),
                    parent=refs.head,
                )
            except ParentMoved:
                log.info("main of %s moved while publishing %s; re-reading the refs", repo_id, bundle.ref)
                continue
        try:
            backend.tag(repo_id, tag, commit, message=f"{bundle.ref} (sha256 {bundle.sha256})")
        except TagExists:
            continue
        return commit, False
    raise HubError(f"{repo_id} kept changing while publishing {bundle.ref}; publish it again")


def _commit_description(bundle: pubs.PublishBundle) -> str:
    lines = [f"sha256: {bundle.sha256}"]
    if bundle.expression:
        lines.insert(0, f"expression: {bundle.expression}")
    return "\n".join(lines)


def publish_version(
    version_id: int,
    *,
    session_factory: sessionmaker[Session],
    store: ArtifactStore,
    settings: Settings,
    repo_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PublishOutcome:
    """Publish version ``version_id`` to ``repo_id`` (default ``{namespace}/{adapter name}``) and record it.

    Idempotent: a published version returns its publication (``reused=True``); a failed or interrupted one is
    retried. Raises a typed error after recording it on the row: ``publish_conflict`` (the tag holds other
    content), ``hub_auth_failed``, ``hub_unavailable`` (5xx/timeouts on every attempt), ``hub_not_found``,
    ``hub_error``; ``version_not_found`` / ``invalid_input`` (bad repo id) record nothing.
    """
    with session_scope(session_factory) as session:
        version = repo.get_versions_by_ids(session, [version_id]).get(version_id)
        if version is None:
            raise VersionNotFound(f"no adapter version with id {version_id}")
        target = pubs.hub_target(settings, version.adapter.name, repo_id)
        publication = pubs.prepare_publication(session, version, target)
        if publication.status == "published" and publication.commit_oid and publication.url:
            return PublishOutcome(
                publication.id,
                version.ref,
                publication.repo_id,
                publication.endpoint,
                publication.tag,
                publication.commit_oid,
                publication.url,
                publication.attempts,
                reused=True,
                local=target.local,
            )
        bundle = pubs.build_bundle(session, version, publication)

    publication_id = bundle.publication_id
    attempts = 0

    def count_attempt(_n: int) -> None:
        nonlocal attempts
        with session_scope(session_factory) as s:
            attempts = pubs.record_attempt(s, publication_id)

    try:
        backend = open_backend(settings, target.endpoint)
        files = commit_files(bundle, store)
        commit, reused = with_retries(
            lambda: publish_once(backend, bundle, files),
            settings=settings,
            what=f"publish {bundle.ref} to {target.label}",
            on_attempt=count_attempt,
            sleep=sleep,
        )
        url = backend.revision_url(target.repo_id, bundle.tag)
    except GraftError as exc:
        _record_failure(session_factory, publication_id, exc.code, settings.redact(exc.message))
        raise type(exc)(settings.redact(exc.message)) from None
    except Exception as exc:
        message = settings.redact(f"publishing {bundle.ref} failed: {type(exc).__name__}: {exc}")
        _record_failure(session_factory, publication_id, HubError.code, message)
        raise HubError(message) from None

    with session_scope(session_factory) as session:
        pubs.record_published(session, publication_id, commit, url)
    log.info("published %s to %s at %s (%s)", bundle.ref, target.label, bundle.tag, commit[:12])
    return PublishOutcome(
        publication_id,
        bundle.ref,
        target.repo_id,
        target.endpoint,
        bundle.tag,
        commit,
        url,
        attempts,
        reused,
        target.local,
    )


def _record_failure(session_factory: sessionmaker[Session], publication_id: int, code: str, message: str) -> None:
    with session_scope(session_factory) as session:
        pubs.record_failed(session, publication_id, code, message)
