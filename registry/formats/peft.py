"""The PEFT LoRA folder format: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`inspect_peft_folder` validates a folder completely and returns the facts the registry stores.
Every refusal is an :class:`InvalidAdapter` with a one-line message that says how to fix it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import InvalidAdapter
from registry.formats.safetensors_file import DTYPE_BYTES, SafetensorsHeader, count_nonfinite, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Tensors that belong to LoRA variants we register but cannot merge yet (the compiler refuses them).
_VARIANT_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".lora_B.bias")


CONV_1X1 = (1, 1)
"""The only convolution kernel whose LoRA Graft merges: ΔW of a 1×1 Conv2d is the 2-D product, reshaped."""


@dataclass(frozen=True)
class ModuleFacts:
    """One LoRA module: ΔW = scale · B @ A with B of shape (out, rank) and A of shape (rank, in).

    ``kernel`` is None for a Linear layer (2-D factors) and ``(1, 1)`` for a Conv2d with a 1×1 kernel, whose
    factors are stored 4-D, A as (rank, in, 1, 1) and B as (out, rank, 1, 1): ΔW[out, in, 1, 1] is then
    ``scale · B.view(out, rank) @ A.view(rank, in)``, so every merge works on the 2-D views.
    """

    out_features: int
    in_features: int
    rank: int
    scale: float
    kernel: tuple[int, int] | None = None

    def as_row(self) -> list[float | int]:
        """``[out, in, rank, scale]``, followed by ``kh, kw`` for a conv module (the version's ``modules`` JSON)."""
        row: list[float | int] = [self.out_features, self.in_features, self.rank, self.scale]
        if self.kernel is not None:
            row.extend(self.kernel)
        return row

    @classmethod
    def from_row(cls, row: Sequence[float | int]) -> ModuleFacts:
        """The inverse of :meth:`as_row`; rows without a kernel (all rows before conv support) are Linear."""
        return cls(int(row[0]), int(row[1]), int(row[2]), float(row[3]), row_kernel(row))


def row_kernel(row: Sequence[float | int]) -> tuple[int, int] | None:
    """The kernel a stored module row records: ``(kh, kw)`` for a conv module, None for a Linear one."""
    return (int(row[4]), int(row[5])) if len(row) > 4 else None


def factor_kernel(
    module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], names: tuple[str, str] = ("lora_A", "lora_B")
) -> tuple[int, int] | None:
    """Check the factors' layouts: None for 2-D (Linear) factors, ``(1, 1)`` for a 1×1 Conv2d's 4-D ones.

    Raises :class:`InvalidAdapter` for anything else: a larger kernel, mixed 2-D/4-D factors, a B factor that
    is not (out, rank, 1, 1), other dimensionalities (Conv1d/Conv3d LoRA, 1-D tensors). ``names`` are the
    factors' names in the file (``lora_down``/``lora_up`` for kohya), for the messages.
    """
    a_name, b_name = names
    if len(a_shape) == 2 and len(b_shape) == 2:
        return None
    if len(a_shape) == 4 and (a_shape[2], a_shape[3]) != CONV_1X1:
        kh, kw = a_shape[2], a_shape[3]
        raise InvalidAdapter(
            f"module {module!r}: conv LoRA with a {kh}×{kw} kernel is not supported yet; only 1×1 kernels "
            f"(export the LoRA without its {kh}×{kw} conv layers)"
        )
    if len(a_shape) == 4 and len(b_shape) == 4 and (b_shape[2], b_shape[3]) == CONV_1X1:
        return CONV_1X1
    raise InvalidAdapter(
        f"module {module!r}: {a_name} is {list(a_shape)} and {b_name} is {list(b_shape)}; LoRA factors must be 2-D "
        f"(Linear), or 4-D with a 1×1 kernel (Conv2d: {a_name} (rank, in, 1, 1), {b_name} (out, rank, 1, 1))"
    )


