"""The small languages of ``select()``: layer sets (``"0-15"``, ``"0,2,8-11"``) and module patterns
(``"q_proj|v_proj"``, ``"mlp.*"``), with canonical spellings and matching against PEFT module names."""

from __future__ import annotations

import re
from functools import lru_cache

MAX_LAYER = 100_000
_LAYER_IN_NAME = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_LAYER_ITEM = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")
_MODULE_ALT = re.compile(r"^[A-Za-z0-9_*]+(?:\.[A-Za-z0-9_*]+)*$")


class SelectorError(ValueError):
    """A layer set or module pattern that does not parse; the message says what is wrong."""


def layer_of(module: str) -> int | None:
    """The transformer block index in a module name (``…layers.12.self_attn.q_proj`` → 12), or None."""
    match = _LAYER_IN_NAME.search(module)
    return int(match.group(1)) if match else None


def parse_layers(text: str) -> frozenset[int]:
    """``"0-3, 8"`` → {0, 1, 2, 3, 8}. Items are separated by ``,`` or ``|``."""
    layers: set[int] = set()
    items = [item.strip() for item in re.split(r"[,|]", text)]
    if not any(items):
        raise SelectorError('layers is empty; write e.g. layers="0-15"')
    for item in items:
        match = _LAYER_ITEM.match(item)
        if match is None:
            raise SelectorError(f'cannot read layers item {item!r}; write N or N-M, e.g. layers="0-15" or "0,2,8-11"')
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if low > high:
            raise SelectorError(f"layers range {item!r} runs backwards; write {high}-{low}")
        if high > MAX_LAYER:
            raise SelectorError(f"layer {high} is beyond any model (the limit is {MAX_LAYER})")
        layers.update(range(low, high + 1))
    return frozenset(layers)


def format_layers(layers: frozenset[int]) -> str:
    """The canonical spelling: sorted, runs collapsed (``0-3,8``)."""
    ordered = sorted(layers)
    runs: list[str] = []
    start = previous = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if value is not None:
            start = previous = value
    return ",".join(runs)


def parse_modules(text: str) -> tuple[str, ...]:
    """``"q_proj|v_proj"`` → ("q_proj", "v_proj"). Items: dotted name suffixes; ``*`` matches within a part."""
    alternatives = [alt.strip() for alt in re.split(r"[|,]", text)]
    if not any(alternatives):
        raise SelectorError('modules is empty; write e.g. modules="q_proj|v_proj"')
    for alt in alternatives:
        if not _MODULE_ALT.match(alt):
            raise SelectorError(
                f'cannot read module pattern {alt!r}; use names, dots and * (e.g. "q_proj|v_proj" or "mlp.*")'
            )
    return tuple(sorted(set(alternatives)))


def format_modules(alternatives: tuple[str, ...]) -> str:
    return "|".join(alternatives)


@lru_cache(maxsize=256)
def _module_regex(canonical: str) -> re.Pattern[str]:
    parts = [re.escape(alt).replace(r"\*", r"[^.]*") for alt in canonical.split("|")]
    return re.compile(rf"(?:^|\.)(?:{'|'.join(parts)})$")


def module_matches(module: str, canonical_modules: str) -> bool:
    """Whether ``module`` ends with one of the patterns (whole dotted parts)."""
    return _module_regex(canonical_modules).search(module) is not None


@lru_cache(maxsize=256)
def _layer_set(canonical: str) -> frozenset[int]:
    return parse_layers(canonical)


def layer_matches(module: str, canonical_layers: str) -> bool:
    """Whether ``module`` sits in one of the layers (a module without a layer index never does)."""
    layer = layer_of(module)
    return layer is not None and layer in _layer_set(canonical_layers)
