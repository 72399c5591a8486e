"""CPU/GPU agreement of the whole executor, plan by plan, on the same adapter files.

    python -m bench.device_agreement [--layers 4]       # needs CUDA; exits 1 if any plan disagrees

Each expression is compiled once (against a catalog built from the files' own facts), executed by
``execute_plan`` on the CPU and on CUDA into two folders, and every module's ΔW = B @ A is compared.
Exact strategies must agree to 1e-5 relative; re-factored ones (randomized SVD, different BLAS) to 1e-3.
Timings of both runs are printed: the GPU path must also be the faster one at real shapes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.synthetic import TINYLLAMA, LlamaShape, write_adapter
from registry.artifacts import sha256_file
from registry.formats.peft import inspect_peft_folder
from workers.compiler import compile_expression
from workers.engine.executor import execute_plan

EXPRESSIONS = {
    "svd(a0 - 0.5*a1 - 0.5*a2, rank=16)": 1e-5,
    "a0 + 0.7*a1 - a2": 1e-5,
    "ties(a0, a1, a2, density=0.5, rank=16)": 1e-3,
    "dare_ties(a0, a1, a2, density=0.3, seed=7, rank=16)": 1e-3,
    "magnitude_prune(a0, density=0.2)": 1e-3,
    "orth(a0, against=(a1, a2))": 1e-4,
}


@dataclass(frozen=True)
class Entry:
    adapter: str
    version: int
    version_id: int
    sha256: str
    base_model: str
    dtype: str
    task_type: str | None
    modules: dict[str, list[float]] = field(default_factory=dict)
    variants: tuple[str, ...] = ()


class FolderCatalog:
    """Adapters straight from their folders (facts read by the registry's own validator)."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.entries: dict[str, Entry] = {}
        self.paths: dict[str, Path] = {}
        for index, (name, folder) in enumerate(folders.items()):
            facts = inspect_peft_folder(folder)
            sha = sha256_file(facts.weights_path)
            self.paths[sha] = facts.weights_path
            rows = {m: f.as_row() for m, f in facts.modules.items()}
            self.entries[name] = Entry(name, 1, index + 1, sha, facts.base_model, facts.dtype, "CAUSAL_LM", rows)

    def adapter_names(self) -> list[str]:
        return sorted(self.entries)

    def version_numbers(self, name: str) -> list[int]:
        return [1] if name in self.entries else []

    def get(self, name: str, number: int) -> Entry:
        return self.entries[name]


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    names = {k.rsplit(".lora_", 1)[0] for k in tensors}
    return {m: tensors[f"{m}.lora_B.weight"].double() @ tensors[f"{m}.lora_A.weight"].double() for m in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    shape = LlamaShape(TINYLLAMA.hidden, TINYLLAMA.intermediate, args.layers, TINYLLAMA.kv_dim, TINYLLAMA.base_model)
    work = Path(tempfile.mkdtemp(prefix="graft-agree-"))
    folders = {
        f"a{i}": write_adapter(work / f"a{i}", shape.modules(), base_model=shape.base_model, rank=16, alpha=32, seed=i)
        for i in range(3)
    }
    catalog = FolderCatalog(folders)
    print(f"device: {torch.cuda.get_device_name(0)}; {len(shape.modules())} modules of TinyLlama shapes")
    print(f"{'expression':<52} {'cpu s':>7} {'cuda s':>7} {'max rel diff':>13} {'tolerance':>9}")
    failed = False
    for expression, tolerance in EXPRESSIONS.items():
        plan = compile_expression(expression, catalog)
        paths = [catalog.paths[op.sha256] for op in plan.operands]
        seconds = {}
        for device in ("cpu", "cuda"):
            execute_plan(plan, paths, work / f"warm-{device}", device=torch.device(device))  # warm-up
            started = time.perf_counter()
            execute_plan(plan, paths, work / f"{device}-{len(seconds)}", device=torch.device(device))
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[device] = time.perf_counter() - started
        cpu, gpu = deltas(work / "cpu-0"), deltas(work / "cuda-1")
        worst = max(float((cpu[m] - gpu[m]).norm() / cpu[m].norm().clamp_min(1e-30)) for m in cpu)
        ok = worst <= tolerance
        failed |= not ok
        print(
            f"{expression:<52} {seconds['cpu']:>7.2f} {seconds['cuda']:>7.2f} {worst:>13.2e} {tolerance:>9.0e}"
            f"{'' if ok else '  DISAGREE'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