@dataclass(frozen=True)
class AdapterFacts:
    """What a validated PEFT folder holds."""

    base_model: str
    base_revision: str | None
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: dict[str, ModuleFacts]
    dtype: str
    config: dict[str, Any]
    weights_path: Path
    size_bytes: int
    variants: list[str] = field(default_factory=list)


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches a suffix of the name.

    Mirrors ``peft.utils.other.get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)``.
    """
    name = module.removeprefix(PEFT_PREFIX)
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            raise InvalidAdapter(f"{CONFIG_FILE}: pattern key {key!r} is not a valid regular expression") from None
    return default


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The factor PEFT multiplies B @ A by: alpha/r, or alpha/√r under rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InvalidAdapter(f"{folder} has no {CONFIG_FILE}; a PEFT adapter folder needs one")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InvalidAdapter(f"{CONFIG_FILE} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    if _holds_nul(config):  # neither text nor JSON columns can store one (PostgreSQL refuses "\u0000")
        raise InvalidAdapter(
            f"{CONFIG_FILE} contains a NUL character (\\u0000) in a key or a string, which cannot be stored; "
            "remove it"
        )
    return config


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


def _number(config: dict[str, Any], key: str, default: float | None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidAdapter(f"{CONFIG_FILE}: {key} must be a positive number, got {value!r}")
    return float(value)


def _pattern(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in value.values()
    ):
        raise InvalidAdapter(f"{CONFIG_FILE}: {key} must be an object mapping module patterns to positive numbers")
    return value


def _find_weights(folder: Path) -> Path:
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        return weights
    for pickle_name in PICKLE_FILES:
        if (folder / pickle_name).is_file():
            raise InvalidAdapter(
                f"{pickle_name} is a pickle file, which can run code when loaded, so Graft refuses it; convert it "
                f'with: python -c "import torch; from safetensors.torch import save_file; '
                f"save_file(torch.load('{pickle_name}', weights_only=True), '{WEIGHTS_FILE}')\""
            )
    raise InvalidAdapter(f"{folder} has no {WEIGHTS_FILE}")


def _check_config(config: dict[str, Any], base_model_override: str | None) -> tuple[str, bool]:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise InvalidAdapter(
            f'unknown peft_type {peft_type!r} in {CONFIG_FILE}; Graft registers LoRA adapters (peft_type "LORA")'
        )
    base_model = base_model_override or config.get("base_model_name_or_path")
    if not isinstance(base_model, str) or not base_model.strip():
        raise InvalidAdapter(f"no base model named: set base_model_name_or_path in {CONFIG_FILE} or pass --base-model")
    use_rslora = bool(config.get("use_rslora", False))
    return base_model.strip(), use_rslora


def _collect_factors(header: SafetensorsHeader) -> tuple[dict[str, dict[str, tuple[int, ...]]], list[str]]:
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    variants: set[str] = set()
    for name, info in header.tensors.items():
        if info.dtype not in DTYPE_BYTES:
            raise InvalidAdapter(f"tensor {name!r} has dtype {info.dtype}; Graft reads F32, F16, BF16 and F64")
        match = _FACTOR.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["which"]] = info.shape
        elif name.endswith(_VARIANT_SUFFIXES):
            variants.add("dora" if "magnitude" in name else "lora_bias")
        elif "lora_embedding_" in name:
            raise InvalidAdapter(
                f"tensor {name!r} is a LoRA embedding factor; embedding adapters are not supported yet"
            )
        else:
            raise InvalidAdapter(
                f"tensor {name!r} is not a LoRA factor (expected '<module>.lora_A.weight' / "
                "'<module>.lora_B.weight'); modules_to_save and full weights are not supported yet"
            )
    return factors, sorted(variants)


def inspect_peft_folder(folder: Path, base_model_override: str | None = None) -> AdapterFacts:
    """Validate a PEFT LoRA folder and describe it; raise :class:`InvalidAdapter` on the first problem."""
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder; point at a PEFT adapter folder")
    config = _load_config(folder)
    base_model, use_rslora = _check_config(config, base_model_override)
    weights = _find_weights(folder)
    rank = int(_number(config, "r", 8))
    alpha = _number(config, "lora_alpha", 8)  # PEFT's LoraConfig default, whatever r is
    rank_pattern, alpha_pattern = _pattern(config, "rank_pattern"), _pattern(config, "alpha_pattern")

    header = read_header(weights)
    factors, variants = _collect_factors(header)
    variants = sorted(set(variants) | {flag for flag in ("use_dora", "lora_bias") if config.get(flag)})
    variants = sorted({"dora" if v == "use_dora" else v for v in variants})
    if not factors:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA factors ('<module>.lora_A.weight')")

    modules: dict[str, ModuleFacts] = {}
    for module in sorted(factors):
        pair = factors[module]
        for which, other in (("A", "B"), ("B", "A")):
            if which in pair and other not in pair:
                raise InvalidAdapter(f"module {module!r} has lora_{which} but no lora_{other}; the file is incomplete")
        a_shape, b_shape = pair["A"], pair["B"]
        kernel = factor_kernel(module, a_shape, b_shape)
        expected = int(pattern_value(rank_pattern, module, rank))
        if a_shape[0] != expected or b_shape[1] != expected:
            raise InvalidAdapter(
                f"module {module!r}: lora_A is {list(a_shape)} and lora_B is {list(b_shape)}, but the config says "
                f"rank {expected} (r / rank_pattern); fix adapter_config.json or the weights"
            )
        module_alpha = float(pattern_value(alpha_pattern, module, alpha))
        scale = lora_scale(module_alpha, expected, use_rslora)
        modules[module] = ModuleFacts(b_shape[0], a_shape[1], expected, scale, kernel)

    for info in header.tensors.values():
        bad = count_nonfinite(weights, info)
        if bad:
            raise InvalidAdapter(f"tensor {info.name!r} has {bad} NaN/Inf value(s); the adapter is corrupt")

    dtypes = {info.dtype for info in header.tensors.values()}
    # The module kinds present (q_proj, v_proj, …), read off the tensors: configs may name targets as a regex,
    # "all-linear" or full paths, and what the file holds is what counts.
    target_list = sorted({m.rsplit(".", 1)[-1] for m in modules})
    revision = config.get("revision")
    return AdapterFacts(
        base_model=base_model,
        base_revision=str(revision) if revision else None,
        rank=max(m.rank for m in modules.values()),
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=target_list,
        modules=modules,
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        config=config,
        weights_path=weights,
        size_bytes=weights.stat().st_size,
        variants=variants,
    )
