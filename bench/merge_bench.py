"""Merge speed: Amend's engine files-to-file against reading the adapters once and against PEFT.

    python -m bench.merge_bench [--layers 32] [--tasks 2,4,8] [--quick] [--dtype fp32|bf16]
                                [--peft-svd-tasks 2] [--peft-svd-layers 1] [--threads N]

Generates PEFT-format LoRA adapters for a Llama-2-7B-shaped model (hidden 4096, intermediate 11008;
q/k/v/o/gate/up/down; rank 16, alpha 32; random but realistic: decaying spectra, a subspace partly shared
across tasks) in a temporary directory, then prints, side by side:

- the time to merely read the T adapters once (safetensors -> float32 factors);
- Amend `merge_adapter_files` (read, merge, write a PEFT adapter + report) for merge_then_compress, ctm,
  ties (core space), cat and knots (TIES threshold per task over the whole adapter), each in a fresh
  process (so peak RSS is its own);
- PEFT `add_weighted_adapter` with combination_type `svd` (dense ΔW + full SVD per module, output rank 16)
  and `cat` on a one-layer LlamaForCausalLM with the same sizes (base weights allocated uninitialised, PEFT
  runs its real code), extrapolated per layer to `--layers` layers. PEFT's svd takes minutes per layer on
  two cores, so by default it is timed on 1 layer at T=2 only (past --peft-budget seconds, on q_proj alone,
  scaled ×7), and the extrapolation is stated;
- ratios Amend/PEFT per layer (same output rank) and Amend/read-once; peak RSS against the input size;
- the m×n-free check: the largest tensor any op creates while the engine merges one layer, against m·n.

It stops by itself in about 10 minutes with the defaults on an otherwise idle 2-core machine (less with
--quick: 4 layers, T in {2, 8}, PEFT svd on q_proj of one layer only). Each run is a fresh process; wall
and CPU seconds are both printed, since other processes sharing the CPUs inflate wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from queue import Empty
from typing import Any

HIDDEN, INTERMEDIATE, RANK, ALPHA = 4096, 11008, 16, 32
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
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("merge_then_compress", "merge_then_compress", {"rule": "task_arithmetic", "space": "core"}),
    ("ctm", "ctm", {"rule": "ties", "density": 0.25, "beta": 0.25}),
    ("ties (core)", "ties", {"space": "core", "density": 0.25}),
    ("cat", "cat", {}),
    ("knots", "knots", {"rule": "ties", "density": 0.25}),
    ("tsv", "tsv", {"space": "core"}),
    ("iso_c", "iso_c", {"space": "core"}),
    ("iso_cts", "iso_cts", {"space": "core"}),
]
SPECTRAL = ("tsv", "iso_c", "iso_cts")
# read-once ratio targets (issue 11): files to file over reading the inputs once, at T=8
RATIO_TARGETS = {"merge_then_compress": 3.0, "ctm": 5.0, "tsv": 5.0, "iso_c": 5.0, "iso_cts": 5.0}


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited from the spawning parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }


def generate(root: Path, tasks: int, layers: int, dtype: str, seed: int = 0) -> list[Path]:
    """T adapters (and one-layer copies for PEFT): B_t, A_t with decaying spectra; half of each task's
    directions come from a subspace shared by all tasks (so tasks overlap, as fine-tunes of one base do)."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -1, RANK)
    shared = RANK // 2
    per_task: list[dict[str, Any]] = [{} for _ in range(tasks)]
    for layer in range(layers):
        for module, (m, n) in SHAPES.items():
            common_b = torch.randn(m, shared, generator=g)
            common_a = torch.randn(shared, n, generator=g)
            for t in range(tasks):
                b = torch.randn(m, RANK, generator=g)
                a = torch.randn(RANK, n, generator=g)
                mix = torch.randn(shared, shared, generator=g) / shared**0.5
                b[:, :shared] = 0.6 * common_b @ mix + 0.4 * b[:, :shared]
                a[:shared] = 0.6 * mix.T @ common_a + 0.4 * a[:shared]
                key = f"{PREFIX}.{layer}.{module}"
                per_task[t][f"{key}.lora_B.weight"] = (b * decay * 2e-3).to(torch_dtype)
                per_task[t][f"{key}.lora_A.weight"] = (a / n**0.5).to(torch_dtype)
    paths = []
    for t, tensors in enumerate(per_task):
        for sub, keep in ((f"task{t}", tensors), (f"task{t}-layer0", _layer0(tensors))):
            out = root / sub
            out.mkdir(parents=True, exist_ok=True)
            save_file(keep, str(out / "adapter_model.safetensors"))
            (out / "adapter_config.json").write_text(json.dumps(_config()))
        paths.append(root / f"task{t}")
    return paths


