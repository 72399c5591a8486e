"""`graft register` and `graft export --format kohya` with kohya LoRA files, on the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from api.cli import app
from registry.formats.kohya import inspect_kohya_file
from tests.registry.test_formats_kohya import MIXED, Q, assert_same_deltas, kohya_deltas, write_kohya


@pytest.fixture
def graft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GRAFT_DATABASE_URL", raising=False)
    runner = CliRunner()

    def run(*args: str, expect: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, list(args))
        assert result.exit_code == expect, f"exit {result.exit_code}\nstdout:{result.stdout}\nstderr:{result.stderr}"
        return result

    return run


def test_register_show_and_export_a_kohya_file(graft, tmp_path: Path) -> None:
    lora = write_kohya(
        tmp_path / "my_style.safetensors", MIXED, dtype=torch.float16, metadata={"ss_base_model_version": "sd_v1"}
    )
    first = json.loads(graft("register", str(lora), "--name", "style", "--tags", "anime", "--json").stdout)
    assert first["created"] and first["ref"] == "style@1"
    assert (first["source"], first["base_model"], first["rank"], first["modules"]) == ("upload:kohya", "sd_v1", 8, 4)
    assert "already registered" in graft("register", str(lora), "--name", "style").stdout
    assert "upload:kohya" in graft("show", "style").stdout

    out = tmp_path / "out"
    graft("export", "style", str(out), "--format", "kohya")
    exported = out / "style.safetensors"
    assert inspect_kohya_file(exported).base_model == "sd_v1"
    assert_same_deltas(kohya_deltas(exported), kohya_deltas(lora))
    graft("export", "style", str(out), "--format", "kohya", expect=4)  # exists: needs --force
    graft("export", "style", str(out), "--format", "kohya", "--force")
    graft("export", "style", str(out), "--format", "ckpt", expect=2)
    graft("export", "style", str(out / "peft"))  # the default is still a PEFT folder
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["target_modules"] == sorted(MIXED)

    # The exported file registers again, without --base-model, with the same deltas.
    again = json.loads(graft("register", str(exported), "--name", "style-again", "--json").stdout)
    assert again["created"] and again["base_model"] == "sd_v1"


def test_a_refused_kohya_file_prints_one_line(graft, tmp_path: Path) -> None:
    lora = write_kohya(tmp_path / "loha.safetensors", MIXED, extra={f"{Q}.hada_w1_a": torch.randn(4, 4)})
    result = graft("register", str(lora), "--name", "style", "--base-model", "sd", expect=2)
    assert "LoHa/LoKr/full-diff" in result.stderr
    assert json.loads(graft("list", "--json").stdout) == []
    plain = write_kohya(tmp_path / "plain.safetensors", MIXED)
    result = graft("register", str(plain), "--name", "style", expect=2)
    assert "pass --base-model" in result.stderr
