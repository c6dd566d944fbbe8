"""Merge inputs streamed into the merge (workers/jobs/streamed_inputs.py): hashed in file order whatever the
arrival order, reads wait for their bytes, a failed download raises instead of hanging, a changed input is
refused, and the streamed merge writes exactly the bytes of the plain files-to-file merge (moto S3, tiny
real PEFT adapters cut into many small chunks)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from app.errors import StorageUnavailable
from app.storage import keys
from tests.app.test_api import upload
from workers.formats.lora import merge_adapter_files, read_spans
from workers.jobs.context import InputCorrupted
from workers.jobs.streamed_inputs import ArrivingFile, StreamedAdapters

OUTPUT = {"name": "merged", "rank": 4}


def test_the_hash_is_in_file_order_whatever_order_the_chunks_arrive_in(tmp_path: Path) -> None:
    data = os.urandom(1000)
    file = ArrivingFile(tmp_path / "w", len(data), hashlib.sha256(data).hexdigest(), "w", chunk=300, head=100)
    assert [file.chunk_range(i) for i in range(file.count)] == [(0, 100), (100, 400), (400, 700), (700, 1000)]
    for index in reversed(range(file.count)):
        start, end = file.chunk_range(index)
        file.write(index, [data[start : start + 7], data[start + 7 : end]])  # pieces, as a stream gives them
    file.check()
    assert file.digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "w").read_bytes() == data


def test_the_hash_is_right_when_threads_write_chunks_side_by_side(tmp_path: Path) -> None:
    """Chunks written by several threads at once, mostly in order (hashed as they are written) and some out of
    order (hashed from the file later): the digest is the file's, every time."""
    import random

    data = os.urandom(64 * 1000 + 123)
    for trial in range(5):
        file = ArrivingFile(tmp_path / f"w{trial}", len(data), hashlib.sha256(data).hexdigest(), "w", chunk=1000,
                            head=64)
        order = list(range(file.count))
        rng = random.Random(trial)
        for _ in range(10):  # a few swaps: mostly in order
            i, j = rng.randrange(file.count), rng.randrange(file.count)
            order[i], order[j] = order[j], order[i]
        lock = threading.Lock()

        def writer(rng=random.Random(trial), order=order, lock=lock, file=file) -> None:
            while True:
                with lock:
                    if not order:
                        return
                    index = order.pop(0)
                start, end = file.chunk_range(index)
                pieces = [data[position : min(position + 300, end)] for position in range(start, end, 300)]

                def slowly(pieces=pieces):
                    for piece in pieces:
                        time.sleep(rng.random() / 2000)
                        yield piece

                file.write(index, slowly())

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        file.check()
        assert file.digest == hashlib.sha256(data).hexdigest()


def test_a_short_chunk_is_refused_as_a_changed_input(tmp_path: Path) -> None:
    file = ArrivingFile(tmp_path / "w", 100, "0" * 64, "adapter x", chunk=64, head=32)
    with pytest.raises(InputCorrupted, match="size"):
        file.write(1, [b"x" * 10])


def test_a_read_waits_for_its_bytes_and_a_failed_download_raises_instead_of_hanging(tmp_path: Path) -> None:
    data = os.urandom(300)
    file = ArrivingFile(tmp_path / "w", 300, hashlib.sha256(data).hexdigest(), "w", chunk=100, head=100)
    returned: list[float] = []
    waiter = threading.Thread(target=lambda: (file.wait(150, 160), returned.append(time.monotonic())))
    waiter.start()
    time.sleep(0.2)
    assert not returned  # chunk 1 (bytes 100..199) is not there yet
    file.write(0, [data[:100]])
    time.sleep(0.05)
    assert not returned
    wrote = time.monotonic()
    file.write(1, [data[100:200]])
    waiter.join(timeout=5)
    assert returned and returned[0] >= wrote
    file.wait(0, 200)  # arrived: returns at once
    errors: list[BaseException] = []

    def wait_for_the_rest() -> None:
        try:
            file.wait(250, 300)
        except StorageUnavailable as error:
            errors.append(error)

    waiter = threading.Thread(target=wait_for_the_rest)
    waiter.start()
    time.sleep(0.05)
    file.fail(StorageUnavailable("object storage is unreachable"))
    waiter.join(timeout=5)
    assert not waiter.is_alive() and len(errors) == 1
    file.wait(0, 200)  # what did arrive is still readable
    with pytest.raises(StorageUnavailable):
        file.check()


