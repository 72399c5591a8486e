"""Compile-time benchmark: a 200-operand expression, compiled against an in-memory catalog.

Measures the compiler alone (parse → resolve → check → lower → cost → plan), not the database: the
catalog is a dict, so the numbers are what the API adds on top of its registry look-ups. Two model
layouts: the tiny demo Llama (2 layers, 14 modules per adapter) and a Llama-2-7B layout (32 layers,
224 modules per adapter), where the plan holds 200 x 224 operand terms.

The process imports no torch, like the API process that compiles (a large heap makes each of Python's
full garbage collections slower, which would inflate the numbers).

Usage::

    python -m bench.compile [--repeat 30] [--operands 200]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.synthetic import LLAMA2_7B, TINY, LlamaShape
from workers.compiler import compile_expression


@dataclass(frozen=True)
class _Entry:
    adapter: str
    version: int
    version_id: int
    sha256: str
    base_model: str
    dtype: str = "F16"
    task_type: str | None = "CAUSAL_LM"
    modules: dict[str, list[float]] = field(default_factory=dict)
    variants: tuple[str, ...] = ()


class DictCatalog:
    """A catalog of ``count`` rank-16 adapters named ``task000``… over one model layout."""

    def __init__(self, shape: LlamaShape, count: int) -> None:
        rows = {name: [out_f, in_f, 16, 2.0] for name, (out_f, in_f) in shape.modules().items()}
        self._entries = {
            f"task{i:03d}": _Entry(
                adapter=f"task{i:03d}",
                version=1,
                version_id=i + 1,
                sha256=hashlib.sha256(f"task{i}".encode()).hexdigest(),
                base_model=shape.base_model,
                modules=rows,
            )
            for i in range(count)
        }

    def adapter_names(self) -> Sequence[str]:
        return sorted(self._entries)

    def version_numbers(self, name: str) -> Sequence[int]:
        return [1] if name in self._entries else []

    def get(self, name: str, number: int) -> _Entry:
        return self._entries[name]


def expression(count: int) -> str:
    """``0.005*task000 + 0.005*task001 - … `` with alternating signs and varied weights."""
    terms = [f"{(i % 7 + 1) / 1000:g}*task{i:03d}" for i in range(count)]
    return " + ".join(terms[: count // 2]) + " - " + " - ".join(terms[count // 2 :])


@dataclass(frozen=True)
class Result:
    modules: int
    wall_median: float
    cpu_median: float
    cpu_best: float


def measure(shape: LlamaShape, count: int, repeat: int) -> Result:
    """Median wall and CPU time of ``repeat`` compilations (after a warm-up that loads the grammar).

    CPU time (``process_time``) is reported too: on a shared machine it is the steadier measure.
    """
    catalog = DictCatalog(shape, count)
    text = expression(count)
    plan = compile_expression(text, catalog, max_rank=4096)
    assert len(plan.operands) == count
    wall, cpu = [], []
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        compile_expression(text, catalog, max_rank=4096)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return Result(len(plan.steps), statistics.median(wall), statistics.median(cpu), min(cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--operands", type=int, default=200)
    args = parser.parse_args()
    print(f"compile_expression, {args.operands} operands, {args.repeat} runs (ms)")
    print(f"  {'layout':<18} {'modules':>7} {'wall median':>12} {'cpu median':>11} {'cpu best':>9}")
    for label, shape in (("tiny demo Llama", TINY), ("Llama-2-7B layout", LLAMA2_7B)):
        found = measure(shape, args.operands, args.repeat)
        print(
            f"  {label:<18} {found.modules:>7} {found.wall_median * 1000:>12.1f} "
            f"{found.cpu_median * 1000:>11.1f} {found.cpu_best * 1000:>9.1f}"
        )


if __name__ == "__main__":
    main()
