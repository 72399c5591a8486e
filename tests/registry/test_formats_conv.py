"""LoRA on 1×1 convolutions (SD 1.5's ``proj_in``/``proj_out``), in PEFT folders and kohya files.

PEFT's Conv2d LoRA stores ``lora_A`` as (r, in, kh, kw) and ``lora_B`` as (out, r, 1, 1); kohya stores
``lora_down`` (r, in, 1, 1) and ``lora_up`` (out, r, 1, 1). For a 1×1 kernel ΔW is the 2-D product reshaped, so
Graft registers these modules (recording the kernel in the module facts), keeps their 4-D shapes in the stored
PEFT file and in kohya exports, and refuses larger kernels with one line. Every file here is a real safetensors
file; registration goes through ``register_folder`` on both database backends.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from sqlalchemy.orm import Session, sessionmaker

from api.merges import submit_merge
from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.errors import InvalidAdapter
from registry.formats.kohya import convert_kohya_to_peft, inspect_kohya_file, write_kohya_file
from registry.formats.peft import ModuleFacts, inspect_peft_folder, row_kernel
from registry.services.adapters import register_folder
from registry.settings import Settings
from tests.registry.test_formats_kohya import (
    BASE,
    PREFIX,
    Q,
    Stems,
    assert_same_deltas,
    kohya_deltas,
    peft_deltas,
    write_kohya,
)
from tests.registry.test_ingest import MODULES, Q0, V0, assert_refused, edit_tensors
from workers.pipeline import run_merge_job

# An SD 1.5-like slice: two 1×1 convs around an attention projection.
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"
PROJ_OUT = "lora_unet_down_blocks_0_attentions_0_proj_out"
SD: dict[str, tuple[int, int, int, float | None]] = {
    PROJ_IN: (32, 32, 4, 2.0),
    PROJ_OUT: (32, 32, 8, None),
    Q: (32, 24, 4, 4.0),
}
CONV = (PROJ_IN, PROJ_OUT)
CONV_PEFT = (Q0,)  # in the PEFT folders below, q_proj of layer 0 is a 1×1 conv


def shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def register(session: Session, store: ArtifactStore, path: Path, name: str = "style", **kwargs: Any):  # type: ignore[no-untyped-def]
    kwargs.setdefault("base_model", BASE)
    return register_folder(session, store, path, name, **kwargs)


@pytest.fixture
def adapter(make_adapter: Callable[..., Path]) -> Callable[..., Path]:
    """A PEFT folder over three small modules, q_proj of layer 0 a 1×1 conv (4-D factors)."""

    def make(name: str = "a", **kwargs: Any) -> Path:
        kwargs.setdefault("modules", MODULES)
        kwargs.setdefault("rank", 4)
        kwargs.setdefault("alpha", 8.0)
        kwargs.setdefault("conv_modules", CONV_PEFT)
        return make_adapter(name, **kwargs)

    return make


# -- PEFT folders ------------------------------------------------------------------------------------


def test_a_peft_folder_with_1x1_conv_modules_registers_with_the_kernel_in_its_facts(
    session: Session, store: ArtifactStore, adapter: Callable[..., Path]
) -> None:
    folder = adapter(rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6.0})
    assert shapes(folder / "adapter_model.safetensors")[f"{Q0}.lora_A.weight"] == [4, 12, 1, 1]
    version = register_folder(session, store, folder, "conv").version
    q1 = next(m for m in MODULES if m not in (Q0, V0))
    # [out, in, rank, scale] for Linear modules, then kh, kw for a conv one
    assert version.modules == {Q0: [16, 12, 4, 2.0, 1, 1], V0: [8, 12, 2, 3.0], q1: [16, 12, 4, 2.0]}
    session.expire_all()
    assert version.modules[Q0] == [16, 12, 4, 2.0, 1, 1]  # read back from the database
    assert ModuleFacts.from_row(version.modules[Q0]) == ModuleFacts(16, 12, 4, 2.0, (1, 1))
    # the stored artifact is the upload, 4-D factors included
    assert shapes(store.path(version.artifact_key))[f"{Q0}.lora_B.weight"] == [16, 4, 1, 1]


def test_rows_without_a_kernel_are_linear() -> None:
    """Rows stored before conv support (4 elements) read back as Linear; no migration needed."""
    assert ModuleFacts.from_row([16, 12, 4, 2.0]) == ModuleFacts(16, 12, 4, 2.0)
    assert row_kernel([16, 12, 4, 2.0]) is None and row_kernel([16, 12, 4, 2.0, 1, 1]) == (1, 1)
    assert ModuleFacts(16, 12, 4, 2.0).as_row() == [16, 12, 4, 2.0]
    assert ModuleFacts(16, 12, 4, 2.0, (1, 1)).as_row() == [16, 12, 4, 2.0, 1, 1]


def _set(key: str, shape: tuple[int, ...]) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(key, torch.randn(*shape))


PEFT_REFUSALS = [
    (
        "3x3 kernel",
        _set(f"{Q0}.lora_A.weight", (4, 12, 3, 3)),
        (f"module '{Q0}': conv LoRA with a 3×3 kernel is not supported yet; only 1×1 kernels",),
    ),
    (
        "1x3 kernel",
        _set(f"{Q0}.lora_A.weight", (4, 12, 1, 3)),
        ("conv LoRA with a 1×3 kernel is not supported yet; only 1×1 kernels",),
    ),
    (
        "2-D B with a 4-D A",
        _set(f"{Q0}.lora_B.weight", (16, 4)),
        ("lora_A is [4, 12, 1, 1] and lora_B is [16, 4]", "4-D with a 1×1 kernel"),
    ),
    (
        "B with a 3x3 kernel",
        _set(f"{Q0}.lora_B.weight", (16, 4, 3, 3)),
        ("lora_B is [16, 4, 3, 3]", "lora_B (out, rank, 1, 1)"),
    ),
    ("Conv1d factors", _set(f"{Q0}.lora_A.weight", (4, 12, 1)), ("lora_A is [4, 12, 1]", "must be 2-D (Linear)")),
    ("rank mismatch", _set(f"{Q0}.lora_A.weight", (3, 12, 1, 1)), ("lora_A is [3, 12, 1, 1]", "rank 4")),
]


@pytest.mark.parametrize(("edit", "fragments"), [r[1:] for r in PEFT_REFUSALS], ids=[r[0] for r in PEFT_REFUSALS])
def test_peft_conv_factors_other_than_1x1_are_refused_with_one_line(
    session: Session,
    store: ArtifactStore,
    adapter: Callable[..., Path],
    edit: Callable[[dict[str, torch.Tensor]], None],
    fragments: tuple[str, ...],
) -> None:
    folder = adapter()
    edit_tensors(folder, edit)
    assert_refused(session, store, folder, *fragments)


# -- kohya files -------------------------------------------------------------------------------------


def test_a_kohya_file_with_1x1_convs_converts_with_its_4d_shapes(
    session: Session, store: ArtifactStore, tmp_path: Path
) -> None:
    path = write_kohya(tmp_path / "sd.safetensors", SD, conv=CONV, dtype=torch.float16)
    facts = inspect_kohya_file(path, BASE)
    assert list(facts.modules[PROJ_IN].down.shape) == [4, 32, 1, 1] and facts.modules[PROJ_OUT].rank == 8

    version = register(session, store, path).version
    assert version.source == "upload:kohya"
    assert version.modules == {
        PREFIX + PROJ_IN: [32, 32, 4, 0.5, 1, 1],
        PREFIX + PROJ_OUT: [32, 32, 8, 1.0, 1, 1],
        PREFIX + Q: [32, 24, 4, 1.0],
    }
    stored = shapes(store.path(version.artifact_key))
    assert stored[f"{PREFIX}{PROJ_IN}.lora_A.weight"] == [4, 32, 1, 1]  # PEFT's Conv2d LoRA shapes
    assert stored[f"{PREFIX}{PROJ_OUT}.lora_B.weight"] == [32, 8, 1, 1]
    assert stored[f"{PREFIX}{Q}.lora_A.weight"] == [4, 24]
    artifact = peft_deltas(store.path(version.artifact_key), version.modules)
    assert_same_deltas({m.removeprefix(PREFIX): d for m, d in artifact.items()}, kohya_deltas(path))


def test_a_kohya_locon_3x3_is_refused_with_one_line(session: Session, store: ArtifactStore, tmp_path: Path) -> None:
    conv_3x3 = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = write_kohya(
        tmp_path / "locon.safetensors",
        SD,
        conv=CONV,
        extra={
            f"{conv_3x3}.lora_down.weight": torch.randn(4, 32, 3, 3),
            f"{conv_3x3}.lora_up.weight": torch.randn(32, 4, 1, 1),
            f"{conv_3x3}.alpha": torch.tensor(4.0),
        },
    )
    with pytest.raises(InvalidAdapter) as caught:
        register(session, store, path)
    message = caught.value.message
    assert message.startswith(f"module '{conv_3x3}': conv LoRA with a 3×3 kernel is not supported yet; only 1×1")
    assert "\n" not in message


def test_kohya_1x1_round_trip(session: Session, store: ArtifactStore, tmp_path: Path) -> None:
    """kohya → PEFT (stored) → kohya gives the same tensors, bytes and shapes, and the same ΔW per module."""
    path = write_kohya(tmp_path / "sd.safetensors", SD, conv=CONV, metadata={"ss_sd_model_name": "v1-5.ckpt"})
    version = register(session, store, path).version
    exported = write_kohya_file(store.path(version.artifact_key), version.peft_config, tmp_path / "out.safetensors")
    assert shapes(exported) == shapes(path) | {f"{PROJ_OUT}.alpha": []}  # alpha is written for every module
    with safe_open(str(path), framework="pt") as source, safe_open(str(exported), framework="pt") as out:
        for stem in SD:
            for which in ("lora_down", "lora_up"):
                assert torch.equal(
                    out.get_tensor(f"{stem}.{which}.weight"), source.get_tensor(f"{stem}.{which}.weight")
                )
    assert_same_deltas(kohya_deltas(exported), kohya_deltas(path))
    again = inspect_kohya_file(exported)
    assert {s: (list(m.down.shape), m.scale) for s, m in again.modules.items()} == {
        PROJ_IN: ([4, 32, 1, 1], 0.5),
        PROJ_OUT: ([8, 32, 1, 1], 1.0),
        Q: ([4, 24], 1.0),
    }
    # and it registers again, as a conv adapter with the same facts
    assert register(session, store, exported, "again").version.modules == version.modules


def test_merged_kohya_convs_export_as_4d_kohya_factors(
    sessions: sessionmaker[Session], store: ArtifactStore, tmp_path: Path
) -> None:
    a = write_kohya(tmp_path / "a.safetensors", SD, conv=CONV, seed=1)
    b = write_kohya(tmp_path / "b.safetensors", {**SD, PROJ_IN: (32, 32, 2, 8.0)}, conv=CONV, seed=2)
    with session_scope(sessions) as session:
        register(session, store, a, "a")
        register(session, store, b, "b")
    with session_scope(sessions) as session:
        job, _plan = submit_merge(session, Settings(home=tmp_path / "home"), "a - 0.5*b", "merged", [])
        job_id = job.id
    outcome = run_merge_job(job_id, session_factory=sessions, store=store, device="cpu")
    with sessions() as session:
        version = repo.get_versions_by_ids(session, [outcome.version_id])[outcome.version_id]
        weights, config, rows = store.path(version.artifact_key), version.peft_config, dict(version.modules)
    assert rows[PREFIX + PROJ_IN][4:] == [1, 1] and rows[PREFIX + PROJ_IN][2] == 6 and len(rows[PREFIX + Q]) == 4
    da, db = kohya_deltas(a), kohya_deltas(b)
    expected = {s: da[s] - 0.5 * db[s] for s in SD}
    exported = write_kohya_file(weights, config, tmp_path / "merged.safetensors")
    assert shapes(exported)[f"{PROJ_IN}.lora_down.weight"] == [6, 32, 1, 1]
    assert shapes(exported)[f"{PROJ_IN}.lora_up.weight"] == [32, 6, 1, 1]
    assert shapes(exported)[f"{Q}.lora_down.weight"] == [8, 24]
    assert_same_deltas(kohya_deltas(exported), expected)


# -- PEFT loads a converted folder onto the Conv2d --------------------------------------------------------


class ConvStems(Stems):
    """``Stems`` with the named paths as 1×1 Conv2d layers instead of Linear ones."""

    def __init__(self, shapes: dict[str, tuple[int, int]], conv: tuple[str, ...]) -> None:
        super().__init__(shapes)
        for path in conv:
            out_f, in_f = shapes[path]
            parent_path, _, leaf = path.rpartition(".")
            parent = self.get_submodule(parent_path) if parent_path else self
            parent.add_module(leaf, torch.nn.Conv2d(in_f, out_f, 1))


@pytest.mark.slow
def test_peft_loads_a_converted_1x1_conv_folder(tmp_path: Path) -> None:
    from peft import PeftModel

    path = write_kohya(tmp_path / "sd.safetensors", SD, conv=CONV, seed=3)
    folder = convert_kohya_to_peft(path, tmp_path / "peft", BASE)
    kernels = {name: m.kernel for name, m in inspect_peft_folder(folder).modules.items()}
    assert kernels == {PREFIX + PROJ_IN: (1, 1), PREFIX + PROJ_OUT: (1, 1), PREFIX + Q: None}
    torch.manual_seed(0)
    base = ConvStems({stem: (out_f, in_f) for stem, (out_f, in_f, _, _) in SD.items()}, CONV)
    inputs = {
        stem: torch.randn(2, in_f, 5, 5) if stem in CONV else torch.randn(3, in_f)
        for stem, (_, in_f, _, _) in SD.items()
    }
    deltas = kohya_deltas(path)
    with torch.no_grad():
        expected = {}
        for stem, module in ((s, base.get_submodule(s)) for s in SD):
            weight = module.weight.double() + deltas[stem].reshape(module.weight.shape)
            x = inputs[stem].double()
            if stem in CONV:
                expected[stem] = torch.nn.functional.conv2d(x, weight, module.bias.double())
            else:
                expected[stem] = torch.nn.functional.linear(x, weight, module.bias.double())
        model = PeftModel.from_pretrained(base, str(folder))
        got = model(inputs)
    for stem in SD:
        assert hasattr(model.base_model.model.get_submodule(stem), "lora_A"), stem  # wrapped by PEFT
        assert torch.allclose(got[stem].double(), expected[stem], atol=1e-5), stem
