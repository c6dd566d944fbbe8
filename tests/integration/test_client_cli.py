"""The Python client and the CLI against the real stack (Redis, SeaweedFS, a Celery worker): upload → merge →
watch → download, typed errors with the API's code, and `--json` output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from app import commands
from app.client import Client, JobFailed, NotFound, Unprocessable


class SharedClient(Client):
    """A client on the test's HTTP client, which the CLI's `with` must not close."""

    def close(self) -> None:
        pass


@pytest.fixture
def amend(client):
    return SharedClient(http=client)


def test_upload_merge_wait_download_with_the_client(amend, adapter_dir, tmp_path):
    one = amend.upload_adapter(adapter_dir("one", seed=1), name="one")
    two = amend.upload_adapter(adapter_dir("two", seed=2))
    assert one.name == "one" and two.name == "two" and one.rank > 0
    assert [a.id for a in amend.adapters(limit=1)][:2] == [two.id, one.id]  # pages of one, newest first
    # (the stack's bucket is shared with other tests, so older records may follow)
    job = amend.merge([one.id, (two.id, 0.5)], method="ties", params={"density": 0.5}, output={"rank": 4})
    assert job.state == "queued"
    done = amend.wait(job.id, progress=True, timeout=120, poll=0.2)
    assert done.state == "succeeded" and done.result and done.result.adapter_id
    folder = amend.download(done.result.adapter_id, tmp_path / "merged")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    assert load_file(folder / "adapter_model.safetensors")
    assert next(amend.jobs(state="succeeded")).id == job.id
    assert amend.events(job.id)[-1]["stage"] == "succeeded"
    # version pins: every adapter is its own version 1; a version it does not have is a 404
    assert amend.adapter(one.id, version=1).sha256 == one.sha256
    with pytest.raises(NotFound):
        amend.adapter(one.id, version=2)
    with pytest.raises(NotFound):
        amend.download(one.id, tmp_path / "v2", version=2)
    pinned = amend.merge([{"id": one.id, "weight": 1.0, "version": 1}, two.id], method="cat")
    assert pinned.spec["adapters"][0] == {"id": one.id, "weight": 1.0, "version": 1}
    assert amend.wait(pinned.id, timeout=120, poll=0.2).state == "succeeded"

    with pytest.raises(NotFound) as missing:
        amend.job("jb_0123456789abcdef01234567")
    assert missing.value.code == "not_found" and missing.value.status == 404
    with pytest.raises(Unprocessable) as invalid:
        amend.merge([one.id], method="ties", params={"density": 7})
    assert invalid.value.code == "validation_error"
    queued = amend.merge([one.id, two.id], method="cat")
    amend.cancel(queued.id)
    with pytest.raises(JobFailed) as failed:
        amend.wait(queued.id, timeout=10)
    assert failed.value.job.state == "cancelled"


def test_the_cli_uploads_merges_watches_and_downloads(client, amend, adapter_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "make_client", lambda: amend)
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(commands.app, list(args))
        assert result.exit_code == code, (args, result.output)
        return result.stdout

    one = json.loads(run("adapters", "upload", str(adapter_dir("one", seed=1)), "--name", "one", "--json"))
    two = json.loads(run("adapters", "upload", str(adapter_dir("two", seed=2)), "--json"))
    listed = json.loads(run("adapters", "list", "--json"))
    assert [a["id"] for a in listed][:2] == [two["id"], one["id"]]
    assert "one" in run("adapters", "list")  # the table
    job = json.loads(run("merge", one["id"], f"{two['id']}:0.5", "--method", "ctm", "--param", "rule=\"ties\"",
                         "--param", "density=0.5", "--rank", "4", "--json"))
    assert job["spec"]["adapters"][1] == {"id": two["id"], "weight": 0.5, "version": None}
    assert job["spec"]["params"]["density"] == 0.5
    done = json.loads(run("jobs", "watch", job["id"], "--json"))
    assert done["state"] == "succeeded", done
    assert json.loads(run("jobs", "list", "--state", "succeeded", "--json"))[0]["id"] == job["id"]
    assert json.loads(run("jobs", "get", job["id"], "--json"))["result"]["adapter_id"] == done["result"]["adapter_id"]
    run("adapters", "download", done["result"]["adapter_id"], str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 0
    merged_watch = run("merge", one["id"], two["id"], "--method", "cat", "--watch")  # progress bar, then the table
    assert "succeeded" in merged_watch
    queued = json.loads(run("merge", one["id"], two["id"], "--method", "cat", "--json"))
    assert json.loads(run("jobs", "cancel", queued["id"], "--json"))["state"] in ("cancelled", "running")
    missing = runner.invoke(commands.app, ["jobs", "get", "jb_0123456789abcdef01234567"])
    assert missing.exit_code == 1 and "404 not_found" in missing.output


def test_amend_dev_and_reindex_stay_behind_the_same_command():
    shown = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, check=True)
    assert all(word in shown.stdout for word in ("dev", "reindex", "adapters", "merge", "jobs"))
    dev = subprocess.run([sys.executable, "-m", "app.cli", "dev", "--help"], capture_output=True, text=True, check=True)
    assert "--port" in dev.stdout
    imported = subprocess.run([sys.executable, "-c", "import sys, app.client, app.commands; "
                               "print('torch' in sys.modules, 'workers' in sys.modules)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout.split() == ["False", "False"]
