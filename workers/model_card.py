"""The model card (``README.md``) of a published version, built locally with ``ModelCardData``.

The YAML front matter is what the Hub indexes: ``base_model``, ``library_name: peft``, tags (``lora``,
``graft``, ``merge`` for merges, the adapter's task tags), the pipeline tag when the PEFT task type maps to one.
The body is for people: the expression, the parents (linked to their Hub revisions when published), the
strategy and its parameters, the retained energy, and how to load the adapter. Nothing here calls the Hub.
"""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from registry.services.publications import PROVENANCE_FILE, ParentInfo, PublishBundle


def card_tags(bundle: PublishBundle) -> list[str]:
    """``lora``, ``graft``, ``merge`` (merged versions only), then the adapter's task tags, without repeats."""
    tags = ["lora", "graft", "peft"]
    if bundle.merged:
        tags.append("merge")
    for tag in bundle.task_tags:
        if tag not in tags:
            tags.append(tag)
    return tags


def _parent_link(parent: ParentInfo) -> str:
    published = parent.published
    if published is None:
        return "not published"
    label = f"{published.repo_id} @ {published.tag}"
    return f"[{label}]({published.url})" if published.url else label


def _parents_section(bundle: PublishBundle) -> list[str]:
    if not bundle.parents:
        return []
    lines = [
        "## Parents",
        "",
        "| parent | weight | role | sha256 | on the Hub |",
        "|---|---|---|---|---|",
    ]
    for p in bundle.parents:
        lines.append(f"| `{p.ref}` | {p.coefficient:+g} | {p.role} | `{p.sha256[:12]}` | {_parent_link(p)} |")
    return [*lines, ""]


def _merge_section(bundle: PublishBundle) -> list[str]:
    if not bundle.merged:
        return []
    params = bundle.strategy_parameters
    shown = ", ".join(f"`{k}={v}`" for k, v in sorted(params.items())) if params else "none"
    if bundle.retained_energy is None:
        energy = "not recorded"
    elif bundle.retained_energy >= 1.0 and not params:
        energy = "100% (exact: a linear merge keeps every direction)"
    else:
        energy = f"{bundle.retained_energy:.1%}"
    lines = [
        "## Merge",
        "",
        f"- strategy: `{bundle.strategy or 'linear'}`",
        f"- parameters: {shown}",
        f"- retained energy: {energy}",
    ]
    if bundle.plan_hash:
        lines.append(f"- plan hash: `{bundle.plan_hash}`")
    lines.extend(f"- warning: {w}" for w in bundle.warnings)
    return [*lines, ""]


def _origin_section(bundle: PublishBundle) -> list[str]:
    if bundle.source == "hub" and bundle.hub_origin:
        origin = bundle.hub_origin
        where = f"{origin.get('endpoint') or ''}/{origin.get('repo_id')}".lstrip("/")
        return [
            "## Origin",
            "",
            f"Ingested from [{origin.get('repo_id')} @ {origin.get('revision')}]({where}) "
            f"(commit `{origin.get('commit')}`).",
            "",
        ]
    if bundle.source == "upload":
        return ["## Origin", "", "Registered in Graft from an uploaded PEFT folder.", ""]
    if bundle.source == "upload:kohya":
        text = "Registered in Graft from an uploaded kohya/diffusers LoRA file, converted losslessly to PEFT."
        return ["## Origin", "", text, ""]
    return []


def _load_section(bundle: PublishBundle) -> list[str]:
    loader = "AutoModelForCausalLM" if (bundle.task_type or "CAUSAL_LM").upper() == "CAUSAL_LM" else "AutoModel"
    lines = [
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {loader}",
        "",
        f'base = {loader}.from_pretrained("{bundle.base_model}")',
        f'model = PeftModel.from_pretrained(base, "{bundle.target.repo_id}", revision="{bundle.tag}")',
        "```",
        "",
    ]
    if bundle.target.local:
        lines += [
            "This copy lives in Graft's local Hub folder, laid out like the Hugging Face cache: run the snippet",
            f"with `HF_HUB_CACHE={bundle.target.endpoint.removeprefix('file://')}` and `HF_HUB_OFFLINE=1`.",
            "",
        ]
    return lines


def render_model_card(bundle: PublishBundle) -> str:
    """The ``README.md`` text for ``bundle``; it parses back with ``huggingface_hub.ModelCard``."""
    data = ModelCardData(
        base_model=bundle.base_model,
        library_name="peft",
        tags=card_tags(bundle),
        pipeline_tag=bundle.pipeline_tag,
        base_model_relation="adapter",
    )
    what = "a merge" if bundle.merged else "an adapter"
    body = [
        f"# {bundle.adapter} {bundle.tag}",
        "",
        *([bundle.description, ""] if bundle.description else []),
        f"A LoRA adapter for `{bundle.base_model}` (rank {bundle.rank}, {bundle.module_count} modules, "
        f"{bundle.dtype}), {what} recorded by Graft as `{bundle.ref}` (sha256 `{bundle.sha256[:12]}`).",
        "",
    ]
    if bundle.expression:
        body += ["## Expression", "", "```text", bundle.expression, "```", ""]
    body += _parents_section(bundle) + _merge_section(bundle) + _origin_section(bundle) + _load_section(bundle)
    body += [
        "## Provenance",
        "",
        f"`{PROVENANCE_FILE}` holds the machine-readable provenance: the expression, the compiled plan and the",
        "sha256 of every parent.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)
