"""`graft analyze` against ΔW formed densely from the registered files."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from registry.errors import AdapterNotFound, InvalidInput
from registry.models import AdapterVersion
from registry.services.adapters import register_folder
from workers.analyze import analyze_versions

MODULES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (16, 16),
    "base_model.model.model.layers.0.mlp.down_proj": (16, 24),
}


def dense_deltas(store, version: AdapterVersion) -> dict[str, torch.Tensor]:
    tensors = load_file(str(store.path(version.artifact_key)))
    return {
        m: float(row[3]) * tensors[f"{m}.lora_B.weight"].double() @ tensors[f"{m}.lora_A.weight"].double()
        for m, row in version.modules.items()
    }


def test_norms_and_cosines_match_dense_deltas(sessions, store, make_adapter):
    with sessions() as session:
        a = register_folder(session, store, make_adapter("a", seed=1, rank=4, modules=MODULES), "a").version
        b = register_folder(session, store, make_adapter("b", seed=2, rank=3, alpha=6, modules=MODULES), "b").version
        session.commit()
        da, db = dense_deltas(store, a), dense_deltas(store, b)

    report = analyze_versions(["a", "b@1"], session_factory=sessions, store=store, conflict_density=0.5)

    inner = sum(float((da[m] * db[m]).sum()) for m in MODULES)
    norm_a = math.sqrt(sum(float(da[m].square().sum()) for m in MODULES))
    norm_b = math.sqrt(sum(float(db[m].square().sum()) for m in MODULES))
    assert report["operands"] == ["a@1", "b@1"]
    assert report["overall"]["norms"] == pytest.approx([norm_a, norm_b], rel=1e-5)
    assert report["overall"]["cosines"][0][1] == pytest.approx(inner / (norm_a * norm_b), rel=1e-4, abs=1e-6)
    assert report["overall"]["cosines"][0][0] == pytest.approx(1.0, rel=1e-6)
    for row in report["modules"]:
        m = row["module"]
        expected = float((da[m] * db[m]).sum()) / (float(da[m].norm()) * float(db[m].norm()))
        assert row["cosines"][0][1] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert 0.0 <= row["sign_conflict_rate"] <= 1.0
    assert 0.0 < report["overall"]["sign_conflict_rate"] < 1.0


def test_an_adapter_is_perfectly_aligned_with_its_own_multiple(sessions, store, make_adapter):
    folder = make_adapter("a", seed=3, rank=4, modules=MODULES)
    with sessions() as session:
        register_folder(session, store, folder, "a")
        session.commit()
    report = analyze_versions(["a", "a"], session_factory=sessions, store=store)
    assert report["overall"]["cosines"][0][1] == pytest.approx(1.0, rel=1e-6)


def test_bad_requests_are_typed_errors(sessions, store, make_adapter):
    with sessions() as session:
        register_folder(session, store, make_adapter("a", seed=1, modules=MODULES), "a")
        register_folder(session, store, make_adapter("o", seed=2, modules=MODULES, base_model="other/model"), "o")
        session.commit()
    with pytest.raises(AdapterNotFound):
        analyze_versions(["a", "missing"], session_factory=sessions, store=store)
    with pytest.raises(InvalidInput, match="different base models"):
        analyze_versions(["a", "o"], session_factory=sessions, store=store)
    with pytest.raises(InvalidInput, match="density"):
        analyze_versions(["a"], session_factory=sessions, store=store, conflict_density=1.5)
