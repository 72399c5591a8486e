"""Registering an adapter downloaded from a Hub: validated exactly like an upload, with its origin pinned.

The download itself (``snapshot_download``) is the worker's job (``workers/hub_ingest.py``); this service
receives the folder and the resolved origin, and flushes without committing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.errors import InvalidInput
from registry.formats.peft import inspect_peft_folder
from registry.services.adapters import Registered, add_version, check_name, ensure_adapter
from registry.services.publications import check_repo_id

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# hf://namespace/name[/sub/folder][@revision]; a revision may itself contain '/' (refs/pr/1) but not '@'.
_HF_URI = re.compile(
    r"^hf://(?:models/)?(?P<repo>[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+)(?P<sub>(?:/[A-Za-z0-9_.\-]+)*)(?:@(?P<rev>[^@\s]+))?$"
)


@dataclass(frozen=True)
class HubOrigin:
    """A Hub location: the repo, an optional subfolder, the revision asked for and (once resolved) its commit."""

    endpoint: str
    repo_id: str
    revision: str
    subfolder: str | None = None
    commit: str | None = None

    @property
    def uri(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"hf://{self.repo_id}{sub}@{self.revision}"


def is_hub_uri(text: str) -> bool:
    return text.startswith("hf://")


def parse_hub_uri(text: str, endpoint: str) -> HubOrigin:
    """Parse ``hf://org/repo[/subfolder][@revision]`` (revision defaults to ``main``)."""
    match = _HF_URI.match(text.strip())
    if not match:
        raise InvalidInput(f"invalid Hub reference {text!r}: write hf://ORG/REPO or hf://ORG/REPO@REVISION")
    check_repo_id(match["repo"])  # the Hub's own rules (no '--' or '..', at most 96 characters a part)
    sub = match["sub"].strip("/") or None
    return HubOrigin(endpoint=endpoint, repo_id=match["repo"], revision=match["rev"] or "main", subfolder=sub)


def register_hub_folder(
    session: Session,
    store: ArtifactStore,
    folder: Path,
    name: str,
    origin: HubOrigin,
    *,
    tags: list[str] | None = None,
    description: str = "",
    base_model: str | None = None,
) -> Registered:
    """Validate a downloaded PEFT folder and record it as the next version of ``name`` with source ``hub``.

    ``origin.commit`` must be the resolved 40-hex commit, so the version is pinned even when the revision was a
    branch. Ingesting the same content from the same commit again returns the latest version instead of a copy.
    Invalid folders raise :class:`~registry.errors.InvalidAdapter` and record nothing (the blob may stay, as for
    uploads: the store is content-addressed).
    """
    check_name(name)
    if origin.commit is None or not _COMMIT.match(origin.commit):
        raise InvalidInput(f"the Hub did not resolve {origin.uri} to a commit; try again or pin a commit sha")
    facts = inspect_peft_folder(folder, base_model_override=base_model)
    adapter = ensure_adapter(session, name, facts.base_model, tags or [], description)
    sha, key, _created = store.put_file(facts.weights_path)
    latest = repo.get_version(session, name, None)
    if (
        latest is not None
        and latest.sha256 == sha
        and latest.peft_config == facts.config
        and latest.source == "hub"
        and latest.hub_commit == origin.commit
    ):
        return Registered(latest, created=False)
    version = add_version(session, adapter, facts, sha256=sha, artifact_key=key, source="hub")
    version.hub_endpoint = origin.endpoint
    version.hub_repo = origin.repo_id if origin.subfolder is None else f"{origin.repo_id}/{origin.subfolder}"
    version.hub_revision = origin.revision
    version.hub_commit = origin.commit
    session.flush()
    return Registered(version, created=True)
