"""The typed Python client of the Amend API (httpx; imports no torch and nothing of `workers`).

    from app.client import Client
    amend = Client()                                   # AMEND_URL, AMEND_API_KEY from the environment
    one = amend.upload_adapter("adapters/one", name="one")
    two = amend.upload_adapter("adapters/two", name="two")
    job = amend.merge([one.id, (two.id, 0.5)], method="ctm", params={"rule": "ties"}, output={"rank": 8})
    job = amend.wait(job.id, progress=True)            # a rich progress bar; raises JobFailed on failure
    amend.download(job.result.adapter_id, "merged/")

Results are the API's own pydantic models (`JobPublic`, `AdapterPublic`); every error answer is raised as an
`ApiError` subclass chosen by its status, carrying the API's stable `code`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from app.schemas.adapters import AdapterPublic
from app.schemas.jobs import JobPublic

FINAL_STATES = ("succeeded", "failed", "cancelled")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# at or above this many bytes of weights, upload_adapter sends them straight to the object store (/v1/uploads)
PRESIGNED_THRESHOLD = 64 * 2**20
PART_WORKERS = 8
PART_TIMEOUT = 300.0  # seconds per part PUT


class ApiError(Exception):
    """An error answer: `status`, the API's stable `code` and its `message`."""

    status = 0

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class Unprocessable(ApiError):
    status = 422


class QuotaExceeded(ApiError):
    status = 429


class ServiceUnavailable(ApiError):
    status = 503


_BY_STATUS: dict[int, type[ApiError]] = {
    cls.status: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge,
                                Unprocessable, QuotaExceeded, ServiceUnavailable)
}


class JobFailed(Exception):
    """`wait` saw the job end in `failed` or `cancelled`; `job` is its final state (`job.error.code`)."""

    def __init__(self, job: JobPublic) -> None:
        detail = f"{job.error.code}: {job.error.message}" if job.error else job.state
        super().__init__(f"job {job.id} {job.state} ({detail})")
        self.job = job


