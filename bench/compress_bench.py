"""Compression speed and exactness: Amend's rank_reduce and extract against the dense routes, side by side.

    python -m bench.compress_bench [--layers 32] [--dense-layers 1] [--threads 2] [--quick] [--skip-extract]

1. `rank_reduce` of a rank-64 PEFT adapter for a Llama-2-7B-shaped model (hidden 4096, intermediate 11008;
   q/k/v/o/gate/up/down; 32 layers; fp32; alpha 128; random factors, each module's spectrum decaying over
   one to three decades), to rank 16 and to energy 0.9, file to file (read, reduce, write the PEFT adapter
   and its report), against the dense route PEFT and mergekit take: ΔW = s·B·A formed per module and
   `torch.linalg.svd` of it, truncated the same way. A dense SVD of a 4096×11008 matrix takes about a
   minute on two cores, so the dense route is timed on `--dense-layers` layers (every layer has the same
   shapes) and scaled to the whole adapter; the scaling is printed. On the timed layers the two outputs are
   compared: the same ranks, and ‖B'A' − ΔW_k‖_F / ‖ΔW_k‖_F (ΔW_k the dense truncation) below 1e-4.
2. `extract` at rank 16 of one 4096×11008 module (two safetensors "models": a base weight and a fine-tune
   whose difference has a decaying spectrum over a full-rank noise floor) against a full SVD of the same
   difference: time, and Amend's relative error against the optimal rank-16 error (target: within 1%).

Each run is a fresh process, so each peak RSS (VmHWM) is its own. Both routes of a comparison use the same
number of torch threads (`--threads`, default 2: the dense LAPACK SVD uses both cores; the worker itself
runs compression with AMEND_MERGE_THREADS, default 1). Wall and CPU seconds are both printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HIDDEN, INTERMEDIATE, RANK, ALPHA = 4096, 11008, 64, 128
SHAPES = {  # module -> (out m, in n)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
PREFIX = "base_model.model.model.layers"
TARGETS = {"rank 16": {"rank": 16}, "energy 0.9": {"energy": 0.9}}
EXTRACT_RANK = 16


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited from the spawning parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _set_threads(threads: int) -> None:
    from workers import runtime

    runtime.configure()
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def _config() -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": sorted(name.split(".")[-1] for name in SHAPES),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "inference_mode": True,
    }


def generate_adapter(root: Path, layers: int, dense_layers: int, seed: int = 0) -> tuple[Path, Path]:
    """The rank-64 adapter (all layers) and a copy of its first `dense_layers` layers for the dense route.
    B has a decaying column scale (σ spread over two decades), A rows of unit norm."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    for layer in range(layers):
        for module, (m, n) in SHAPES.items():
            key = f"{PREFIX}.{layer}.{module}"
            decades = 1.0 + 2.0 * float(torch.rand(1, generator=g))  # each module its own spectrum
            decay = torch.logspace(0, -decades, RANK)
            tensors[f"{key}.lora_B.weight"] = torch.randn(m, RANK, generator=g) * decay * 1e-3
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, n, generator=g) / math.sqrt(n)
    paths = []
    for name, keep in (("adapter", tensors), ("dense-layers", _first_layers(tensors, dense_layers))):
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        save_file(keep, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(_config()))
        paths.append(out)
    return paths[0], paths[1]


def _first_layers(tensors: dict[str, Any], layers: int) -> dict[str, Any]:
    return {k: v for k, v in tensors.items() if int(k[len(PREFIX) + 1 :].split(".", 1)[0]) < layers}


# ---- children (each in a fresh process) ------------------------------------------------------------------


def child_amend(adapter: str, output: dict[str, Any], out: str, threads: int) -> dict[str, Any]:
    """Amend file to file: read, rank_reduce, write the PEFT adapter + report."""
    _set_threads(threads)
    from app.schemas.compress import CompressOutput
    from workers.engines import registry
    from workers.jobs.compress_files import compress_adapter_files

    registry.load_all()
    path = Path(adapter)
    config = json.loads((path / "adapter_config.json").read_text())
    marks: list[float] = []
    start, cpu = time.perf_counter(), _cpu_seconds()
    report = compress_adapter_files(
        config, path / "adapter_model.safetensors", "rank_reduce", {}, CompressOutput(**output), Path(out),
        progress=lambda fraction, stage: marks.append(time.perf_counter()),
    )
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    summary = report["summary"]
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "engine_s": marks[-1] - marks[0] if marks else None,
        "peak_rss_mb": _peak_rss_mb(),
        "energy_kept": summary["energy_kept"],
        "rel_error": summary["rel_error"],
        "ranks": {name: row["rank_out"] for name, row in report["modules"].items()},
        "output_mb": (Path(out) / "adapter_model.safetensors").stat().st_size / 2**20,
    }


