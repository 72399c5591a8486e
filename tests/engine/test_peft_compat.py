"""A merged adapter, exported by `graft export`, is a PEFT adapter: it loads with ``PeftModel.from_pretrained``
over a tiny randomly initialised Llama, and the logits equal those of the base model with ΔW = Σ wᵢsᵢBᵢAᵢ
(computed here from the input files) added to its weights by hand.

Everything runs through the real CLI on the embedded default (SQLite + artifacts under GRAFT_HOME), once
per test, with no network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from api.cli import app
from bench.synthetic import TINY, write_adapter
from tests.engine.test_linear_merge import expected_deltas, folder_deltas, modules_of, relative_error

PEFT_PREFIX = "base_model.model."
ATOL = 1e-5  # fp32 logits

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield


@pytest.fixture(scope="module")
def base_dir(offline: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (the shape of ``bench.synthetic.TINY``), saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=TINY.hidden,
        intermediate_size=TINY.intermediate,
        num_hidden_layers=TINY.layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim 16, so k/v project to TINY.kv_dim = 32
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    model.save_pretrained(path)
    return path


def load_base(base_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture
def graft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None) -> Callable[..., str]:
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GRAFT_DATABASE_URL", raising=False)
    monkeypatch.delenv("GRAFT_ARTIFACTS_DIR", raising=False)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, f"graft {' '.join(args)}: exit {result.exit_code}\n{result.output}"
        return result.stdout

    return run


@pytest.fixture
def adapter(tmp_path: Path, base_dir: Path) -> Callable[..., Path]:
    def make(name: str, **kwargs: Any) -> Path:
        modules = kwargs.pop("modules", None) or TINY.modules()
        return write_adapter(tmp_path / "adapters" / name, modules, base_model=str(base_dir), **kwargs)

    return make


def merge_and_export(graft: Callable[..., str], folders: dict[str, Path], expression: str, out: Path) -> None:
    for name, folder in folders.items():
        graft("register", str(folder), "--name", name)
    merged = json.loads(graft("merge", expression, "--name", "merged", "--json", "--device", "cpu"))
    assert merged["version"]["ref"] == "merged@1"
    graft("export", "merged@1", str(out))


def hand_merged(base_dir: Path, deltas: dict[str, torch.Tensor]) -> Any:
    """The base model with ΔW added to each targeted Linear's weight."""
    model = load_base(base_dir)
    with torch.no_grad():
        for module, delta in deltas.items():
            linear = model.get_submodule(module.removeprefix(PEFT_PREFIX))
            assert linear.weight.shape == delta.shape, module
            linear.weight += delta.to(torch.float32)
    return model


