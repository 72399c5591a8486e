"""The ``graft`` command line. Each command opens one session scope: that is where it commits.

In the embedded default (no ``GRAFT_DATABASE_URL``), ``graft merge`` runs the merge in-process; this
module is therefore the one place in ``api/`` allowed to import the worker pipeline.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree
from sqlalchemy.orm import Session

from api.errors import exit_code
from api.merges import plan_expression, submit_merge
from api.runtime import Runtime, build_runtime
from registry import repositories as repo
from registry.db import session_scope
from registry.errors import GraftError
from registry.formats.peft import CONFIG_FILE, WEIGHTS_FILE
from registry.services.adapters import describe_version, register_folder, resolve_version
from registry.services.lineage import lineage_graph
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


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def _guard(action: Callable[[], T]) -> T:
    """Run a command body; expected errors become one clear message and a meaningful exit status."""
    try:
        return action()
    except CompileError as exc:
        err.print(exc.render(), highlight=False, markup=False)
        raise typer.Exit(exit_code(exc.code, compile_error=True)) from None
    except GraftError as exc:
        raise _fail(exc.message, exit_code(exc.code)) from None


@contextmanager
def _session(runtime: Runtime) -> Iterator[Session]:
    with session_scope(runtime.sessions) as session:
        yield session


def _tags(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


@app.command()
def register(
    path: Annotated[
        Path, typer.Argument(help="A PEFT adapter folder (adapter_config.json + adapter_model.safetensors).")
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Adapter name; registering again adds a version.")],
    tags: Annotated[str | None, typer.Option("--tags", help="Comma-separated task tags, e.g. code,python.")] = None,
    description: Annotated[str, typer.Option("--description", help="What the adapter is for.")] = "",
    base_model: Annotated[str | None, typer.Option("--base-model", help="Override base_model_name_or_path.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate a PEFT LoRA folder and register it as a new version."""

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
            result = register_folder(
                session, runtime.store, path, name, tags=_tags(tags), description=description, base_model=base_model
            )
            info = describe_version(result.version)
        if as_json:
            _print_json({**info, "created": result.created})
        else:
            verb = "registered" if result.created else "already registered (identical content)"
            out.print(
                f"{verb} [bold]{info['ref']}[/]  rank {info['rank']}, {info['modules']} modules, "
                f"base {info['base_model']}, sha256 {info['sha256'][:12]}"
            )

    _guard(body)


@app.command("list")
def list_adapters(as_json: JsonFlag = False) -> None:
    """List registered adapters with their latest version."""

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
            rows = [
                {**describe_version(a.versions[-1]), "versions": len(a.versions)}
                for a in repo.list_adapters(session)
                if a.versions
            ]
        if as_json:
            _print_json(rows)
            return
        table = Table("adapter", "latest", "versions", "base model", "rank", "source", "tags")
        for row in rows:
            table.add_row(
                row["adapter"],
                f"@{row['version']}",
                str(row["versions"]),
                row["base_model"],
                str(row["rank"]),
                row["source"],
                ",".join(row["tags"]),
            )
        out.print(table if rows else "no adapters yet; add one with `graft register PATH --name NAME`")

    _guard(body)


@app.command()
def show(ref: Annotated[str, typer.Argument(help="NAME or NAME@V.")], as_json: JsonFlag = False) -> None:
    """Show one adapter version."""

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
            info = describe_version(resolve_version(session, ref))
        if as_json:
            _print_json(info)
            return
        for key, value in info.items():
            out.print(f"[bold]{key:>14}[/]  {value}", highlight=False)

    _guard(body)


@app.command()
def plan(
    expression: Annotated[str, typer.Argument(help='e.g. "base + code - toxic"')], as_json: JsonFlag = False
) -> None:
    """Compile an expression and show the plan, without running it (a dry run)."""

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
            compiled = plan_expression(session, runtime.settings, expression)
        if as_json:
            _print_json({**compiled.model_dump(mode="json"), "plan_hash": compiled.hash()})
            return
        out.print(f"[bold]normalized[/]  {compiled.normalized}", highlight=False)
        for op in compiled.operands:
            out.print(f"[bold]operand[/]     {op.ref}  weight {op.weight:g}  sha256 {op.sha256[:12]}", highlight=False)
        ranks = sorted({s.rank for s in compiled.steps})
        out.print(f"[bold]modules[/]     {len(compiled.steps)}, output rank {', '.join(map(str, ranks))}")
        out.print(f"[bold]plan hash[/]   {compiled.hash()}")
        for warning in compiled.warnings:
            out.print(f"[yellow]warning:[/] {warning}")

    _guard(body)


