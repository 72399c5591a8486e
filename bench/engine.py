"""Engine benchmarks: Graft's kernels against the reference, same adapters, same process.

    python -m bench.engine --case a [--layers 2]          # CPU, TinyLlama shapes, svd(a0 - .5a1 - .5a2, rank=16)
    python -m bench.engine --case b [--layers 1]          # the same with ties(density=0.5) re-factored to rank 16
    python -m bench.engine --case c --device cuda         # Llama-70B shapes, 4 rank-64 adapters, TIES 0.2 → rank 64
    python -m bench.engine --case c --scale tiny          # the same code path at a tiny size (CPU smoke test)

(a)/(b): ours streams every module from the adapters' safetensors files (``OperandReader``), runs the kernels
(factored ``concat_factors`` + ``truncate_factors`` for a, dense ``form_delta`` + ``ties`` + randomized
``refactor`` for b) and streams the result out (``PeftFolderWriter``), at full size (all 22 layers). The
reference is PEFT's ``add_weighted_adapter(combination_type="svd" | "ties_svd")`` on a real
``LlamaForCausalLM`` built from TinyLlama's config (fp32 weights, allocated uninitialised: their values do not
enter ΔW). PEFT takes minutes per layer on a small CPU, so it runs on the first ``--layers N`` layers only;
ours is timed on the same subset too, and the full-size PEFT time is extrapolated linearly in layers
(every layer has the same shapes). Both the subset ratio and the extrapolated ratio are printed, labelled.
With equal positive weights (``--weights 1,1,1``) case b also checks the results against each other.

(c): four rank-64 adapters are generated in GPU memory (bf16), and the whole model's modules are merged
(TIES 0.2 → rank 64, and the factored svd path), the results copied to the host and written as a PEFT
folder. The reference is PEFT's ``merge_utils.ties`` + full ``torch.linalg.svd`` (what ``ties_svd`` does) on
``--ref-layers`` layers, extrapolated, and ``torch.kthvalue``/``torch.topk`` against our exact threshold on
one intermediate-sized ΔW. On CUDA, a few modules are also recomputed on the CPU (agreement check).

Peak memory: ``resource.getrusage`` high-water marks, taken right after our run and before PEFT is imported
(``--only ours`` under ``/usr/bin/time -v`` gives the same number for a process that runs ours alone).
"""

from __future__ import annotations

import os

# Transparent huge pages for torch's large CPU allocations (set before torch is imported): a fresh 46 MB
# tensor then costs ~500 page faults instead of ~11 000, on both sides of every comparison.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import json
import math
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bench.synthetic import PROJECTIONS, TINYLLAMA, LlamaShape, write_adapter
from workers.engine.dense import LOW_RETAINED_ENERGY, form_delta, refactor
from workers.engine.kernels import concat_factors, truncate_factors
from workers.engine.peft_config import peft_config
from workers.engine.reader import OperandReader
from workers.engine.strategies import ties
from workers.engine.threshold import kth_largest_abs
from workers.engine.writer import PeftFolderWriter

LLAMA_70B = LlamaShape(hidden=8192, intermediate=28672, layers=80, kv_dim=1024, base_model="meta-llama/Llama-2-70b-hf")
TINY_C = LlamaShape(hidden=256, intermediate=704, layers=2, kv_dim=64, base_model="graft-bench/tiny")
TINYLLAMA_VOCAB = 32000
HEAD_DIM = 64