def _layer0(tensors: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tensors.items() if k.startswith(f"{PREFIX}.0.")}


def _inputs(paths: list[Path]) -> list[tuple[dict, Path, float]]:
    return [
        (json.loads((p / "adapter_config.json").read_text()), p / "adapter_model.safetensors", 1.0 / len(paths))
        for p in paths
    ]


# ---- children (each in a fresh process) ------------------------------------------------------------------


def _set_threads(threads: int) -> None:
    """Each child starts as a worker process does (workers.runtime), then sets its torch threads."""
    from workers import runtime

    runtime.configure()
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def child_read(paths: list[str], threads: int) -> dict[str, Any]:
    _set_threads(threads)
    from workers.formats.lora import read_adapter_factors

    base = _peak_rss_mb()
    start, cpu = time.perf_counter(), _cpu_seconds()
    factors = [read_adapter_factors(c, p, w) for c, p, w in _inputs([Path(p) for p in paths])]
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    del factors
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": _peak_rss_mb(), "base_rss_mb": base}


def child_merge(
    paths: list[str], method: str, params: dict, out: str, threads: int, read_ahead: int | None = None
) -> dict[str, Any]:
    _set_threads(threads)
    from workers.engines import registry
    from workers.formats.lora import merge_adapter_files

    registry.load_all()
    base = _peak_rss_mb()
    marks: list[tuple[float, float, str]] = []
    start, cpu = time.perf_counter(), _cpu_seconds()
    report = merge_adapter_files(
        _inputs([Path(p) for p in paths]),
        method,
        params,
        {},
        Path(out),
        progress=lambda f, s: marks.append((time.perf_counter(), f, s)),
        **({} if read_ahead is None else {"read_ahead": read_ahead}),
    )
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    merge_start, merge_end = marks[0][0], marks[-1][0]
    summary = report["summary"]
    sweeps = [m.get("hooi_sweeps") for m in report["modules"].values() if m.get("hooi_sweeps") is not None]
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "read_s": merge_start - start,
        "merge_s": merge_end - merge_start,
        "write_s": start + seconds - merge_end,
        "peak_rss_mb": _peak_rss_mb(),
        "base_rss_mb": base,
        "energy_mean": summary["energy_kept_fraction_mean"],
        "energy_worst": summary["energy_kept_fraction_worst_task"],
        "rel_error": summary["deviation_from_sum_total"],
        "hooi_sweeps_max": max(sweeps) if sweeps else None,
        "hooi_sweeps_mean": sum(sweeps) / len(sweeps) if sweeps else None,
        "output_mb": (Path(out) / "adapter_model.safetensors").stat().st_size / 2**20,
    }


def child_peft(
    paths: list[str], combination: str, threads: int, modules: list[str] | None, dtype: str
) -> dict[str, Any]:
    """PEFT add_weighted_adapter on a one-layer Llama with the 7B sizes; `modules` limits the targets."""
    _set_threads(threads)
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=256,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    names = [f"t{i}" for i in range(len(paths))]
    layer0 = [str(Path(p).parent / f"{Path(p).name}-layer0") for p in paths]
    if modules is not None:  # a subset of the layer's modules (for --quick)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules)
        peft_model = PeftModel(model, config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        for name, path in zip(names, layer0, strict=True):
            state = load_file(str(Path(path) / "adapter_model.safetensors"))
            state = {k: v for k, v in state.items() if any(f".{m}." in k for m in modules)}
            set_peft_model_state_dict(peft_model, state, adapter_name=name)
    else:
        peft_model = PeftModel.from_pretrained(model, layer0[0], adapter_name=names[0])
        for name, path in zip(names[1:], layer0[1:], strict=True):
            peft_model.load_adapter(path, adapter_name=name)
    base = _peak_rss_mb()
    weights = [1.0 / len(names)] * len(names)
    start, cpu = time.perf_counter(), _cpu_seconds()
    kwargs: dict[str, Any] = {"svd_rank": RANK} if combination == "svd" else {}
    peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kwargs)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": _peak_rss_mb(), "base_rss_mb": base}


