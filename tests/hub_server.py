"""A small Hugging Face Hub-compatible HTTP server for tests (a test utility, not product code).

It serves the endpoints that the real ``huggingface_hub`` client (2.x) calls for what Graft does — create a
repo, preupload, commit (ndjson), tag, refs, model info (optionally at a revision), tree listing and
resolve/download — over a simple git-like model kept in a temporary folder:

- a *blob* is a file's bytes, named by its git blob sha1 (the oid the Hub reports for regular files) and
  stored under ``root/objects/``;
- a *commit* has a 40-hex oid, a parent, a message and a full tree (path → blob oid), recorded under
  ``root/repos/{ns}--{name}/commits/``;
- *refs*: branches (``main``, created with an initial ``.gitattributes`` commit, as on the Hub) and tags.

Every file is committed inline ("regular" upload mode), so no LFS/Xet transfer is involved: run the client
with ``HF_HUB_DISABLE_XET=1``. Behaviour the client relies on is reproduced: ``parentCommit`` guards a
commit (412 on mismatch), an existing tag gives 409, ``X-Error-Code`` (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``) and ``X-Repo-Commit``/``ETag``/``Content-Length`` on resolve.

Auth: with ``token`` set, writes need ``Authorization: Bearer <token>``; a wrong token is refused (401,
``Invalid credentials in Authorization header``) on every endpoint; reads without a token are allowed.

Fault injection: :meth:`HubServer.fail_next` makes the next N requests to a route answer an error
(optionally *after* applying a commit, to simulate a lost answer); :meth:`HubServer.slow_next` holds
requests back, so that a client with a short timeout times out. Every request is recorded in
:attr:`HubServer.requests`, with the ``Authorization`` header reduced to whether it was present.

Usage::

    with HubServer(tmp_path, token="secret") as hub:
        api = HfApi(endpoint=hub.url, token="secret")
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
ROUTES = ("create", "validate", "preupload", "commit", "tag", "refs", "info", "tree", "resolve")
REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data``: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    tree: dict[str, str]  # path -> blob oid
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Fault:
    status: int
    after_apply: bool


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    status: int
    authorized: bool


class HubError(Exception):
    """An error answer: status, message, and the ``X-Error-Code`` the client keys on."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


