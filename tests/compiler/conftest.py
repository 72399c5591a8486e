"""A real registry for the compiler tests: SQLite migrated with Alembic, synthetic adapters registered through
``register_folder``, looked up through ``RegistryCatalog`` — built once per test session.

The adapters (all over the tiny Llama layout, 2 layers x 7 projections, unless noted):

=====================  ==============================================================================
``code@1``, ``code@2``  rank 8 / alpha 16 (scale 2), then rank 4 / alpha 4 (scale 1); latest is 2
``math``, ``toxic``     rank 8 / alpha 16
``"acme/code-lora"``    rank 4 / alpha 8, a name that must be quoted
``code_copy``           the same files as ``code@1`` under another name (same sha256 and scale)
``attn``                rank 6, only q_proj and v_proj (modules other adapters have, it lacks)
``half``                fp16 factors, rank 8
``llama2``              another base model (``meta-llama/Llama-2-7b-hf``)
``dora``, ``biased``    a DoRA adapter (``use_dora``) and a ``lora_bias`` one: refused
``wide``                the same base model with different module shapes (hidden 96)
=====================  ==============================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from bench.synthetic import TINY, LlamaShape, write_adapter
from registry.artifacts import ArtifactStore
from registry.catalog import RegistryCatalog
from registry.db import make_engine, make_session_factory, session_scope
from registry.migrate import upgrade_to_head
from registry.services.adapters import register_folder
from workers.compiler import MergePlan, compile_expression

BASE = TINY.base_model
WIDE = LlamaShape(hidden=96, intermediate=128, layers=2, kv_dim=32, base_model=TINY.base_model)
ATTN_MODULES = {name: shape for name, shape in TINY.modules().items() if name.endswith(("q_proj", "v_proj"))}


@dataclass(frozen=True)
class Registry:
    """The session's registry: its session factory, artifact store and the adapter folders."""

    sessions: sessionmaker[Session]
    store: ArtifactStore
    folders: dict[str, Path]


# name, folder key, write_adapter keyword arguments
ADAPTERS: list[tuple[str, str, dict[str, object]]] = [
    ("code", "code@1", {"rank": 8, "alpha": 16, "seed": 1}),
    ("code", "code@2", {"rank": 4, "alpha": 4, "seed": 11}),
    ("math", "math", {"rank": 8, "alpha": 16, "seed": 2}),
    ("toxic", "toxic", {"rank": 8, "alpha": 16, "seed": 3}),
    ("acme/code-lora", "acme", {"rank": 4, "alpha": 8, "seed": 4}),
    ("code_copy", "code@1", {}),
    ("attn", "attn", {"rank": 6, "alpha": 6, "seed": 5, "modules": ATTN_MODULES}),
    ("half", "half", {"rank": 8, "alpha": 16, "seed": 6, "dtype": torch.float16}),
    ("llama2", "llama2", {"rank": 8, "alpha": 16, "seed": 7, "base_model": "meta-llama/Llama-2-7b-hf"}),
    ("dora", "dora", {"rank": 8, "alpha": 16, "seed": 8, "extra_config": {"use_dora": True}}),
    ("biased", "biased", {"rank": 8, "alpha": 16, "seed": 9, "extra_config": {"lora_bias": True}}),
    ("wide", "wide", {"rank": 8, "alpha": 16, "seed": 10, "modules": WIDE.modules()}),
]


def build_registry(root: Path, adapters: list[tuple[str, str, dict[str, object]]]) -> Registry:
    """Migrate a fresh SQLite database under ``root`` and register ``adapters`` in order."""
    engine = make_engine(f"sqlite:///{root / 'graft.db'}")
    upgrade_to_head(engine)
    sessions = make_session_factory(engine)
    store = ArtifactStore(root / "artifacts")
    folders: dict[str, Path] = {}
    with session_scope(sessions) as session:
        for name, folder_key, options in adapters:
            if folder_key not in folders:
                kwargs = dict(options)
                modules = kwargs.pop("modules", None) or TINY.modules()
                kwargs.setdefault("base_model", BASE)
                folders[folder_key] = write_adapter(root / "adapters" / folder_key, modules, **kwargs)  # type: ignore[arg-type]
            register_folder(session, store, folders[folder_key], name)
    return Registry(sessions, store, folders)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return build_registry(tmp_path_factory.mktemp("compiler-registry"), ADAPTERS)


@pytest.fixture(scope="session")
def catalog(registry: Registry) -> Iterator[RegistryCatalog]:
    """One long-lived read-only session over the registry (the catalog caches version lists)."""
    session = registry.sessions()
    yield RegistryCatalog(session)
    session.close()


Compile = Callable[..., MergePlan]


@pytest.fixture(scope="session")
def compile_(catalog: RegistryCatalog) -> Compile:
    """``compile_(text, max_rank=1024)`` against the registry."""

    def run(text: str, *, max_rank: int = 1024) -> MergePlan:
        return compile_expression(text, catalog, max_rank=max_rank)

    return run
