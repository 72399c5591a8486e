"""``POST /v1/adapters`` with one kohya LoRA file: converted to PEFT and registered like `graft register`."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.api.conftest import Api
from tests.registry.test_formats_kohya import MIXED, Q, write_kohya


def test_a_single_kohya_file_uploads_as_a_version(api: Api, tmp_path: Path) -> None:
    data = write_kohya(tmp_path / "style.safetensors", MIXED).read_bytes()
    response = api.upload_files("style", {"my_style.safetensors": data}, base_model="sd-v1-5")
    assert response.status_code == 201, response.text
    version = response.json()["version"]
    assert (version["ref"], version["source"], version["base_model"], version["rank"]) == (
        "style@1",
        "upload:kohya",
        "sd-v1-5",
        8,
    )
    again = api.upload_files("style", {"renamed.safetensors": data}, base_model="sd-v1-5")
    assert again.status_code == 200 and again.json()["version"]["ref"] == "style@1"

    files = api.client.get("/v1/adapters/style/versions/1/files/adapter_config.json")
    assert files.status_code == 200 and files.json()["target_modules"] == sorted(MIXED)


def test_a_refused_kohya_upload_says_why(api: Api, tmp_path: Path) -> None:
    loha = write_kohya(tmp_path / "loha.safetensors", MIXED, extra={f"{Q}.lokr_w1": torch.randn(2, 2)})
    response = api.upload_files("style", {"loha.safetensors": loha.read_bytes()}, base_model="sd-v1-5")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_adapter" and "LoKr" in error["message"]
    no_base = api.upload_files(
        "style", {"plain.safetensors": write_kohya(tmp_path / "p.safetensors", MIXED).read_bytes()}
    )
    assert no_base.status_code == 422 and "pass --base-model" in no_base.json()["error"]["message"]
    assert api.client.get("/v1/adapters").json()["total"] == 0