class HubServer:
    """The server: start it (or use it as a context manager), point the client at :attr:`url`."""

    def __init__(self, root: Path, *, token: str | None = None) -> None:
        self.root = root
        self.token = token
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, deque[Fault]] = {route: deque() for route in ROUTES}
        self.requests: list[RecordedRequest] = []
        self.delays: deque[tuple[re.Pattern[str], float]] = deque()
        self._seq = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        (root / "objects").mkdir(parents=True, exist_ok=True)
        self.app = Starlette(
            routes=[Route("/{path:path}", self._dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])]
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test Hub server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self, *, token: str | None = None) -> None:
        """Forget every repo, fault and recorded request (blobs stay: they are content-addressed)."""
        with self.lock:
            self.repos.clear()
            for queue in self.faults.values():
                queue.clear()
            self.delays.clear()
            self.requests.clear()
            self.token = token

    # -- test controls ---------------------------------------------------------------------------------

    def fail_next(self, route: str, count: int = 1, *, status: int = 500, after_apply: bool = False) -> None:
        """Answer ``status`` to the next ``count`` requests of ``route`` (one of :data:`ROUTES`).

        With ``after_apply`` (commit only) the commit is made first, then the error is answered: the client
        sees a failure although the commit landed, like a lost answer.
        """
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
        with self.lock:
            self.faults[route].extend(Fault(status, after_apply) for _ in range(count))

    def slow_next(self, path_pattern: str, count: int = 1, *, seconds: float = 1.0) -> None:
        """Hold the next ``count`` requests whose path matches ``path_pattern`` for ``seconds`` before answering
        (without blocking other requests): a client with a shorter timeout sees a timeout."""
        with self.lock:
            self.delays.extend((re.compile(path_pattern), seconds) for _ in range(count))

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The commits reachable from ``branch``, newest first."""
        with self.lock:
            repo = self.repos[repo_id]
            found, oid = [], repo.branches.get(branch)
            while oid is not None:
                found.append(repo.commits[oid])
                oid = repo.commits[oid].parent
            return found

    def tags(self, repo_id: str) -> dict[str, str]:
        with self.lock:
            return dict(self.repos[repo_id].tags)

    def read(self, repo_id: str, revision: str, path: str) -> bytes:
        with self.lock:
            commit = self._resolve(self.repos[repo_id], revision)
            return self._blob(commit.tree[path])

    def delete_tag(self, repo_id: str, tag: str) -> None:
        with self.lock:
            del self.repos[repo_id].tags[tag]

    def move_tag(self, repo_id: str, tag: str, revision: str) -> None:
        with self.lock:
            repo = self.repos[repo_id]
            repo.tags[tag] = self._resolve(repo, revision).oid

    def put_files(self, repo_id: str, files: dict[str, bytes], message: str = "upload") -> str:
        """Commit ``files`` to ``main`` directly (creating the repo if needed); returns the commit oid."""
        with self.lock:
            repo = self.repos.get(repo_id) or self._create_repo(repo_id, private=False)
            tree = dict(repo.commits[repo.branches["main"]].tree)
            for path, data in files.items():
                tree[path] = self._store_blob(data)
            return self._commit(repo, "main", tree, message, "").oid

    # -- the git-like model ----------------------------------------------------------------------------

    def _now(self) -> str:
        return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = self.root / "objects" / oid
        if not path.exists():
            path.write_bytes(data)
        return oid

    def _blob(self, oid: str) -> bytes:
        return (self.root / "objects" / oid).read_bytes()

    def _create_repo(self, repo_id: str, *, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, private=private, created=self._now())
        self.repos[repo_id] = repo
        self._commit(repo, "main", {".gitattributes": self._store_blob(GITATTRIBUTES)}, "initial commit", "")
        return repo

    def _commit(self, repo: Repo, branch: str, tree: dict[str, str], message: str, description: str) -> Commit:
        self._seq += 1
        parent = repo.branches.get(branch)
        payload = json.dumps([parent, sorted(tree.items()), message, description, self._seq]).encode()
        oid = hashlib.sha1(payload, usedforsecurity=False).hexdigest()
        commit = Commit(oid, parent, message, description, dict(tree), self._now())
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        folder = self.root / "repos" / repo.repo_id.replace("/", "--") / "commits"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{oid}.json").write_text(json.dumps(commit.__dict__, indent=2), encoding="utf-8")
        return commit

    def _repo(self, ns: str, name: str) -> Repo:
        repo_id = f"{ns}/{name}"
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.tags:
            return repo.commits[repo.tags[revision]]
        if len(revision) >= 7:
            matches = [c for oid, c in repo.commits.items() if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # -- HTTP --------------------------------------------------------------------------------------------

    def _check_auth(self, request: Request, *, write: bool) -> bool:
        header = request.headers.get("authorization")
        if self.token is None:
            return header is not None
        if header is not None and header != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        if write and header is None:
            raise HubError(401, "You must be authenticated to do this")
        return header is not None

    def _fault(self, route: str) -> Fault | None:
        queue = self.faults[route]
        return queue.popleft() if queue else None

    async def _dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        path = raw.decode("latin-1").split("?", 1)[0]
        authorized = request.headers.get("authorization") is not None
        with self.lock:
            delay = next(((p, t) for p, t in self.delays if p.search(path)), None)
            if delay is not None:
                self.delays.remove(delay)
        if delay is not None:
            await asyncio.sleep(delay[1])
        try:
            response = await self._route(request, path)
        except HubError as exc:
            # Header values are latin-1 on the wire; a message naming a non-ASCII revision must still fit.
            message = exc.message.encode("ascii", "backslashreplace").decode("ascii")
            headers = {"X-Error-Message": message, **exc.headers}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            response = JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=headers)
        with self.lock:
            self.requests.append(RecordedRequest(request.method, path, response.status_code, authorized))
        return response

    async def _route(self, request: Request, path: str) -> Response:
        method = request.method
        if path == "/api/repos/create" and method == "POST":
            return self._create(request, await request.json())
        if path == "/api/validate-yaml" and method == "POST":
            self._injected("validate")
            return JSONResponse({"errors": [], "warnings": []})
        if path == "/api/whoami-v2" and method == "GET":
            self._check_auth(request, write=True)
            return JSONResponse({"type": "user", "name": "graft-test", "auth": {"type": "access_token"}})
        api = re.match(rf"^/api/models/{REPO}(?:/(?P<op>[^/]+)(?:/(?P<rest>.*))?)?$", path)
        if api:
            ns, name, op, rest = (unquote(api["ns"]), unquote(api["name"]), api["op"], api["rest"])
            body = await request.body() if method in ("POST", "PUT", "DELETE") else b""
            return self._api(request, method, ns, name, op, rest, body)
        resolve = re.match(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", path)
        if resolve and method in ("GET", "HEAD"):
            return self._download(request, unquote(resolve["ns"]), unquote(resolve["name"]), resolve)
        raise HubError(404, f"no route for {method} {path}")

    def _injected(self, route: str) -> Fault | None:
        with self.lock:
            fault = self._fault(route)
        if fault is not None and not fault.after_apply:
            raise HubError(fault.status, f"injected failure ({route})")
        return fault

    def _create(self, request: Request, payload: dict[str, Any]) -> Response:
        self._check_auth(request, write=True)
        self._injected("create")
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repos")
        repo_id = f"{payload.get('organization') or 'graft-test'}/{payload['name']}"
        with self.lock:
            if repo_id in self.repos:
                # As on the Hub, the 409 carries the repo URL: create_repo(exist_ok=True) returns it.
                raise HubError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
            self._create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return JSONResponse({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _api(
        self, request: Request, method: str, ns: str, name: str, op: str | None, rest: str | None, body: bytes
    ) -> Response:
        write = method in ("POST", "PUT", "DELETE")
        self._check_auth(request, write=write)
        revision = unquote(rest) if rest else None
        if op is None and method == "GET":
            self._injected("info")
            return self._info(request, ns, name, None)
        if op == "revision" and method == "GET" and revision:
            self._injected("info")
            return self._info(request, ns, name, revision)
        if op == "refs" and method == "GET":
            self._injected("refs")
            with self.lock:
                repo = self._repo(ns, name)
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()]
                tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()]
            return JSONResponse({"branches": branches, "converts": [], "tags": tags, "pullRequests": []})
        if op == "tree" and method == "GET" and rest:
            self._injected("tree")
            rev, _, sub = rest.partition("/")
            return self._tree(request, ns, name, unquote(rev), unquote(sub))
        if op == "preupload" and method == "POST" and revision:
            self._injected("preupload")
            return self._preupload(ns, name, revision, json.loads(body))
        if op == "commit" and method == "POST" and revision:
            return self._commit_request(ns, name, revision, body)
        if op == "tag" and method == "POST" and revision:
            self._injected("tag")
            return self._tag(ns, name, revision, json.loads(body))
        if op == "tag" and method == "DELETE" and revision:
            with self.lock:
                repo = self._repo(ns, name)
                if repo.tags.pop(revision, None) is None:
                    raise HubError(404, f"no tag {revision}", "RevisionNotFound")
            return JSONResponse({})
        raise HubError(404, f"no route for {method} /api/models/{ns}/{name}/{op}")

    def _info(self, request: Request, ns: str, name: str, revision: str | None) -> Response:
        with self.lock:
            repo = self._repo(ns, name)
            commit = self._resolve(repo, revision or "main")
            blobs = request.query_params.get("blobs") in ("1", "true", "True")
            siblings = []
            for path, oid in sorted(commit.tree.items()):
                entry: dict[str, Any] = {"rfilename": path}
                if blobs:
                    entry.update(size=len(self._blob(oid)), blobId=oid)
                siblings.append(entry)
            card = self._card_data(commit)
        return JSONResponse(
            {
                "_id": hashlib.md5(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": ns,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": list(card.get("tags") or []),
                "library_name": card.get("library_name"),
                "pipeline_tag": card.get("pipeline_tag"),
                "cardData": card or None,
                "siblings": siblings,
            }
        )

    def _card_data(self, commit: Commit) -> dict[str, Any]:
        oid = commit.tree.get("README.md")
        if oid is None:
            return {}
        text = self._blob(oid).decode("utf-8", errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, flags=re.DOTALL)
        if not match:
            return {}
        data = yaml.safe_load(match.group(1))
        return data if isinstance(data, dict) else {}

    def _tree(self, request: Request, ns: str, name: str, revision: str, sub: str) -> Response:
        recursive = request.query_params.get("recursive") in ("1", "true", "True")
        with self.lock:
            commit = self._resolve(self._repo(ns, name), revision)
            prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
            if prefix and not any(p.startswith(prefix) for p in commit.tree):
                raise HubError(404, f"{sub} does not exist at {revision}", "EntryNotFound")
            entries: dict[str, dict[str, Any]] = {}
            for path, oid in sorted(commit.tree.items()):
                if not path.startswith(prefix):
                    continue
                parts = path[len(prefix) :].split("/")
                for depth in range(1, len(parts)):
                    folder = prefix + "/".join(parts[:depth])
                    if recursive or depth == 1:
                        folder_oid = hashlib.sha1(folder.encode(), usedforsecurity=False).hexdigest()
                        entries.setdefault(folder, {"type": "directory", "oid": folder_oid, "size": 0, "path": folder})
                if recursive or len(parts) == 1:
                    entries[path] = {"type": "file", "oid": oid, "size": len(self._blob(oid)), "path": path}
        return JSONResponse([entries[k] for k in sorted(entries)])

    def _preupload(self, ns: str, name: str, revision: str, payload: dict[str, Any]) -> Response:
        with self.lock:
            repo = self._repo(ns, name)
            try:
                tree = self._resolve(repo, revision).tree
            except HubError:
                tree = {}
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
                for f in payload.get("files", [])
            ]
        return JSONResponse({"files": files, "commitOid": repo.branches.get(revision)})

    def _commit_request(self, ns: str, name: str, revision: str, body: bytes) -> Response:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first ndjson line must be the commit header")
        header = lines[0]["value"]
        with self.lock:
            fault = self._fault("commit")
            if fault is not None and not fault.after_apply:
                raise HubError(fault.status, "injected failure (commit)")
            repo = self._repo(ns, name)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.branches[revision]
            parent = header.get("parentCommit")
            if parent is not None and not head.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].tree)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                    tree[value["path"]] = self._store_blob(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    tree = {p: o for p, o in tree.items() if not p.startswith(folder)}
                else:
                    raise HubError(422, f"operation {key!r} is not supported by this test server (LFS/Xet)")
            commit = self._commit(repo, revision, tree, header.get("summary", ""), header.get("description", ""))
        if fault is not None:
            raise HubError(fault.status, "injected failure (commit, after applying it)")
        return JSONResponse(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _tag(self, ns: str, name: str, revision: str, payload: dict[str, Any]) -> Response:
        with self.lock:
            repo = self._repo(ns, name)
            commit = self._resolve(repo, revision)
            tag = payload["tag"]
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.oid
        return JSONResponse({})

    def _download(self, request: Request, ns: str, name: str, match: re.Match[str]) -> Response:
        self._check_auth(request, write=False)
        self._injected("resolve")
        revision, file = unquote(match["rev"]), unquote(match["file"])
        with self.lock:
            commit = self._resolve(self._repo(ns, name), revision)
            oid = commit.tree.get(file)
            if oid is None:
                raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
            data = self._blob(oid)
        headers = {
            "ETag": f'"{oid}"',
            "X-Repo-Commit": commit.oid,
            "Content-Disposition": f'inline; filename="{file.rsplit("/", 1)[-1]}"',
        }
        return Response(data, media_type="application/octet-stream", headers=headers)
