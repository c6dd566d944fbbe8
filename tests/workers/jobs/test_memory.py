"""A job's estimated memory need and the refusal of a job that cannot fit the worker's device, before anything
is loaded (real redis-server, moto S3, the in-process runner of test_run)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from safetensors.torch import save

from app.schemas.unlearn import UNLEARN_PARAMS
from app.settings import Settings
from tests.workers.jobs.test_run import merge_job, run_in_process  # noqa: F401 - fixtures
from workers.jobs import memory
from workers.jobs.outputs import output_adapter_id


def test_a_merge_that_cannot_fit_fails_with_the_numbers_and_stores_nothing(api, merge_job):  # noqa: F811
    job_id, _ = merge_job
    api.app.state.settings = api.app.state.settings.model_copy(update={"device_memory_bytes": 2**20})
    job = run_in_process(api, job_id)
    assert job.state == "failed" and job.error.code == "insufficient_device_memory", job.error
    assert "GiB" in job.error.message and "2 adapters" in job.error.message
    records = api.app.state.records
    assert not list(records.storage.list_keys(f"tenants/{job.tenant}/adapters/{output_adapter_id(job_id)}"))


def test_a_merge_estimate_counts_every_factor_twice_in_float32(api, merge_job):  # noqa: F811
    job_id, adapter_ids = merge_job
    records = api.app.state.records
    job = records.get_job(job_id)
    context = SimpleNamespace(job=job, records=records, settings=api.app.state.settings)
    need, detail = memory.estimate(context)  # type: ignore[arg-type]
    elements = 0
    for adapter_id in adapter_ids:
        key = f"tenants/{job.tenant}/adapters/{adapter_id}/adapter_model.safetensors"
        shapes = memory.safetensors_shapes(records, key, api.app.state.settings)
        elements += sum(torch.Size(shape).numel() for shape in shapes.values())
    assert need == 2 * 4 * elements + memory.OVERHEAD
    assert f"{elements} factor elements" in detail


def _unlearn_context(spec: dict, parameters: int) -> SimpleNamespace:
    blob = save({"w": torch.zeros(parameters // 10, 10), "b": torch.zeros(parameters % 10)})

    def get_range(key: str, start: int, length: int) -> bytes:
        return blob[start : start + length]

    model = SimpleNamespace(id="md_x", files=[SimpleNamespace(name="model.safetensors"),
                                              SimpleNamespace(name="config.json")])
    records = SimpleNamespace(storage=SimpleNamespace(get_range=get_range),
                              get_resource=lambda kind, tenant, model_id: model)
    job = SimpleNamespace(type="unlearn", tenant="a", spec={"model": "md_x", **spec})
    return SimpleNamespace(job=job, records=records, settings=Settings())


def test_unlearn_estimates_double_the_weights_for_a_frozen_reference_and_add_training_state():
    p = 1_000_003
    weights = 4 * p
    batch = UNLEARN_PARAMS["grad_ascent"]().batch_size  # type: ignore[attr-defined]
    assert UNLEARN_PARAMS["npo"]().batch_size == batch  # type: ignore[attr-defined]
    activations = weights * batch // memory.ROWS_PER_WEIGHTS_COPY
    lora = int(p * memory.LORA_FRACTION) * 12
    plain, _ = memory.estimate(_unlearn_context({"method": "grad_ascent"}, p))  # type: ignore[arg-type]
    assert plain == weights + lora + activations + memory.OVERHEAD
    with_reference, detail = memory.estimate(_unlearn_context({"method": "npo"}, p))  # type: ignore[arg-type]
    assert with_reference == plain + weights and "frozen reference" in detail
    full, _ = memory.estimate(  # type: ignore[arg-type]
        _unlearn_context({"method": "grad_ascent", "output": "weights"}, p))
    assert full == weights + 12 * p + activations + memory.OVERHEAD
