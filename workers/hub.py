"""Two Hubs behind one small interface: a Hugging Face Hub (compatible) server, and a local folder.

The publisher (``workers/publisher.py``) only needs refs, file digests at a commit, a commit guarded by its
parent, and a tag. :class:`RemoteHub` does those with ``huggingface_hub.HfApi``; :class:`LocalHub` does them
on disk, in the layout of the Hugging Face cache (``models--{ns}--{name}/refs/{main,vN}`` and
``snapshots/{commit}/…``), so that a locally published adapter loads with the standard tools::

    HF_HUB_CACHE=.graft/hub HF_HUB_OFFLINE=1 python -c \\
        'from peft import PeftModel; PeftModel.from_pretrained(base, "graft/code-detox", revision="v1")'

Errors leave this module in three shapes only: :class:`Transient` (retry it: 5xx, 408, 429, timeouts,
network), :class:`ParentMoved` / :class:`TagExists` (the publisher re-reads the refs), or a typed
:class:`~registry.errors.GraftError` (``hub_auth_failed``, ``hub_not_found``, ``hub_error``). Messages never
hold the token: they are built here from status codes and passed through ``Settings.redact``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, set_client_factory
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils._http import default_client_factory

from registry.errors import GraftError, HubAuthFailed, HubError, HubNotFound, HubUnavailable
from registry.settings import Settings

log = logging.getLogger("graft.hub")
T = TypeVar("T")
CHUNK = 1 << 20
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class Transient(Exception):
    """A failure that may pass: a 5xx/408/429 answer, a timeout, or a network error."""


class ParentMoved(Exception):
    """The branch head is no longer the ``parent_commit`` the commit was based on (HTTP 412)."""


class TagExists(Exception):
    """The tag was created by someone else between reading the refs and tagging (HTTP 409)."""


# -- file content and digests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    """One file of a commit: its path in the repo and its content (bytes, or a file on disk)."""

    path: str
    content: bytes | Path

    def chunks(self) -> Iterator[bytes]:
        if isinstance(self.content, bytes):
            yield self.content
            return
        with self.content.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    @property
    def size(self) -> int:
        return len(self.content) if isinstance(self.content, bytes) else self.content.stat().st_size


@dataclass(frozen=True)
class Digest:
    """How a Hub identifies a file's content: its git blob sha1 and, for LFS files, its sha256."""

    git_oid: str | None = None
    sha256: str | None = None

    def matches(self, other: Digest) -> bool:
        """True when both digests name the same bytes (compared on whichever hash both sides know)."""
        if self.sha256 is not None and other.sha256 is not None:
            return self.sha256 == other.sha256
        if self.git_oid is not None and other.git_oid is not None:
            return self.git_oid == other.git_oid
        return False


def digest_of(file: HubFile) -> Digest:
    """Both digests of a local file, in one pass (git's blob sha1 is ``sha1("blob {size}\\0" + content)``)."""
    git = hashlib.sha1(f"blob {file.size}\0".encode(), usedforsecurity=False)
    sha = hashlib.sha256()
    for chunk in file.chunks():
        git.update(chunk)
        sha.update(chunk)
    return Digest(git_oid=git.hexdigest(), sha256=sha.hexdigest())


@dataclass(frozen=True)
class Refs:
    """A repo's ``main`` head (None for a repo with no commit) and its tags (name → commit)."""

    head: str | None
    tags: dict[str, str] = field(default_factory=dict)


class HubBackend(Protocol):
    """What publishing needs from a Hub. Every method is safe to call again after a failure."""

    endpoint: str

    def ensure_repo(self, repo_id: str) -> None: ...

    def refs(self, repo_id: str) -> Refs: ...

    def files_at(self, repo_id: str, commit: str) -> dict[str, Digest]: ...

    def commit(
        self, repo_id: str, files: Sequence[HubFile], *, message: str, description: str, parent: str | None
    ) -> str: ...

    def tag(self, repo_id: str, tag: str, commit: str, *, message: str) -> None: ...

    def revision_url(self, repo_id: str, revision: str) -> str: ...


# -- the remote Hub (huggingface_hub) -------------------------------------------------------------------

_timeout_lock = threading.Lock()
_configured_timeout: float | None = None


def configure_http_timeout(seconds: float) -> None:
    """Give huggingface_hub's shared HTTP client a timeout (its default waits forever), once per value.

    A stalled Hub then surfaces as a timeout, which the publisher retries with backoff.
    """
    global _configured_timeout
    with _timeout_lock:
        if _configured_timeout == seconds:
            return

        def factory() -> httpx2.Client:
            client = default_client_factory()
            client.timeout = httpx2.Timeout(seconds)
            return client

        set_client_factory(factory)
        _configured_timeout = seconds


