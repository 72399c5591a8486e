"""Synthetic PEFT LoRA adapters with Llama-shaped modules, seeded and reproducible.

Used by ``make demo``, the benchmarks and the tests. Usage::

    python -m bench.synthetic demo OUT_DIR     # writes OUT_DIR/{code,math,toxic}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made, so the shapes load without it
    import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int
    base_model: str

    def modules(self, projections: tuple[str, ...] = PROJECTIONS) -> dict[str, tuple[int, int]]:
        """PEFT module name → (out_features, in_features)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        shapes = {
            "q_proj": ("self_attn", h, h),
            "k_proj": ("self_attn", kv, h),
            "v_proj": ("self_attn", kv, h),
            "o_proj": ("self_attn", h, h),
            "gate_proj": ("mlp", i, h),
            "up_proj": ("mlp", i, h),
            "down_proj": ("mlp", h, i),
        }
        result = {}
        for layer in range(self.layers):
            for proj in projections:
                block, out_f, in_f = shapes[proj]
                result[f"base_model.model.model.layers.{layer}.{block}.{proj}"] = (out_f, in_f)
        return result


TINY = LlamaShape(hidden=64, intermediate=128, layers=2, kv_dim=32, base_model="graft-demo/tiny-llama")
LLAMA2_7B = LlamaShape(hidden=4096, intermediate=11008, layers=32, kv_dim=4096, base_model="meta-llama/Llama-2-7b-hf")
TINYLLAMA = LlamaShape(hidden=2048, intermediate=5632, layers=22, kv_dim=256, base_model="TinyLlama/TinyLlama-1.1B")


def write_adapter(
    folder: Path,
    modules: dict[str, tuple[int, int]],
    *,
    base_model: str,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    extra_config: dict[str, object] | None = None,
    conv_modules: Collection[str] = (),
) -> Path:
    """Write a PEFT LoRA folder with random (non-zero) A and B factors. Returns the folder.

    Modules named in ``conv_modules`` are LoRAs on a 1×1 Conv2d: the same values, stored 4-D as PEFT stores
    them, A as (r, in, 1, 1) and B as (out, r, 1, 1).
    """
    import torch
    from safetensors.torch import save_file

    from registry.formats.peft import pattern_value  # the same lookup PEFT does

    dtype = dtype or torch.float32

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in modules.items():
        r = int(pattern_value(rank_pattern or {}, name, rank))
        tensors[f"{name}.lora_A.weight"] = (torch.randn(r, in_f, generator=generator) / in_f**0.5).to(dtype)
        tensors[f"{name}.lora_B.weight"] = (torch.randn(out_f, r, generator=generator) * 0.02).to(dtype)
        if name in conv_modules:
            for which in "AB":
                tensors[f"{name}.lora_{which}.weight"] = tensors[f"{name}.lora_{which}.weight"][:, :, None, None]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config: dict[str, object] = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "use_rslora": use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    config.update(extra_config or {})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def write_demo_adapters(root: Path) -> list[Path]:
    """The demo's three adapters over a tiny Llama shape: code, math and toxic."""
    modules = TINY.modules()
    return [
        write_adapter(root / name, modules, base_model=TINY.base_model, rank=8, alpha=16, seed=seed)
        for seed, name in enumerate(("code", "math", "toxic"), start=1)
    ]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "demo":
        sys.exit("usage: python -m bench.synthetic demo OUT_DIR")
    for path in write_demo_adapters(Path(sys.argv[2])):
        print(f"wrote {path}")