@pytest.fixture
def stored(api, adapter_dir):
    """Three tiny adapters uploaded through the API (tenant A): (records, their records, their directories)."""
    records = api.app.state.records
    directories = [adapter_dir(f"a{seed}", seed=seed, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
                   for seed in (1, 2, 3)]
    adapters = []
    for number, directory in enumerate(directories):
        response = upload(api, directory, f"a{number}")
        assert response.status_code == 201, response.text
        adapters.append(records.get_adapter("tenant-a", response.json()["id"]))
    return records, adapters, directories


def _local_inputs(directories, weights):
    return [(json.loads((d / "adapter_config.json").read_text()), d / "adapter_model.safetensors", w)
            for d, w in zip(directories, weights, strict=True)]


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {"density": 0.5})])
def test_the_streamed_merge_writes_the_bytes_of_the_files_merge(stored, tmp_path, monkeypatch, method, params):
    records, adapters, directories = stored
    weights = [0.7, -0.4, 1.0]
    merge_adapter_files(_local_inputs(directories, weights), method, params, OUTPUT, tmp_path / "files")
    real_iter_range = records.storage.iter_range
    slow: list[tuple[str, int]] = []

    def late_iter_range(key, start, length, piece=1 << 20):
        if start > 3000:  # the later chunks arrive late: the merge must wait for them, not read zeros
            slow.append((key, start))
            time.sleep(0.05)
        return real_iter_range(key, start, length, piece=64)  # small pieces: many partial writes per chunk

    monkeypatch.setattr(records.storage, "iter_range", late_iter_range)
    blocked = []

    def watched(file):
        def wait(start, end):
            if not all(file.arrived(index) for index in file.chunks(start, end)):
                blocked.append((file.what, start, end))
            file.wait(start, end)

        return wait

    with StreamedAdapters(records, adapters, tmp_path / "inputs", read_spans, threads=2, chunk=1024,
                          head=256) as streamed:
        assert max(file.count for file in streamed.files) > 5
        report = merge_adapter_files(streamed.inputs(weights), method, params, OUTPUT, tmp_path / "streamed",
                                     arrivals=[watched(file) for file in streamed.files])
        streamed.verify()
    assert slow and report
    assert blocked  # the merge did get ahead of the downloads and waited for its bytes
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "files" / name).read_bytes()


def test_a_changed_input_is_refused(stored, tmp_path):
    records, adapters, _ = stored
    key = keys.adapter(adapters[1].tenant, adapters[1].id, "adapter_model.safetensors")
    original = records.storage.get_bytes(key)
    tampered = bytearray(original)
    tampered[-1] ^= 0x01  # one bit of one weight
    records.storage.put_bytes(key, bytes(tampered))
    with StreamedAdapters(records, adapters, tmp_path / "flipped", read_spans, chunk=1024, head=256) as streamed:
        with pytest.raises(InputCorrupted, match=adapters[1].id):
            streamed.verify()
    records.storage.put_bytes(key, original + b"\0")  # one byte longer: refused before the merge starts
    with pytest.raises(InputCorrupted, match="size"):
        StreamedAdapters(records, adapters, tmp_path / "longer", read_spans, chunk=1024, head=256).__enter__()


@pytest.mark.timeout(60)
def test_a_failed_download_fails_the_merge_instead_of_hanging(stored, tmp_path, monkeypatch):
    records, adapters, _ = stored
    real_iter_range = records.storage.iter_range

    def broken_iter_range(key, start, length, piece=1 << 20):
        if start > 3000:
            raise StorageUnavailable("object storage is unreachable")
        return real_iter_range(key, start, length, piece)

    monkeypatch.setattr(records.storage, "iter_range", broken_iter_range)
    with StreamedAdapters(records, adapters, tmp_path / "inputs", read_spans, threads=2, chunk=1024,
                          head=256) as streamed:
        with pytest.raises(StorageUnavailable):
            merge_adapter_files(streamed.inputs([1.0] * 3), "task_arithmetic", {}, OUTPUT, tmp_path / "out",
                                arrivals=streamed.arrivals)
        with pytest.raises(StorageUnavailable):
            streamed.verify()


def test_a_merge_job_cancelled_while_its_inputs_stream_stops_them_and_stores_nothing(api, adapter_dir, monkeypatch):
    """A cancel seen at the engine's first progress report ends the job `cancelled`: the downloads stop (no
    fetch thread is left) and no output is stored."""
    from types import SimpleNamespace

    from app.errors import NotFound
    from workers.jobs import run
    from workers.jobs.context import JobCancelled, JobContext
    from workers.jobs.outputs import output_adapter_id

    records = api.app.state.records
    ids = [upload(api, adapter_dir(f"x{seed}", seed=seed), f"x{seed}").json()["id"] for seed in (1, 2)]
    job_id = api.post("/v1/jobs", json={"type": "merge", "adapters": [{"id": i} for i in ids],
                                         "method": "task_arithmetic", "output": {"name": "m", "rank": 4}}).json()["id"]
    original = StreamedAdapters.__init__  # many small chunks: some still pending when the cancel comes

    def small_chunks(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "chunk": 1024, "head": 256})

    monkeypatch.setattr(StreamedAdapters, "__init__", small_chunks)

    def cancel_once_merging(self, fraction, stage, force=False):
        if stage.startswith("merging"):
            raise JobCancelled

    monkeypatch.setattr(JobContext, "progress", cancel_once_merging)
    run._run_leased(job_id, api.app.state.settings, records, SimpleNamespace(lost=False))
    job = records.get_job(job_id)
    assert job.state == "cancelled", (job.state, job.error)
    assert not [t for t in threading.enumerate() if t.name.startswith("amend-fetch")]
    with pytest.raises(NotFound):
        records.get_adapter(job.tenant, output_adapter_id(job_id))