def translate_error(exc: BaseException, *, action: str, settings: Settings) -> BaseException:
    """Map a huggingface_hub / httpx error to :class:`Transient` or a typed, token-free Graft error."""
    endpoint = settings.resolved_hub_endpoint
    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        # snapshot_download hides the Hub's answer behind a cache miss; judge the answer itself.
        return translate_error(exc.__cause__, action=action, settings=settings)
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"cannot {action}: HF_HUB_OFFLINE is set; unset it to reach the Hub at {endpoint}")
    if isinstance(exc, httpx2.TimeoutException):
        return Transient(f"timed out after {settings.hub_timeout_seconds:g}s while trying to {action}")
    if isinstance(exc, (httpx2.NetworkError, httpx2.RemoteProtocolError, httpx2.ProxyError)):
        return Transient(f"could not reach {endpoint} to {action} ({type(exc).__name__})")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        detail = settings.redact((exc.server_message or "").strip().splitlines()[0] if exc.server_message else "")
        suffix = f": {detail}" if detail else ""
        if status in TRANSIENT_STATUSES or status >= 500:
            return Transient(f"the Hub answered {status} while trying to {action}{suffix}")
        if status in (401, 403):
            return HubAuthFailed(
                f"the Hub at {endpoint} refused the credentials ({status}) while trying to {action}; check that "
                "GRAFT_HUB_TOKEN (or HF_TOKEN, or the token file) holds a token with write access"
            )
        if status == 404:
            return HubNotFound(f"not found on the Hub at {endpoint} while trying to {action}{suffix}")
        return HubError(f"the Hub at {endpoint} refused to {action} ({status}){suffix}")
    if isinstance(exc, GraftError):
        return exc
    return HubError(settings.redact(f"failed to {action}: {type(exc).__name__}: {exc}"))


class RemoteHub:
    """A Hugging Face Hub (or compatible server) through ``HfApi``, with an explicit endpoint and token."""

    def __init__(self, settings: Settings, *, endpoint: str | None = None) -> None:
        self.settings = settings
        self.endpoint = (endpoint or settings.resolved_hub_endpoint).rstrip("/")
        token = settings.hub_token_value()
        configure_http_timeout(settings.hub_timeout_seconds)
        # token=False, not None: without a configured token, send none (never huggingface_hub's own lookup).
        self.api = HfApi(endpoint=self.endpoint, token=token if token else False, library_name="graft")

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (Transient, ParentMoved, TagExists, GraftError):
            raise
        except Exception as exc:
            raise translate_error(exc, action=action, settings=self.settings) from None

    def ensure_repo(self, repo_id: str) -> None:
        self._call(
            f"create the repo {repo_id}",
            lambda: self.api.create_repo(repo_id, repo_type="model", exist_ok=True, private=self.settings.hub_private),
        )

    def refs(self, repo_id: str) -> Refs:
        found = self._call(f"list the refs of {repo_id}", lambda: self.api.list_repo_refs(repo_id, repo_type="model"))
        head = next((b.target_commit for b in found.branches if b.name == "main"), None)
        return Refs(head=head, tags={t.name: t.target_commit for t in found.tags})

    def files_at(self, repo_id: str, commit: str) -> dict[str, Digest]:
        entries = self._call(
            f"list the files of {repo_id} at {commit[:12]}",
            lambda: list(self.api.list_repo_tree(repo_id, revision=commit, recursive=True, repo_type="model")),
        )
        return {
            e.path: Digest(git_oid=e.blob_id, sha256=e.lfs.sha256 if e.lfs is not None else None)
            for e in entries
            if isinstance(e, RepoFile)
        }

    def commit(
        self, repo_id: str, files: Sequence[HubFile], *, message: str, description: str, parent: str | None
    ) -> str:
        operations = [
            CommitOperationAdd(
                path_in_repo=f.path, path_or_fileobj=f.content if isinstance(f.content, bytes) else str(f.content)
            )
            for f in files
        ]
        try:
            info = self.api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                commit_description=description,
                repo_type="model",
                revision="main",
                parent_commit=parent,
            )
        except HfHubHTTPError as exc:
            if exc.response.status_code == 412:
                raise ParentMoved(f"main of {repo_id} moved away from {parent}") from None
            raise translate_error(exc, action=f"commit to {repo_id}", settings=self.settings) from None
        except Exception as exc:
            raise translate_error(exc, action=f"commit to {repo_id}", settings=self.settings) from None
        return str(info.oid)

    def tag(self, repo_id: str, tag: str, commit: str, *, message: str) -> None:
        try:
            self.api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message, repo_type="model")
        except HfHubHTTPError as exc:
            if exc.response.status_code == 409:
                raise TagExists(f"{repo_id} already has tag {tag}") from None
            raise translate_error(exc, action=f"tag {repo_id} {tag}", settings=self.settings) from None
        except Exception as exc:
            raise translate_error(exc, action=f"tag {repo_id} {tag}", settings=self.settings) from None

    def revision_url(self, repo_id: str, revision: str) -> str:
        return f"{self.endpoint}/{repo_id}/tree/{revision}"


# -- the local folder ---------------------------------------------------------------------------------


