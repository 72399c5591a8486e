"""A published version loads with PEFT, unchanged: ``PeftModel.from_pretrained(base, repo, revision="v1")``.

PEFT has no endpoint argument: it goes through huggingface_hub's defaults, which the ``hub`` fixture points at
the test server exactly as ``HF_ENDPOINT`` would. The same call also loads from the local Hub folder, offline,
with ``cache_dir`` (the folder is laid out like the Hugging Face cache). Runs on SQLite only: the database
plays no part here and building the model is the slow bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file
from sqlalchemy.orm import Session, sessionmaker

from registry import repositories as repo
from registry.artifacts import ArtifactStore
from registry.settings import Settings
from tests.hub.conftest import RegisterFn
from tests.hub_server import HubServer
from workers.publisher import publish_version

pytestmark = pytest.mark.slow
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("db_engine", ["sqlite"], indirect=True)
def test_published_adapter_loads_with_peft_from_the_hub_and_from_the_local_folder(
    hub: HubServer,
    hub_settings: Settings,
    local_settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    register: RegisterFn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft import PeftModel

    v1, _v2 = register("code", seed=1), register("code", seed=2)
    remote = publish_version(v1, session_factory=sessions, store=store, settings=hub_settings)
    local = publish_version(v1, session_factory=sessions, store=store, settings=local_settings)
    publish_version(_v2, session_factory=sessions, store=store, settings=hub_settings)  # v1 must still load
    with sessions() as session:
        expected = load_file(str(store.path(repo.get_versions_by_ids(session, [v1])[v1].artifact_key)))

    model = PeftModel.from_pretrained(tiny_llama(), remote.repo_id, revision="v1")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.lora_A["default"].weight, expected[f"{Q0}.lora_A.weight"])
    assert torch.equal(q_proj.lora_B["default"].weight, expected[f"{Q0}.lora_B.weight"])
    fetched = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/adapter_model.safetensors")]
    assert [r.path for r in fetched] == [f"/{remote.repo_id}/resolve/v1/adapter_model.safetensors"]

    # The local folder, offline, through the very same PEFT call.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root = Path(local.endpoint.removeprefix("file://"))
    offline = PeftModel.from_pretrained(tiny_llama(), local.repo_id, revision="v1", cache_dir=str(root))
    q_local = offline.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q_local.lora_B["default"].weight, expected[f"{Q0}.lora_B.weight"])
