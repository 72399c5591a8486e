"""The `graft` CLI end to end on the embedded default (SQLite + local artifacts in GRAFT_HOME)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app
from bench.synthetic import write_demo_adapters


@pytest.fixture
def graft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    monkeypatch.setenv("GRAFT_HOME", str(home))
    monkeypatch.delenv("GRAFT_DATABASE_URL", raising=False)
    runner = CliRunner()

    def run(*args: str, expect: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, list(args))
        assert result.exit_code == expect, f"exit {result.exit_code}\nstdout:{result.stdout}\nstderr:{result.stderr}"
        return result

    return run


@pytest.fixture
def demo_dirs(tmp_path: Path) -> dict[str, Path]:
    return {p.name: p for p in write_demo_adapters(tmp_path / "adapters")}


def test_register_merge_lineage_export(graft, demo_dirs: dict[str, Path], tmp_path: Path) -> None:
    for name, folder in demo_dirs.items():
        graft("register", str(folder), "--name", name, "--tags", name)
    merged = json.loads(graft("merge", "base + code - toxic", "--name", "code-detox", "--json").stdout)
    assert merged["version"]["ref"] == "code-detox@1"
    assert merged["version"]["rank"] == 16
    assert merged["timings"]["engine_seconds"] > 0
    assert merged["timings"]["total_seconds"] >= merged["timings"]["engine_seconds"]

    graph = json.loads(graft("lineage", "code-detox", "--json").stdout)
    edges = {(e["parent"], e["coefficient"]) for e in graph["edges"]}
    assert edges == {("code@1", 1.0), ("toxic@1", -1.0)}

    listed = {row["adapter"]: row for row in json.loads(graft("list", "--json").stdout)}
    assert set(listed) == {"code", "math", "toxic", "code-detox"}
    assert listed["code-detox"]["source"] == "merge"

    shown = json.loads(graft("show", "code-detox@1", "--json").stdout)
    assert shown["expression"] == "base + code - toxic"

    out = tmp_path / "exported"
    graft("export", "code-detox", str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 16
    assert (out / "adapter_model.safetensors").stat().st_size == shown["size_bytes"]
    # Exporting over an existing adapter needs --force.
    graft("export", "code-detox", str(out), expect=4)
    graft("export", "code-detox", str(out), "--force")

    tree = graft("lineage", "code-detox").stdout
    assert "code@1" in tree and "toxic@1" in tree and "-1" in tree


def test_expression_errors_show_a_caret(graft, demo_dirs: dict[str, Path]) -> None:
    graft("register", str(demo_dirs["math"]), "--name", "math")
    result = graft("plan", "0.7*math + 0.3*mathh", expect=2)
    lines = result.stderr.splitlines()
    assert "unknown adapter 'mathh' (did you mean 'math'?)" in lines[0]
    caret_line = lines[2]
    assert caret_line.index("^") == lines[1].index("mathh")
    result = graft("merge", "math * math", "--name", "x", expect=2)
    assert "type_error" in result.stderr


def test_bad_input_is_refused_with_one_clear_line(graft, demo_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = demo_dirs["code"]
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    result = graft("register", str(folder), "--name", "code", expect=2)
    assert "pickle" in result.stderr and "save_file" in result.stderr
    assert json.loads(graft("list", "--json").stdout) == []
    graft("show", "nothing", expect=3)
    graft("register", str(demo_dirs["math"]), "--name", "bad name!", expect=2)


def test_invalid_configuration_is_reported(graft, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFT_DATABASE_URL", "not-a-url")
    result = graft("list", expect=1)
    assert "GRAFT_DATABASE_URL" in result.stderr


def test_console_script_runs_in_a_fresh_process(tmp_path: Path, demo_dirs: dict[str, Path]) -> None:
    env = {**os.environ, "GRAFT_HOME": str(tmp_path / "proc-home")}
    env.pop("GRAFT_DATABASE_URL", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True)

    assert run("register", str(demo_dirs["code"]), "--name", "code").returncode == 0
    assert run("register", str(demo_dirs["math"]), "--name", "math").returncode == 0
    merged = run("merge", "0.7*code + 0.3*math", "--name", "mix", "--json")
    assert merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout)["version"]["ref"] == "mix@1"
