"""The status page in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python package):
sign in, watch a running job's progress bar move (server-sent events), open a finished merge and see its
report table and chart. Screenshots go to docs/ (see `screenshot_path`). Without a browser the test installs
Debian's chromium when it can (root and apt-get) and otherwise skips, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from app.jobs import lifecycle
from app.main import create_app
from app.records import new_id, now
from app.schemas.jobs import JobRecord
from app.settings import Settings
from tests.conftest import tenant_keys

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[2] / "docs"


def screenshot_path(name: str, tmp_path: Path) -> str:
    """docs/<name> (shown in the README) when it is missing or AMEND_UPDATE_SCREENSHOTS=1, else a scratch file,
    so an ordinary test run leaves the committed pictures alone."""
    target = DOCS / name
    if os.environ.get("AMEND_UPDATE_SCREENSHOTS") == "1" or not target.exists():
        DOCS.mkdir(exist_ok=True)
        return str(target)
    return str(tmp_path / name)


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed (make install)")
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip(f"{CHROMIUM} is missing and this user cannot apt-get install chromium")
        installed = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True,
                                   timeout=900, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
        if installed.returncode != 0 or not os.path.exists(CHROMIUM):
            pytest.skip(f"apt-get install chromium failed: {installed.stderr[-500:]}")
    return CHROMIUM


@pytest.fixture
def server(redis_url, redis_client, moto_s3):
    key_a, _, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not (uv.started and uv.servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}", key_a
    uv.should_exit = True
    thread.join(timeout=10)


def merge_with_report(app, key, adapter_dir) -> str:
    """A real merge, run in-process, so the page shows a real report."""
    from fastapi.testclient import TestClient

    from tests.app.test_api import upload
    from tests.workers.jobs.test_run import run_in_process

    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        ids = [upload(client, adapter_dir(n, seed=s), n).json()["id"] for n, s in (("one", 1), ("two", 2))]
        body = {"type": "merge", "adapters": [{"id": ids[0]}, {"id": ids[1], "weight": 0.5}], "method": "ctm",
                "params": {"rule": "ties", "density": 0.5}, "output": {"name": "merged", "rank": 4}}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        assert run_in_process(client, job_id).state == "succeeded"
        return job_id


def running_job(records) -> str:
    spec = {"type": "merge", "adapters": [{"id": "ad_0000000000000000000000aa", "weight": 1.0}], "method": "knots",
            "params": {"rule": "ties"}, "output": {"rank": 8}}
    record = JobRecord(id=new_id("jb"), tenant="tenant-a", type="merge", method="knots", state="queued",
                       progress=0.0, stage="queued", created_at=now(), spec=spec)
    lifecycle.create(records, record)
    lifecycle.start(records, record.id, max_attempts=3)
    records.set_progress(record.id, 0.1, "aligning 2 of 20 modules")
    return record.id


def test_sign_in_watch_progress_and_read_a_report(chromium, server, adapter_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    app, base, key = server
    records = app.state.records
    merged = merge_with_report(app, key, adapter_dir)
    running = running_job(records)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=FLAGS,
            viewport={"width": 1200, "height": 640},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(base + "/")
            page.fill("#api-key", "not-a-key")
            page.click("button[type=submit]")
            expect(page.locator("#signin-error")).to_have_text("That key was refused.")
            page.fill("#api-key", key)
            page.click("button[type=submit]")
            bar = page.locator(f'tr[data-job="{running}"] .bar')
            expect(bar).to_have_attribute("aria-valuenow", "10")
            records.set_progress(running, 0.55, "aligning 11 of 20 modules")
            expect(bar).to_have_attribute("aria-valuenow", "55")  # moved by the event stream, no reload
            expect(page.locator(f'tr[data-job="{running}"] .stage')).to_have_text("aligning 11 of 20 modules")
            expect(page.locator(f'tr[data-job="{merged}"] .state')).to_have_text("succeeded")
            page.screenshot(path=screenshot_path("status-page.png", tmp_path))

            page.click(f'a[data-open="{merged}"]')
            report = page.locator("#report-table table")
            expect(report).to_contain_text("q_proj")
            expect(report).to_contain_text("%")
            assert report.locator("tbody tr").count() >= 2  # a row per module and task
            expect(page.locator("#report-chart rect")).to_have_count(2)  # a bar per task
            expect(page.locator("#detail")).to_contain_text("succeeded")
            page.screenshot(path=screenshot_path("status-page-job.png", tmp_path), full_page=True)

            page.click("nav button[data-show=adapters]")
            expect(page.locator("#adapters table")).to_contain_text("merged")
            for view in ("schedules", "requests", "models"):  # their lists render (empty here), not an error
                page.click(f"nav button[data-show={view}]")
                expect(page.locator(f"#{view} table")).to_contain_text("nothing yet")
            assert page.evaluate("sessionStorage.getItem('amend-api-key')") == key
        finally:
            browser.close()
    lifecycle.finish(records, running, "cancelled")
