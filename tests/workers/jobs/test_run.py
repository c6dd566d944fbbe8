"""Running a job in-process (real redis-server, moto S3, no Celery): the lease-free core of `run_job`, the one
error-to-code table, the lifecycle hook, and SHA-256-checked merge inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.errors import NotFound, Unprocessable
from app.jobs import lifecycle
from app.storage import keys
from tests.app.test_api import upload
from workers.engines.merge.errors import MergeInputError, MergeNumericError
from workers.engines.unlearn.errors import GoalNotMet, MissingInput, NonFinite
from workers.formats.tensor_files import TensorFileError
from workers.jobs import run
from workers.jobs.context import InputCorrupted, InputRejected
from workers.jobs.outputs import output_adapter_id, report_key


@pytest.fixture
def merge_job(api, adapter_dir):
    ids = []
    for name, seed in (("one", 1), ("two", 2)):
        response = upload(api, adapter_dir(name, seed=seed), name)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    body = {"type": "merge", "adapters": [{"id": i} for i in ids], "method": "task_arithmetic",
            "output": {"name": "merged", "rank": 4}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"], ids


def run_in_process(api, job_id: str):
    records, settings = api.app.state.records, api.app.state.settings
    run._run_leased(job_id, settings, records, SimpleNamespace(lost=False))
    return records.get_job(job_id)


def test_a_merge_runs_and_every_state_change_reaches_the_listener(api, merge_job):
    job_id, _ = merge_job
    seen = []
    remove = lifecycle.on_change(lambda record, previous: seen.append((record.id, previous, record.state)))
    try:
        job = run_in_process(api, job_id)
    finally:
        remove()
    assert job.state == "succeeded", job.error
    assert [(previous, state) for jid, previous, state in seen if jid == job_id] == [
        ("queued", "running"), ("running", "succeeded")
    ]
    assert job.result.adapter_id == output_adapter_id(job_id)


def test_a_merge_input_whose_bytes_changed_fails_as_corrupted_and_stores_nothing(api, merge_job):
    job_id, adapter_ids = merge_job
    records = api.app.state.records
    job = records.get_job(job_id)
    key = keys.adapter(job.tenant, adapter_ids[1], "adapter_model.safetensors")
    tampered = bytearray(records.storage.get_bytes(key))
    tampered[-1] ^= 0x01  # one bit of one weight
    records.storage.put_bytes(key, bytes(tampered))
    job = run_in_process(api, job_id)
    assert job.state == "failed" and job.error.code == "input_corrupted", job.error
    assert adapter_ids[1] in job.error.message
    with pytest.raises(NotFound):
        records.get_adapter(job.tenant, output_adapter_id(job_id))
    assert not records.storage.exists(report_key(job))


def test_an_unexpected_error_is_internal_and_names_its_type_never_invalid_input(api, merge_job, monkeypatch):
    job_id, _ = merge_job

    def broken(context):
        raise ValueError("a programming error")

    monkeypatch.setitem(run.HANDLERS, "merge", run.JobType(broken, lambda context: None))
    job = run_in_process(api, job_id)
    assert job.state == "failed"
    assert job.error.code == "internal_error" and job.error.message.startswith("ValueError")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InputRejected("gone"), "invalid_input"),
        (InputCorrupted("changed"), "input_corrupted"),
        (MergeInputError("module x: shapes differ"), "invalid_input"),
        (MergeNumericError("module x: NaN"), "merge_non_finite"),
        (TensorFileError("truncated"), "invalid_input"),
        (MissingInput("needs retain rows"), "unlearn_missing_input"),
        (NonFinite("loss is NaN"), "unlearn_non_finite"),
        (GoalNotMet("the step budget ran out"), "goal_not_met"),
        (Unprocessable("too big", code="too_many_adapters"), "too_many_adapters"),
        (KeyError("x"), "internal_error"),
        (ValueError("bad"), "internal_error"),
        (ZeroDivisionError(), "internal_error"),
    ],
)
def test_the_error_table(error, code):
    assert run.error_for(error).code == code


def test_every_job_type_has_one_handler_module():
    from app.jobs.submit import ADMISSION_CHECKS

    assert set(run.HANDLERS) == set(ADMISSION_CHECKS)