def _raise_for(response: httpx.Response) -> None:
    if response.is_success or response.status_code == 304:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    raise _BY_STATUS.get(response.status_code, ApiError)(response.status_code, code, message)


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 http: httpx.Client | None = None) -> None:
        """`url` and `api_key` default to AMEND_URL (else http://127.0.0.1:8000) and AMEND_API_KEY. `http`
        replaces the HTTP client (e.g. a test client); the key is then set on it."""
        key = api_key if api_key is not None else os.environ.get("AMEND_API_KEY", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if http is None:
            base = url or os.environ.get("AMEND_URL", "http://127.0.0.1:8000")
            http = httpx.Client(base_url=base, timeout=timeout, headers=headers)
        elif key:
            http.headers.update(headers)
        self.http = http

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    # -- adapters -------------------------------------------------------------------------------------
    def upload_adapter(self, directory: str | Path, name: str | None = None,
                       presigned: bool | None = None) -> AdapterPublic:
        """Upload a PEFT adapter directory (adapter_config.json + adapter_model.safetensors): through the API, or
        (`presigned`; by default when the weights are PRESIGNED_THRESHOLD bytes or more) in parallel parts
        straight to the object store, see `upload_files`."""
        folder = Path(directory)
        if presigned is None:
            presigned = (folder / ADAPTER_FILES[1]).stat().st_size >= PRESIGNED_THRESHOLD
        if presigned:
            adapter_id = self.upload_files("adapter", [folder / item for item in ADAPTER_FILES], name or folder.name)
            return self.adapter(adapter_id)
        with (folder / ADAPTER_FILES[0]).open("rb") as config, (folder / ADAPTER_FILES[1]).open("rb") as weights:
            files = {"config": (ADAPTER_FILES[0], config), "weights": (ADAPTER_FILES[1], weights)}
            response = self._request("POST", "/v1/adapters", files=files, data={"name": name or folder.name})
        return AdapterPublic.model_validate(response.json())

    def upload_files(self, kind: str, paths: list[Path], name: str | None = None, **extra: Any) -> str:
        """A presigned upload (POST /v1/uploads): declare the files with their SHA-256, PUT their parts to the
        signed URLs, PART_WORKERS at a time, then complete; returns the registered adapter's, model's or
        dataset's id. A failed upload is deleted."""
        files = [{"name": path.name, "size": path.stat().st_size, "sha256": _sha256(path)} for path in paths]
        upload = self._request("POST", "/v1/uploads", json={"kind": kind, "files": files, "name": name, **extra}).json()
        try:
            by_name = {path.name: path for path in paths}
            work = [(by_name[item["name"]], item["part_size"], part)
                    for item in upload["files"] for part in item["parts"]]
            # the URLs carry their own signature: a plain client, without the API key
            with httpx.Client(timeout=PART_TIMEOUT) as store, ThreadPoolExecutor(PART_WORKERS) as pool:
                list(pool.map(lambda job: _put_part(store, *job), work))
            done = self._request("POST", f"/v1/uploads/{upload['id']}/complete").json()
        except BaseException:
            self.http.request("DELETE", f"/v1/uploads/{upload['id']}")  # gone already if complete refused it
            raise
        return str(done["result_id"])

    def adapter(self, adapter_id: str, version: int | None = None) -> AdapterPublic:
        """An adapter: its current version, or the `version` pinned."""
        params = {"version": version} if version is not None else {}
        return AdapterPublic.model_validate(self._request("GET", f"/v1/adapters/{adapter_id}", params=params).json())

    def adapters(self, limit: int = 50) -> Iterator[AdapterPublic]:
        """Every adapter of the tenant, newest first (pages fetched as needed)."""
        for item in self._pages("/v1/adapters", {"limit": limit}):
            yield AdapterPublic.model_validate(item)

    def delete_adapter(self, adapter_id: str) -> None:
        self._request("DELETE", f"/v1/adapters/{adapter_id}")

    def download(self, adapter_id: str, directory: str | Path, version: int | None = None) -> Path:
        """Both files of an adapter (its current version, or the `version` pinned) into `directory` (streamed);
        returns the directory."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        params = {"version": version} if version is not None else {}
        for name in ADAPTER_FILES:
            with self.http.stream("GET", f"/v1/adapters/{adapter_id}/files/{name}", params=params) as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                partial = folder / f".{name}.part"
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                partial.replace(folder / name)
        return folder

    # -- jobs -----------------------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> JobPublic:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobPublic.model_validate(self._request("POST", "/v1/jobs", json=spec, headers=headers).json())

    def merge(self, adapters: Sequence[str | tuple[str, float] | dict[str, Any]], method: str = "ctm",
              params: dict[str, Any] | None = None, output: dict[str, Any] | None = None,
              webhook_url: str | None = None, idempotency_key: str | None = None,
              tune: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None) -> JobPublic:
        """Merge adapters — ids, `(id, weight)` pairs, or `{"id", "weight", "version"}` items (a version pin) —
        with a method and its params; `tune` (a grid search on validation rows) and `calibration` (rain's base
        model, rows and markers) are passed as the job's blocks of those names (see the README)."""
        items = [
            {"id": a, "weight": 1.0} if isinstance(a, str) else dict(a) if isinstance(a, dict)
            else {"id": a[0], "weight": a[1]}
            for a in adapters
        ]
        spec: dict[str, Any] = {"type": "merge", "adapters": items, "method": method, "params": params or {},
                                "output": output or {}}
        for name, block in (("webhook_url", webhook_url), ("tune", tune), ("calibration", calibration)):
            if block:
                spec[name] = block
        return self.submit(spec, idempotency_key)

    def compress(self, adapter: str, method: str, params: dict[str, Any] | None = None,
                 output: dict[str, Any] | None = None, idempotency_key: str | None = None) -> JobPublic:
        spec = {"type": "compress", "adapter": adapter, "method": method, "params": params or {},
                "output": output or {}}
        return self.submit(spec, idempotency_key)

    def unlearn(self, model: str, forget: str, method: str, idempotency_key: str | None = None,
                **spec: Any) -> JobPublic:
        """An unlearning job: `model` id, `forget` dataset id, `method`; any other field of the job (retain,
        adapter, params, output, goal …) as keyword arguments."""
        body = {"type": "unlearn", "model": model, "forget": {"dataset": forget}, "method": method, **spec}
        return self.submit(body, idempotency_key)

    def job(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self, limit: int = 50, **filters: str) -> Iterator[JobPublic]:
        """The tenant's jobs, newest first; filters: state, type, method, adapter, created_after, created_before."""
        for item in self._pages("/v1/jobs", {"limit": limit, **filters}):
            yield JobPublic.model_validate(item)

    def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def events(self, job_id: str, after: str | None = None) -> list[dict[str, Any]]:
        params = {"after": after} if after else {}
        return list(self._request("GET", f"/v1/jobs/{job_id}/events", params=params).json()["items"])

    def report(self, job_id: str) -> Any:
        return self._request("GET", f"/v1/jobs/{job_id}/report").json()

    def wait(self, job_id: str, progress: bool = False, timeout: float | None = None, poll: float = 0.5,
             raise_on_failure: bool = True) -> JobPublic:
        """Poll until the job ends (conditional GETs: an unchanged job costs a 304). With `progress`, a rich
        progress bar with the job's stage. Raises `JobFailed` for a failed or cancelled job (unless told not
        to) and TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        etag: str | None = None
        job: JobPublic | None = None
        bar = _ProgressBar(job_id) if progress else None
        try:
            while True:
                response = self._request("GET", f"/v1/jobs/{job_id}",
                                         headers={"If-None-Match": etag} if etag else {})
                if response.status_code != 304 or job is None:
                    job, etag = JobPublic.model_validate(response.json()), response.headers.get("etag")
                    if bar is not None:
                        bar.update(job)
                if job.state in FINAL_STATES:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()
        if raise_on_failure and job.state != "succeeded":
            raise JobFailed(job)
        return job

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            page = self._request("GET", path, params={**params, **({"cursor": cursor} if cursor else {})}).json()
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _put_part(store: httpx.Client, path: Path, part_size: int, part: dict[str, Any]) -> None:
    with path.open("rb") as source:
        source.seek((part["number"] - 1) * part_size)
        data = source.read(part_size)
    response = store.put(part["url"], content=data)
    if response.status_code != 200:
        raise ApiError(response.status_code, "upload_part_failed", response.text[:500])


class _ProgressBar:
    """A rich progress bar for one job (rich is imported only when a bar is asked for)."""

    def __init__(self, job_id: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.fields[job]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[state]}: {task.description}"), TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("waiting", total=1.0, job=job_id, state="queued")
        self.progress.start()

    def update(self, job: JobPublic) -> None:
        self.progress.update(self.task, completed=job.progress, description=job.stage[:60], state=job.state)

    def close(self) -> None:
        self.progress.stop()