def mn_free_check(threads: int) -> list[str]:
    """Run the engine on one Llama-shaped layer (T=8) under a dispatch mode that records the largest
    tensor any op creates; compare with m·n of the smallest module (4096²)."""
    _set_threads(threads)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from app.schemas.merge import MERGE_PARAMS, MergeOutput
    from workers.engines.merge.engine import merge_modules
    from workers.engines.merge.types import TaskFactors

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = (0, "")

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                    self.largest = (t.numel(), f"{func}{tuple(t.shape)}")
            return out

    g = torch.Generator().manual_seed(0)
    modules = {
        f"model.layers.0.{name}": [
            TaskFactors(torch.randn(RANK, n, generator=g) / n**0.5, torch.randn(m, RANK, generator=g) * 1e-3)
            for _ in range(8)
        ]
        for name, (m, n) in SHAPES.items()
    }
    lines = []
    for label, method, params in [*METHODS, ("task_arithmetic", "task_arithmetic", {"space": "core"})]:
        mode = Largest()
        with mode:
            merge_modules(method, modules, MERGE_PARAMS[method].model_validate(params), MergeOutput())
        numel, what = mode.largest
        ok = numel < HIDDEN * HIDDEN
        lines.append(
            f"  {label:<22} largest tensor created: {numel:>12,d} elements ({what}); "
            f"m·n = {HIDDEN * HIDDEN:,d} -> {'m×n-free' if ok else 'FORMS m×n'}"
        )
    return lines


# ---- driver ---------------------------------------------------------------------------------------------


def _target(queue: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    queue.put(fn(*args))


def _run(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """Run fn(*args) in a fresh spawned process (own peak RSS, no state shared between runs); returns its
    result, or None when it exceeds `timeout` seconds (the process is then terminated)."""
    # the previous run's output (up to 1.2 GB) must not be written back to disk during this one
    os.sync()
    ctx = get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_target, args=(queue, fn, args))
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Empty:
        return None
    finally:
        if proc.is_alive() and timeout is not None:
            proc.terminate()
        proc.join()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fmt(x: float | None, unit: str = "s", width: int = 9) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width - len(unit)}.2f}{unit}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="layers (default 32; 4 with --quick)")
    ap.add_argument("--tasks", default=None, help="comma-separated T values (default 2,4,8; 2,8 with --quick)")
    ap.add_argument("--quick", action="store_true", help="4 layers, T in {2, 8}")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in each child (default 0 = torch's, every core: as a worker runs a merge, "
        "AMEND_MERGE_THREADS=0; the engine spreads its work over that many one-thread pool workers)",
    )
    ap.add_argument("--peft-svd-tasks", default="2", help="T values at which PEFT svd is timed (default 2)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument(
        "--spectral-module",
        default="self_attn.q_proj",
        help="module of layer 0 on which tsv/iso_c/iso_cts run in core and full space ('' to skip)",
    )

    ap.add_argument(
        "--peft-budget",
        type=float,
        default=300.0,
        help="seconds allowed for PEFT svd on a whole layer; past it, q_proj alone is timed and scaled ×7",
    )
    args = ap.parse_args(argv)
    layers = args.layers or (4 if args.quick else 32)
    task_list = [int(t) for t in (args.tasks or ("2,8" if args.quick else "2,4,8")).split(",")]
    svd_tasks = {int(t) for t in args.peft_svd_tasks.split(",") if t}
    svd_modules = ["q_proj"] if args.quick else None
    out = print  # the bench prints; library code does not

    load = os.getloadavg()
    # children inherit it; each also calls workers.runtime.configure() as a worker does (passive OpenMP
    # waits, a malloc that reuses freed blocks)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out(f"Amend merge bench: Llama-2-7B shapes, rank {RANK}, {layers} layers × {len(SHAPES)} modules, {args.dtype}")
    out(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} (other processes share the CPUs), "
        f"threads per run: {args.threads or 'torch default'}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    total_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="amend-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = _run(generate, root / "adapters", max(task_list), layers, args.dtype)
        out(f"generated {max(task_list)} adapters in {time.perf_counter() - t0:.0f}s under {root}")
        for tasks in task_list:
            chosen = [str(p) for p in paths[:tasks]]
            size_mb = sum((Path(p) / "adapter_model.safetensors").stat().st_size for p in chosen) / 2**20
            row: dict[str, Any] = {"T": tasks, "input_mb": size_mb}
            row["read"] = _run(child_read, chosen, args.threads)
            for label, method, params in METHODS:
                row[label] = _run(
                    child_merge, chosen, method, params, str(root / f"out-{method}-{tasks}"), args.threads
                )
            for label, method, params in METHODS[:2]:  # the same runs without reading ahead, side by side
                row[f"{label} (no read-ahead)"] = _run(
                    child_merge, chosen, method, params, str(root / f"out-{method}-{tasks}-sync"), args.threads, 0
                )
            if not args.no_peft:
                row["peft cat"] = _run(child_peft, chosen, "cat", args.threads, svd_modules, args.dtype)
                if tasks in svd_tasks:
                    row["peft svd"] = _run(
                        child_peft, chosen, "svd", args.threads, svd_modules, args.dtype, timeout=args.peft_budget
                    )
                    if row["peft svd"] is None and svd_modules is None:
                        out(f"  PEFT svd on a whole layer exceeded {args.peft_budget:.0f}s; timing q_proj alone")
                        row["peft svd"] = _run(
                            child_peft, chosen, "svd", args.threads, ["q_proj"], args.dtype, timeout=args.peft_budget
                        )
                        if row["peft svd"] is not None:
                            row["peft svd"]["modules"] = ["q_proj"]
                            row["peft svd"]["layer_budget_exceeded"] = args.peft_budget
                    if row["peft svd"] is None:
                        row["peft svd"] = {"seconds": None, "budget": args.peft_budget}
            rows.append(row)
            out(f"  T={tasks}: done ({time.perf_counter() - total_start:.0f}s elapsed)")
        spectral: list[str] = []
        if args.spectral_module:
            chosen = [str(p) for p in paths[: max(task_list)]]
            spectral = _run(spectral_full_check, chosen, args.threads, args.spectral_module)
    report(rows, layers, svd_modules, out)
    if spectral:
        out("")
        out(f"Spectral rules, core vs full space on {args.spectral_module} of layer 0 (CPU seconds):")
        for line in spectral:
            out(line)
    out("")
    out("m×n-free check (one layer, T=8, the engine's own ops recorded with a TorchDispatchMode):")
    for line in _run(mn_free_check, args.threads):
        out(line)
    out(f"\ntotal bench time {time.perf_counter() - total_start:.0f}s")
    return 0


