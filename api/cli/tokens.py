"""``graft token create|list|revoke``: API tokens for the REST API (stored hashed; shown once)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from api.cli.base import JsonFlag, app, err, guard, open_session, out, print_json
from api.runtime import build_runtime
from registry import repositories as repo

token_app = typer.Typer(help="API tokens for the REST API (stored hashed; shown once).", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    scope: Annotated[str, typer.Option("--scope", help="read, write or admin (each includes the ones before).")],
    name: Annotated[str, typer.Option("--name", help="A label: who or what uses the token.")] = "cli",
    as_json: JsonFlag = False,
) -> None:
    """Create an API token. It is printed once, on stdout; only its sha256 is stored."""
    from registry.services.tokens import create_token

    def body() -> None:
        runtime = build_runtime()
        with open_session(runtime) as session:
            issued = create_token(session, name, scope)
        if as_json:
            print_json({"id": issued.id, "name": issued.name, "scope": issued.scope, "token": issued.secret})
            return
        err.print(f"created API token {issued.id} ({issued.name}, scope {issued.scope}); it is shown only once:")
        sys.stdout.write(issued.secret + "\n")

    guard(body)


@token_app.command("list")
def token_list(as_json: JsonFlag = False) -> None:
    """List API tokens (their names, scopes and prefixes; never the tokens)."""

    def body() -> None:
        runtime = build_runtime()
        with open_session(runtime) as session:
            rows = [
                {
                    "id": t.id,
                    "name": t.name,
                    "scope": t.scope,
                    "prefix": t.prefix,
                    "created_at": t.created_at,
                    "revoked": t.revoked_at is not None,
                }
                for t in repo.list_tokens(session)
            ]
        if as_json:
            print_json(rows)
            return
        table = Table("id", "name", "scope", "prefix", "revoked")
        for row in rows:
            revoked = "yes" if row["revoked"] else ""
            table.add_row(str(row["id"]), str(row["name"]), str(row["scope"]), f"{row['prefix']}…", revoked)
        out.print(table if rows else "no API tokens yet; create one with `graft token create --scope write`")

    guard(body)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(help="The id `graft token list` shows.")]) -> None:
    """Revoke an API token; requests with it are refused from now on."""
    from registry.services.tokens import revoke_token

    def body() -> None:
        runtime = build_runtime()
        with open_session(runtime) as session:
            revoke_token(session, token_id)
        out.print(f"revoked API token {token_id}")

    guard(body)
