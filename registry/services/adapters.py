"""Registering adapter versions and looking them up by reference."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.errors import AdapterNotFound, Conflict, InvalidInput, VersionNotFound
from registry.formats.kohya import convert_kohya_to_peft, find_kohya_file
from registry.formats.peft import AdapterFacts, inspect_peft_folder
from registry.models import Adapter, AdapterVersion

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]{0,199}$")
# The source of a version registered from a kohya/diffusers single-file LoRA (converted to PEFT on the way in).
KOHYA_SOURCE = "upload:kohya"
_REF = re.compile(r"^(?P<name>[^@]+?)(?:@(?:v)?(?P<number>\d+|latest))?$")


@dataclass(frozen=True)
class Registered:
    """The outcome of a registration: the version, and whether it was new."""

    version: AdapterVersion
    created: bool


def check_name(name: str) -> str:
    """Adapter names start with a letter or '_' and use letters, digits, '_', '.', '-' and '/'."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"invalid adapter name {name!r}: start with a letter or '_' and use letters, digits, '_', '.', '-', '/'"
        )
    return name


def check_text(value: str, what: str) -> str:
    """Free text (a description, a tag, a base model name) must fit a text column: no NUL characters."""
    if "\x00" in value:
        raise InvalidInput(f"the {what} contains a NUL character (\\x00), which cannot be stored; remove it")
    return value


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split ``NAME[@N|@vN|@latest]`` into the name and the version number (None for latest)."""
    match = _REF.match(ref.strip())
    if not match:
        raise InvalidInput(f"invalid reference {ref!r}: write NAME, NAME@3 or NAME@latest")
    number = match["number"]
    return match["name"], None if number in (None, "latest") else int(number)


def resolve_version(session: Session, ref: str) -> AdapterVersion:
    """The version a ``NAME[@N]`` reference names, or a typed not-found error."""
    name, number = parse_ref(ref)
    version = repo.get_version(session, name, number)
    if version is not None:
        return version
    if repo.get_adapter(session, name) is None:
        raise AdapterNotFound(f"unknown adapter {name!r}; `graft list` shows the registered ones")
    raise VersionNotFound(f"adapter {name!r} has no version {number}; `graft show {name}` lists its versions")


def ensure_adapter(session: Session, name: str, base_model: str, tags: list[str], description: str) -> Adapter:
    """The adapter called ``name``, created if missing; refuses a different base model than its versions'."""
    check_text(base_model, "base model")
    check_text(description, "description")
    for tag in tags:
        check_text(tag, "tag")
    adapter = repo.get_adapter(session, check_name(name))
    if adapter is None:
        adapter = Adapter(name=name, description=description, tags=sorted(set(tags)))
        session.add(adapter)
        session.flush()
        return adapter
    latest = repo.get_version(session, name, None)
    if latest is not None and latest.base_model.name != base_model:
        raise Conflict(
            f"adapter {name!r} is for base model {latest.base_model.name!r}, not {base_model!r}; "
            "register it under another name"
        )
    if tags:
        adapter.tags = sorted(set(adapter.tags) | set(tags))
    if description:
        adapter.description = description
    return adapter


def add_version(
    session: Session,
    adapter: Adapter,
    facts: AdapterFacts,
    *,
    sha256: str,
    artifact_key: str,
    source: str,
    expression: str | None = None,
    plan_hash: str | None = None,
) -> AdapterVersion:
    """Append an immutable version to ``adapter``."""
    version = AdapterVersion(
        adapter=adapter,
        number=repo.next_version_number(session, adapter.id),
        base_model=repo.get_or_create_base_model(session, facts.base_model),
        base_revision=facts.base_revision,
        rank=facts.rank,
        alpha=facts.alpha,
        use_rslora=facts.use_rslora,
        target_modules=facts.target_modules,
        modules={name: m.as_row() for name, m in facts.modules.items()},
        peft_config=facts.config,
        format="peft",
        dtype=facts.dtype,
        size_bytes=facts.size_bytes,
        sha256=sha256,
        artifact_key=artifact_key,
        source=source,
        expression=expression,
        plan_hash=plan_hash,
    )
    session.add(version)
    session.flush()
    return version


