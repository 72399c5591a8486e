"""The ``adapter_config.json`` Graft writes: alpha = r everywhere, so PEFT's scale is exactly 1."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

PEFT_PREFIX = "base_model.model."


def peft_config(base_model: str, task_type: str | None, ranks: dict[str, int]) -> dict[str, Any]:
    """A LoRA config for modules with these ranks.

    The most common rank becomes ``r``; other modules get ``rank_pattern``/``alpha_pattern`` entries keyed
    by their escaped full name (PEFT treats keys as regular expressions matched against name suffixes).
    ``target_modules`` lists the exact module names: suffixes such as ``q_proj`` would make PEFT wrap every
    layer's ``q_proj`` (and warn about missing keys) when a result covers only some layers, e.g. after
    ``select(x, layers="0-15")``.
    """
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {
        re.escape(module.removeprefix(PEFT_PREFIX)): rank for module, rank in sorted(ranks.items()) if rank != common
    }
    targets = sorted(module.removeprefix(PEFT_PREFIX) for module in ranks)
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "task_type": task_type,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