def rss_mb() -> float:
    """This process's peak resident set so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


@dataclass
class Phases:
    """Seconds per phase (synchronised on CUDA when ``sync``)."""

    sync: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.seconds.items())


@dataclass
class Run:
    seconds: float
    modules: int
    kept: float = 0.0
    total: float = 0.0
    low_energy_modules: int = 0
    phases: Phases | None = None

    @property
    def retained(self) -> float:
        return 1.0 if self.total == 0.0 else self.kept / self.total


# -- adapters on disk (cases a, b) -------------------------------------------------------------------------


def module_names(shape: LlamaShape, layers: int | None = None) -> list[str]:
    names = list(shape.modules())
    if layers is None:
        return names
    return [n for n in names if int(n.split(".layers.", 1)[1].split(".", 1)[0]) < layers]


def ensure_adapters(workdir: Path, shape: LlamaShape, count: int, rank: int, alpha: float) -> list[Path]:
    """Write (once) ``count`` seeded PEFT adapters with these shapes under ``workdir``."""
    paths = []
    for i in range(count):
        folder = workdir / f"{shape.hidden}x{shape.intermediate}x{shape.layers}-r{rank}-a{alpha:g}" / f"a{i}"
        marker = folder / ".complete"
        if not marker.exists():
            write_adapter(folder, shape.modules(), base_model=shape.base_model, rank=rank, alpha=alpha, seed=100 + i)
            marker.write_text("ok")
        paths.append(folder)
    return paths


def subset_adapter(folder: Path, layers: int, out: Path) -> Path:
    """A copy of ``folder`` with only the first ``layers`` layers: what the PEFT model of that depth loads."""
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    keep = {k: v for k, v in tensors.items() if int(k.split(".layers.", 1)[1].split(".", 1)[0]) < layers}
    save_file(keep, str(out / "adapter_model.safetensors"))
    shutil.copy(folder / "adapter_config.json", out / "adapter_config.json")
    (out / ".complete").write_text("ok")
    return out


def scales_of(folder: Path) -> float:
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("the benchmark adapters have uniform rank and alpha")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def run_ours_streamed(
    paths: list[Path],
    modules: list[str],
    weights: list[float],
    *,
    strategy: str,
    rank: int,
    density: float,
    out_dir: Path,
    device: torch.device,
) -> Run:
    """Ours, end to end: read each module's factors, merge, re-factor, write; one module in memory at a time."""
    scales = [scales_of(p) for p in paths]
    coefficients = [w * s for w, s in zip(weights, scales, strict=True)]
    phases = Phases(sync=device.type == "cuda")
    run = Run(0.0, len(modules), phases=phases)
    started = time.perf_counter()
    writer = PeftFolderWriter(out_dir, torch.float32)
    with torch.inference_mode(), OperandReader([p / "adapter_model.safetensors" for p in paths], device) as reader:
        for module in modules:
            with phases("read"):
                factors = [reader.factors(i, module) for i in range(len(paths))]
            if strategy == "svd":
                with phases("truncate"):
                    b, a = concat_factors([(c, b, a) for c, (b, a) in zip(coefficients, factors, strict=True)])
                    cut = truncate_factors(b, a, rank)
            else:
                with phases("form"):
                    deltas = [form_delta(b, a, s) for s, (b, a) in zip(scales, factors, strict=True)]
                with phases("ties"):
                    merged = ties(deltas, weights, density=density, reuse_inputs=True)
                del deltas
                with phases("refactor"):
                    cut = refactor(merged, rank)
                del merged
            with phases("write"):
                writer.add_module(module, cut.b, cut.a)
            run.kept += cut.kept_energy
            run.total += cut.total_energy
            run.low_energy_modules += cut.retained < LOW_RETAINED_ENERGY
    writer.finish(peft_config("bench", "CAUSAL_LM", writer.ranks), {"format": "pt"})
    run.seconds = time.perf_counter() - started
    return run


# -- PEFT (cases a, b) ------------------------------------------------------------------------------------------


def build_peft_model(shape: LlamaShape, layers: int, adapters: list[Path]) -> Any:
    """TinyLlama's architecture at depth ``layers`` (fp32, weights allocated but not initialised), adapters loaded."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.hidden // HEAD_DIM,
        num_key_value_heads=shape.kv_dim // HEAD_DIM,
        vocab_size=TINYLLAMA_VOCAB,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base = base.to_empty(device="cpu")
    model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    return model


def peft_deltas(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    """module name (as in our files) → ΔW of ``adapter`` in the PEFT model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            lora: Any = layer
            out[name] = lora.get_delta_weight(adapter).detach()
    return out