@app.command()
def merge(
    expression: Annotated[str, typer.Argument(help='e.g. "base + code - toxic" or "0.7*code + 0.3*math"')],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the adapter that receives the result.")],
    tags: Annotated[str | None, typer.Option("--tags", help="Comma-separated tags for the result.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda; default: cuda when present.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Compile and run a merge in-process, and record the result as a new version with lineage."""
    from workers.pipeline import run_merge_job

    def body() -> None:
        started = time.perf_counter()
        runtime = build_runtime()
        with _session(runtime) as session:
            job, compiled = submit_merge(session, runtime.settings, expression, name, _tags(tags))
            job_id = job.id
        compile_seconds = time.perf_counter() - started
        for warning in compiled.warnings:
            err.print(f"[yellow]warning:[/] {warning}")
        quiet = as_json or not sys.stderr.isatty()
        with Progress(
            TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, disable=quiet
        ) as bar:
            task = bar.add_task("merge", total=len(compiled.steps))
            outcome = run_merge_job(
                job_id,
                session_factory=runtime.sessions,
                store=runtime.store,
                device=device,
                progress=lambda done, _total: bar.update(task, completed=done),
            )
        with _session(runtime) as session:
            info = describe_version(repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id])
        total = time.perf_counter() - started
        if as_json:
            _print_json(
                {
                    "version": info,
                    "job_id": job_id,
                    "plan_hash": compiled.hash(),
                    "warnings": list(compiled.warnings),
                    "timings": {
                        "compile_seconds": compile_seconds,
                        "engine_seconds": outcome.engine_seconds,
                        "total_seconds": total,
                    },
                }
            )
        else:
            out.print(
                f"merged [bold]{info['ref']}[/] = {compiled.normalized}  "
                f"(rank {info['rank']}, {info['modules']} modules, engine {outcome.engine_seconds:.3f}s)",
                highlight=False,
            )

    _guard(body)


def _lineage_tree(graph: dict[str, Any]) -> Tree:
    parents: dict[str, list[dict[str, Any]]] = {}
    for edge in graph["edges"]:
        parents.setdefault(edge["child"], []).append(edge)
    nodes = {n["ref"]: n for n in graph["nodes"]}

    def label(ref: str, edge: dict[str, Any] | None) -> str:
        node = nodes[ref]
        text = f"[bold]{ref}[/] ({node['source']})"
        if node["expression"]:
            text += f"  = {node['expression']}"
        if edge is not None:
            text = f"{edge['coefficient']:+g} × " + text
        return text

    def grow(tree: Tree, ref: str, path: tuple[str, ...]) -> None:
        for edge in parents.get(ref, []):
            branch = tree.add(label(edge["parent"], edge))
            if edge["parent"] not in path:
                grow(branch, edge["parent"], (*path, edge["parent"]))

    root = Tree(label(graph["root"], None))
    grow(root, graph["root"], (graph["root"],))
    return root


@app.command()
def lineage(ref: Annotated[str, typer.Argument(help="NAME or NAME@V.")], as_json: JsonFlag = False) -> None:
    """Show what a version was made from, as a tree of ancestors."""

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
            graph = lineage_graph(session, resolve_version(session, ref), "up")
        if as_json:
            _print_json(graph)
        else:
            out.print(_lineage_tree(graph), highlight=False)

    _guard(body)


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@V.")],
    directory: Annotated[Path, typer.Argument(help="Folder to write the PEFT adapter into.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite adapter files already there.")] = False,
) -> None:
    """Write a version as a PEFT folder that `PeftModel.from_pretrained` loads."""

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
            version = resolve_version(session, ref)
            config, key, label = dict(version.peft_config), version.artifact_key, version.ref
        targets = [directory / CONFIG_FILE, directory / WEIGHTS_FILE]
        if not force and any(t.exists() for t in targets):
            raise _fail(f"{directory} already holds an adapter; pass --force to overwrite it", 4)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(runtime.store.path(key), targets[1])
        targets[0].write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        out.print(f"exported [bold]{label}[/] to {directory}")

    _guard(body)


@app.command()
def migrate() -> None:
    """Bring the configured database to the newest schema."""
    _guard(lambda: build_runtime(migrate=True))
    out.print("database schema is up to date")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
