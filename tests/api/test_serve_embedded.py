"""The embedded default for real: ``graft serve`` (a separate process, SQLite, no broker) runs the merges
submitted to it, and ``graft merge --remote`` submits one and follows it; ``graft token create`` makes the
token."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from api.cli import app
from bench.synthetic import write_demo_adapters

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("GRAFT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("GRAFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_graft_serve_runs_merges_without_a_broker(home: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(app, ["token", "create", "--scope", "write", "--name", "me", "--json"])
    assert created.exit_code == 0, created.output
    token = json.loads(created.stdout)["token"]
    assert token.startswith("graft_")
    listed = runner.invoke(app, ["token", "list", "--json"])
    assert token not in listed.stdout and json.loads(listed.stdout)[0]["scope"] == "write"

    port = free_port()
    env = {**os.environ, "GRAFT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "graft serve did not start"
            time.sleep(0.1)

        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{url}/readyz").json()["mode"] == "embedded"
        for folder in write_demo_adapters(tmp_path / "adapters"):
            files = [("files", (p.name, io.BytesIO(p.read_bytes()))) for p in sorted(folder.iterdir())]
            response = httpx.post(f"{url}/v1/adapters", data={"name": folder.name}, files=files, headers=headers)
            assert response.status_code == 201, response.text

        result = runner.invoke(
            app, ["merge", "base + code - toxic", "--name", "detox", "--remote", url, "--token", token, "--json"]
        )
        assert result.exit_code == 0, result.output
        job = json.loads(result.stdout)
        assert job["status"] == "succeeded" and job["result"] == "detox@1" and job["attempts"] == 1

        # Errors from the server keep the CLI's exit codes and caret rendering.
        bad = runner.invoke(app, ["merge", "code + mathh", "--name", "x", "--remote", url, "--token", token])
        assert bad.exit_code == 2 and "did you mean 'math'" in bad.stderr and "^" in bad.stderr
        denied = runner.invoke(app, ["merge", "code", "--name", "x", "--remote", url])
        assert denied.exit_code == 1 and "unauthenticated" in denied.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
        log.close()
    assert token not in (tmp_path / "serve.log").read_text()