def compare_with_peft(model: Any, ours_dir: Path, modules: list[str]) -> tuple[float, float]:
    """Largest and overall relative Frobenius difference between PEFT's merged ΔW and ours, over ``modules``."""
    ours = load_file(str(ours_dir / "adapter_model.safetensors"))
    theirs = peft_deltas(model, "merged")
    worst = diff2 = norm2 = 0.0
    for module in modules:
        mine = ours[f"{module}.lora_B.weight"].double() @ ours[f"{module}.lora_A.weight"].double()
        other = theirs[module].double()
        d2, n2 = float((mine - other).square().sum()), float(other.square().sum())
        worst = max(worst, math.sqrt(d2 / n2) if n2 else math.sqrt(d2))
        diff2, norm2 = diff2 + d2, norm2 + n2
    return worst, math.sqrt(diff2 / norm2) if norm2 else 0.0


def truncation_error_ratio(
    model: Any, ours_dir: Path, adapters: list[Path], modules: list[str], weights: list[float], density: float
) -> float:
    """Per module ``‖T − ours‖ / ‖T − PEFT‖`` with ``T`` the exact TIES ΔW (ours equals PEFT's here); the worst."""
    ours = load_file(str(ours_dir / "adapter_model.safetensors"))
    theirs = peft_deltas(model, "merged")
    scales = [scales_of(p) for p in adapters]
    worst = 0.0
    with OperandReader([p / "adapter_model.safetensors" for p in adapters], torch.device("cpu")) as reader:
        for module in modules:
            deltas = [form_delta(*reader.factors(i, module), s) for i, s in enumerate(scales)]
            exact = ties(deltas, weights, density=density).double()
            mine = ours[f"{module}.lora_B.weight"].double() @ ours[f"{module}.lora_A.weight"].double()
            other = float((theirs[module].double() - exact).norm())
            worst = max(worst, float((mine - exact).norm()) / other if other else 1.0)
    return worst


@dataclass(frozen=True)
class CaseAB:
    strategy: str  # "svd" (case a) or "ties" (case b)
    shape: LlamaShape
    adapters: list[Path]
    weights: list[float]
    layers: int
    rank: int = 16
    density: float = 0.5

    def subset(self) -> list[str]:
        return module_names(self.shape, self.layers)


def ours_side(case: CaseAB, out_root: Path, device: torch.device) -> dict[str, Any]:
    """Ours at full size (peak RSS taken right after), then on PEFT's subset."""

    def run(modules: list[str], out_dir: Path) -> Run:
        return run_ours_streamed(
            case.adapters, modules, case.weights, strategy=case.strategy, rank=case.rank, density=case.density,
            out_dir=out_dir, device=device,
        )  # fmt: skip

    full = run(module_names(case.shape), out_root / "full")
    peak = rss_mb()
    sub = run(case.subset(), out_root / "subset")
    assert full.phases is not None
    print(
        f"ours, full size ({case.shape.layers} layers, {full.modules} modules): {full.seconds:.2f} s, "
        f"retained energy {full.retained:.4f}, modules under {LOW_RETAINED_ENERGY}: {full.low_energy_modules}, "
        f"peak RSS {peak:.0f} MiB"
    )
    print(f"  phases: {full.phases.summary()}")
    print(f"ours, subset ({case.layers} layers, {sub.modules} modules): {sub.seconds:.2f} s")
    return {
        "ours_full_s": full.seconds,
        "ours_subset_s": sub.seconds,
        "ours_peak_rss_mib": peak,
        "ours_retained": full.retained,
        "ours_phases": full.phases.seconds,
    }