def report(rows: list[dict[str, Any]], layers: int, svd_modules: list[str] | None, out: Callable[[str], None]) -> None:
    labels = [label for label, _, _ in METHODS]
    out("")
    out(f"1. Files-to-file for {layers} layers: wall s [CPU s of the run; merge wall s]")
    out("   (read + merge + report + write a PEFT adapter; each run in a fresh process; the merge streams its")
    out("   inputs, so the merge time includes reading them)")
    out(f"  {'T':>3} {'inputs':>8} {'read once':>18}" + "".join(f"{label:>30}" for label in labels))
    for row in rows:
        read = row["read"]
        cells = "".join(
            f"{row[label]['seconds']:>9.2f} [{row[label]['cpu_s']:>6.2f}; {row[label]['merge_s']:>6.2f}]" + " " * 4
            for label in labels
        )
        out(f"  {row['T']:>3} {row['input_mb']:>6.0f}MB {read['seconds']:>7.2f} [{read['cpu_s']:>6.2f}]     {cells}")
    out("")
    out("2. Amend / read-once (files-to-file wall time over the wall time to read the inputs once; CPU in [])")
    for row in rows:
        read = row["read"]
        out(
            f"  T={row['T']:<3} "
            + "  ".join(
                f"{label}: {row[label]['seconds'] / read['seconds']:.1f}× [{row[label]['cpu_s'] / read['cpu_s']:.1f}×]"
                for label in labels
            )
        )
    out("")
    out("3. Quality from the engine's report: energy kept mean / worst task, rel. error vs the full-rank sum")
    for row in rows:
        for label in labels:
            r = row[label]
            sweeps = (
                f", HOOI sweeps mean {r['hooi_sweeps_mean']:.1f} max {r['hooi_sweeps_max']}"
                if r["hooi_sweeps_max"]
                else ""
            )
            out(
                f"  T={row['T']:<3} {label:<20} E kept {r['energy_mean']:.3f} / {r['energy_worst']:.3f}, "
                f"deviation from sum {r['rel_error']:.3f}, output {r['output_mb']:.0f}MB{sweeps}"
            )
    out("")
    out("4. Peak RSS of each run (its own process, including ~0.3-0.4 GB of imports) vs the inputs on disk")
    for row in rows:
        cells = "; ".join(
            f"{label} {row[label]['peak_rss_mb']:.0f}MB ({row[label]['peak_rss_mb'] / row['input_mb']:.1f}×)"
            for label in labels
        )
        out(f"  T={row['T']:<3} inputs {row['input_mb']:.0f}MB; read once {row['read']['peak_rss_mb']:.0f}MB; {cells}")
    targets(rows, layers, out)
    if not any("peft cat" in row for row in rows):
        return
    factor = len(SHAPES) / len(svd_modules) if svd_modules else 1.0
    scope = f"{svd_modules} of 1 layer, scaled ×{factor:.1f} to a layer" if svd_modules else "1 layer"
    out("")
    out(f"5. PEFT add_weighted_adapter (live PeftModel, one-layer Llama with 7B sizes; measured on {scope})")
    out(f"   vs Amend's merge time per layer (its {layers}-layer merge time / {layers}, reading included); same rank")
    for row in rows:
        amend = {label: row[label]["merge_s"] / layers for label in labels}
        cat = row["peft cat"]["seconds"] * factor
        line = f"  T={row['T']:<3} cat: PEFT {cat:.3f}s/layer vs Amend {amend['cat']:.3f}s/layer"
        svd = row.get("peft svd")
        if svd is not None and svd["seconds"] is None:
            line += f"; svd: PEFT > {svd['budget']:.0f}s budget (stopped), so > {svd['budget'] * factor:.0f}s/layer"
        elif svd is not None:
            svd_factor = len(SHAPES) / len(svd["modules"]) if "modules" in svd else factor
            if "layer_budget_exceeded" in svd:
                line += f"; svd: a whole layer took > {svd['layer_budget_exceeded']:.0f}s (stopped), q_proj alone"
            per_layer = svd["seconds"] * svd_factor
            line += (
                f"; svd (rank {RANK}): PEFT {per_layer:.1f}s/layer [CPU {svd['cpu_s'] * svd_factor:.1f}s] -> "
                f"~{per_layer * 32 / 60:.0f} min for 32 layers (extrapolated); Amend merge_then_compress "
                f"{amend['merge_then_compress']:.3f}s/layer "
                f"({per_layer / max(amend['merge_then_compress'], 1e-9):.0f}× "
                f"faster), ctm {amend['ctm']:.3f}s/layer ({per_layer / max(amend['ctm'], 1e-9):.0f}× faster); "
                f"PEFT svd peak RSS {svd['peak_rss_mb']:.0f}MB"
            )
        out(line)
    if svd_modules or any("modules" in (row.get("peft svd") or {}) for row in rows):
        out("  note: PEFT is timed on q_proj only (4096×4096) and scaled ×7 to a layer; the MLP modules (11008×4096,")
        out("  full_matrices=True builds an 11008×11008 factor) are slower for PEFT's dense SVD, so this")
        out("  under-estimates PEFT's per-layer time (without --quick a whole layer is timed first).")
    out("  PEFT's svd is timed at T=2 only by default (--peft-svd-tasks); its cost is dominated by the dense")
    out("  m×n SVD per module, which does not shrink with T.")