def child_dense(adapter: str, amend_outputs: dict[str, str], threads: int) -> dict[str, Any]:
    """The dense route on the given layers: ΔW = s·B·A, torch.linalg.svd, truncate to each target (timed, and
    the peak RSS taken, before anything else); then Amend's outputs for the same modules are compared."""
    _set_threads(threads)
    import torch
    from safetensors import safe_open

    from workers.formats.lora import read_adapter_factors

    path = Path(adapter)
    config = json.loads((path / "adapter_config.json").read_text())
    factors = read_adapter_factors(config, path / "adapter_model.safetensors", 1.0)
    seconds, cpu = 0.0, 0.0
    truncated: dict[str, dict[str, tuple[Any, Any]]] = {}
    for name, f in factors.items():
        start, started_cpu = time.perf_counter(), _cpu_seconds()
        delta = f.lora_B @ f.lora_A
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        energy = s.double().square().cumsum(0) / s.double().square().sum()
        truncated[name] = {}
        for label, target in TARGETS.items():
            k = target.get("rank") or int((energy < target["energy"] - 1e-12).sum()) + 1
            truncated[name][label] = (u[:, :k] * s[:k], vh[:k].clone())
        seconds += time.perf_counter() - start
        cpu += _cpu_seconds() - started_cpu
        del delta, u, s, vh
    peak = _peak_rss_mb()
    worst = {label: 0.0 for label in TARGETS}
    mismatches = {label: 0 for label in TARGETS}
    for label, out in amend_outputs.items():
        with safe_open(str(Path(out) / "adapter_model.safetensors"), framework="pt") as handle:
            for name, per_target in truncated.items():
                left, right = per_target[label]
                lora_B = handle.get_tensor(f"base_model.model.{name}.lora_B.weight").double()
                lora_A = handle.get_tensor(f"base_model.model.{name}.lora_A.weight").double()
                if lora_A.shape[0] != right.shape[0]:
                    mismatches[label] += 1
                    continue
                reference = left.double() @ right.double()
                worst[label] = max(worst[label], float((lora_B @ lora_A - reference).norm() / reference.norm()))
    return {"seconds": seconds, "cpu_s": cpu, "modules": len(factors), "peak_rss_mb": peak,
            "worst_rel_diff": worst, "rank_mismatches": mismatches}


