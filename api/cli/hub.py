"""``graft publish``, and publishing after a merge: versions to a Hugging Face Hub repo (or the local Hub folder)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from api.cli.base import JsonFlag, app, guard, open_session, out, print_json
from api.runtime import Runtime, build_runtime
from registry.errors import GraftError
from registry.services.adapters import resolve_version


def _publish_version(runtime: Runtime, version_id: int, repo_id: str | None) -> dict[str, Any]:
    from workers.publisher import publish_version

    return publish_version(
        version_id, session_factory=runtime.sessions, store=runtime.store, settings=runtime.settings, repo_id=repo_id
    ).as_dict()


def publish_after_merge(
    runtime: Runtime, version_id: int, repo_id: str | None
) -> tuple[dict[str, Any], GraftError | None]:
    """Publish a freshly merged version; a failure is returned (the merge itself stays recorded)."""
    try:
        return _publish_version(runtime, version_id, repo_id), None
    except GraftError as exc:
        return {"status": "failed", "error_code": exc.code, "error": exc.message}, exc


def print_published(published: dict[str, Any]) -> None:
    verb = "already published" if published["reused"] else "published"
    where = "the local Hub folder" if published["local"] else published["endpoint"]
    out.print(
        f"{verb} [bold]{published['ref']}[/] to {published['repo_id']}@{published['tag']} on {where}\n"
        f"  commit {published['commit']}\n  {published['url']}",
        highlight=False,
    )


@app.command()
def publish(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@V.")],
    repo_id: Annotated[
        str | None, typer.Option("--repo", help="Hub repo ORG/NAME; default GRAFT_HUB_NAMESPACE/NAME.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Publish a version to the Hub as one commit tagged vN (or to the local Hub folder when none is set).

    Safe to run again: a published version is reported as such, and a failed publication is retried.
    """

    def body() -> None:
        runtime = build_runtime()
        with open_session(runtime) as session:
            version_id = resolve_version(session, ref).id
        published = _publish_version(runtime, version_id, repo_id)
        if as_json:
            print_json(published)
        else:
            print_published(published)

    guard(body)