def targets(rows: list[dict[str, Any]], layers: int, out: Callable[[str], None]) -> None:
    """The issue's engine targets at the largest T, each with its measured value and whether it is met."""
    row = max(rows, key=lambda r: r["T"])
    scale = f" (targets are for T=8, 32 layers; this run: T={row['T']}, {layers} layers)"
    out("")
    out("Targets, files to file" + ("" if (row["T"], layers) == (8, 32) else scale))
    budget = row["input_mb"] + 1024
    for label, limit in (("merge_then_compress", 3.0), ("ctm", 5.0)):
        seconds = row[label]["seconds"]
        out(f"  {label:<20} {seconds:6.2f} s  < {limit:.0f} s: {'met' if seconds < limit else 'MISSED'}")
    for label in ("merge_then_compress", "ctm"):
        rss = row[label]["peak_rss_mb"]
        verdict = "met" if rss < budget else "MISSED"
        out(f"  {label:<20} peak RSS {rss:.0f} MB < inputs + 1 GB = {budget:.0f} MB: {verdict}")
    read = row["read"]
    for label, _, _ in METHODS[:2]:
        sync = row.get(f"{label} (no read-ahead)")
        if sync is not None:
            out(
                f"  {label:<20} read-ahead {row[label]['seconds']:.2f} s vs no read-ahead {sync['seconds']:.2f} s "
                f"({sync['seconds'] / read['seconds']:.1f}× read-once without it)"
            )
    for label, limit in RATIO_TARGETS.items():
        wall, cpu = row[label]["seconds"] / read["seconds"], row[label]["cpu_s"] / read["cpu_s"]
        out(
            f"  {label:<20} {wall:5.1f}× read-once wall [{cpu:.1f}× CPU] ≤ {limit:.0f}×: "
            f"{'met' if wall <= limit else 'MISSED'} (wall), {'met' if cpu <= limit else 'MISSED'} (CPU)"
        )


