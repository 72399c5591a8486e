"""``graft plan``, ``functions``, ``merge`` and ``analyze``: expressions, merges (local or ``--remote``) and analysis.

In the embedded default (no ``GRAFT_DATABASE_URL``), ``graft merge`` runs the merge in-process: this module is
the one place in ``api/`` allowed to import the worker pipeline.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from api.cli.base import JsonFlag, app, err, fail, guard, open_session, out, parse_tags, print_json
from api.cli.hub import print_published, publish_after_merge
from api.errors import exit_code
from api.merges import plan_expression, submit_merge
from api.runtime import build_runtime
from registry import repositories as repo
from registry.services.adapters import describe_version


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
        with open_session(runtime) as session:
            compiled = plan_expression(session, runtime.settings, expression)
        if as_json:
            print_json({**compiled.model_dump(mode="json"), "plan_hash": compiled.hash()})
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

    guard(body)


@app.command()
def functions(as_json: JsonFlag = False) -> None:
    """List the functions expressions can call, with their parameters and an example."""
    from workers.compiler import FUNCTIONS

    specs = sorted(FUNCTIONS.values(), key=lambda spec: spec.name)
    if as_json:
        print_json(
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
        return _remote_merge(remote, token, expression, name, parse_tags(tags), as_json)
    from workers.pipeline import run_merge_job

    def body() -> None:
        started = time.perf_counter()
        runtime = build_runtime()
        with open_session(runtime) as session:
            job, compiled = submit_merge(session, runtime.settings, expression, name, parse_tags(tags))
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
        with open_session(runtime) as session:
            info = describe_version(repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id])
        total = time.perf_counter() - started
        for warning in outcome.warnings:
            err.print(f"[yellow]warning:[/] {warning}")
        energy = "" if outcome.retained_energy is None else f"retained energy {outcome.retained_energy:.1%}, "
        published, failure = publish_after_merge(runtime, outcome.version_id, repo_id) if publish else (None, None)
        if as_json:
            print_json(
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
                print_published(published)
        if failure is not None:
            raise fail(
                f"merged {info['ref']}, but publishing failed: {failure.message} "
                f"(retry with `graft publish {info['ref']}`)",
                exit_code(failure.code),
            )

    guard(body)


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
            print_json(report)
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

    guard(body)


def _remote_error(response: Any) -> typer.Exit:
    """A server's error body as the CLI's message and exit status."""
    from rich.markup import escape

    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return fail(f"the server answered {response.status_code}: {response.text[:200]}", 1)
    if error.get("rendered"):
        err.print(error["rendered"], highlight=False, markup=False)
        return typer.Exit(exit_code(error["code"], compile_error=True))
    return fail(escape(f"{error['message']} [{error['code']}]"), exit_code(error["code"]))


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
                        raise fail(f"cannot reach {url}: {exc}", 1) from None
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
        print_json(job)
    if job["status"] != "succeeded":
        error = job.get("error") or {"code": job["status"], "message": job["status"]}
        raise fail(escape(f"merge job {job['id']} {job['status']}: {error['message']} [{error['code']}]"), 1)
    if not as_json:
        reused = f" (reused job {job['reused_from']})" if job.get("reused_from") else ""
        out.print(f"merged [bold]{job['result']}[/] = {job['expression']}  job {job['id']}{reused}", highlight=False)
