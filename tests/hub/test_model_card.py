"""The model card and provenance, as pure functions of a version (no Hub, no database)."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard

from registry.services.publications import (
    HubTarget,
    ParentInfo,
    PublishBundle,
    PublishedRef,
    check_repo_id,
    default_repo_id,
    plan_parameters,
)
from workers.model_card import render_model_card

TIES_PLAN: dict[str, Any] = {
    "strategy": "ties",
    "steps": [
        {
            "module": m,
            "path": "dense",
            "program": {
                "kind": "ties",
                "density": 0.5,
                "majority": "total",
                "refactor_rank": r,
                "inputs": [[0.7, {"kind": "operand", "operand": 0, "scale": 2.0, "rank": 8}]],
            },
        }
        for m, r in (("a", 16), ("b", 8))
    ],
}


def bundle(**overrides: Any) -> PublishBundle:
    values: dict[str, Any] = {
        "publication_id": 1,
        "version_id": 3,
        "adapter": "mix",
        "number": 2,
        "tag": "v2",
        "target": HubTarget("https://hub.example", "acme/mix", local=False),
        "description": "Code, with manners.",
        "task_tags": ("code", "lora"),
        "base_model": "meta-llama/Llama-2-7b-hf",
        "base_revision": None,
        "rank": 16,
        "dtype": "F32",
        "module_count": 2,
        "target_modules": ("q_proj",),
        "task_type": "CAUSAL_LM",
        "sha256": "f" * 64,
        "artifact_key": "objects/ff/x.safetensors",
        "peft_config": {"peft_type": "LORA", "r": 16},
        "source": "merge",
        "expression": "ties(0.7*code, 0.3*math, density=0.5)",
        "plan_hash": "a" * 64,
        "plan": TIES_PLAN,
        "parents": (
            ParentInfo(
                "code@1",
                "1" * 64,
                0.7,
                "operand",
                "ties",
                PublishedRef(
                    "https://hub.example", "acme/code", "v1", "c" * 40, "https://hub.example/acme/code/tree/v1"
                ),
            ),
            ParentInfo("math@4", "2" * 64, 0.3, "operand", "ties", None),
        ),
    }
    values.update(overrides)
    return PublishBundle(**values)


def test_card_front_matter_and_body_for_a_non_linear_merge() -> None:
    card = ModelCard(render_model_card(bundle()))
    assert card.data.to_dict() == {
        "base_model": "meta-llama/Llama-2-7b-hf",
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["lora", "graft", "peft", "merge", "code"],
        "base_model_relation": "adapter",
    }
    assert "ties(0.7*code, 0.3*math, density=0.5)" in card.text
    link = "[acme/code @ v1](https://hub.example/acme/code/tree/v1)"
    assert f"| `code@1` | +0.7 | operand | `111111111111` | {link} |" in card.text
    assert "`ties.density=0.5`" in card.text and "`ties.refactor_rank=[16, 8]`" in card.text
    assert "retained energy: not recorded" in card.text
    assert 'PeftModel.from_pretrained(base, "acme/mix", revision="v2")' in card.text
    assert "Code, with manners." in card.text


def test_plan_parameters_and_exactness() -> None:
    assert plan_parameters(TIES_PLAN) == {
        "ties.density": 0.5,
        "ties.majority": "total",
        "ties.refactor_rank": [16, 8],
    }
    linear = {"steps": [{"program": {"kind": "linear", "terms": [[1.0, {"kind": "operand", "operand": 0}]]}}]}
    assert plan_parameters(linear) == {}
    legacy = {"steps": [{"terms": [], "truncate_to": 32}]}
    assert plan_parameters(legacy) == {"svd.rank": 32}


def test_provenance_is_stable_and_has_no_hub_urls() -> None:
    first, second = bundle().provenance_bytes(), bundle(parents=bundle().parents[1:]).provenance_bytes()
    assert first == bundle().provenance_bytes()
    assert b"hub.example" not in first and first != second


def test_repo_ids() -> None:
    assert default_repo_id("acme", "code") == "acme/code"
    assert default_repo_id("acme", "team/code") == "acme/team-code"
    assert default_repo_id(None, "team/code") == "team/code"
    for bad in ("acme", "a/b/c", "acme/-x", "acme/x--y", "acme/" + "x" * 97):
        try:
            check_repo_id(bad)
        except Exception as exc:
            assert getattr(exc, "code", None) == "invalid_input"
        else:
            raise AssertionError(f"{bad!r} was accepted")
