"""The worker's device: AMEND_DEVICE resolution, queues by device class, memory refusal, and engines that create
every tensor on the device they are given.

The CPU runs the same code path a GPU runs: the device is passed explicitly everywhere. To prove it, the
merges and compressions below run with torch's default device set to "meta": a tensor an engine creates without
naming its device lands on "meta", and the first operation that mixes it with the real (CPU) tensors raises —
so a forgotten `device=` fails here, as it would on a GPU worker.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.queue import queue_for, queues_for_device
from app.schemas.compress import CompressOutput
from app.schemas.merge import MERGE_PARAMS
from app.settings import Settings
from tests.workers.test_lora import inputs, save_adapter
from workers import device as worker_device
from workers.formats.compact import COMPACT_FILE
from workers.formats.lora import merge_adapter_files
from workers.jobs.compress_files import compress_adapter_files, extract_model_files

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")


def merge_cases() -> list[tuple[str, dict]]:
    cases = []
    for method, model in MERGE_PARAMS.items():
        if model.calibrated:  # reads a model and rows: tests/workers/engines/merge/test_rain.py
            continue
        fields = model.model_fields
        kw = {"density": 0.5} if "density" in fields else {}
        spaces = ("full", "core") if "space" in fields else (None,)
        cases += [(method, kw if space is None else {**kw, "space": space}) for space in spaces]
    # KnOTS' global thresholds stream every module's magnitudes (streamed_magnitudes)
    return cases + [("knots", {"rule": "magnitude_prune", "density": 0.5}),
                    ("ctm", {"rule": "dare_ties", "density": 0.5})]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return (save_adapter(root, "a", 1, r=4, lora_alpha=8),
            save_adapter(root, "b", 2, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))


@pytest.mark.parametrize("method,params", merge_cases(), ids=lambda v: str(v))
def test_merge_engines_create_no_tensor_on_a_default_device(adapters, tmp_path: Path, method, params) -> None:
    pairs = inputs((adapters[0], 0.8), (adapters[1], -0.5))
    reference = merge_adapter_files(pairs, method, params, {"rank": 3}, tmp_path / "plain", device="cpu")
    with torch.device("meta"):  # any tensor created without an explicit device lands here and breaks the merge
        report = merge_adapter_files(pairs, method, params, {"rank": 3}, tmp_path / "strict", device="cpu")
    plain, strict = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("plain", "strict"))
    assert plain.keys() == strict.keys()
    for key, value in plain.items():
        assert strict[key].device.type == "cpu"
        assert torch.equal(strict[key], value), key
    assert report["summary"] == reference["summary"]


COMPRESS_CASES = [
    ("rank_reduce", {}, {"rank": 2}),
    ("rank_reduce", {}, {"energy": 0.9}),
    ("rank_reduce", {}, {"budget_params": 400}),
    ("cast", {"dtype": "bf16"}, {}),
    ("sparsify_quantize", {"density": 0.5, "bits": "ternary"}, {}),
    ("sparsify_quantize", {"density": 0.5, "bits": "int8"}, {}),
]


def _same_files(tmp_path: Path, names: tuple[str, ...] = ("adapter_model.safetensors",)) -> None:
    for name in names:
        plain, strict = (load_file(str(tmp_path / d / name)) for d in ("plain", "strict"))
        assert plain.keys() == strict.keys()
        for key, value in plain.items():
            assert strict[key].device.type == "cpu"
            assert torch.equal(strict[key], value), key


@pytest.mark.parametrize("method,params,output", COMPRESS_CASES, ids=lambda v: str(v))
def test_compress_engines_create_no_tensor_on_a_default_device(adapters, tmp_path: Path, method, params,
                                                               output) -> None:
    config = json.loads((adapters[0] / "adapter_config.json").read_text())
    weights = adapters[0] / "adapter_model.safetensors"
    reference = compress_adapter_files(config, weights, method, params, CompressOutput(**output), tmp_path / "plain",
                                       device="cpu")
    with torch.device("meta"):
        report = compress_adapter_files(config, weights, method, params, CompressOutput(**output),
                                        tmp_path / "strict", device="cpu")
    _same_files(tmp_path, ("adapter_model.safetensors", COMPACT_FILE) if method == "sparsify_quantize" else
                ("adapter_model.safetensors",))
    assert report["summary"] == reference["summary"]


def test_extract_creates_no_tensor_on_a_default_device(tmp_path: Path) -> None:
    """The randomized range finder draws its sketch from a generator on the given device."""
    from tests.factories import tiny_llama

    tiny_llama(0).save_pretrained(tmp_path / "base")
    tuned = tiny_llama(0)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if name.endswith(("q_proj.weight", "down_proj.weight")):
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    tuned.save_pretrained(tmp_path / "tuned")
    params = {"target_modules": ["q_proj", "down_proj"], "oversample": 2}  # sketch 6 < 32/2: the random path
    runs = {}
    for name in ("plain", "strict"):
        with torch.device("meta") if name == "strict" else contextlib.nullcontext():
            runs[name] = extract_model_files(tmp_path / "base", tmp_path / "tuned", "md_base", "CAUSAL_LM", params,
                                             CompressOutput(rank=4), tmp_path / name, device="cpu")
    _same_files(tmp_path)
    assert runs["strict"]["summary"] == runs["plain"]["summary"]


@cuda_only
@pytest.mark.parametrize("method,params", merge_cases(), ids=lambda v: str(v))
def test_a_merge_on_the_gpu_matches_the_cpu_within_1e4_relative(adapters, tmp_path: Path, method, params) -> None:
    pairs = inputs((adapters[0], 0.8), (adapters[1], -0.5))
    merge_adapter_files(pairs, method, params, {"rank": 3}, tmp_path / "cpu", device="cpu")
    merge_adapter_files(pairs, method, params, {"rank": 3}, tmp_path / "gpu", device="cuda")
    cpu, gpu = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("cpu", "gpu"))
    for key in cpu:
        if key.endswith("lora_A.weight"):
            b = key.replace("lora_A", "lora_B")
            want, got = cpu[b].double() @ cpu[key].double(), gpu[b].double() @ gpu[key].double()
            assert (got - want).norm() <= 1e-4 * want.norm(), key


def test_device_specs_resolve_and_refuse() -> None:
    assert worker_device.device_class("cpu") == "cpu"
    assert worker_device.device_class("cuda:1") == "cuda"
    assert worker_device.device_class("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = worker_device.resolve("cpu")
    assert (cpu.device, cpu.kind) == ("cpu", "cpu") and cpu.total_memory > 2**20 and cpu.name
    assert 0 < cpu.free_memory() <= cpu.total_memory
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            worker_device.resolve("cuda:0")
    with pytest.raises(ValueError):
        Settings(device="gpu")
    assert Settings(device="cuda:3").device == "cuda:3"


def test_queues_by_device_class() -> None:
    gpu = queues_for_device("cuda", unlearn_on_cpu=False)
    assert set(gpu) == {"amend.merge", "amend.compress", "amend.unlearn", "amend.unlearn.gpu"}
    assert queues_for_device("cpu", unlearn_on_cpu=True) == ["amend.merge", "amend.unlearn", "amend.compress"]
    assert queues_for_device("cpu", unlearn_on_cpu=False) == ["amend.merge", "amend.compress"]
    assert queue_for("unlearn", gpu_only=True) == "amend.unlearn.gpu"
    assert queue_for("merge", gpu_only=True) == "amend.merge"  # merges run anywhere


def test_a_job_that_cannot_fit_is_refused_with_the_numbers() -> None:
    cpu = worker_device.resolve("cpu")
    settings = Settings(device_memory_bytes=2**30)
    worker_device.check_fits(2**29, "half the budget", cpu, settings)
    with pytest.raises(worker_device.InsufficientDeviceMemory) as refused:
        worker_device.check_fits(3 * 2**30, "a 7B model", cpu, settings)
    message = str(refused.value)
    assert "3.00 GiB" in message and "1.00 GiB" in message and "a 7B model" in message
    assert refused.value.code == "insufficient_device_memory"


def test_autocast_dtype_follows_the_precision_setting() -> None:
    cpu = worker_device.resolve("cpu")
    assert worker_device.autocast_dtype(cpu, "auto") is None
    assert worker_device.autocast_dtype(cpu, "float32") is None
    assert worker_device.autocast_dtype(cpu, "bfloat16") is torch.bfloat16
    ampere = worker_device.WorkerDevice("cuda", "cuda:0", "cuda", "A100", 80 * 2**30, (8, 0))
    turing = worker_device.WorkerDevice("cuda", "cuda:0", "cuda", "T4", 16 * 2**30, (7, 5))
    assert worker_device.autocast_dtype(ampere, "auto") is torch.bfloat16
    assert worker_device.autocast_dtype(turing, "auto") is None
