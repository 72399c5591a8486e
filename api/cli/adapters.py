"""``graft register``, ``list``, ``show``, ``lineage`` and ``export``: adapters and their versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.tree import Tree

from api.cli.base import JsonFlag, app, err, fail, guard, open_session, out, parse_tags, print_json
from api.runtime import Runtime, build_runtime
from registry import repositories as repo
from registry.formats.kohya import write_kohya_file
from registry.formats.peft import CONFIG_FILE, WEIGHTS_FILE
from registry.services.adapters import describe_version, register_folder, resolve_version
from registry.services.lineage import lineage_graph


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
            info, created = _register_from_hub(runtime, path, name, parse_tags(tags), description, base_model)
        else:
            with open_session(runtime) as session:
                result = register_folder(
                    session,
                    runtime.store,
                    Path(path),
                    name,
                    tags=parse_tags(tags),
                    description=description,
                    base_model=base_model,
                )
                info, created = describe_version(result.version), result.created
        if as_json:
            print_json({**info, "created": created})
        else:
            verb = "registered" if created else "already registered (identical content)"
            out.print(
                f"{verb} [bold]{info['ref']}[/]  rank {info['rank']}, {info['modules']} modules, "
                f"base {info['base_model']}, sha256 {info['sha256'][:12]}"
            )

    guard(body)


@app.command("list")
def list_adapters(as_json: JsonFlag = False) -> None:
    """List registered adapters with their latest version."""

    def body() -> None:
        runtime = build_runtime()
        with open_session(runtime) as session:
            rows = [
                {**describe_version(a.versions[-1]), "versions": len(a.versions)}
                for a in repo.list_adapters(session)
                if a.versions
            ]
        if as_json:
            print_json(rows)
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

    guard(body)


@app.command()
def show(ref: Annotated[str, typer.Argument(help="NAME or NAME@V.")], as_json: JsonFlag = False) -> None:
    """Show one adapter version."""

    def body() -> None:
        runtime = build_runtime()
        with open_session(runtime) as session:
            info = describe_version(resolve_version(session, ref))
        if as_json:
            print_json(info)
            return
        for key, value in info.items():
            out.print(f"[bold]{key:>14}[/]  {value}", highlight=False)

    guard(body)


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
        with open_session(runtime) as session:
            graph = lineage_graph(session, resolve_version(session, ref), "up")
        if as_json:
            print_json(graph)
        else:
            out.print(_lineage_tree(graph), highlight=False)
            for node in graph["nodes"]:  # full Hub links below the tree, where they are never cropped
                if node.get("hub"):
                    out.print(f"{node['ref']} published at {node['hub']['url']}", highlight=False)

    guard(body)


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
            raise fail(f"unknown export format {fmt!r}; use --format peft or --format kohya", 2)
        runtime = build_runtime()
        with open_session(runtime) as session:
            version = resolve_version(session, ref)
            config, key, label = dict(version.peft_config), version.artifact_key, version.ref
            stem = version.adapter.name.replace("/", "_")
        if fmt == "kohya":
            target = directory / f"{stem}.safetensors"
            if not force and target.exists():
                raise fail(f"{target} already exists; pass --force to overwrite it", 4)
            write_kohya_file(runtime.store.path(key), config, target, {"graft.ref": label})
            out.print(f"exported [bold]{label}[/] to {target}")
            return
        targets = [directory / CONFIG_FILE, directory / WEIGHTS_FILE]
        if not force and any(t.exists() for t in targets):
            raise fail(f"{directory} already holds an adapter; pass --force to overwrite it", 4)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(runtime.store.path(key), targets[1])
        targets[0].write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        out.print(f"exported [bold]{label}[/] to {directory}")

    guard(body)


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
