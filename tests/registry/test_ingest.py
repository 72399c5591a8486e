"""Ingest of PEFT folders through ``register_folder``: every refusal, and the facts and storage of good ones.

A refusal must raise :class:`InvalidAdapter` (code ``invalid_adapter``) with a one-line message that names
the problem, and must leave nothing behind: no adapter, version or base-model row, and no blob.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.artifacts import ArtifactStore
from registry.errors import Conflict, InvalidAdapter, InvalidInput
from registry.models import Adapter, AdapterVersion, BaseModel
from registry.services.adapters import register_folder

P = "base_model.model.model.layers"
Q0 = f"{P}.0.self_attn.q_proj"
V0 = f"{P}.0.self_attn.v_proj"
Q1 = f"{P}.1.self_attn.q_proj"
MODULES = {Q0: (16, 12), V0: (8, 12), Q1: (16, 12)}
BASE = "graft-demo/tiny-llama"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# -- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
def adapter(make_adapter: Callable[..., Path]) -> Callable[..., Path]:
    """``make_adapter`` over three small modules (fast), rank 4 and alpha 8 unless told otherwise."""

    def make(name: str = "a", **kwargs: Any) -> Path:
        kwargs.setdefault("modules", MODULES)
        kwargs.setdefault("rank", 4)
        kwargs.setdefault("alpha", 8.0)
        return make_adapter(name, **kwargs)

    return make


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def edit_config(folder: Path, drop: tuple[str, ...] = (), **changes: Any) -> None:
    path = folder / CONFIG
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    path.write_text(json.dumps(config))


def stored_files(store: ArtifactStore) -> list[Path]:
    """Every file under the store (blobs, partial files, scratch): empty when nothing was stored."""
    if not store.root.exists():
        return []
    return sorted(p for p in store.root.rglob("*") if p.is_file())


def row_counts(session: Session) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        session.scalar(select(func.count()).select_from(model)) for model in (Adapter, AdapterVersion, BaseModel)
    )


def assert_refused(
    session: Session, store: ArtifactStore, folder: Path, *fragments: str, name: str = "a", **kwargs: Any
) -> InvalidAdapter:
    """Register ``folder``; expect an InvalidAdapter naming ``fragments``, and nothing recorded or stored."""
    before = row_counts(session)
    with pytest.raises(InvalidAdapter) as info:
        register_folder(session, store, folder, name, **kwargs)
    error = info.value
    assert error.code == "invalid_adapter"
    assert error.message == str(error)
    assert "\n" not in error.message, "refusals are one line"
    for fragment in fragments:
        assert fragment in error.message, f"{fragment!r} not in {error.message!r}"
    assert row_counts(session) == before, "a refused adapter must record nothing"
    assert session.scalar(select(Adapter).where(Adapter.name == name)) is None
    assert stored_files(store) == [], "a refused adapter must store nothing"
    return error


def set_bits(tensor: torch.Tensor, index: int, bits: int) -> None:
    """Write raw bits into one element of a float tensor (NaN payloads and signs included)."""
    unsigned, signed, int_dtype = {
        2: (np.uint16, np.int16, torch.int16),
        4: (np.uint32, np.int32, torch.int32),
    }[tensor.element_size()]
    value = int(np.array([bits], dtype=unsigned).view(signed)[0])
    tensor.view(int_dtype).view(-1)[index] = value


# -- refusals -----------------------------------------------------------------------------------------


def test_pickle_bin_only_is_refused_with_a_conversion_hint(session, store, adapter):
    folder = adapter()
    tensors = load_file(str(folder / WEIGHTS))
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    error = assert_refused(session, store, folder, "adapter_model.bin", "pickle")
    assert "convert" in error.message
    assert "save_file" in error.message and WEIGHTS in error.message


def test_pickle_bin_next_to_safetensors_uses_the_safetensors(session, store, adapter):
    folder = adapter()
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    result = register_folder(session, store, folder, "a")
    assert result.created
    assert result.version.sha256 == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()


def test_missing_weights_is_refused(session, store, adapter):
    folder = adapter()
    (folder / WEIGHTS).unlink()
    assert_refused(session, store, folder, f"has no {WEIGHTS}")


@pytest.mark.parametrize(("present", "missing"), [("A", "B"), ("B", "A")])
def test_factor_without_its_partner_is_refused(session, store, adapter, present, missing):
    folder = adapter()
    edit_tensors(folder, lambda t: t.pop(f"{V0}.lora_{missing}.weight"))
    assert_refused(session, store, folder, repr(V0), f"has lora_{present} but no lora_{missing}")


def test_shapes_that_disagree_with_r_are_refused(session, store, adapter):
    folder = adapter(rank=4)
    edit_config(folder, r=8)
    assert_refused(session, store, folder, repr(Q0), "rank 8", "[4, 12]")


def test_lora_b_rank_that_disagrees_with_lora_a_is_refused(session, store, adapter):
    folder = adapter(rank=4)

    def widen_b(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{V0}.lora_B.weight"] = torch.randn(8, 5)

    edit_tensors(folder, widen_b)
    assert_refused(session, store, folder, repr(V0), "[8, 5]", "rank 4")


def test_weights_written_with_rank_pattern_but_config_without_it_are_refused(session, store, adapter):
    folder = adapter(rank=4, rank_pattern={"v_proj": 2})
    edit_config(folder, rank_pattern={})
    assert_refused(session, store, folder, repr(V0), "rank 4", "[2, 12]")


def test_rank_pattern_in_config_that_the_weights_do_not_follow_is_refused(session, store, adapter):
    folder = adapter(rank=4)
    edit_config(folder, rank_pattern={"layers.1.self_attn.q_proj": 2})
    assert_refused(session, store, folder, repr(Q1), "rank 2", "rank_pattern")


def test_one_dimensional_factor_is_refused(session, store, adapter):
    folder = adapter()

    def flatten(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q0}.lora_A.weight"] = tensors[f"{Q0}.lora_A.weight"].reshape(-1)

    edit_tensors(folder, flatten)
    assert_refused(session, store, folder, repr(Q0), "2-D")


NONFINITE_BITS = {
    # dtype: {kind: raw bits}; "payload" is a negative NaN with a non-canonical mantissa (not what torch writes)
    torch.float32: {"nan": 0x7FC00000, "inf": 0x7F800000, "-inf": 0xFF800000, "payload": 0xFF800001},
    torch.float16: {"nan": 0x7E00, "inf": 0x7C00, "-inf": 0xFC00, "payload": 0xFC01},
    torch.bfloat16: {"nan": 0x7FC0, "inf": 0x7F80, "-inf": 0xFF80, "payload": 0xFF81},
}


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "payload"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["F32", "F16", "BF16"])
def test_nonfinite_values_are_refused(session, store, adapter, dtype, kind):
    folder = adapter(dtype=dtype)
    target = f"{Q1}.lora_B.weight"  # the last tensor of the last module, at its last element

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        set_bits(tensors[target], -1, NONFINITE_BITS[dtype][kind])
        value = tensors[target].view(-1)[-1].float()
        assert not torch.isfinite(value)

    edit_tensors(folder, poison)
    assert_refused(session, store, folder, repr(target), "1 NaN/Inf")


def test_every_nonfinite_value_is_counted(session, store, adapter):
    folder = adapter(dtype=torch.bfloat16)
    target = f"{V0}.lora_A.weight"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[target][0, :3] = float("nan")
        tensors[target][1, 0] = float("inf")

    edit_tensors(folder, poison)
    assert_refused(session, store, folder, repr(target), "4 NaN/Inf")


FINITE_EXTREMES = {
    # largest finite, most negative finite, smallest subnormal: all must pass a raw-bit check
    torch.float32: (0x7F7FFFFF, 0xFF7FFFFF, 0x00000001),
    torch.float16: (0x7BFF, 0xFBFF, 0x0001),
    torch.bfloat16: (0x7F7F, 0xFF7F, 0x0001),
}


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16")],
    ids=["F32", "F16", "BF16"],
)
def test_finite_extremes_are_accepted(session, store, adapter, dtype, name):
    folder = adapter(dtype=dtype)

    def extremes(tensors: dict[str, torch.Tensor]) -> None:
        for index, bits in enumerate(FINITE_EXTREMES[dtype]):
            set_bits(tensors[f"{Q0}.lora_A.weight"], index, bits)
        assert torch.isfinite(tensors[f"{Q0}.lora_A.weight"].float()).all()

    edit_tensors(folder, extremes)
    result = register_folder(session, store, folder, "a")
    assert result.created
    assert result.version.dtype == name


@pytest.mark.parametrize("value", [None, "", "   "])
def test_no_base_model_named_is_refused(session, store, adapter, value):
    folder = adapter(extra_config={"base_model_name_or_path": value})
    assert_refused(session, store, folder, "no base model", "base_model_name_or_path", "--base-model")


def test_missing_base_model_key_is_refused(session, store, adapter):
    folder = adapter()
    edit_config(folder, drop=("base_model_name_or_path",))
    assert_refused(session, store, folder, "no base model", "--base-model")


def test_base_model_override_fixes_a_missing_base_model(session, store, adapter):
    folder = adapter(extra_config={"base_model_name_or_path": None})
    result = register_folder(session, store, folder, "a", base_model="acme/base-7b")
    assert result.created
    assert result.version.base_model.name == "acme/base-7b"


def test_base_model_override_wins_over_the_config(session, store, adapter):
    folder = adapter(base_model="from/config")
    result = register_folder(session, store, folder, "a", base_model="from/flag")
    assert result.version.base_model.name == "from/flag"


@pytest.mark.parametrize("peft_type", ["IA3", "PREFIX_TUNING", "LOHA", None, 7])
def test_unknown_peft_type_is_refused(session, store, adapter, peft_type):
    folder = adapter(extra_config={"peft_type": peft_type})
    assert_refused(session, store, folder, f"unknown peft_type {peft_type!r}", "LORA")


def test_missing_peft_type_is_refused(session, store, adapter):
    folder = adapter()
    edit_config(folder, drop=("peft_type",))
    assert_refused(session, store, folder, "unknown peft_type None")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b'{"peft_type": "LORA", "r": 4', "not valid JSON (line 1"),
        (b"", "not valid JSON"),
        (b'["LORA", 4]', "must hold a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
    ids=["truncated", "empty", "array", "binary"],
)
def test_invalid_config_is_refused(session, store, adapter, text, fragment):
    folder = adapter()
    (folder / CONFIG).write_bytes(text)
    assert_refused(session, store, folder, CONFIG, fragment)


def test_missing_config_is_refused(session, store, adapter):
    folder = adapter()
    (folder / CONFIG).unlink()
    assert_refused(session, store, folder, f"has no {CONFIG}")


@pytest.mark.parametrize(("key", "value"), [("r", 0), ("r", "8"), ("lora_alpha", -1), ("lora_alpha", True)])
def test_bad_rank_or_alpha_is_refused(session, store, adapter, key, value):
    folder = adapter(extra_config={key: value})
    assert_refused(session, store, folder, key, "positive number")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rank_pattern", {"v_proj": "two"}),
        ("rank_pattern", {"v_proj": 0}),
        ("alpha_pattern", {"v_proj": "x"}),
        ("rank_pattern", [2]),
    ],
)
def test_bad_pattern_is_refused(session, store, adapter, key, value):
    folder = adapter(extra_config={key: value})
    assert_refused(session, store, folder, key, "positive numbers")


def test_not_a_folder_is_refused(session, store, tmp_path):
    assert_refused(session, store, tmp_path / "nowhere", "is not a folder")


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("base_model.model.lm_head.weight", "is not a LoRA factor"),
        (f"{Q0}.weight", "is not a LoRA factor"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding"),
    ],
    ids=["full-weight", "base-weight", "embedding-factor"],
)
def test_non_lora_tensor_keys_are_refused(session, store, adapter, key, fragment):
    folder = adapter()

    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = torch.zeros(4, 12)

    edit_tensors(folder, add)
    assert_refused(session, store, folder, repr(key), fragment)


def test_integer_tensor_is_refused(session, store, adapter):
    folder = adapter()

    def to_int(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{Q0}.lora_A.weight"] = torch.ones(4, 12, dtype=torch.int8)

    edit_tensors(folder, to_int)
    assert_refused(session, store, folder, "dtype I8")


def test_weights_without_lora_factors_are_refused(session, store, adapter):
    folder = adapter()
    save_file({}, str(folder / WEIGHTS))
    assert_refused(session, store, folder, "no LoRA factors")


@pytest.mark.parametrize("cut", [4, 64, -16], ids=["no-header", "half-header", "truncated-data"])
def test_corrupt_safetensors_is_refused(session, store, adapter, cut):
    folder = adapter()
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[:cut])
    assert_refused(session, store, folder, WEIGHTS)


def test_invalid_name_is_refused_before_anything(session, store, adapter):
    before = row_counts(session)
    with pytest.raises(InvalidInput) as info:
        register_folder(session, store, adapter(), "9 bad name")
    assert info.value.code == "invalid_input"
    assert "invalid adapter name" in info.value.message
    assert row_counts(session) == before
    assert stored_files(store) == []


# -- accepted folders: facts ----------------------------------------------------------------------------


def test_registration_records_the_facts(session, store, adapter):
    folder = adapter(rank=4, alpha=8.0, dtype=torch.float16, extra_config={"revision": "abc123"})
    weights = folder / WEIGHTS
    result = register_folder(session, store, folder, "code", tags=["code", "python", "code"], description="d")
    version = result.version
    assert result.created
    assert version.ref == "code@1"
    assert version.number == 1
    assert version.source == "upload"
    assert version.format == "peft"
    assert version.base_model.name == BASE
    assert version.base_revision == "abc123"
    assert (version.rank, version.alpha, version.use_rslora) == (4, 8.0, False)
    assert version.dtype == "F16"
    assert version.target_modules == ["q_proj", "v_proj"]
    assert version.size_bytes == weights.stat().st_size
    assert version.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert version.expression is None and version.plan_hash is None
    assert version.adapter.tags == ["code", "python"]
    assert version.adapter.description == "d"
    # each module: [out, in, rank, scale] with scale = alpha / r
    assert version.modules == {Q0: [16, 12, 4, 2.0], V0: [8, 12, 4, 2.0], Q1: [16, 12, 4, 2.0]}
    assert version.peft_config["revision"] == "abc123"
    # the row is really in the database, not only in the session's identity map
    session.expire_all()
    stored = session.get(AdapterVersion, version.id)
    assert stored is not None and stored.modules[Q0] == [16, 12, 4, 2.0]


def test_rslora_scale_is_alpha_over_sqrt_r(session, store, adapter):
    folder = adapter(rank=16, alpha=8.0, use_rslora=True)
    version = register_folder(session, store, folder, "rs").version
    assert version.use_rslora is True
    for module in MODULES:
        assert version.modules[module][2] == 16
        assert version.modules[module][3] == pytest.approx(8.0 / math.sqrt(16))  # 2.0, not alpha/r = 0.5


def test_rank_pattern_and_alpha_pattern_apply_per_module(session, store, adapter):
    folder = adapter(
        rank=4,
        alpha=8.0,
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 2.0, "layers.1.self_attn.q_proj": 6.0},
    )
    version = register_folder(session, store, folder, "pat").version
    assert version.modules[Q0] == [16, 12, 4, 8.0 / 4]  # defaults: r=4, alpha=8
    assert version.modules[V0] == [8, 12, 4, 2.0 / 4]  # alpha_pattern only
    assert version.modules[Q1] == [16, 12, 2, 6.0 / 2]  # both patterns
    assert version.rank == 4
    tensors = load_file(str(folder / WEIGHTS))
    assert tensors[f"{Q1}.lora_A.weight"].shape == (2, 12)


def test_rank_pattern_with_rslora(session, store, adapter):
    folder = adapter(rank=16, alpha=8.0, use_rslora=True, rank_pattern={"v_proj": 4})
    version = register_folder(session, store, folder, "rsp").version
    assert version.modules[V0][2:] == [4, pytest.approx(8.0 / 2)]
    assert version.modules[Q0][2:] == [16, pytest.approx(8.0 / 4)]


def test_missing_lora_alpha_defaults_like_peft(session, store, adapter):
    # PEFT's LoraConfig defaults lora_alpha to 8 whatever r is, so PEFT would scale this adapter by 8/4.
    folder = adapter(rank=4)
    edit_config(folder, drop=("lora_alpha",))
    version = register_folder(session, store, folder, "noalpha").version
    assert version.alpha == 8.0
    assert version.modules[Q0][3] == 2.0


def test_lowercase_peft_type_is_accepted(session, store, adapter):
    folder = adapter(extra_config={"peft_type": "lora"})
    assert register_folder(session, store, folder, "low").created


# -- accepted folders: storage and versions ---------------------------------------------------------------


def test_artifact_is_stored_content_addressed(session, store, adapter):
    folder = adapter()
    data = (folder / WEIGHTS).read_bytes()
    version = register_folder(session, store, folder, "code").version
    sha = hashlib.sha256(data).hexdigest()
    assert version.artifact_key == f"objects/{sha[:2]}/{sha}.safetensors"
    assert store.path(version.artifact_key).read_bytes() == data
    assert stored_files(store) == [store.path(version.artifact_key)]
    with safe_open(str(store.path(version.artifact_key)), framework="pt") as handle:
        assert f"{Q0}.lora_A.weight" in set(handle.keys())


def test_same_bytes_under_two_names_are_stored_once(session, store, adapter):
    folder = adapter(seed=3)
    first = register_folder(session, store, folder, "code").version
    second = register_folder(session, store, folder, "code-copy").version
    assert first.id != second.id
    assert first.adapter.name == "code" and second.adapter.name == "code-copy"
    assert first.sha256 == second.sha256
    assert first.artifact_key == second.artifact_key
    assert stored_files(store) == [store.path(first.artifact_key)]


def test_reregistering_identical_content_returns_the_existing_version(session, store, adapter):
    folder = adapter(seed=1)
    first = register_folder(session, store, folder, "code")
    # a byte-identical copy in another folder is the same content
    again = register_folder(session, store, adapter(seed=1), "code", tags=["extra"])
    assert first.created and not again.created
    assert again.version.id == first.version.id
    assert again.version.number == 1
    assert row_counts(session)[1] == 1
    assert len(stored_files(store)) == 1

    changed = register_folder(session, store, adapter(seed=2), "code")
    assert changed.created
    assert changed.version.number == 2
    assert changed.version.sha256 != first.version.sha256
    assert len(stored_files(store)) == 2
    assert row_counts(session)[1] == 2


def test_same_weights_with_a_different_config_is_a_new_version(session, store, adapter):
    folder = adapter(seed=1, alpha=8.0)
    first = register_folder(session, store, folder, "code").version
    edit_config(folder, lora_alpha=4.0)
    second = register_folder(session, store, folder, "code")
    assert second.created
    assert second.version.number == 2
    assert second.version.sha256 == first.sha256
    assert second.version.modules[Q0][3] == 1.0  # 4 / 4
    assert len(stored_files(store)) == 1  # the same bytes are still stored once


def test_different_base_model_under_the_same_name_is_a_conflict(session, store, adapter):
    first = register_folder(session, store, adapter(seed=1), "code").version
    before = row_counts(session)
    with pytest.raises(Conflict) as info:
        register_folder(session, store, adapter(seed=2, base_model="other/base"), "code")
    assert info.value.code == "conflict"
    assert "other/base" in info.value.message and BASE in info.value.message
    assert row_counts(session) == before
    assert stored_files(store) == [store.path(first.artifact_key)]