def _full_reference(rule: str, deltas: list[Any], rank: int, fraction: float = 0.8) -> Any:
    """The rule in full space as the reference code computes it — torch.linalg.svd of the m×n matrices in
    float32 — with D = the output rank in place of min(m, n) (see workers/engines/merge/spectral.py)."""
    import torch

    def svd(x: Any) -> Any:
        return torch.linalg.svd(x, full_matrices=False)

    def orth(x: Any) -> Any:
        u, _, vh = svd(x)
        return u @ vh

    t, total = len(deltas), sum(deltas)
    if rule == "iso_c":
        u, s, vh = svd(total)
        return (u[:, :rank] * s[:rank].mean()) @ vh[:rank]
    us, ss, vs = [], [], []
    residuals = deltas
    if rule == "tsv":
        k = max(1, rank // t)
    else:  # iso_cts: common directions of the sum, then each task's own directions outside them
        common = int(rank * fraction)
        specific = round((rank - common) / t) * t
        common, k = rank - specific, specific // t
        u, s, vh = svd(total)
        uc, sc, vc = u[:, :common], s[:common], vh[:common]
        residuals = [d - uc @ (uc.T @ d) for d in deltas] if k else []
    for d in residuals:
        u, s, vh = svd(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    if rule == "iso_cts":
        us.append(uc)
        ss.append(sc)
        vs.append(vc)
    sigma = torch.cat(ss)
    if rule == "iso_cts":
        sigma = sigma.mean().expand_as(sigma)
    return (orth(torch.cat(us, 1)) * sigma) @ orth(torch.cat(vs, 0))


def spectral_full_check(paths: list[str], threads: int, module: str) -> list[str]:
    """Each spectral rule on one module of layer 0 (T adapters): Amend's core space against the rule in full
    space as the reference code runs it (per-task dense SVDs of the m×n updates): time and difference."""
    _set_threads(threads)
    from app.schemas.merge import MERGE_PARAMS, MergeOutput
    from workers.engines.merge.engine import merge_modules
    from workers.formats.lora import read_adapter_factors

    name = f"model.layers.0.{module}"
    tasks = []
    for config, path, weight in _inputs([Path(p) for p in paths]):
        tasks.append(read_adapter_factors(config, path, weight)[name])
    lines = []
    for rule in SPECTRAL:
        start = time.process_time()
        result = merge_modules(rule, {name: tasks}, MERGE_PARAMS[rule].model_validate({}), MergeOutput())
        core_s = time.process_time() - start
        merged = result.modules[name]
        core = merged.lora_B.double() @ merged.lora_A.double()
        start = time.process_time()
        full = _full_reference(rule, [f.lora_B @ f.lora_A for f in tasks], RANK)
        full_s = time.process_time() - start
        diff = float((core - full.double()).norm() / full.double().norm())
        ratio = full_s / max(core_s, 1e-9)
        lines.append(
            f"  {rule:<8} {module} ({len(paths)} adapters): core {core_s * 1e3:8.1f} ms CPU, full "
            f"{full_s:7.1f} s CPU -> {ratio:,.0f}× faster "
            f"(target ≥ 100×: {'met' if ratio >= 100 else 'MISSED'}); "
            f"relative difference {diff:.1e} (≤ 1e-4: {'met' if diff <= 1e-4 else 'MISSED'})"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