class LocalHub:
    """A Hub in a folder, laid out like the Hugging Face cache, with commits, ``main`` and tags.

    Per repo ``models--{ns}--{name}/``: ``snapshots/{commit}/`` holds every file of a commit, ``refs/main``
    and ``refs/{tag}`` hold commit ids, ``.commits/{commit}.json`` records parent, message and sha256s.
    Writers serialise on a lock file; snapshots and refs appear atomically (rename).
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.endpoint = f"file://{self.root}"

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    @contextlib.contextmanager
    def _locked(self, repo_id: str) -> Iterator[Path]:
        folder = self.repo_dir(repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield folder
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _write_ref(folder: Path, name: str, commit: str) -> None:
        refs = folder / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        partial = refs / f".{name}.{uuid.uuid4().hex}"
        partial.write_text(commit, encoding="utf-8")
        os.replace(partial, refs / name)

    @staticmethod
    def _read_ref(folder: Path, name: str) -> str | None:
        path = folder / "refs" / name
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None

    def ensure_repo(self, repo_id: str) -> None:
        (self.repo_dir(repo_id) / "refs").mkdir(parents=True, exist_ok=True)

    def refs(self, repo_id: str) -> Refs:
        folder = self.repo_dir(repo_id)
        tags: dict[str, str] = {}
        refs = folder / "refs"
        if refs.is_dir():
            for path in refs.iterdir():
                if path.is_file() and path.name != "main" and not path.name.startswith("."):
                    tags[path.name] = path.read_text(encoding="utf-8").strip()
        return Refs(head=self._read_ref(folder, "main"), tags=tags)

    def files_at(self, repo_id: str, commit: str) -> dict[str, Digest]:
        record = self.repo_dir(repo_id) / ".commits" / f"{commit}.json"
        if not record.is_file():
            raise HubNotFound(f"no commit {commit} in {repo_id} at {self.endpoint}")
        files: dict[str, str] = json.loads(record.read_text(encoding="utf-8"))["files"]
        return {path: Digest(sha256=sha) for path, sha in files.items()}

    def commit(
        self, repo_id: str, files: Sequence[HubFile], *, message: str, description: str, parent: str | None
    ) -> str:
        with self._locked(repo_id) as folder:
            head = self._read_ref(folder, "main")
            if head != parent:
                raise ParentMoved(f"main of {repo_id} is {head}, not {parent}")
            tree = dict(self.files_at(repo_id, head)) if head else {}
            staging = folder / "snapshots" / f".{uuid.uuid4().hex}"
            try:
                if head:
                    shutil.copytree(folder / "snapshots" / head, staging)
                staging.mkdir(parents=True, exist_ok=True)
                for file in files:
                    target = staging / file.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if isinstance(file.content, bytes):
                        target.write_bytes(file.content)
                    else:
                        shutil.copyfile(file.content, target)
                    tree[file.path] = digest_of(file)
                shas = {path: d.sha256 for path, d in sorted(tree.items())}
                record = {"parent": head, "message": message, "description": description, "files": shas}
                commit = hashlib.sha1(json.dumps(record, sort_keys=True).encode(), usedforsecurity=False).hexdigest()
                snapshot = folder / "snapshots" / commit
                if not snapshot.exists():
                    os.replace(staging, snapshot)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            commits = folder / ".commits"
            commits.mkdir(exist_ok=True)
            (commits / f"{commit}.json").write_text(
                json.dumps({**record, "created": time.time()}, indent=2), encoding="utf-8"
            )
            self._write_ref(folder, "main", commit)
            return commit

    def tag(self, repo_id: str, tag: str, commit: str, *, message: str) -> None:
        with self._locked(repo_id) as folder:
            if self._read_ref(folder, tag) is not None:
                raise TagExists(f"{repo_id} already has tag {tag}")
            self._write_ref(folder, tag, commit)

    def revision_url(self, repo_id: str, revision: str) -> str:
        commit = self._read_ref(self.repo_dir(repo_id), revision) or revision
        return f"file://{self.repo_dir(repo_id) / 'snapshots' / commit}"


def open_backend(settings: Settings, endpoint: str) -> HubBackend:
    """The backend for a publication's endpoint (``file://…`` → :class:`LocalHub`, else :class:`RemoteHub`)."""
    if endpoint.startswith("file://"):
        return LocalHub(Path(endpoint.removeprefix("file://")))
    return RemoteHub(settings, endpoint=endpoint)


# -- retries -------------------------------------------------------------------------------------------


def with_retries(
    action: Callable[[], T],
    *,
    settings: Settings,
    what: str,
    on_attempt: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``action``; on :class:`Transient` wait ``backoff·2^k`` (capped) and run it again.

    After ``settings.hub_max_attempts`` tries the last transient failure becomes :class:`HubUnavailable`.
    ``on_attempt(n)`` is called before try ``n`` (1-based), e.g. to count attempts in the database.
    """
    attempt = 0
    while True:
        attempt += 1
        if on_attempt is not None:
            on_attempt(attempt)
        try:
            return action()
        except Transient as exc:
            message = settings.redact(str(exc))
            if attempt >= settings.hub_max_attempts:
                raise HubUnavailable(f"gave up trying to {what} after {attempt} attempts: {message}") from None
            delay = min(settings.hub_backoff_max_seconds, settings.hub_backoff_seconds * 2 ** (attempt - 1))
            log.warning("%s; retrying in %.2fs (attempt %d of %d)", message, delay, attempt, settings.hub_max_attempts)
            sleep(delay)
