"""Ingest from a Hub: ``hf://org/repo[/subfolder]@revision`` → a registered version with its origin pinned.

Only the adapter files are downloaded (``snapshot_download`` with ``allow_patterns``), into a private scratch
folder, pinned to the commit the revision resolved to; the folder is then validated exactly like an upload
(``registry.services.hub_ingest``). Transient Hub failures are retried with backoff, like publishing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from huggingface_hub import snapshot_download
from sqlalchemy.orm import Session, sessionmaker

from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.errors import GraftError, HubNotFound, InvalidAdapter
from registry.formats.peft import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE
from registry.services.adapters import describe_version
from registry.services.hub_ingest import HubOrigin, parse_hub_uri, register_hub_folder
from registry.settings import Settings
from workers.hub import RemoteHub, translate_error, with_retries


@dataclass(frozen=True)
class IngestOutcome:
    """The registered version (as ``describe_version`` gives it), whether it is new, and the pinned origin."""

    version: dict[str, Any]
    created: bool
    origin: HubOrigin


def _resolve(hub: RemoteHub, origin: HubOrigin) -> HubOrigin:
    """Pin ``origin.revision`` to a commit and check the repo holds a safetensors PEFT adapter there."""
    try:
        info = hub.api.model_info(origin.repo_id, revision=origin.revision)
    except Exception as exc:
        raise translate_error(exc, action=f"read {origin.uri}", settings=hub.settings) from None
    if not info.sha:
        raise HubNotFound(f"the Hub gave no commit for {origin.uri}")
    prefix = f"{origin.subfolder}/" if origin.subfolder else ""
    names = {s.rfilename for s in info.siblings or []}
    if f"{prefix}{CONFIG_FILE}" not in names:
        raise InvalidAdapter(f"{origin.uri} has no {prefix}{CONFIG_FILE}; it is not a PEFT adapter")
    if f"{prefix}{WEIGHTS_FILE}" not in names:
        pickles = [p for p in PICKLE_FILES if f"{prefix}{p}" in names]
        if pickles:
            raise InvalidAdapter(
                f"{origin.uri} only has {pickles[0]}, a pickle file, which can run code when loaded; Graft ingests "
                f"{WEIGHTS_FILE} only (convert it and push the safetensors file)"
            )
        raise InvalidAdapter(f"{origin.uri} has no {prefix}{WEIGHTS_FILE}")
    return HubOrigin(origin.endpoint, origin.repo_id, origin.revision, origin.subfolder, info.sha)


def ingest_from_hub(
    uri: str,
    name: str,
    *,
    session_factory: sessionmaker[Session],
    store: ArtifactStore,
    settings: Settings,
    tags: list[str] | None = None,
    description: str = "",
    base_model: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> IngestOutcome:
    """Download the adapter at ``uri`` from ``settings.resolved_hub_endpoint`` and register it as ``name``.

    Raises ``invalid_input`` (bad URI), ``hub_not_found`` (repo or revision), ``invalid_adapter`` (the files fail
    validation, or only a pickle is there), ``hub_auth_failed``, ``hub_unavailable``; records nothing then.
    """
    origin = parse_hub_uri(uri, settings.resolved_hub_endpoint)
    hub = RemoteHub(settings)
    pinned = with_retries(lambda: _resolve(hub, origin), settings=settings, what=f"read {origin.uri}", sleep=sleep)
    assert pinned.commit is not None
    prefix = f"{pinned.subfolder}/" if pinned.subfolder else ""
    with store.scratch() as scratch:
        target = scratch / "snapshot"

        def download() -> None:
            try:
                snapshot_download(
                    pinned.repo_id,
                    revision=pinned.commit,
                    allow_patterns=[f"{prefix}{CONFIG_FILE}", f"{prefix}{WEIGHTS_FILE}"],
                    local_dir=str(target),
                    endpoint=hub.endpoint,
                    token=settings.hub_token_value() or False,
                    library_name="graft",
                )
            except GraftError:
                raise
            except Exception as exc:
                raise translate_error(exc, action=f"download {pinned.uri}", settings=settings) from None

        with_retries(download, settings=settings, what=f"download {pinned.uri}", sleep=sleep)
        folder = target / pinned.subfolder if pinned.subfolder else target
        with session_scope(session_factory) as session:
            registered = register_hub_folder(
                session, store, folder, name, pinned, tags=tags, description=description, base_model=base_model
            )
            info = describe_version(registered.version)  # with hub_origin: endpoint, repo, revision, commit
        return IngestOutcome(info, registered.created, pinned)