def generate_module(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Two one-tensor safetensors files: W_base, and W_base + Δ with σ_j(Δ) = 0.5·e^(−j/12) + 0.002·noise."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    m, n = HIDDEN, INTERMEDIATE
    base = torch.randn(m, n, generator=g) * 0.02
    k = 256
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    sigma = 0.5 * torch.exp(-torch.arange(k, dtype=torch.float32) / 12.0)
    delta = (u * sigma) @ v.mT + 0.002 / math.sqrt(n) * torch.randn(m, n, generator=g)
    paths = []
    for name, weight in (("base", base), ("tuned", base + delta)):
        out = root / f"{name}.safetensors"
        save_file({"model.layers.0.mlp.down_proj.weight": weight.contiguous()}, str(out))
        paths.append(out)
    return paths[0], paths[1]


def _difference(base: str, tuned: str) -> Any:
    from safetensors import safe_open

    key = "model.layers.0.mlp.down_proj.weight"
    with safe_open(tuned, framework="pt") as handle:
        delta = handle.get_tensor(key)
    with safe_open(base, framework="pt") as handle:
        delta -= handle.get_tensor(key)
    return delta


def child_extract(base: str, tuned: str, threads: int) -> dict[str, Any]:
    _set_threads(threads)
    import torch

    from app.schemas.compress import ExtractParams
    from workers.engines.compress.extract import extract
    from workers.engines.compress.types import ExtractJob, SizeRule, WeightDelta

    start, cpu = time.perf_counter(), _cpu_seconds()
    delta = _difference(base, tuned)
    read = time.perf_counter() - start
    job = ExtractJob(modules={"down_proj": (delta.shape[0], delta.shape[1], torch.float32)},
                     delta=lambda name: WeightDelta(delta=delta, base_norm=1.0), size=SizeRule(rank=EXTRACT_RANK))
    result = extract(job, ExtractParams())
    row = result.report["modules"]["down_proj"]
    return {"seconds": time.perf_counter() - start, "read_s": read, "cpu_s": _cpu_seconds() - cpu,
            "peak_rss_mb": _peak_rss_mb(), "rel_error": row["rel_error"], "rank": row["rank_out"]}


def child_full_svd(base: str, tuned: str, threads: int) -> dict[str, Any]:
    _set_threads(threads)
    import torch

    start, cpu = time.perf_counter(), _cpu_seconds()
    delta = _difference(base, tuned)
    read = time.perf_counter() - start
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    lora_B, lora_A = u[:, :EXTRACT_RANK] * s[:EXTRACT_RANK], vh[:EXTRACT_RANK]
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    tail = s.double()[EXTRACT_RANK:].square().sum().sqrt() / s.double().square().sum().sqrt()
    del lora_B, lora_A
    return {"seconds": seconds, "read_s": read, "cpu_s": cpu, "peak_rss_mb": _peak_rss_mb(),
            "optimal_rel_error": float(tail)}


def _target(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    queue.put(fn(*args))


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) in a fresh spawned process (its own peak RSS); returns its result."""
    os.sync()
    ctx = get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_target, args=(queue, fn, args))
    proc.start()
    try:
        return queue.get()
    finally:
        proc.join()


def _say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def bench_rank_reduce(root: Path, layers: int, dense_layers: int, threads: int) -> bool:
    adapter, dense_copy = generate_adapter(root, layers, dense_layers)
    size_mb = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    _say(f"rank_reduce: rank-{RANK} adapter, {layers} layers × 7 modules, fp32, {size_mb:.0f} MB; "
         f"{threads} torch thread(s)")
    amend, outputs = {}, {}
    for label, target in TARGETS.items():
        outputs[label] = str(root / f"out-{label.replace(' ', '-')}")
        amend[label] = _run(child_amend, str(adapter), target, outputs[label], threads)
        # the dense route's modules are the first layers: keep Amend's outputs of those for the comparison
    dense = _run(child_dense, str(dense_copy), outputs, threads)
    scale = layers / dense_layers
    ok = True
    _say(f"  dense route (torch.linalg.svd of each ΔW): {dense['seconds']:.1f} s wall, {dense['cpu_s']:.1f} s CPU "
         f"for {dense['modules']} modules ({dense_layers} layer(s)); ×{scale:g} -> {dense['seconds'] * scale:.0f} s "
         f"for the whole adapter; peak RSS {dense['peak_rss_mb']:.0f} MB")
    for label, run in amend.items():
        ratio = dense["seconds"] * scale / run["seconds"]
        cpu_ratio = dense["cpu_s"] * scale / max(run["cpu_s"], 1e-9)
        ranks = sorted(set(run["ranks"].values()))
        worst, mismatches = dense["worst_rel_diff"][label], dense["rank_mismatches"][label]
        same = worst <= 1e-4 and mismatches == 0
        ok = ok and ratio >= 100 and same
        _say(f"  {label:>10}: Amend {run['seconds']:.2f} s wall ({run['engine_s']:.2f} s reducing, "
             f"{run['cpu_s']:.1f} s CPU), peak RSS {run['peak_rss_mb']:.0f} MB, output {run['output_mb']:.0f} MB, "
             f"ranks {ranks[0]}..{ranks[-1]}, energy kept {run['energy_kept']:.4f}")
        _say(f"  {'':>10}  {ratio:,.0f}× faster than the dense route in wall time (target ≥ 100×: "
             f"{_met(ratio >= 100)}), {cpu_ratio:,.0f}× in CPU time; "
             f"largest ‖Amend − dense‖/‖dense‖ on the dense layers {worst:.1e}, rank mismatches {mismatches} "
             f"(target ≤ 1e-4: {_met(same)})")
    return ok


def bench_extract(root: Path, threads: int) -> bool:
    base, tuned = generate_module(root)
    _say(f"extract: one {HIDDEN}×{INTERMEDIATE} module at rank {EXTRACT_RANK}, fp32; {threads} torch thread(s)")
    amend = _run(child_extract, str(base), str(tuned), threads)
    full = _run(child_full_svd, str(base), str(tuned), threads)
    ratio = full["seconds"] / amend["seconds"]
    cpu_ratio = full["cpu_s"] / max(amend["cpu_s"], 1e-9)
    quality = amend["rel_error"] / full["optimal_rel_error"]
    _say(f"  full SVD: {full['seconds']:.1f} s wall ({full['read_s']:.2f} s reading), {full['cpu_s']:.1f} s CPU, "
         f"peak RSS {full['peak_rss_mb']:.0f} MB, optimal rank-{EXTRACT_RANK} error {full['optimal_rel_error']:.5f}")
    _say(f"  Amend:    {amend['seconds']:.2f} s wall ({amend['read_s']:.2f} s reading), {amend['cpu_s']:.1f} s CPU, "
         f"peak RSS {amend['peak_rss_mb']:.0f} MB, error {amend['rel_error']:.5f}")
    _say(f"  {ratio:.1f}× faster in wall time (target ≥ 5×: {_met(ratio >= 5)}), {cpu_ratio:.1f}× in CPU time; "
         f"error {quality:.4f}× the optimal "
         f"(target ≤ 1.01×: {_met(quality <= 1.01)})")
    return ratio >= 5 and quality <= 1.01


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="layers of the adapter (default 32; 4 with --quick)")
    ap.add_argument("--dense-layers", type=int, default=1, help="layers the dense route is timed on (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every child (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="4 layers")
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args(argv)
    layers = args.layers or (4 if args.quick else 32)
    dense_layers = min(args.dense_layers, layers)
    with tempfile.TemporaryDirectory(prefix="amend-compress-bench-") as scratch:
        root = Path(scratch)
        ok = bench_rank_reduce(root, layers, dense_layers, args.threads)
        if not args.skip_extract:
            ok = bench_extract(root, args.threads) and ok
    _say(f"compress_bench: {'all targets met' if ok else 'a target was MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
