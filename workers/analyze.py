"""`graft analyze`: how registered adapters relate, module by module, before anyone merges them.

Cosines and norms are computed in factored form (never forming ΔW); the sign-conflict rate TIES
would see is computed on request, on dense ΔW one module at a time. Interference between adapters
is what breaks merges, so this is the first thing to look at.
"""

from __future__ import annotations

from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from registry.artifacts import ArtifactStore
from registry.db import session_scope
from registry.errors import InvalidInput
from registry.services.adapters import resolve_version
from workers.engine.analysis import analyze_module
from workers.engine.reader import OperandReader


def analyze_versions(
    refs: list[str],
    *,
    session_factory: sessionmaker[Session],
    store: ArtifactStore,
    conflict_density: float | None = None,
) -> dict[str, Any]:
    """Per-module and overall norms, pairwise cosines, effective ranks (and sign conflicts) of ``refs``.

    Only modules that every operand has, with the same shape and layer kind, are compared. Raises ``InvalidInput``
    for fewer than one reference, a bad density, or operands on different base models.
    """
    if not refs:
        raise InvalidInput("name at least one adapter, e.g. `graft analyze code math`")
    if conflict_density is not None and not 0.0 < conflict_density <= 1.0:
        raise InvalidInput(f"--conflicts takes a density in (0, 1], got {conflict_density}")
    with session_scope(session_factory) as session:
        versions = [resolve_version(session, ref) for ref in refs]
        labels = [v.ref for v in versions]
        bases = {v.base_model.name for v in versions}
        paths = [store.path(v.artifact_key) for v in versions]
        tables = [dict(v.modules) for v in versions]
    if len(bases) > 1:
        raise InvalidInput(f"the adapters are for different base models ({', '.join(sorted(bases))})")
    # Same shape and same layer kind (rows of 1×1 conv modules end in their kernel, Linear rows have none).
    shared = sorted(
        m for m in set(tables[0]).intersection(*tables[1:]) if len({(*t[m][:2], *t[m][4:6]) for t in tables}) == 1
    )
    n = len(refs)
    inner = torch.zeros(n, n, dtype=torch.float64)
    conflicting = overlapping = 0
    modules: list[dict[str, Any]] = []
    with torch.inference_mode(), OperandReader(paths, torch.device("cpu")) as reader:
        for name in shared:
            factors = []
            for index, table in enumerate(tables):
                b, a = reader.factors(index, name)
                factors.append((float(table[name][3]) * b, a))
            result = analyze_module(factors, conflict_density=conflict_density)
            norms = torch.tensor(result.norms, dtype=torch.float64)
            inner += result.cosines * torch.outer(norms, norms)
            row: dict[str, Any] = {
                "module": name,
                "norms": list(result.norms),
                "cosines": result.cosines.tolist(),
                "effective_ranks": list(result.effective_ranks),
            }
            if result.conflicts is not None:
                row["sign_conflict_rate"] = result.conflicts.rate
                conflicting += result.conflicts.conflicting
                overlapping += result.conflicts.overlapping
            modules.append(row)
    norms_all = torch.sqrt(torch.diagonal(inner))
    scale = torch.outer(norms_all, norms_all)
    cosines = torch.where(scale > 0, inner / scale.clamp_min(1e-300), torch.zeros_like(inner))
    overall: dict[str, Any] = {"norms": norms_all.tolist(), "cosines": cosines.tolist()}
    if conflict_density is not None:
        overall["sign_conflict_rate"] = conflicting / overlapping if overlapping else 0.0
    return {
        "operands": labels,
        "shared_modules": len(shared),
        "overall": overall,
        "modules": modules,
        "max_abs_cosine": max(
            (abs(c) for i, r in enumerate(overall["cosines"]) for j, c in enumerate(r) if i != j), default=0.0
        ),
    }
