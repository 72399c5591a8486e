"""Single-file LoRAs in the kohya-ss and (older) diffusers layouts: detect, validate, convert, export.

A kohya file holds, for each module ("stem"), ``<stem>.lora_down.weight`` (rank × in), ``<stem>.lora_up.weight``
(out × rank) and optionally a scalar ``<stem>.alpha``; ΔW = (alpha/rank) · up @ down, and alpha defaults to the
rank (scale 1). A module on a 1×1 Conv2d has 4-D factors, (rank, in, 1, 1) and (out, rank, 1, 1), converted with
their shapes (PEFT's Conv2d LoRA stores them so); conv LoRA with a larger kernel (LoCon) is refused.
Kohya stems are flat (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``); the diffusers layout uses dotted stems and
``<stem>.lora.down.weight`` / ``<stem>.lora.up.weight``
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight``).

Graft stores every adapter as a PEFT folder, so a kohya file is converted before it is registered
(:func:`convert_kohya_to_peft`): down becomes ``base_model.model.<stem>.lora_A.weight`` and up ``…lora_B.weight``,
bytes and dtype unchanged, and ``adapter_config.json`` reproduces every module's rank and alpha exactly. The
converted folder then goes through :func:`registry.formats.peft.inspect_peft_folder` like any upload. The
conversion is a pure function of the file's bytes (and the base model), so registering a file twice stores the
same artifact. :func:`write_kohya_file` goes the other way, for ``graft export --format kohya``.

Everything here reads safetensors headers and raw bytes only (no torch), so every dtype, bf16 included, passes
through unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from registry.artifacts import sha256_file
from registry.errors import InvalidAdapter, NotSupported
from registry.formats.peft import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, factor_kernel, lora_scale, pattern_value
from registry.formats.safetensors_file import (
    DTYPE_BYTES,
    SafetensorsHeader,
    TensorInfo,
    TensorSource,
    count_nonfinite,
    read_header,
    write_safetensors,
)

SOURCE_FORMAT_KEY = "graft.source_format"
SOURCE_SHA_KEY = "graft.source_sha256"
# Kohya training metadata worth keeping through a conversion (short values; the rest, e.g. tag frequencies and
# dataset folders, can be large or private and is dropped).
KEPT_METADATA = (
    "ss_sd_model_name",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_output_name",
    "modelspec.architecture",
    "modelspec.title",
)
# diffusers roots and the kohya prefixes they export as (kohya names are module paths with '.' replaced by '_').
DIFFUSERS_ROOTS = (("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te_"))

_KEY = re.compile(
    r"^(?P<stem>.+?)(?:\.lora_(?P<kohya>down|up)\.weight|\.lora\.(?P<diffusers>down|up)\.weight|\.(?P<alpha>alpha))$"
)
_LYCORIS = re.compile(
    r"\.(?P<kind>hada_\w+|lokr_\w+|diff|diff_b|oft_\w+|boft_\w+|dora_scale|lora_mid\.weight|w_norm|b_norm|on_input)$"
)
_LYCORIS_NAMES = {
    "hada": "LoHa",
    "lokr": "LoKr",
    "diff": "full-diff",
    "oft": "OFT",
    "boft": "BOFT",
    "dora": "DoRA",
    "lora": "Tucker LoCon (lora_mid)",
    "w": "norm-layer",
    "b": "norm-layer",
    "on": "IA3",
}
_PEFT_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SCALAR_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2", "I32": "<i4", "I64": "<i8"}


@dataclass(frozen=True)
class KohyaModule:
    """One module: ΔW = (alpha/rank) · up @ down, with down (rank, in) and up (out, rank).

    On a 1×1 Conv2d (``proj_in``/``proj_out`` of SD 1.5, say) down is (rank, in, 1, 1) and up (out, rank, 1, 1).
    """

    stem: str
    down: TensorInfo
    up: TensorInfo
    alpha: float  # as stored, or the rank when the file has no alpha for this module
    alpha_given: bool

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class KohyaFacts:
    """What a validated kohya/diffusers LoRA file holds."""

    path: Path
    style: str  # "kohya" (``.lora_down.weight``) or "diffusers" (``.lora.down.weight``)
    base_model: str
    modules: dict[str, KohyaModule]  # by stem, sorted
    metadata: dict[str, str]
    dtype: str


# -- detection -------------------------------------------------------------------------------------------


def _kohya_like(name: str) -> bool:
    return bool(_KEY.match(name) or _LYCORIS.search(name))


def is_kohya_file(path: Path) -> bool:
    """Whether ``path`` is a ``.safetensors`` file in the kohya family rather than PEFT.

    True when some tensor ends in ``.lora_down.weight``/``.lora_up.weight``/``.lora.down.weight``/
    ``.lora.up.weight``/``.alpha`` (or is a LyCORIS tensor, so that it gets refused with a precise message) and
    none is a PEFT ``.lora_A.weight``/``.lora_B.weight``. A file whose header cannot be read is not.
    """
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    try:
        names = list(read_header(path).tensors)
    except InvalidAdapter:
        return False
    return any(_kohya_like(n) for n in names) and not any(_PEFT_FACTOR.match(n) for n in names)


def find_kohya_file(path: Path) -> Path | None:
    """The single-file LoRA that ``path`` stands for, or None when it should be read as a PEFT folder.

    ``path`` itself when it is a file (whatever its suffix, so that the refusal names the problem); or, for a
    folder without ``adapter_config.json``, its only ``.safetensors`` file, provided that file is not named
    ``adapter_model.safetensors`` or holds kohya-style keys (a PEFT weights file missing its config keeps the
    PEFT error).
    """
    if path.is_file():
        return path
    if not path.is_dir() or (path / CONFIG_FILE).exists():
        return None
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".safetensors")
    if len(candidates) != 1:
        return None
    (candidate,) = candidates
    return candidate if candidate.name != WEIGHTS_FILE or is_kohya_file(candidate) else None


# -- validation ------------------------------------------------------------------------------------------


def _refuse_lycoris(name: str) -> None:
    match = _LYCORIS.search(name)
    if match is None:
        return
    kind = _LYCORIS_NAMES[re.split(r"[_.]", match["kind"])[0]]
    raise InvalidAdapter(
        f"tensor {name!r} belongs to a LyCORIS {kind} network; LoHa/LoKr/full-diff and the other LyCORIS "
        "algorithms are not supported: export the network as a plain LoRA (lora_down/lora_up/alpha)"
    )


def _parse_keys(header: SafetensorsHeader, path: Path) -> tuple[dict[str, dict[str, TensorInfo]], set[str]]:
    parts: dict[str, dict[str, TensorInfo]] = {}
    styles: set[str] = set()
    for name in sorted(header.tensors):
        _refuse_lycoris(name)
    for name, info in sorted(header.tensors.items()):
        match = _KEY.match(name)
        if match is None:
            raise InvalidAdapter(
                f"tensor {name!r} in {path.name} is not a LoRA tensor (expected '<module>.lora_down.weight', "
                "'<module>.lora_up.weight' and '<module>.alpha'); remove it or export a plain LoRA"
            )
        if match["alpha"]:
            which = "alpha"
        else:
            which = match["kohya"] or match["diffusers"]
            styles.add("kohya" if match["kohya"] else "diffusers")
        slot = parts.setdefault(match["stem"], {})
        if which in slot:
            raise InvalidAdapter(
                f"module {match['stem']!r} has two {which} tensors (both the kohya '.lora_{which}' and the diffusers "
                f"'.lora.{which}' spelling); keep one"
            )
        slot[which] = info
    return parts, styles


def _scalar(path: Path, info: TensorInfo) -> float | None:
    """The value of a one-element tensor, or None when it is not one (or not numeric)."""
    if info.dtype not in _SCALAR_DTYPES or math.prod(info.shape) != 1 or len(info.shape) > 1:
        return None
    with path.open("rb") as handle:
        handle.seek(info.start)
        raw = handle.read(info.end - info.start)
    if len(raw) != np.dtype(_SCALAR_DTYPES[info.dtype]).itemsize:
        return None
    value = np.frombuffer(raw, dtype=_SCALAR_DTYPES[info.dtype])
    if info.dtype == "BF16":  # the top half of an fp32
        return float((value.astype(np.uint32) << np.uint32(16)).view(np.float32)[0])
    return float(value[0])


def _module(path: Path, stem: str, slot: dict[str, TensorInfo]) -> KohyaModule:
    if "down" not in slot and "up" not in slot:
        raise InvalidAdapter(
            f"module {stem!r} has an alpha but no lora_down/lora_up factors; remove '{stem}.alpha' or add its factors"
        )
    for which, other in (("down", "up"), ("up", "down")):
        if which in slot and other not in slot:
            raise InvalidAdapter(f"module {stem!r} has lora_{which} but no lora_{other}; the file is incomplete")
    down, up = slot["down"], slot["up"]
    for info in (down, up):
        if info.dtype not in DTYPE_BYTES:
            raise InvalidAdapter(f"tensor {info.name!r} has dtype {info.dtype}; Graft reads F32, F16, BF16 and F64")
    factor_kernel(stem, down.shape, up.shape, ("lora_down", "lora_up"))  # 2-D, or 4-D with a 1×1 kernel
    if down.shape[0] != up.shape[1]:
        raise InvalidAdapter(
            f"module {stem!r}: lora_down is {list(down.shape)} (rank {down.shape[0]}) but lora_up is "
            f"{list(up.shape)} (rank {up.shape[1]}); the ranks must agree, the file is corrupt"
        )
    if down.shape[0] == 0:
        raise InvalidAdapter(f"module {stem!r} has rank 0; remove it from the file")
    rank = down.shape[0]
    if "alpha" not in slot:
        return KohyaModule(stem, down, up, float(rank), alpha_given=False)
    alpha = _scalar(path, slot["alpha"])
    if alpha is None or not math.isfinite(alpha) or alpha <= 0:
        shown = (
            f"{alpha!r}"
            if alpha is not None
            else f"a {slot['alpha'].dtype} tensor of shape {list(slot['alpha'].shape)}"
        )
        raise InvalidAdapter(
            f"module {stem!r}: alpha must be a finite positive scalar, got {shown}; fix '{stem}.alpha' or remove it "
            "(alpha then defaults to the rank)"
        )
    return KohyaModule(stem, down, up, alpha, alpha_given=True)


def inspect_kohya_file(path: Path, base_model_override: str | None = None) -> KohyaFacts:
    """Validate a kohya/diffusers LoRA file and describe it; raise :class:`InvalidAdapter` on the first problem.

    The base model is ``base_model_override``, else the file's ``ss_sd_model_name`` or ``ss_base_model_version``
    metadata.
    """
    if not path.is_file():
        raise InvalidAdapter(f"{path} is not a file; point at a kohya/diffusers LoRA .safetensors file")
    if path.suffix.lower() != ".safetensors":
        hint = (
            " (a pickle, which can run code when loaded, so Graft refuses it)"
            if path.suffix.lower() in _PICKLE_SUFFIXES
            else ""
        )
        raise InvalidAdapter(
            f"{path.name} is not a .safetensors file{hint}; register a PEFT folder or a LoRA .safetensors file"
        )
    header = read_header(path)
    if any(_PEFT_FACTOR.match(name) for name in header.tensors):
        raise InvalidAdapter(
            f"{path.name} holds PEFT factors (lora_A/lora_B), not kohya ones; register the folder that holds it "
            "together with its adapter_config.json"
        )
    parts, styles = _parse_keys(header, path)
    if not parts:
        raise InvalidAdapter(f"{path.name} holds no LoRA factors ('<module>.lora_down.weight' / '.lora_up.weight')")
    modules = {stem: _module(path, stem, parts[stem]) for stem in sorted(parts)}

    metadata = header.metadata
    base_model = (
        base_model_override
        or metadata.get("ss_sd_model_name", "").strip()
        or metadata.get("ss_base_model_version", "").strip()
    )
    if not base_model or not base_model.strip():
        raise InvalidAdapter(
            f"no base model named: {path.name} has no ss_sd_model_name or ss_base_model_version metadata; "
            "pass --base-model (or the base_model form field)"
        )

    for module in modules.values():
        for info in (module.down, module.up):
            bad = count_nonfinite(path, info)
            if bad:
                raise InvalidAdapter(f"tensor {info.name!r} has {bad} NaN/Inf value(s); the adapter is corrupt")

    dtypes = {info.dtype for m in modules.values() for info in (m.down, m.up)}
    return KohyaFacts(
        path=path,
        style="diffusers" if styles == {"diffusers"} else "kohya",
        base_model=base_model.strip(),
        modules=modules,
        metadata=metadata,
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
    )


# -- conversion to PEFT ----------------------------------------------------------------------------------


def _most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the largest, so the choice does not depend on order."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def pattern_keys(stems: list[str]) -> dict[str, str]:
    """A PEFT pattern key for each stem that matches that module and no other one of ``stems``.

    PEFT matches a key as ``re.match(rf"(.*\\.)?({key})$", name)``: an escaped stem also matches any longer name
    that ends in ``.<stem>``. When another stem is such a name, a negative look-behind excludes it, so the match
    is exact whatever order the pattern dict comes back in (JSON columns and ``sort_keys`` reorder it).
    """
    keys = {}
    for stem in stems:
        prefixes = sorted(other[: -len(stem) - 1] for other in stems if other.endswith(f".{stem}"))
        keys[stem] = "".join(f"(?<!{re.escape(p)}\\.)" for p in prefixes) + re.escape(stem)
    return keys


def peft_config_for(modules: dict[str, KohyaModule], base_model: str) -> dict[str, Any]:
    """The ``adapter_config.json`` that gives each module its rank and alpha (hence its scale) exactly.

    ``r`` is the most common rank and ``lora_alpha`` the most common alpha; the others go to ``rank_pattern`` /
    ``alpha_pattern``. ``target_modules`` lists the exact stems.
    """
    stems = sorted(modules)
    rank = int(_most_common([m.rank for m in modules.values()]))
    alpha = float(_most_common([m.alpha for m in modules.values()]))
    keys = pattern_keys(stems)
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "task_type": None,
        "r": rank,
        "lora_alpha": _number(alpha),
        "rank_pattern": {keys[s]: modules[s].rank for s in stems if modules[s].rank != rank},
        "alpha_pattern": {keys[s]: _number(modules[s].alpha) for s in stems if modules[s].alpha != alpha},
        "target_modules": stems,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def convert_kohya_to_peft(path: Path, out_folder: Path, base_model: str | None = None) -> Path:
    """Validate ``path`` and write it as a PEFT folder in ``out_folder`` (created if needed); return the folder.

    Lossless: each factor's bytes and dtype are copied unchanged and the config reproduces every module's
    alpha/rank. Deterministic: the same file and base model give byte-identical output. The safetensors metadata
    records the source (``graft.source_format``, ``graft.source_sha256``) and the short kohya training metadata.
    """
    facts = inspect_kohya_file(path, base_model)
    config = peft_config_for(facts.modules, facts.base_model)
    # Check the config against PEFT's own lookup before anything relies on it.
    for stem, module in facts.modules.items():
        name = f"{PEFT_PREFIX}{stem}"
        rank = int(pattern_value(config["rank_pattern"], name, config["r"]))
        alpha = float(pattern_value(config["alpha_pattern"], name, config["lora_alpha"]))
        if rank != module.rank or lora_scale(alpha, rank, False) != module.scale:
            raise AssertionError(f"the PEFT config does not reproduce module {stem!r}; please report this")

    tensors: dict[str, TensorSource] = {}
    for stem, module in facts.modules.items():
        tensors[f"{PEFT_PREFIX}{stem}.lora_A.weight"] = TensorSource.from_file(path, module.down)
        tensors[f"{PEFT_PREFIX}{stem}.lora_B.weight"] = TensorSource.from_file(path, module.up)
    metadata = {key: facts.metadata[key] for key in KEPT_METADATA if key in facts.metadata}
    metadata.update({"format": "pt", SOURCE_FORMAT_KEY: facts.style, SOURCE_SHA_KEY: sha256_file(path)})

    out_folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_folder / WEIGHTS_FILE, tensors, metadata)
    (out_folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return out_folder


# -- export ----------------------------------------------------------------------------------------------


def kohya_stem(module: str) -> str:
    """The kohya stem a PEFT module exports under.

    The PEFT prefix ``base_model.model.`` is dropped. A name without dots (already kohya-style, e.g. one converted
    from a kohya file) is kept as it is, so kohya files round-trip with their names. A diffusers name under
    ``unet.``, ``text_encoder.`` or ``text_encoder_2.`` becomes ``lora_unet_…``, ``lora_te_…``, ``lora_te2_…``
    with dots replaced by ``_`` (kohya's naming). Any other dotted name (e.g. an LLM's
    ``model.layers.0.self_attn.q_proj``) is kept with its dots: kohya has no convention for those, and keeping
    them lets the file round-trip through Graft unchanged.
    """
    stem = module.removeprefix(PEFT_PREFIX)
    for root, prefix in DIFFUSERS_ROOTS:
        if stem.startswith(root):
            return prefix + stem[len(root) :].replace(".", "_")
    return stem


def _alpha_tensor(alpha: float) -> TensorSource:
    """A 0-d alpha as kohya writes it: fp32, or fp64 when fp32 would not hold the value exactly."""
    if float(np.float32(alpha)) == alpha:
        return TensorSource("F32", (), data=np.array(alpha, dtype="<f4").tobytes())
    return TensorSource("F64", (), data=np.array(alpha, dtype="<f8").tobytes())


def write_kohya_file(
    peft_weights_path: Path, config: dict[str, Any], out_path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a PEFT adapter (weights file + config) as a kohya LoRA file at ``out_path``; return it.

    Per module: ``<stem>.lora_down.weight`` = lora_A, ``<stem>.lora_up.weight`` = lora_B (bytes and shapes
    unchanged: a 1×1 conv module keeps its 4-D factors, as kohya writes them) and a 0-d ``<stem>.alpha`` chosen so
    that alpha/rank equals the module's PEFT scale (rank_pattern, alpha_pattern and rsLoRA included), so every ΔW
    is the same. Stems follow :func:`kohya_stem`. DoRA and LoRA-bias adapters have
    no kohya form and raise :class:`NotSupported`.
    """
    if config.get("use_dora") or config.get("lora_bias"):
        raise NotSupported("DoRA and LoRA-bias adapters have no kohya form; export them with --format peft")
    header = read_header(peft_weights_path)
    factors: dict[str, dict[str, TensorInfo]] = {}
    for name, info in header.tensors.items():
        match = _PEFT_FACTOR.match(name)
        if match is None:
            raise NotSupported(f"tensor {name!r} has no kohya form (only LoRA factors do); export with --format peft")
        factors.setdefault(match["module"], {})[match["which"]] = info

    rank_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", 8))
    use_rslora = bool(config.get("use_rslora", False))
    tensors: dict[str, TensorSource] = {}
    owners: dict[str, str] = {}
    for module in sorted(factors):
        pair = factors[module]
        if set(pair) != {"A", "B"}:
            raise InvalidAdapter(f"module {module!r} lacks lora_A or lora_B; the stored artifact is incomplete")
        stem = kohya_stem(module)
        if stem in owners:
            raise NotSupported(
                f"modules {owners[stem]!r} and {module!r} would both export as {stem!r}; export with --format peft"
            )
        owners[stem] = module
        rank = pair["A"].shape[0]
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha_default))
        if int(pattern_value(config.get("rank_pattern") or {}, module, rank_default)) != rank:
            raise InvalidAdapter(f"module {module!r}: its rank disagrees with the config; the artifact is corrupt")
        # alpha/rank must equal PEFT's scale: the same alpha without rsLoRA, alpha·√r with it.
        kohya_alpha = alpha if not use_rslora else lora_scale(alpha, rank, True) * rank
        tensors[f"{stem}.lora_down.weight"] = TensorSource.from_file(peft_weights_path, pair["A"])
        tensors[f"{stem}.lora_up.weight"] = TensorSource.from_file(peft_weights_path, pair["B"])
        tensors[f"{stem}.alpha"] = _alpha_tensor(kohya_alpha)
    if not tensors:
        raise InvalidAdapter(f"{peft_weights_path.name} holds no LoRA factors")

    kept = {key: header.metadata[key] for key in KEPT_METADATA if key in header.metadata}
    base_model = config.get("base_model_name_or_path")
    kept.update(
        {
            "format": "pt",
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank_default),
            "ss_network_alpha": str(_number(alpha_default)),
        }
    )
    if isinstance(base_model, str) and base_model:
        kept["ss_sd_model_name"] = base_model
    kept.update(metadata or {})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(out_path, tensors, kept)
