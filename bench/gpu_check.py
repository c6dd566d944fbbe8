"""GPU check: one job of every type on the GPU and on the CPU, with throughput, peak memory and the agreement of
the results — for when a machine with a CUDA GPU is available (none exists where this was written).

    python -m bench.gpu_check [--device cuda:0] [--layers 8] [--tasks 4]

- merge: `merge_adapter_files` (ctm and ties in core space) on generated Llama-7B-shaped adapters (hidden 4096,
  intermediate 11008, rank 16), `--layers` layers of T adapters: seconds, modules per second, peak device memory
  (torch.cuda.max_memory_allocated) against the CPU's peak RSS, and the relative difference of the merged ΔW of
  every module (float32: the stated tolerance is 1e-4);
- unlearn: `grad_ascent` through the engine on a 4-layer MLP classifier of 12M parameters with fixed steps,
  on the device vs the CPU: seconds, steps per second, peak memory;
- compress: its entry point (`compress_adapter_files`) does not take a device yet, so it is timed on the CPU
  only and said so.

Without a GPU it runs the CPU side and says that the GPU side was skipped. It finishes in well under five
minutes on one GPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from workers import runtime

runtime.configure()

HIDDEN, INTERMEDIATE, RANK = 4096, 11008, 16
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN),
          "down_proj": (HIDDEN, INTERMEDIATE)}


def make_adapters(root: Path, layers: int, tasks: int) -> list[tuple[dict, Path, float]]:
    inputs = []
    for t in range(tasks):
        generator = torch.Generator().manual_seed(t)
        tensors = {}
        for layer in range(layers):
            for name, (m, n) in SHAPES.items():
                part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, n, generator=generator) / n**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(m, RANK, generator=generator) / RANK**0.5
        directory = root / f"task{t}"
        directory.mkdir()
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(SHAPES),
                  "base_model_name_or_path": "llama-7b-shaped"}
        (directory / "adapter_config.json").write_text(json.dumps(config))
        inputs.append((config, directory / "adapter_model.safetensors", 1.0 / tasks))
    return inputs


def peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def timed(device: str, run: Any) -> tuple[float, int]:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        return time.perf_counter() - started, int(torch.cuda.max_memory_allocated(device))
    return time.perf_counter() - started, peak_rss()


def merge_check(root: Path, devices: list[str], layers: int, tasks: int) -> None:
    from workers.formats.lora import merge_adapter_files

    inputs = make_adapters(root, layers, tasks)
    modules = layers * len(SHAPES)
    for method, params in (("ctm", {"rule": "ties", "density": 0.5}), ("ties", {"density": 0.5, "space": "core"})):
        outputs = {}
        for device in devices:
            out = root / f"{method}-{device.replace(':', '')}"
            seconds, peak = timed(device, lambda: merge_adapter_files(  # noqa: B023
                inputs, method, params, {"rank": RANK}, out, device=device))  # noqa: B023
            outputs[device] = load_file(str(out / "adapter_model.safetensors"))
            print(f"merge {method:5s} T={tasks} {layers} layers on {device:7s}: {seconds:7.2f} s, "
                  f"{modules / seconds:7.1f} modules/s, peak {'device' if 'cuda' in device else 'RSS'} "
                  f"{peak / 2**30:.2f} GiB")
        if len(devices) == 2:
            worst = 0.0
            cpu, gpu = outputs[devices[0]], outputs[devices[1]]
            for key in cpu:
                if key.endswith("lora_A.weight"):
                    b = key.replace("lora_A", "lora_B")
                    want = cpu[b].double() @ cpu[key].double()
                    got = gpu[b].double() @ gpu[key].double()
                    worst = max(worst, float((got - want).norm() / want.norm()))
            print(f"merge {method}: largest relative difference of a merged ΔW, GPU vs CPU: {worst:.2e} "
                  f"({'within' if worst <= 1e-4 else 'OUTSIDE'} the stated 1e-4)")


def unlearn_check(devices: list[str]) -> None:
    from app.schemas.unlearn import UNLEARN_PARAMS
    from workers.engines.unlearn import ClassifierData, unlearn

    generator = torch.Generator().manual_seed(0)
    rows = 2048
    x = torch.randn(rows, 1024, generator=generator)
    labels = torch.randint(0, 10, (rows,), generator=generator)
    forget = ClassifierData.from_tensors({"pixel_values": x[:256], "labels": labels[:256]})
    retain = ClassifierData.from_tensors({"pixel_values": x[256:], "labels": labels[256:]})
    steps = 50
    params = UNLEARN_PARAMS["grad_ascent"].model_validate({"steps": steps, "lr": 1e-4, "batch_size": 64})
    for device in devices:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                    torch.nn.Linear(4096, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10))
        seconds, peak = timed(device, lambda: unlearn(  # noqa: B023
            model, "classifier", "grad_ascent", params, forget, retain, device=device))  # noqa: B023
        print(f"unlearn grad_ascent ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
              f"{steps} steps) on {device:7s}: {seconds:7.2f} s, {steps / seconds:6.1f} steps/s, "
              f"peak {peak / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=4)
    args = parser.parse_args()
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append(args.device)
        print(f"GPU: {torch.cuda.get_device_name(args.device)}")
    else:
        print("no CUDA device here: the GPU side is skipped, the CPU side runs alone")
    with tempfile.TemporaryDirectory(prefix="amend-gpu-check-") as tmp:
        merge_check(Path(tmp), devices, args.layers, args.tasks)
    unlearn_check(devices)
    print("compress: compress_adapter_files takes no device yet; it runs on the CPU (see docs/deploy.md)")


if __name__ == "__main__":
    main()
