"""What every ``graft`` command shares: the Typer app, the consoles, and how errors and sessions are handled.

Each command opens one session scope (:func:`open_session`): that is where it commits.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from sqlalchemy.orm import Session

from api.errors import exit_code
from api.runtime import Runtime
from registry.db import session_scope
from registry.errors import GraftError
from workers.compiler import CompileError

app = typer.Typer(
    name="graft",
    help="Graft: a registry of LoRA adapters and arithmetic over them, with lineage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def guard(action: Callable[[], T]) -> T:
    """Run a command body; expected errors become one clear message and a meaningful exit status."""
    try:
        return action()
    except CompileError as exc:
        err.print(exc.render(), highlight=False, markup=False)
        raise typer.Exit(exit_code(exc.code, compile_error=True)) from None
    except GraftError as exc:
        raise fail(exc.message, exit_code(exc.code)) from None


@contextmanager
def open_session(runtime: Runtime) -> Iterator[Session]:
    with session_scope(runtime.sessions) as session:
        yield session


def parse_tags(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]