def register_folder(
    session: Session,
    store: ArtifactStore,
    folder: Path,
    name: str,
    *,
    tags: list[str] | None = None,
    description: str = "",
    base_model: str | None = None,
) -> Registered:
    """Validate an adapter and record it as the next version of ``name``.

    ``folder`` is a PEFT folder, a kohya/diffusers LoRA ``.safetensors`` file, or a folder holding just such a
    file (see :func:`~registry.formats.kohya.find_kohya_file`). A kohya file is converted into a PEFT folder in
    the store's scratch space (removed afterwards) and registered through the same validation, with source
    ``upload:kohya``. Identical content (same weights and config) as the latest version returns that version
    instead of adding a copy; the conversion is deterministic, so this holds for kohya files too. Invalid input
    raises :class:`~registry.errors.InvalidAdapter` and records nothing.
    """
    check_name(name)
    kohya_file = find_kohya_file(folder)
    if kohya_file is None:
        facts = inspect_peft_folder(folder, base_model_override=base_model)
        return _record_upload(session, store, name, facts, tags or [], description, source="upload")
    with store.scratch() as scratch:
        convert_kohya_to_peft(kohya_file, scratch / "peft", base_model)
        facts = inspect_peft_folder(scratch / "peft")
        return _record_upload(session, store, name, facts, tags or [], description, source=KOHYA_SOURCE)


def _record_upload(
    session: Session,
    store: ArtifactStore,
    name: str,
    facts: AdapterFacts,
    tags: list[str],
    description: str,
    *,
    source: str,
) -> Registered:
    adapter = ensure_adapter(session, name, facts.base_model, tags, description)
    sha, key, _created = store.put_file(facts.weights_path)
    latest = repo.get_version(session, name, None)
    if latest is not None and latest.sha256 == sha and latest.peft_config == facts.config:
        return Registered(latest, created=False)
    version = add_version(session, adapter, facts, sha256=sha, artifact_key=key, source=source)
    return Registered(version, created=True)


def describe_version(version: AdapterVersion) -> dict[str, Any]:
    """A JSON-ready description of a version (used by the CLI and the API)."""
    return {
        "ref": version.ref,
        "adapter": version.adapter.name,
        "version": version.number,
        "id": version.id,
        "base_model": version.base_model.name,
        "rank": version.rank,
        "alpha": version.alpha,
        "target_modules": version.target_modules,
        "modules": len(version.modules),
        "dtype": version.dtype,
        "size_bytes": version.size_bytes,
        "sha256": version.sha256,
        "source": version.source,
        "expression": version.expression,
        "plan_hash": version.plan_hash,
        "tags": version.adapter.tags,
        "created_at": version.created_at.isoformat() if version.created_at else None,
        "hub_origin": hub_origin(version),
    }


def hub_origin(version: AdapterVersion) -> dict[str, str | None] | None:
    """Where a version ingested from a Hub came from: the revision asked for, pinned to a commit."""
    if version.source != "hub":
        return None
    return {
        "endpoint": version.hub_endpoint,
        "repo_id": version.hub_repo,
        "revision": version.hub_revision,
        "commit": version.hub_commit,
    }


# -- the service (issue 5): browsing ---------------------------------------------------------------------


def find_adapters(
    session: Session,
    *,
    base_model: str | None = None,
    tag: str | None = None,
    rank_min: int | None = None,
    rank_max: int | None = None,
    text: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[repo.AdapterRow], int]:
    """A page of adapters matching the filters (applied to each adapter's latest version), and the total."""
    if rank_min is not None and rank_max is not None and rank_min > rank_max:
        raise InvalidInput(f"rank_min ({rank_min}) is larger than rank_max ({rank_max})")
    return repo.search_adapters(
        session,
        base_model=base_model,
        tag=tag,
        rank_min=rank_min,
        rank_max=rank_max,
        text=text,
        limit=limit,
        offset=offset,
    )


def get_adapter_or_404(session: Session, name: str) -> tuple[Adapter, AdapterVersion]:
    """The adapter called ``name`` and its latest version, or :class:`AdapterNotFound`."""
    adapter = repo.get_adapter(session, name)
    latest = repo.get_version(session, name, None) if adapter is not None else None
    if adapter is None or latest is None:
        raise AdapterNotFound(f"unknown adapter {name!r}; GET /v1/adapters lists the registered ones")
    return adapter, latest