def peft_side(case: CaseAB, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """PEFT's ``add_weighted_adapter`` on a ``case.layers``-layer model; returns the model and the timings."""
    import warnings

    warnings.filterwarnings("ignore")
    subset_paths = [
        subset_adapter(p, case.layers, workdir / "adapters" / f"{p.parent.name}-first{case.layers}" / p.name)
        for p in case.adapters
    ]
    started = time.perf_counter()
    model = build_peft_model(case.shape, case.layers, subset_paths)
    build_s = time.perf_counter() - started
    combination = "svd" if case.strategy == "svd" else "ties_svd"
    extra = {} if case.strategy == "svd" else {"density": case.density, "majority_sign_method": "total"}
    started = time.perf_counter()
    model.add_weighted_adapter(
        ["a0", "a1", "a2"], case.weights, "merged", combination_type=combination, svd_rank=case.rank, **extra
    )
    seconds = time.perf_counter() - started
    peak = rss_mb()
    extrapolated = seconds * case.shape.layers / case.layers
    print(
        f"PEFT {combination}, subset ({case.layers} layers): {seconds:.2f} s "
        f"(model build {build_s:.1f} s, not counted), process peak RSS {peak:.0f} MiB"
    )
    print(
        f"PEFT {combination}, full size EXTRAPOLATED ({case.shape.layers}/{case.layers} × subset): {extrapolated:.0f} s"
    )
    return model, {"peft_subset_s": seconds, "peft_extrapolated_full_s": extrapolated, "peft_peak_rss_mib": peak}


def check_against_peft(case: CaseAB, model: Any, ours_dir: Path) -> dict[str, Any]:
    if case.strategy == "svd":
        worst, overall = compare_with_peft(model, ours_dir, case.subset())
        print(f"ΔW vs PEFT (both optimal rank-{case.rank} truncations): worst module rel. diff {worst:.2e}, "
              f"overall {overall:.2e}")  # fmt: skip
        return {"worst_rel_diff": worst, "overall_rel_diff": overall}
    if len(set(case.weights)) == 1 and case.weights[0] > 0:
        ratio = truncation_error_ratio(model, ours_dir, case.adapters, case.subset(), case.weights, case.density)
        print(f"TIES ΔW as PEFT's (equal positive weights); our re-factoring error / PEFT's full-SVD error: "
              f"worst module {ratio:.4f}")  # fmt: skip
        return {"worst_error_ratio": ratio}
    print("(no ΔW check: with unequal or negative weights PEFT elects signs before weighting, we after)")
    return {}


def case_ab(args: argparse.Namespace) -> None:
    shape = TINYLLAMA if args.scale == "full" else LlamaShape(256, 704, 4, 64, "graft-bench/tiny")
    workdir = Path(args.workdir)
    case = CaseAB(
        strategy="svd" if args.case == "a" else "ties",
        shape=shape,
        adapters=ensure_adapters(workdir / "adapters", shape, 3, 16, 32.0),
        weights=parse_weights(args.weights, 3),
        layers=min(args.layers, shape.layers),
    )
    title = "svd(w0*a0 + w1*a1 + w2*a2, rank=16)" if case.strategy == "svd" else "ties(..., density=0.5) → rank 16"
    print(f"case {args.case}: {title}, weights {case.weights}, {shape}, device {args.device}")
    print(f"machine: {machine()}")
    results: dict[str, Any] = {"case": args.case, "machine": machine(), "weights": case.weights, "layers": case.layers}
    out_root = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    try:
        if args.only in ("ours", "both"):
            results.update(ours_side(case, out_root, torch.device(args.device)))
        if args.only in ("peft", "both"):
            model, timings = peft_side(case, workdir)
            results.update(timings)
            if args.only == "both":
                subset_ratio = results["peft_subset_s"] / results["ours_subset_s"]
                full_ratio = results["peft_extrapolated_full_s"] / results["ours_full_s"]
                print(f"RATIO subset ({case.layers} layers, measured on both sides): {subset_ratio:.1f}x")
                print(f"RATIO full size (PEFT EXTRAPOLATED / ours measured): {full_ratio:.1f}x")
                results.update(ratio_subset=subset_ratio, ratio_full_extrapolated=full_ratio)
                results.update(check_against_peft(case, model, out_root / "subset"))
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    print("RESULT " + json.dumps(results, sort_keys=True))


# -- case c: Llama-70B shapes in GPU memory ------------------------------------------------------------------


def generate_adapters(
    shape: LlamaShape, count: int, rank: int, device: torch.device, dtype: torch.dtype
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    generator = torch.Generator(device=device).manual_seed(7)
    adapters = []
    for _ in range(count):
        factors = {}
        for name, (out_f, in_f) in shape.modules(PROJECTIONS).items():
            b = torch.randn(out_f, rank, generator=generator, device=device) * 0.02
            a = torch.randn(rank, in_f, generator=generator, device=device) / in_f**0.5
            factors[name] = (b.to(dtype), a.to(dtype))
        adapters.append(factors)
    return adapters


def merge_in_memory(
    adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    modules: list[str],
    weights: list[float],
    *,
    strategy: str,
    rank: int,
    density: float,
    out_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> Run:
    device = adapters[0][modules[0]][0].device
    phases = Phases(sync=device.type == "cuda")
    run = Run(0.0, len(modules), phases=phases)
    writer = PeftFolderWriter(out_dir, torch.bfloat16) if out_dir is not None else None
    started = time.perf_counter()
    with torch.inference_mode():
        for index, module in enumerate(modules):
            factors = [adapter[module] for adapter in adapters]
            if strategy == "svd":
                with phases("truncate"):
                    b, a = concat_factors([(w, b, a) for w, (b, a) in zip(weights, factors, strict=True)])
                    cut = truncate_factors(b, a, rank)
            else:
                with phases("form"):
                    deltas = [form_delta(b, a) for b, a in factors]
                with phases("ties"):
                    merged = ties(deltas, weights, density=density, reuse_inputs=True)
                del deltas
                with phases("refactor"):
                    cut = refactor(merged, rank)
                del merged
            with phases("to host + write"):
                if writer is not None:
                    writer.add_module(module, cut.b, cut.a)
                else:
                    host = (cut.b.cpu(), cut.a.cpu())
                    del host
            run.kept += cut.kept_energy
            run.total += cut.total_energy
            run.low_energy_modules += cut.retained < LOW_RETAINED_ENERGY
            if progress is not None:
                progress(index + 1, len(modules))
    if writer is not None:
        writer.finish(peft_config("bench", "CAUSAL_LM", writer.ranks), {"format": "pt"})
    if device.type == "cuda":
        torch.cuda.synchronize()
    run.seconds = time.perf_counter() - started
    return run


def reference_ties_svd(
    adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    modules: list[str],
    weights: list[float],
    *,
    rank: int,
    density: float,
) -> float:
    """PEFT's ``ties_svd`` per module: ``merge_utils.ties`` on the dense ΔW, then a full ``torch.linalg.svd``."""
    from peft.utils.merge_utils import ties as peft_ties

    device = adapters[0][modules[0]][0].device
    started = time.perf_counter()
    with torch.inference_mode():
        for module in modules:
            deltas = [b.float() @ a.float() for b, a in (adapter[module] for adapter in adapters)]
            merged = peft_ties(deltas, torch.tensor(weights, device=device), density, "total")
            u, s, vh = torch.linalg.svd(merged, full_matrices=True)
            host = ((u[:, :rank] @ torch.diag(s[:rank])).cpu(), vh[:rank].cpu())
            del deltas, merged, u, s, vh, host
            print(f"  reference {module}: {time.perf_counter() - started:.1f} s so far", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def case_c(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    shape = LLAMA_70B if args.scale == "full" else TINY_C
    rank = 64 if args.scale == "full" else 8
    count, density = 4, 0.2
    weights = parse_weights(args.weights, count)
    print(f"case c: ties(4 adapters, density {density}) → rank {rank}, and svd(...) → rank {rank}; {shape}")
    print(f"machine: {machine()}")
    results: dict[str, Any] = {"case": "c", "machine": machine(), "scale": args.scale, "device": str(device)}

    started = time.perf_counter()
    adapters = generate_adapters(shape, count, rank, device, torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.synchronize()
        adapters_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        print(f"generated 4 adapters in {time.perf_counter() - started:.1f} s, {adapters_gib:.2f} GiB on the GPU")
        results["adapters_gib"] = adapters_gib
    modules = module_names(shape)
    out_root = Path(tempfile.mkdtemp(prefix="graft-bench-c-"))
    try:
        # Warm up kernels/allocators on one module so the timed run measures steady state.
        merge_in_memory(adapters, modules[:7], weights, strategy="ties", rank=rank, density=density, out_dir=None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tied = merge_in_memory(
            adapters, modules, weights, strategy="ties", rank=rank, density=density,
            out_dir=None if args.no_write else out_root / "ties",
        )  # fmt: skip
        assert tied.phases is not None
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else rss_mb() / 1024
        print(
            f"ours TIES end to end: {tied.seconds:.2f} s for {tied.modules} modules, retained energy "
            f"{tied.retained:.4f} (modules under {LOW_RETAINED_ENERGY}: {tied.low_energy_modules}), "
            f"peak {'GPU' if device.type == 'cuda' else 'RSS'} memory {peak:.2f} GiB"
        )
        print(f"  phases: {tied.phases.summary()}")
        results.update(ours_ties_s=tied.seconds, ours_ties_retained=tied.retained, ours_peak_gib=peak)
        results["ours_ties_phases"] = tied.phases.seconds
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        factored = merge_in_memory(
            adapters, modules, weights, strategy="svd", rank=rank, density=density,
            out_dir=None if args.no_write else out_root / "svd",
        )  # fmt: skip
        print(f"ours factored svd end to end: {factored.seconds:.2f} s, retained energy {factored.retained:.4f}")
        results.update(ours_svd_s=factored.seconds, ours_svd_retained=factored.retained)

        big = next(m for m in modules if m.endswith("down_proj"))
        results.update(threshold_benchmark(form_delta(*adapters[0][big]), density, device))

        if device.type == "cuda" and args.agree_modules:
            results["cpu_gpu_agreement"] = cpu_gpu_agreement(adapters, modules, weights, rank, density, args)
        if args.ref_layers > 0:
            results.update(reference_report(adapters, shape, weights, rank, density, args.ref_layers, tied.seconds))
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    print("RESULT " + json.dumps(results, sort_keys=True))


def reference_report(
    adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    shape: LlamaShape,
    weights: list[float],
    rank: int,
    density: float,
    layers: int,
    ours_full_s: float,
) -> dict[str, float]:
    """PEFT's ``ties_svd`` recipe on the first ``layers`` layers against ours on the same modules, extrapolated."""
    modules = module_names(shape, layers)
    ref_s = reference_ties_svd(adapters, modules, weights, rank=rank, density=density)
    ours = merge_in_memory(adapters, modules, weights, strategy="ties", rank=rank, density=density, out_dir=None)
    extrapolated = ref_s * shape.layers / layers
    print(
        f"PEFT ties_svd recipe (merge_utils.ties + torch.linalg.svd), {layers} layer(s): {ref_s:.2f} s vs ours "
        f"{ours.seconds:.2f} s → {ref_s / ours.seconds:.1f}x"
    )
    print(
        f"PEFT ties_svd recipe EXTRAPOLATED to {shape.layers} layers: {extrapolated:.0f} s "
        f"→ {extrapolated / ours_full_s:.1f}x ours measured"
    )
    return {"ref_subset_s": ref_s, "ours_subset_s": ours.seconds, "ref_extrapolated_s": extrapolated}


def threshold_benchmark(delta: torch.Tensor, density: float, device: torch.device) -> dict[str, float]:
    """Our exact k-th largest |x| against ``torch.kthvalue`` and ``torch.topk`` on one ΔW (same answer)."""
    k = int(density * delta.numel())
    magnitudes = delta.abs().reshape(-1)
    ours_t = min(time_call(lambda: kth_largest_abs(delta, k), device) for _ in range(3))
    kth_t = time_call(lambda: torch.kthvalue(magnitudes, magnitudes.numel() - k + 1), device)
    topk_t = time_call(lambda: torch.topk(magnitudes, k, sorted=False), device)
    same = float(kth_largest_abs(delta, k)) == float(torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values)
    print(
        f"threshold on one {tuple(delta.shape)} ΔW (k={k}): ours {ours_t * 1e3:.1f} ms, "
        f"torch.kthvalue {kth_t * 1e3:.1f} ms ({kth_t / ours_t:.1f}x), "
        f"torch.topk {topk_t * 1e3:.1f} ms ({topk_t / ours_t:.1f}x); same value: {same}"
    )
    return {"threshold_ours_ms": ours_t * 1e3, "threshold_kthvalue_ms": kth_t * 1e3, "threshold_topk_ms": topk_t * 1e3}


def cpu_gpu_agreement(
    adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    modules: list[str],
    weights: list[float],
    rank: int,
    density: float,
    args: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    """Recompute a few modules on the CPU from the same factors; compare the TIES ΔW and the re-factored ΔW."""
    from workers.engine.dense import relative_error

    report = {}
    chosen = [next(m for m in modules if m.endswith(suffix)) for suffix in args.agree_modules.split(",")]
    for module in chosen:
        gpu_deltas = [form_delta(b, a) for b, a in (ad[module] for ad in adapters)]
        gpu_ties = ties(gpu_deltas, weights, density=density)
        gpu_cut = refactor(gpu_ties, rank)
        cpu_deltas = [form_delta(b.cpu(), a.cpu()) for b, a in (ad[module] for ad in adapters)]
        cpu_ties = ties(cpu_deltas, weights, density=density)
        cpu_cut = refactor(cpu_ties, rank)
        ties_err = relative_error(gpu_ties.cpu(), cpu_ties)
        cut_err = relative_error((gpu_cut.b @ gpu_cut.a).cpu(), cpu_cut.b @ cpu_cut.a)
        print(f"CPU/GPU agreement {module}: TIES ΔW rel. diff {ties_err:.2e}, re-factored ΔW rel. diff {cut_err:.2e}")
        report[module] = {"ties": ties_err, "refactored": cut_err}
    return report


def parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0, -0.5, -0.5] if count == 3 else [1.0] * count
    weights = [float(w) for w in text.split(",")]
    if len(weights) != count:
        raise SystemExit(f"--weights needs {count} values")
    return weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["a", "b", "c"], required=True)
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2, help="cases a/b: layers PEFT runs on (extrapolated)")
    parser.add_argument("--only", choices=["both", "ours", "peft"], default="both", help="cases a/b")
    parser.add_argument("--weights", default=None, help="comma-separated; a/b default 1,-0.5,-0.5; c default 1,1,1,1")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "graft-bench"))
    parser.add_argument("--ref-layers", type=int, default=1, help="case c: layers the reference runs on (0: skip)")
    parser.add_argument("--agree-modules", default="k_proj,q_proj,down_proj", help="case c on CUDA; empty: skip")
    parser.add_argument("--no-write", action="store_true", help="case c: copy results to the host, skip the file")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case in ("a", "b"):
        case_ab(args)
    else:
        case_c(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
