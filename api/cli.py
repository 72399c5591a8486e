"""The ``graft`` command line. Each command opens one session scope: that is where it commits.

In the embedded default (no ``GRAFT_DATABASE_URL``), ``graft merge`` runs the merge in-process; this
module is therefore the one place in ``api/`` allowed to import the worker pipeline.
"""

from __future__ import annotations

import contextlib
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
from registry.formats.kohya import write_kohya_file
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
        str,
        typer.Argument(
            help="A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), a kohya/diffusers "
            "LoRA .safetensors file (converted to PEFT, losslessly), or a Hub adapter: hf://ORG/REPO[@REVISION]."
        ),
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Adapter name; registering again adds a version.")],
    tags: Annotated[str | None, typer.Option("--tags", help="Comma-separated task tags, e.g. code,python.")] = None,
    description: Annotated[str, typer.Option("--description", help="What the adapter is for.")] = "",
    base_model: Annotated[str | None, typer.Option("--base-model", help="Override base_model_name_or_path.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate a PEFT LoRA folder (or a kohya/diffusers LoRA file) and register it as a new version."""

    def body() -> None:
        runtime = build_runtime()
        if path.startswith("hf://"):
            info, created = _register_from_hub(runtime, path, name, _tags(tags), description, base_model)
        else:
            with _session(runtime) as session:
                result = register_folder(
                    session,
                    runtime.store,
                    Path(path),
                    name,
                    tags=_tags(tags),
                    description=description,
                    base_model=base_model,
                )
                info, created = describe_version(result.version), result.created
        if as_json:
            _print_json({**info, "created": created})
        else:
            verb = "registered" if created else "already registered (identical content)"
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
    from workers.compiler.plan import MergePlan

    def size(value: float, unit: str, step: int = 1000) -> str:
        for prefix in ("", "k", "M", "G", "T"):
            if abs(value) < step or prefix == "T":
                return f"{value:.3g} {prefix}{unit}"
            value /= step
        return f"{value:.3g} {unit}"

    def module_table(compiled: MergePlan) -> Table:
        """Steps grouped by module kind (the last part of the name): count, shape, path and ranks."""
        groups: dict[tuple[str, str, str], list[int]] = {}
        for step in compiled.steps:
            key = (step.module.rsplit(".", 1)[-1], f"{step.out_features}x{step.in_features}", step.path)
            groups.setdefault(key, []).append(step.rank)
        table = Table("module", "count", "shape", "path", "rank")
        for (kind, shape, path), ranks in sorted(groups.items()):
            low, high = min(ranks), max(ranks)
            table.add_row(kind, str(len(ranks)), shape, path, str(low) if low == high else f"{low}-{high}")
        return table

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
            compiled = plan_expression(session, runtime.settings, expression)
        if as_json:
            _print_json({**compiled.model_dump(mode="json"), "plan_hash": compiled.hash()})
            return
        dense = sum(1 for s in compiled.steps if s.path == "dense")
        cost = compiled.cost
        lines = [
            ("normalized", compiled.normalized),
            ("strategy", f"{compiled.strategy}   base {compiled.base_model}   dtype {compiled.dtype}"),
            ("modules", f"{len(compiled.steps)} ({len(compiled.steps) - dense} factored, {dense} dense), "
             f"max_rank {compiled.max_rank}"),
            ("cost", f"reads {size(cost.bytes_read, 'B', 1024)}, {size(cost.flops, 'FLOP')}, "
             f"peak {size(cost.peak_bytes, 'B', 1024)}, device {cost.device_class}"),
            ("plan hash", compiled.hash()),
        ]  # fmt: skip
        for label, text in lines[:2]:
            out.print(f"[bold]{label:>10}[/]  {text}", highlight=False)
        for op in sorted(compiled.operands, key=lambda o: o.ref):
            out.print(
                f"[bold]{'operand':>10}[/]  {op.ref}  weight {op.weight:g}  sha256 {op.sha256[:12]}  "
                f"(version id {op.version_id})",
                highlight=False,
            )
        for label, text in lines[2:]:
            out.print(f"[bold]{label:>10}[/]  {text}", highlight=False)
        out.print(module_table(compiled))
        for warning in compiled.warnings:
            out.print(f"[yellow]warning:[/] {warning}", highlight=False)

    _guard(body)


@app.command()
def functions(as_json: JsonFlag = False) -> None:
    """List the functions expressions can call, with their parameters and an example."""
    from workers.compiler import FUNCTIONS

    specs = sorted(FUNCTIONS.values(), key=lambda spec: spec.name)
    if as_json:
        _print_json(
            [
                {
                    "name": spec.name,
                    "signature": spec.signature(),
                    "doc": spec.doc,
                    "example": spec.example,
                    "inputs": None if spec.variadic is None else spec.variadic.doc,
                    "params": [
                        {
                            "name": p.name,
                            "type": p.type,
                            "required": p.required,
                            "default": None if p.required else p.default,
                            "bounds": p.bounds_text() or None,
                            "choices": list(p.choices) or None,
                            "doc": p.doc,
                        }
                        for p in spec.params
                    ],
                }
                for spec in specs
            ]
        )
        return
    for spec in specs:
        out.print(f"[bold]{spec.signature()}[/]", highlight=False)
        out.print(f"    {spec.doc}", highlight=False, markup=False)
        if spec.variadic is not None:
            out.print(f"    {'*' + spec.variadic.name:<10} {spec.variadic.doc}", highlight=False)
        for param in spec.params:
            out.print(f"    {param.name:<10} {param.type_text():<28} {param.doc}", highlight=False, markup=False)
        out.print(f"    e.g. {spec.example}\n", highlight=False, markup=False)


@app.command()
def merge(
    expression: Annotated[str, typer.Argument(help='e.g. "base + code - toxic" or "0.7*code + 0.3*math"')],
    name: Annotated[str, typer.Option("--name", "-n", help="Name of the adapter that receives the result.")],
    tags: Annotated[str | None, typer.Option("--tags", help="Comma-separated tags for the result.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda; default: cuda when present.")] = None,
    publish: Annotated[bool, typer.Option("--publish", help="Publish the result to the Hub once recorded.")] = False,
    repo_id: Annotated[str | None, typer.Option("--repo", help="Hub repo for --publish (ORG/NAME).")] = None,
    remote: Annotated[
        str | None, typer.Option("--remote", help="Submit to a Graft server at this URL and follow the job.")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="GRAFT_API_TOKEN", help="API token for --remote.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Compile and run a merge in-process (or, with --remote, on a server), and record the result with lineage."""
    if remote is not None:
        return _remote_merge(remote, token, expression, name, _tags(tags), as_json)
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
        for warning in outcome.warnings:
            err.print(f"[yellow]warning:[/] {warning}")
        energy = "" if outcome.retained_energy is None else f"retained energy {outcome.retained_energy:.1%}, "
        published, failure = _publish_after_merge(runtime, outcome.version_id, repo_id) if publish else (None, None)
        if as_json:
            _print_json(
                {
                    "version": info,
                    "job_id": job_id,
                    "plan_hash": compiled.hash(),
                    "warnings": [*compiled.warnings, *outcome.warnings],
                    "retained_energy": outcome.retained_energy,
                    "timings": {
                        "compile_seconds": compile_seconds,
                        "engine_seconds": outcome.engine_seconds,
                        "total_seconds": total,
                    },
                    **({"publication": published} if publish else {}),
                }
            )
        else:
            out.print(
                f"merged [bold]{info['ref']}[/] = {compiled.normalized}  "
                f"(rank {info['rank']}, {info['modules']} modules, {energy}engine {outcome.engine_seconds:.3f}s)",
                highlight=False,
            )
            if published is not None and failure is None:
                _print_published(published)
        if failure is not None:
            raise _fail(
                f"merged {info['ref']}, but publishing failed: {failure.message} "
                f"(retry with `graft publish {info['ref']}`)",
                exit_code(failure.code),
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
        if node.get("hub"):
            text += f"  → {node['hub']['repo_id']}@{node['hub']['revision']}"
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
            for node in graph["nodes"]:  # full Hub links below the tree, where they are never cropped
                if node.get("hub"):
                    out.print(f"{node['ref']} published at {node['hub']['url']}", highlight=False)

    _guard(body)


@app.command()
def analyze(
    refs: Annotated[list[str], typer.Argument(help="Adapters to compare: NAME or NAME@V, one or more.")],
    conflicts: Annotated[
        float | None, typer.Option("--conflicts", help="Also the sign-conflict rate TIES would see at this density.")
    ] = None,
    top: Annotated[int, typer.Option("--top", help="Modules to list, most aligned (|cosine|) first.")] = 5,
    as_json: JsonFlag = False,
) -> None:
    """Compare adapters before merging: norms, cosine similarity of their ΔW, effective rank."""
    from workers.analyze import analyze_versions

    def body() -> None:
        runtime = build_runtime()
        report = analyze_versions(
            refs, session_factory=runtime.sessions, store=runtime.store, conflict_density=conflicts
        )
        if as_json:
            _print_json(report)
            return
        labels = report["operands"]
        table = Table("overall cosine", *labels)
        for label, row in zip(labels, report["overall"]["cosines"], strict=True):
            table.add_row(label, *(f"{c:+.3f}" for c in row))
        out.print(table)
        norms = ", ".join(f"{lab} {n:.4g}" for lab, n in zip(labels, report["overall"]["norms"], strict=True))
        out.print(f"ΔW norms: {norms}  ({report['shared_modules']} shared modules)", highlight=False)
        if "sign_conflict_rate" in report["overall"]:
            out.print(f"sign conflicts at density {conflicts:g}: {report['overall']['sign_conflict_rate']:.1%}")
        if len(labels) >= 2 and report["modules"]:

            def alignment(row: dict[str, Any]) -> float:
                cos: list[list[float]] = row["cosines"]
                return max(abs(cos[i][j]) for i in range(len(cos)) for j in range(len(cos)) if i != j)

            for row in sorted(report["modules"], key=alignment, reverse=True)[:top]:
                out.print(f"  {alignment(row):.3f}  {row['module']}", highlight=False)

    _guard(body)


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@V.")],
    directory: Annotated[Path, typer.Argument(help="Folder to write the adapter into.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite adapter files already there.")] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="peft: a PEFT folder; kohya: one kohya LoRA file, DIR/<name>.safetensors.")
    ] = "peft",
) -> None:
    """Write a version as a PEFT folder that `PeftModel.from_pretrained` loads, or as a kohya LoRA file."""

    def body() -> None:
        if fmt not in ("peft", "kohya"):
            raise _fail(f"unknown export format {fmt!r}; use --format peft or --format kohya", 2)
        runtime = build_runtime()
        with _session(runtime) as session:
            version = resolve_version(session, ref)
            config, key, label = dict(version.peft_config), version.artifact_key, version.ref
            stem = version.adapter.name.replace("/", "_")
        if fmt == "kohya":
            target = directory / f"{stem}.safetensors"
            if not force and target.exists():
                raise _fail(f"{target} already exists; pass --force to overwrite it", 4)
            write_kohya_file(runtime.store.path(key), config, target, {"graft.ref": label})
            out.print(f"exported [bold]{label}[/] to {target}")
            return
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


# -- publishing and Hub ingest (issue 6) -------------------------------------------------------------


def _register_from_hub(
    runtime: Runtime, uri: str, name: str, tags: list[str], description: str, base_model: str | None
) -> tuple[dict[str, Any], bool]:
    """``graft register hf://…``: download the adapter files only, validate, record the pinned origin."""
    from workers.hub_ingest import ingest_from_hub

    outcome = ingest_from_hub(
        uri,
        name,
        session_factory=runtime.sessions,
        store=runtime.store,
        settings=runtime.settings,
        tags=tags,
        description=description,
        base_model=base_model,
    )
    if outcome.origin.commit:
        err.print(f"from {outcome.origin.uri} (commit {outcome.origin.commit[:12]})", highlight=False)
    return outcome.version, outcome.created


def _publish_version(runtime: Runtime, version_id: int, repo_id: str | None) -> dict[str, Any]:
    from workers.publisher import publish_version

    return publish_version(
        version_id, session_factory=runtime.sessions, store=runtime.store, settings=runtime.settings, repo_id=repo_id
    ).as_dict()


def _publish_after_merge(
    runtime: Runtime, version_id: int, repo_id: str | None
) -> tuple[dict[str, Any], GraftError | None]:
    """Publish a freshly merged version; a failure is returned (the merge itself stays recorded)."""
    try:
        return _publish_version(runtime, version_id, repo_id), None
    except GraftError as exc:
        return {"status": "failed", "error_code": exc.code, "error": exc.message}, exc


def _print_published(published: dict[str, Any]) -> None:
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
        with _session(runtime) as session:
            version_id = resolve_version(session, ref).id
        published = _publish_version(runtime, version_id, repo_id)
        if as_json:
            _print_json(published)
        else:
            _print_published(published)

    _guard(body)


# -- the service (issue 5): API tokens, the server, workers, remote merges ----------------------------------

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
        with _session(runtime) as session:
            issued = create_token(session, name, scope)
        if as_json:
            _print_json({"id": issued.id, "name": issued.name, "scope": issued.scope, "token": issued.secret})
            return
        err.print(f"created API token {issued.id} ({issued.name}, scope {issued.scope}); it is shown only once:")
        sys.stdout.write(issued.secret + "\n")

    _guard(body)


@token_app.command("list")
def token_list(as_json: JsonFlag = False) -> None:
    """List API tokens (their names, scopes and prefixes; never the tokens)."""

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
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
            _print_json(rows)
            return
        table = Table("id", "name", "scope", "prefix", "revoked")
        for row in rows:
            revoked = "yes" if row["revoked"] else ""
            table.add_row(str(row["id"]), str(row["name"]), str(row["scope"]), f"{row['prefix']}…", revoked)
        out.print(table if rows else "no API tokens yet; create one with `graft token create --scope write`")

    _guard(body)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(help="The id `graft token list` shows.")]) -> None:
    """Revoke an API token; requests with it are refused from now on."""
    from registry.services.tokens import revoke_token

    def body() -> None:
        runtime = build_runtime()
        with _session(runtime) as session:
            revoke_token(session, token_id)
        out.print(f"revoked API token {token_id}")

    _guard(body)


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    device: Annotated[str | None, typer.Option("--device", help="Embedded mode: cpu or cuda.")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Run the REST API. Without GRAFT_BROKER_URL it also runs submitted merges, in a thread of this process."""
    import uvicorn

    from api.app import create_app
    from api.dispatch import Dispatcher, EmbeddedDispatcher, dispatcher_for

    runtime = _guard(build_runtime)
    runner = None
    dispatcher: Dispatcher
    if runtime.settings.broker_url:
        dispatcher = _guard(lambda: dispatcher_for(runtime.settings))
        err.print(f"graft: merges go to the broker (queue {runtime.settings.merge_queue!r}); run `graft worker`")
    else:
        from workers.embedded import EmbeddedRunner

        runner = EmbeddedRunner(
            runtime.sessions,
            runtime.store,
            device=device,
            progress_interval=runtime.settings.progress_interval_seconds,
        )
        runner.start()
        dispatcher = EmbeddedDispatcher(runner.wake)
        err.print("graft: embedded mode (no GRAFT_BROKER_URL): merges run in this process, one at a time")
    try:
        uvicorn.run(create_app(runtime=runtime, dispatcher=dispatcher), host=host, port=port, log_level=log_level)
    finally:
        if runner is not None:
            runner.stop(timeout=10)


@app.command()
def worker(
    queues: Annotated[
        str | None, typer.Option("--queues", "-Q", help="Comma-separated queues; default: merge and publish.")
    ] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Merges run at once.")] = 1,
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery log level.")] = "INFO",
    device: Annotated[str | None, typer.Option("--device", help="Embedded mode: cpu or cuda.")] = None,
) -> None:
    """Run merges: a Celery worker on GRAFT_BROKER_URL; with no broker, the embedded runner in the foreground."""
    runtime = _guard(build_runtime)
    settings = runtime.settings
    if settings.broker_url:
        from workers.celery_app import make_celery

        celery = _guard(lambda: make_celery(settings))
        celery.set_current()
        wanted = queues or f"{settings.merge_queue},{settings.publish_queue}"
        celery.worker_main(
            ["worker", "-Q", wanted, "--concurrency", str(concurrency), "--loglevel", loglevel, "--without-gossip"]
        )
        return
    from workers.embedded import EmbeddedRunner

    runner = EmbeddedRunner(
        runtime.sessions, runtime.store, device=device, progress_interval=settings.progress_interval_seconds
    )
    runner.recover()
    err.print("graft: no GRAFT_BROKER_URL; running queued merges from the database (one runner per database)")
    with contextlib.suppress(KeyboardInterrupt):
        runner.run_forever()


def _remote_error(response: Any) -> typer.Exit:
    """A server's error body as the CLI's message and exit status."""
    from rich.markup import escape

    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return _fail(f"the server answered {response.status_code}: {response.text[:200]}", 1)
    if error.get("rendered"):
        err.print(error["rendered"], highlight=False, markup=False)
        return typer.Exit(exit_code(error["code"], compile_error=True))
    return _fail(escape(f"{error['message']} [{error['code']}]"), exit_code(error["code"]))


def _remote_merge(url: str, token: str | None, expression: str, name: str, tags: list[str], as_json: bool) -> None:
    """Submit a merge to a Graft server and follow the job to its end, with a progress bar over modules."""
    import uuid

    import httpx
    from rich.markup import escape

    headers = {"Idempotency-Key": str(uuid.uuid4())}  # a retried submission returns the same job
    if token:
        headers["Authorization"] = f"Bearer {token}"
    terminal = ("succeeded", "failed", "cancelled")
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0) as client:

        def call(method: str, path: str, **kwargs: Any) -> Any:
            for attempt in range(3):
                try:
                    response = client.request(method, path, **kwargs)
                except httpx.TransportError as exc:
                    if attempt == 2:
                        raise _fail(f"cannot reach {url}: {exc}", 1) from None
                    time.sleep(0.5 * (attempt + 1))
                    continue
                if response.status_code >= 400:
                    raise _remote_error(response)
                return response.json()

        job = call("POST", "/v1/merges", json={"expression": expression, "name": name, "tags": tags})
        quiet = as_json or not sys.stderr.isatty()
        with Progress(
            TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, disable=quiet
        ) as bar:
            task = bar.add_task("merge", total=job["progress"]["total"] or None)
            while job["status"] not in terminal:
                time.sleep(0.5)
                job = call("GET", f"/v1/merges/{job['id']}")
                bar.update(task, completed=job["progress"]["done"], total=job["progress"]["total"] or None)
    if as_json:
        _print_json(job)
    if job["status"] != "succeeded":
        error = job.get("error") or {"code": job["status"], "message": job["status"]}
        raise _fail(escape(f"merge job {job['id']} {job['status']}: {error['message']} [{error['code']}]"), 1)
    if not as_json:
        reused = f" (reused job {job['reused_from']})" if job.get("reused_from") else ""
        out.print(f"merged [bold]{job['result']}[/] = {job['expression']}  job {job['id']}{reused}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
