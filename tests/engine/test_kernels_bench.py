"""The benchmarks (bench/engine.py) at a tiny scale: every case runs end to end, and the checks it prints hold.

Case a runs PEFT's ``add_weighted_adapter(combination_type="svd")`` on a real ``LlamaForCausalLM`` against our
factored kernels on the same adapter files: the ΔW must agree to 1e-4 relative (both are the optimal
truncation). Case b with equal positive weights (where our TIES equals PEFT's) checks that our randomized
re-factoring errs at most 1% more than PEFT's full SVD. Case c runs the GPU benchmark's code path on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.engine import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    main(list(argv))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result: dict[str, object] = json.loads(line.removeprefix("RESULT "))
    return result


def test_case_a_matches_peft_svd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--case", "a", "--scale", "tiny", "--layers", "1", "--workdir", str(tmp_path))
    assert isinstance(result["worst_rel_diff"], float) and result["worst_rel_diff"] <= 1e-4
    assert isinstance(result["ratio_subset"], float) and result["ratio_subset"] > 0
    assert isinstance(result["ours_retained"], float) and 0.0 < result["ours_retained"] <= 1.0


def test_case_b_refactoring_is_near_optimal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(
        capsys, "--case", "b", "--scale", "tiny", "--layers", "1", "--weights", "1,1,1", "--workdir", str(tmp_path)
    )
    assert isinstance(result["worst_error_ratio"], float) and result["worst_error_ratio"] <= 1.01


def test_case_c_runs_at_tiny_scale(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "--case", "c", "--scale", "tiny")
    assert isinstance(result["ours_ties_s"], float) and result["ours_ties_s"] > 0
    assert isinstance(result["ours_ties_retained"], float) and 0.0 < result["ours_ties_retained"] < 1.0
    assert isinstance(result["ours_svd_retained"], float) and 0.0 < result["ours_svd_retained"] <= 1.0