def logits(model: Any) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_layers(model: Any, adapter_name: str = "default") -> dict[str, Any]:
    """Every LoRA-wrapped module that carries ``adapter_name``, by its name in the adapter file."""
    from peft.tuners.lora import LoraLayer

    return {
        PEFT_PREFIX + name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def peft_delta(layer: Any, adapter_name: str = "default") -> torch.Tensor:
    b, a = layer.lora_B[adapter_name].weight, layer.lora_A[adapter_name].weight
    return (b.double() @ a.double()) * layer.scaling[adapter_name]


def check_loaded(model: Any, export: Path, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """PEFT injected exactly the exported modules, loaded their factors, at scale 1, giving ΔW."""
    from safetensors.torch import load_file

    tensors = load_file(str(export / "adapter_model.safetensors"))
    layers = lora_layers(model)
    assert set(layers) == set(expected)
    for module, layer in layers.items():
        assert torch.equal(layer.lora_A["default"].weight, tensors[f"{module}.lora_A.weight"]), module
        assert torch.equal(layer.lora_B["default"].weight, tensors[f"{module}.lora_B.weight"]), module
        assert layer.scaling["default"] == 1.0, module
        assert relative_error(peft_delta(layer), expected[module]) <= 1e-5, module
    return layers


def test_exported_merge_matches_hand_merged_base(graft, adapter, base_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    folders = {
        "a": adapter(
            "a",
            seed=1,
            rank=4,
            alpha=64,
            rank_pattern={"o_proj": 6},
            alpha_pattern={"layers.1.mlp.gate_proj": 96},
        ),
        "b": adapter(
            "b", seed=2, rank=3, alpha=40, use_rslora=True, modules=modules_of(("q_proj", "k_proj", "v_proj"))
        ),
    }
    weights = {"a": 2.0, "b": -0.5}
    export = tmp_path / "export"
    merge_and_export(graft, folders, "base + 2*a - b/2", export)
    expected = expected_deltas(folders, weights)

    model = PeftModel.from_pretrained(load_base(base_dir), str(export)).eval()
    check_loaded(model, export, expected)
    got, want = logits(model), logits(hand_merged(base_dir, expected))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # Not vacuous: the adapter moves the logits far more than the tolerance.
    assert (want - logits(load_base(base_dir))).abs().max() > 1000 * ATOL


@pytest.mark.parametrize("b_layers", [(0, 1), (0,)], ids=["q_all_layers", "q_layer0_only"])
def test_differing_ranks_per_module_use_rank_pattern(graft, adapter, base_dir, tmp_path, b_layers) -> None:  # type: ignore[no-untyped-def]
    """a targets q_proj and v_proj (r1 = 4); b targets only q_proj (r2 = 6): q_proj gets rank 10, v_proj 4."""
    from peft import PeftModel

    r1, r2 = 4, 6
    folders = {
        "a": adapter("a", seed=3, rank=r1, alpha=32, modules=modules_of(("q_proj", "v_proj"))),
        "b": adapter("b", seed=4, rank=r2, alpha=12, use_rslora=True, modules=modules_of(("q_proj",), b_layers)),
    }
    export = tmp_path / "export"
    merge_and_export(graft, folders, "0.8*a - 1.5*b", export)
    expected = expected_deltas(folders, {"a": 0.8, "b": -1.5})

    config = json.loads((export / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]

    model = PeftModel.from_pretrained(load_base(base_dir), str(export)).eval()
    layers = check_loaded(model, export, expected)
    for module, layer in layers.items():
        in_b = module.endswith("q_proj") and int(module.split(".")[4]) in b_layers
        want_rank = r1 + r2 if in_b else r1
        assert layer.r["default"] == want_rank, module
        assert layer.lora_A["default"].weight.shape == (want_rank, layer.in_features), module
    got, want = logits(model), logits(hand_merged(base_dir, expected))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (want - logits(load_base(base_dir))).abs().max() > 1000 * ATOL


def test_peft_linear_weighted_adapter_is_not_exact_but_graft_is(graft, adapter, base_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PEFT's ``combination_type="linear"`` merges A and B separately (√w each): B'A' carries the cross terms
    BₐA_b and B_bAₐ, so it is not 0.7·ΔWₐ + 0.3·ΔW_b. PEFT's own ``cat`` is exact (which also checks our
    reference), and so is Graft's merge."""
    from peft import PeftModel

    folders = {
        "a": adapter("a", seed=5, rank=4, alpha=32, modules=modules_of(("q_proj", "v_proj", "down_proj"))),
        "b": adapter("b", seed=6, rank=4, alpha=8, modules=modules_of(("q_proj", "v_proj", "down_proj"))),
    }
    weights = {"a": 0.7, "b": 0.3}
    expected = expected_deltas(folders, weights)

    peft_model = PeftModel.from_pretrained(load_base(base_dir), str(folders["a"]), adapter_name="a")
    peft_model.load_adapter(str(folders["b"]), adapter_name="b")
    for kind in ("linear", "cat"):
        peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.3], kind, combination_type=kind)
    for name, delta in folder_deltas(folders["a"]).items():  # sanity: PEFT reads the inputs as we do
        assert relative_error(peft_delta(lora_layers(peft_model, "a")[name], "a"), delta) <= 1e-6
    linear_errors = {
        m: relative_error(peft_delta(layer, "linear"), expected[m])
        for m, layer in lora_layers(peft_model, "linear").items()
    }
    cat_errors = {
        m: relative_error(peft_delta(layer, "cat"), expected[m]) for m, layer in lora_layers(peft_model, "cat").items()
    }
    assert set(linear_errors) == set(cat_errors) == set(expected)
    assert min(linear_errors.values()) > 0.1, linear_errors  # cross terms: not even close
    assert max(cat_errors.values()) <= 1e-5, cat_errors

    export = tmp_path / "export"
    merge_and_export(graft, folders, "0.7*a + 0.3*b", export)
    ours = PeftModel.from_pretrained(load_base(base_dir), str(export)).eval()
    check_loaded(ours, export, expected)  # every module within 1e-5 of Σ wᵢΔWᵢ

    want = logits(hand_merged(base_dir, expected))
    torch.testing.assert_close(logits(ours), want, atol=ATOL, rtol=0)
    peft_model.set_adapter("linear")
    peft_model.eval()
    assert (logits(peft_model) - want).abs().max() > 100 * ATOL


def _layer0_only_merge(graft, adapter, tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    folders = {
        "a": adapter("a", seed=7, rank=2, alpha=16, modules=modules_of(("q_proj", "v_proj"), (0,))),
        "b": adapter("b", seed=8, rank=5, alpha=20, modules=modules_of(("q_proj",), (0,))),
    }
    export = tmp_path / "export"
    merge_and_export(graft, folders, "a - 0.5*b", export)
    expected = expected_deltas(folders, {"a": 1.0, "b": -0.5})
    assert {int(m.split(".")[4]) for m in expected} == {0}
    return export, expected


def test_modules_missing_from_some_layers(graft, adapter, base_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The result covers q_proj/v_proj in layer 0 only; any module PEFT wraps beyond those must stay a zero
    delta (the exported target_modules name exact modules, so there should be none)."""
    from peft import PeftModel

    export, expected = _layer0_only_merge(graft, adapter, tmp_path)
    model = PeftModel.from_pretrained(load_base(base_dir), str(export)).eval()
    for module, layer in lora_layers(model).items():
        if module in expected:
            assert relative_error(peft_delta(layer), expected[module]) <= 1e-5, module
        else:
            assert torch.count_nonzero(peft_delta(layer)) == 0, module
    torch.testing.assert_close(logits(model), logits(hand_merged(base_dir, expected)), atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("error:Found missing adapter keys:UserWarning")
def test_partial_layer_result_loads_without_missing_key_warning(graft, adapter, base_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    export, expected = _layer0_only_merge(graft, adapter, tmp_path)
    model = PeftModel.from_pretrained(load_base(base_dir), str(export))
    assert set(lora_layers(model)) == set(expected)
