"""The worker's device: `AMEND_DEVICE` resolved once per process, its memory, and the refusal of a job that
cannot fit it.

- `device_class(spec)` says `cpu` or `cuda` without creating a CUDA context (the prefork parent must not: a
  forked child cannot use CUDA its parent initialised), so the worker's main process can pick its queues.
- `current()` resolves the device fully (its name and memory) in the process that runs jobs, once, and logs it.
- `check_fits(need, device)` raises `InsufficientDeviceMemory` (job error `insufficient_device_memory`, with
  the numbers) before anything is loaded, when a job's estimated need exceeds the memory the worker may use.
- `autocast_dtype(device, precision)`: the dtype for `torch.autocast` under `AMEND_PRECISION`, or None.
- `configure_determinism(enabled)`: `AMEND_DETERMINISTIC` applied to the process that runs jobs.

Engines never pick a device themselves: the job handlers pass `current().torch_device` to them.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

DeviceClass = Literal["cpu", "cuda"]


class InsufficientDeviceMemory(Exception):
    """The job's estimated memory need exceeds what this worker's device may give it."""

    code = "insufficient_device_memory"


def device_class(spec: str) -> DeviceClass:
    """`cpu` or `cuda` for an `AMEND_DEVICE` value; `auto` asks torch (NVML-based: no CUDA context)."""
    if spec == "cpu":
        return "cpu"
    if spec.startswith("cuda"):
        return "cuda"
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # read when torch.cuda first checks
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class WorkerDevice:
    spec: str  # as configured: auto, cpu, cuda, cuda:N
    device: str  # resolved: cpu, cuda:N
    kind: DeviceClass
    name: str
    total_memory: int  # bytes
    capability: tuple[int, int] | None = None  # CUDA compute capability

    @property
    def torch_device(self) -> Any:
        import torch

        return torch.device(self.device)

    def free_memory(self) -> int:
        """Bytes free now: the GPU's free memory plus what torch's allocator holds cached; the CPU's
        MemAvailable."""
        if self.kind == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free) + int(torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))
        return _meminfo("MemAvailable")

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "device": self.device, "class": self.kind, "name": self.name,
                "total_memory": self.total_memory, "free_memory": self.free_memory()}


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def resolve(spec: str) -> WorkerDevice:
    """The device `spec` names, checked: `cuda:N` must exist. Creates the CUDA context for a GPU."""
    kind = device_class(spec)
    if kind == "cpu":
        return WorkerDevice(spec, "cpu", "cpu", _cpu_name(), _meminfo("MemTotal"))
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"AMEND_DEVICE={spec} but torch sees no CUDA device")
    index = int(spec.split(":", 1)[1]) if ":" in spec else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"AMEND_DEVICE={spec} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    props = torch.cuda.get_device_properties(index)
    torch.cuda.set_device(index)
    return WorkerDevice(spec, f"cuda:{index}", "cuda", str(props.name), int(props.total_memory),
                        (int(props.major), int(props.minor)))


@lru_cache(maxsize=1)
def current() -> WorkerDevice:
    """This process's device, resolved once from `AMEND_DEVICE` and logged."""
    device = resolve(get_settings().device)
    log.info("worker device", extra={"device": device.device, "device_name": device.name,
                                     "device_memory": device.total_memory, "device_spec": device.spec})
    return device


def budget(device: WorkerDevice, settings: Settings) -> int:
    """The bytes a job may use on `device`: `AMEND_DEVICE_MEMORY_BYTES` if set (capped by the device's free
    memory), else the free memory now."""
    free = device.free_memory()
    return min(free, settings.device_memory_bytes) if settings.device_memory_bytes else free


def check_fits(need: int, detail: str, device: WorkerDevice, settings: Settings) -> None:
    """Refuse (before anything is loaded) a job whose estimated need exceeds this worker's budget."""
    available = budget(device, settings)
    if need > available:
        raise InsufficientDeviceMemory(
            f"the job needs about {_gib(need)} on {device.device} ({detail}); this worker has {_gib(available)} "
            f"of {_gib(device.total_memory)} ({device.name})"
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB ({size} bytes)"


def configure_determinism(enabled: bool, seed: int = 0) -> bool:
    """Under `AMEND_DETERMINISTIC`: deterministic kernels only (`torch.use_deterministic_algorithms(True)`; an
    op without one raises instead of running nondeterministically), cuBLAS's fixed workspace (read when CUDA
    starts, so call this before), and torch's, Python's and numpy's global generators seeded with `seed`. Job
    handlers and engines seed their own generators from the job's parameters as well. Returns `enabled`."""
    if not enabled:
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import random

    import numpy
    import torch

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)
    log.info("deterministic algorithms on", extra={"seed": seed})
    return True


def autocast_dtype(device: WorkerDevice, precision: str) -> Any:
    """The `torch.autocast` dtype for unlearning under `AMEND_PRECISION`, or None (float32, no autocast):
    `auto` is bfloat16 on a GPU of compute capability 8.0 or newer (Ampere), `bfloat16` forces it."""
    import torch

    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.kind == "cuda" and device.capability is not None and device.capability >= (8, 0):
        return torch.bfloat16
    return None
