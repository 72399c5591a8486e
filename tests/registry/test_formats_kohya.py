"""Kohya / diffusers single-file LoRAs: refusals, lossless conversion to PEFT, dedupe, merging, export, PEFT loading.

Every file here is a real safetensors file written with ``safetensors.torch``; registration goes through
``register_folder`` on both database backends, merges through the real pipeline, and the PEFT check loads the
converted folder with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.merges import submit_merge
from registry import repositories as repo
from registry.artifacts import ArtifactStore, sha256_file
from registry.db import session_scope
from registry.errors import InvalidAdapter
from registry.formats.kohya import (
    convert_kohya_to_peft,
    find_kohya_file,
    inspect_kohya_file,
    is_kohya_file,
    kohya_stem,
    pattern_keys,
    write_kohya_file,
)
from registry.formats.peft import inspect_peft_folder, pattern_value
from registry.models import Adapter, AdapterVersion, BaseModel
from registry.services.adapters import describe_version, register_folder
from registry.settings import Settings
from workers.pipeline import run_merge_job

BASE = "stabilityai/sd-tiny"
PREFIX = "base_model.model."
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
OUT = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
# stem → (out_features, in_features, rank, alpha or None for "no alpha tensor")
MIXED: dict[str, tuple[int, int, int, float | None]] = {
    Q: (32, 24, 4, 2.0),
    K: (32, 24, 4, 4.0),
    OUT: (24, 32, 8, None),
    TE: (16, 16, 2, 1.5),
}
DIFFUSERS_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
DIFFUSERS_TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


# -- helpers -----------------------------------------------------------------------------------------


def write_kohya(
    path: Path,
    modules: dict[str, tuple[int, int, int, float | None]],
    *,
    style: str = "kohya",
    dtype: torch.dtype = torch.float32,
    alpha_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    conv: Collection[str] = (),
) -> Path:
    """A kohya (``.lora_down.weight``) or diffusers (``.lora.down.weight``) file with random factors.

    Stems in ``conv`` are LoRAs on a 1×1 Conv2d: the same values, stored (rank, in, 1, 1) and (out, rank, 1, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    down, up = (
        (".lora_down.weight", ".lora_up.weight") if style == "kohya" else (".lora.down.weight", ".lora.up.weight")
    )
    tensors: dict[str, torch.Tensor] = {}
    for stem, (out_f, in_f, rank, alpha) in modules.items():
        tensors[stem + down] = (torch.randn(rank, in_f, generator=generator) / in_f**0.5).to(dtype)
        tensors[stem + up] = (torch.randn(out_f, rank, generator=generator) * 0.05).to(dtype)
        if stem in conv:
            tensors[stem + down], tensors[stem + up] = (
                tensors[stem + down][..., None, None],
                tensors[stem + up][..., None, None],
            )
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha/rank) · up @ down of every module of a kohya/diffusers file, in float64 (2-D for 1×1 convs)."""
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        tensors = {n: handle.get_tensor(n) for n in names}
    deltas = {}
    for name in names:
        for down_suffix, up_suffix in (
            (".lora_down.weight", ".lora_up.weight"),
            (".lora.down.weight", ".lora.up.weight"),
        ):
            if name.endswith(down_suffix):
                stem = name.removesuffix(down_suffix)
                down, up = tensors[name].double().flatten(1), tensors[stem + up_suffix].double().flatten(1)
                alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else down.shape[0]
                deltas[stem] = alpha / down.shape[0] * (up @ down)
    return deltas


def peft_deltas(weights: Path, modules: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
    """ΔW = scale · B @ A of every module of a stored PEFT artifact (scales from the version's facts; 2-D for 1×1
    convs)."""
    with safe_open(str(weights), framework="pt") as handle:
        return {
            module: row[3]
            * (
                handle.get_tensor(f"{module}.lora_B.weight").double().flatten(1)
                @ handle.get_tensor(f"{module}.lora_A.weight").double().flatten(1)
            )
            for module, row in modules.items()
        }


def assert_same_deltas(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, delta in expected.items():
        error = float((got[name] - delta).norm() / delta.norm())
        assert error < 1e-6, (name, error)


def row_counts(session: Session) -> tuple[int, ...]:
    return tuple(
        session.scalar(select(func.count()).select_from(model)) or 0 for model in (Adapter, AdapterVersion, BaseModel)
    )


def stored_files(store: ArtifactStore) -> list[Path]:
    return sorted(p for p in store.root.rglob("*") if p.is_file()) if store.root.exists() else []


def register(session: Session, store: ArtifactStore, path: Path, name: str = "style", **kwargs: Any):  # type: ignore[no-untyped-def]
    kwargs.setdefault("base_model", BASE)
    return register_folder(session, store, path, name, **kwargs)


@pytest.fixture
def kohya_file(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(modules: dict[str, tuple[int, int, int, float | None]] | None = None, **kwargs: Any) -> Path:
        return write_kohya(tmp_path / "in" / f"lora{next(counter)}.safetensors", modules or MIXED, **kwargs)

    return make


# -- refusals ----------------------------------------------------------------------------------------


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.pop(key)


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, value)


def _poison(key: str, value: float, dtype: torch.dtype = torch.float32) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensor = tensors[key].to(dtype).clone()
        tensor[0, 0] = value
        tensors[key] = tensor

    return edit


REFUSALS: list[tuple[str, Callable[[dict[str, torch.Tensor]], None], str]] = [
    ("down without up", _drop(f"{Q}.lora_up.weight"), f"module '{Q}' has lora_down but no lora_up"),
    ("up without down", _drop(f"{K}.lora_down.weight"), f"module '{K}' has lora_up but no lora_down"),
    (
        "alpha without factors",
        _set("lora_unet_mid_block_attn1_to_v.alpha", torch.tensor(4.0)),
        "module 'lora_unet_mid_block_attn1_to_v' has an alpha but no lora_down/lora_up factors",
    ),
    (
        "conv 3x3",
        _set(f"{Q}.lora_down.weight", torch.randn(4, 24, 3, 3)),
        f"module '{Q}': conv LoRA with a 3×3 kernel is not supported yet; only 1×1 kernels",
    ),
    (
        "conv 1x1 down, 2-D up",
        _set(f"{Q}.lora_down.weight", torch.randn(4, 24, 1, 1)),
        "or 4-D with a 1×1 kernel (Conv2d: lora_down (rank, in, 1, 1), lora_up (out, rank, 1, 1))",
    ),
    ("3-D factor", _set(f"{Q}.lora_down.weight", torch.randn(4, 24, 1)), "LoRA factors must be 2-D (Linear)"),
    ("rank mismatch", _set(f"{Q}.lora_up.weight", torch.randn(32, 5)), "(rank 4) but lora_up is [32, 5] (rank 5)"),
    ("NaN", _poison(f"{Q}.lora_down.weight", float("nan")), f"tensor '{Q}.lora_down.weight' has 1 NaN/Inf value(s)"),
    (
        "Inf in bf16",
        _poison(f"{K}.lora_up.weight", float("inf"), torch.bfloat16),
        f"tensor '{K}.lora_up.weight' has 1 NaN/Inf value(s)",
    ),
    ("LoHa", _set(f"{Q}.hada_w1_a", torch.randn(4, 4)), "LyCORIS LoHa network; LoHa/LoKr/full-diff"),
    ("LoKr", _set(f"{Q}.lokr_w1", torch.randn(4, 4)), "LyCORIS LoKr network; LoHa/LoKr/full-diff"),
    ("full diff", _set(f"{Q}.diff", torch.randn(32, 24)), "LyCORIS full-diff network; LoHa/LoKr/full-diff"),
    ("DoRA", _set(f"{Q}.dora_scale", torch.randn(1, 24)), "LyCORIS DoRA network"),
    ("negative alpha", _set(f"{Q}.alpha", torch.tensor(-2.0)), f"module '{Q}': alpha must be a finite positive scalar"),
    ("zero alpha", _set(f"{Q}.alpha", torch.tensor(0.0)), "alpha must be a finite positive scalar, got 0.0"),
    ("NaN alpha", _set(f"{Q}.alpha", torch.tensor(float("nan"), dtype=torch.float16)), "got nan"),
    ("vector alpha", _set(f"{Q}.alpha", torch.tensor([1.0, 2.0])), "got a F32 tensor of shape [2]"),
    ("unknown tensor", _set("lora_unet_conv_in.weight", torch.randn(2, 2)), "is not a LoRA tensor"),
    (
        "two spellings",
        _set(f"{Q}.lora.down.weight", torch.randn(4, 24)),
        "two down tensors (both the kohya '.lora_down' and the diffusers '.lora.down' spelling)",
    ),
]


@pytest.mark.parametrize(("edit", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_problem_and_register_nothing(
    session: Session, store: ArtifactStore, kohya_file: Callable[..., Path], edit: Callable[..., None], message: str
) -> None:
    path = kohya_file()
    with safe_open(str(path), framework="pt") as handle:
        tensors = {n: handle.get_tensor(n) for n in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    edit(tensors)
    save_file(tensors, str(path))
    before = row_counts(session)
    with pytest.raises(InvalidAdapter) as caught:
        register(session, store, path)
    assert message in caught.value.message
    assert "\n" not in caught.value.message
    assert caught.value.code == "invalid_adapter"
    assert row_counts(session) == before
    assert stored_files(store) == []


def test_no_base_model_says_to_pass_one(
    session: Session, store: ArtifactStore, kohya_file: Callable[..., Path]
) -> None:
    path = kohya_file(metadata={"ss_network_dim": "4"})
    with pytest.raises(InvalidAdapter, match=r"no base model named.*pass --base-model"):
        register(session, store, path, base_model=None)
    assert row_counts(session) == (0, 0, 0)
    assert stored_files(store) == []


def test_pickles_and_empty_files_are_refused(tmp_path: Path, session: Session, store: ArtifactStore) -> None:
    ckpt = tmp_path / "lora.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InvalidAdapter, match=r"lora.ckpt is not a .safetensors file \(a pickle"):
        register(session, store, ckpt)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(InvalidAdapter, match="holds no LoRA factors"):
        register(session, store, empty)
    assert row_counts(session) == (0, 0, 0)


# -- base model from metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "override", "expected"),
    [
        (
            {"ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_base_model_version": "sd_v1"},
            None,
            "v1-5-pruned-emaonly.safetensors",
        ),
        ({"ss_base_model_version": "sdxl_base_v1-0"}, None, "sdxl_base_v1-0"),
        ({"ss_sd_model_name": "v1-5.ckpt"}, "runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    ],
)
def test_base_model_comes_from_the_override_or_the_metadata(
    kohya_file: Callable[..., Path], metadata: dict[str, str], override: str | None, expected: str
) -> None:
    assert inspect_kohya_file(kohya_file(metadata=metadata), override).base_model == expected


# -- conversion --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_conversion_is_lossless_with_mixed_ranks_and_per_module_alpha(
    session: Session, store: ArtifactStore, kohya_file: Callable[..., Path], dtype: torch.dtype
) -> None:
    path = kohya_file(
        dtype=dtype, alpha_dtype=torch.float16, metadata={"ss_network_dim": "4", "ss_tag_frequency": "{}"}
    )
    result = register(session, store, path)
    version = result.version
    assert result.created
    assert version.source == "upload:kohya" and describe_version(version)["source"] == "upload:kohya"
    assert version.format == "peft"
    assert version.base_model.name == BASE
    assert version.dtype == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert version.rank == 8
    expected_scales = {
        stem: (alpha if alpha is not None else rank) / rank for stem, (_, _, rank, alpha) in MIXED.items()
    }
    assert {m.removeprefix(PREFIX): (row[2], row[3]) for m, row in version.modules.items()} == {
        stem: (MIXED[stem][2], scale) for stem, scale in expected_scales.items()
    }
    config = version.peft_config
    assert (config["r"], config["target_modules"]) == (4, sorted(MIXED))
    assert config["rank_pattern"] == {OUT: 8, TE: 2}
    # ΔW of every module, from the stored PEFT artifact, is the kohya file's.
    artifact = store.path(version.artifact_key)
    assert_same_deltas(
        {m.removeprefix(PREFIX): d for m, d in peft_deltas(artifact, version.modules).items()}, kohya_deltas(path)
    )
    # The factors are the same bytes in the same dtype, and the provenance is recorded.
    with safe_open(str(artifact), framework="pt") as stored, safe_open(str(path), framework="pt") as source:
        for stem in MIXED:
            for kohya, peft in (("lora_down", "lora_A"), ("lora_up", "lora_B")):
                a, b = stored.get_tensor(f"{PREFIX}{stem}.{peft}.weight"), source.get_tensor(f"{stem}.{kohya}.weight")
                assert a.dtype == b.dtype == dtype and torch.equal(a, b)
        metadata = stored.metadata()
    assert metadata["graft.source_format"] == "kohya"
    assert metadata["graft.source_sha256"] == sha256_file(path)
    assert metadata["ss_network_dim"] == "4" and "ss_tag_frequency" not in metadata


def test_diffusers_stems_keep_their_dots(tmp_path: Path, kohya_file: Callable[..., Path]) -> None:
    modules = {DIFFUSERS_Q: (32, 24, 4, None), DIFFUSERS_TE: (16, 16, 2, 4.0)}
    path = kohya_file(modules, style="diffusers")
    assert is_kohya_file(path)
    assert inspect_kohya_file(path, BASE).style == "diffusers"
    folder = convert_kohya_to_peft(path, tmp_path / "peft", BASE)
    facts = inspect_peft_folder(folder)
    assert sorted(facts.modules) == [PREFIX + DIFFUSERS_TE, PREFIX + DIFFUSERS_Q]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == [DIFFUSERS_TE, DIFFUSERS_Q]
    assert config["rank_pattern"] == {r"text_encoder\.text_model\.encoder\.layers\.0\.self_attn\.q_proj": 2}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["graft.source_format"] == "diffusers"
    assert_same_deltas(
        {
            m.removeprefix(PREFIX): d
            for m, d in peft_deltas(facts.weights_path, {m: f.as_row() for m, f in facts.modules.items()}).items()
        },
        kohya_deltas(path),
    )


def test_pattern_keys_match_exactly_one_module_in_any_order() -> None:
    # "attn1.to_q" is a dotted suffix of two other stems: an escaped stem alone would match them too.
    stems = ["unet.a.attn1.to_q", "text_encoder.attn1.to_q", "attn1.to_q", "unet.a.attn1.to_k"]
    keys = pattern_keys(stems)
    assert keys["unet.a.attn1.to_k"] == r"unet\.a\.attn1\.to_k"
    values = {stem: i + 1 for i, stem in enumerate(stems)}
    for order in (stems, stems[::-1]):
        pattern = {keys[s]: values[s] for s in order}
        for stem in stems:
            for prefix in ("", PREFIX, "wrapper."):
                assert pattern_value(pattern, prefix + stem, 0) == values[stem], (stem, prefix)


def test_suffix_stems_convert_and_validate(tmp_path: Path, kohya_file: Callable[..., Path]) -> None:
    modules = {"unet.attn1.to_q": (8, 8, 4, 4.0), "attn1.to_q": (8, 8, 2, 1.0), "unet.attn1.to_k": (8, 8, 4, 4.0)}
    path = kohya_file(modules, style="diffusers")
    facts = inspect_peft_folder(convert_kohya_to_peft(path, tmp_path / "peft", BASE))
    assert {m.removeprefix(PREFIX): (f.rank, f.scale) for m, f in facts.modules.items()} == {
        "unet.attn1.to_q": (4, 1.0),
        "attn1.to_q": (2, 0.5),
        "unet.attn1.to_k": (4, 1.0),
    }


def test_conversion_is_byte_identical_and_registering_again_dedupes(
    tmp_path: Path, session: Session, store: ArtifactStore, kohya_file: Callable[..., Path]
) -> None:
    path = kohya_file(dtype=torch.bfloat16)
    one, two = (convert_kohya_to_peft(path, tmp_path / name, BASE) for name in ("one", "two"))
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (one / file).read_bytes() == (two / file).read_bytes()

    first = register(session, store, path)
    again = register(session, store, path)
    assert first.created and not again.created
    assert again.version.id == first.version.id
    # The same bytes under another name, inside a folder of their own (as an HTTP upload stages them).
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "renamed.safetensors").write_bytes(path.read_bytes())
    assert find_kohya_file(folder) == folder / "renamed.safetensors"
    third = register(session, store, folder)
    assert not third.created and third.version.id == first.version.id
    assert row_counts(session) == (1, 1, 1)
    assert not any((store.root / "tmp").iterdir())  # the scratch folders are gone


def test_a_peft_folder_is_still_read_as_peft(tmp_path: Path, make_adapter: Callable[..., Path]) -> None:
    folder = make_adapter("peft")
    assert find_kohya_file(folder) is None
    assert not is_kohya_file(folder / "adapter_model.safetensors")
    # Its weights file on its own is not mistaken for a kohya file.
    with pytest.raises(InvalidAdapter, match=r"holds PEFT factors \(lora_A/lora_B\), not kohya ones"):
        inspect_kohya_file(folder / "adapter_model.safetensors", BASE)
    # Weights without their config keep the PEFT error rather than a kohya one.
    (folder / "adapter_config.json").unlink()
    assert find_kohya_file(folder) is None
    with pytest.raises(InvalidAdapter, match=r"has no adapter_config\.json"):
        inspect_peft_folder(folder)


# -- merging -----------------------------------------------------------------------------------------


def test_merging_two_kohya_adapters_gives_the_exact_delta(
    sessions: sessionmaker[Session], store: ArtifactStore, kohya_file: Callable[..., Path], tmp_path: Path
) -> None:
    a = kohya_file(seed=1)
    b = kohya_file({**MIXED, TE: (16, 16, 4, 8.0)}, seed=2, dtype=torch.float16)
    with session_scope(sessions) as session:
        register(session, store, a, "a")
        register(session, store, b, "b")
    settings = Settings(home=tmp_path / "home")
    with session_scope(sessions) as session:
        job, _plan = submit_merge(session, settings, "a - b", "a_minus_b", [])
        job_id = job.id
    outcome = run_merge_job(job_id, session_factory=sessions, store=store)
    with sessions() as session:
        version = repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id]
        merged = peft_deltas(store.path(version.artifact_key), version.modules)
        weights, config = store.path(version.artifact_key), version.peft_config
    da, db = kohya_deltas(a), kohya_deltas(b)
    expected = {s: da[s] - db[s] for s in MIXED}
    assert_same_deltas({m.removeprefix(PREFIX): d for m, d in merged.items()}, expected)
    # The merge result (alpha = r per module, ranks summed) exports to kohya with the same deltas.
    assert_same_deltas(kohya_deltas(write_kohya_file(weights, config, tmp_path / "merged.safetensors")), expected)


# -- export ------------------------------------------------------------------------------------------


def test_kohya_export_round_trips(
    session: Session, store: ArtifactStore, kohya_file: Callable[..., Path], tmp_path: Path
) -> None:
    path = kohya_file(dtype=torch.float16, metadata={"ss_sd_model_name": "v1-5.ckpt"})
    version = register(session, store, path).version
    exported = write_kohya_file(
        store.path(version.artifact_key), version.peft_config, tmp_path / "out" / "style.safetensors"
    )
    assert is_kohya_file(exported)
    facts = inspect_kohya_file(exported)
    assert facts.base_model == BASE  # written as ss_sd_model_name, so re-registering needs no --base-model
    assert {stem: (m.rank, m.scale) for stem, m in facts.modules.items()} == {
        stem: (rank, (alpha if alpha is not None else rank) / rank) for stem, (_, _, rank, alpha) in MIXED.items()
    }
    assert_same_deltas(kohya_deltas(exported), kohya_deltas(path))
    with safe_open(str(exported), framework="pt") as handle:
        assert handle.get_tensor(f"{Q}.alpha").shape == ()
        assert handle.get_tensor(f"{Q}.alpha").dtype == torch.float32
        assert handle.get_tensor(f"{Q}.lora_down.weight").dtype == torch.float16


def test_peft_adapters_export_with_their_scales(tmp_path: Path, make_adapter: Callable[..., Path]) -> None:
    """rsLoRA, rank_pattern and alpha_pattern all fold into each module's alpha; LLM names keep their dots."""
    modules = {
        f"{PREFIX}model.layers.0.self_attn.q_proj": (16, 12),
        f"{PREFIX}model.layers.0.self_attn.v_proj": (8, 12),
    }
    folder = make_adapter(
        "rs",
        modules=modules,
        rank=4,
        alpha=6.0,
        use_rslora=True,
        rank_pattern={"v_proj": 3},
        alpha_pattern={"v_proj": 5.0},
    )
    facts = inspect_peft_folder(folder)
    exported = write_kohya_file(facts.weights_path, facts.config, tmp_path / "rs.safetensors")
    again = inspect_kohya_file(exported)
    assert_same_deltas(
        {PREFIX + s: d for s, d in kohya_deltas(exported).items()},
        peft_deltas(facts.weights_path, {m: f.as_row() for m, f in facts.modules.items()}),
    )
    assert sorted(again.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_diffusers_names_export_with_kohya_prefixes(tmp_path: Path, kohya_file: Callable[..., Path]) -> None:
    path = kohya_file({DIFFUSERS_Q: (32, 24, 4, 2.0), DIFFUSERS_TE: (16, 16, 2, None)}, style="diffusers")
    facts = inspect_peft_folder(convert_kohya_to_peft(path, tmp_path / "peft", BASE))
    exported = write_kohya_file(facts.weights_path, facts.config, tmp_path / "out.safetensors")
    assert kohya_stem(PREFIX + DIFFUSERS_Q) == Q
    assert kohya_stem(PREFIX + DIFFUSERS_TE) == TE
    deltas = kohya_deltas(path)
    assert_same_deltas(kohya_deltas(exported), {Q: deltas[DIFFUSERS_Q], TE: deltas[DIFFUSERS_TE]})


# -- PEFT loads the converted folder -----------------------------------------------------------------------


class Stems(torch.nn.Module):
    """Linear layers at the given module paths (dotted paths become nested modules)."""

    def __init__(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        for path, (out_f, in_f) in shapes.items():
            parent: torch.nn.Module = self
            *parents, leaf = path.split(".")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, torch.nn.Linear(in_f, out_f))

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {path: self.get_submodule(path)(x) for path, x in inputs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_peft_loads_the_converted_folder(tmp_path: Path, kohya_file: Callable[..., Path], style: str) -> None:
    from peft import PeftModel

    if style == "kohya":
        modules = MIXED
    else:
        modules = {
            DIFFUSERS_Q: (32, 24, 4, 2.0),
            DIFFUSERS_TE: (16, 16, 2, None),
            "unet.mid_block.proj": (8, 8, 3, 6.0),
        }
    path = kohya_file(modules, style=style)
    folder = convert_kohya_to_peft(path, tmp_path / "peft", BASE)
    torch.manual_seed(0)
    base = Stems({stem: (out_f, in_f) for stem, (out_f, in_f, _, _) in modules.items()})
    inputs = {stem: torch.randn(3, in_f) for stem, (_, in_f, _, _) in modules.items()}
    deltas = kohya_deltas(path)
    with torch.no_grad():
        expected = {stem: y.double() + inputs[stem].double() @ deltas[stem].T for stem, y in base(inputs).items()}
        model = PeftModel.from_pretrained(base, str(folder))
        got = model(inputs)
    for stem in modules:
        assert hasattr(model.base_model.model.get_submodule(stem), "lora_A"), stem  # wrapped by PEFT
        assert torch.allclose(got[stem].double(), expected[stem], atol=1e-5), stem
