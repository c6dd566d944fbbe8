"""The exact commands the images run — the API image's CMD, the worker image's CMD, the beat and bucket-init
commands of the manifests, the worker's health check — started here as they are written, against the test
stack's Redis and S3 (no Docker engine exists here), serving a merge job end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from app import devstack
from tests.conftest import tenant_keys

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def image_cmd(dockerfile: str) -> list[str]:
    text = (ROOT / "docker" / dockerfile).read_text().replace("\\\n", " ")
    return json.loads(re.search(r"^CMD (\[.*\])\s*$", text, re.M).group(1))


def k8s_command(path: str, name: str) -> list[str]:
    for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / path).read_text()):
        if doc and doc["metadata"]["name"] == name:
            return doc["spec"]["template"]["spec"]["containers"][0]["command"]
    raise AssertionError(name)


def local(argv: list[str]) -> list[str]:
    """The same argv, with this venv's executables."""
    return [sys.executable if argv[0] == "python" else str(BIN / argv[0]), *argv[1:]]


def test_the_image_commands_start_and_serve_a_job(stack, adapter_dir, tmp_path):
    key, _, api_keys = tenant_keys()
    env = stack.env | {"REDIS_URL": stack.redis_url.rsplit("/", 1)[0] + "/2", "AMEND_API_KEYS": api_keys,
                       "AMEND_S3_BUCKET": f"img-{uuid.uuid4().hex[:8]}", "AMEND_DEVICE": "cpu",
                       "AMEND_WORKER_HEARTBEAT_SECONDS": "1"}
    # the one-shot bucket creation, as compose and the k8s Job run it
    [init] = [doc["spec"]["template"]["spec"]["containers"][0]["command"]
              for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / "seaweedfs.yaml").read_text())
              if doc["kind"] == "Job"]
    subprocess.run(local(init), env={**subprocess.os.environ, **env}, check=True, timeout=60)
    port = devstack.free_port()
    api_argv = image_cmd("Dockerfile.api")
    api_argv[api_argv.index("--port") + 1] = str(port)
    worker_argv, beat_argv = image_cmd("Dockerfile.worker"), k8s_command("beat.yaml", "amend-beat")
    assert k8s_command("worker-gpu.yaml", "amend-worker-gpu") == worker_argv  # the same command everywhere
    services = []
    try:
        api = devstack.Service("api", local(api_argv), env=env, log_path=tmp_path / "api.log").start()
        services.append(api)
        services.append(devstack.Service("worker", local(worker_argv), env=env,
                                         log_path=tmp_path / "worker.log").start())
        beat = devstack.Service("beat", local(beat_argv), env=env, log_path=tmp_path / "beat.log").start()
        services.append(beat)
        base = f"http://127.0.0.1:{port}"
        devstack._ready(api, lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, "API", 60)
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        ids = []
        for name, seed in (("one", 1), ("two", 2)):
            directory = adapter_dir(name, seed=seed)
            files = {"config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
                     "weights": ("adapter_model.safetensors",
                                 (directory / "adapter_model.safetensors").read_bytes())}
            response = http.post("/v1/adapters", files=files, data={"name": name})
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        job = http.post("/v1/jobs", json={"type": "merge", "adapters": [{"id": i} for i in ids],
                                          "method": "ties", "params": {"density": 0.5},
                                          "output": {"name": "merged", "rank": 4}}).json()
        deadline = time.monotonic() + 120
        while (state := http.get(f"/v1/jobs/{job['id']}").json())["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
        assert state["state"] == "succeeded", state
        workers = http.get("/v1/stats").json()["workers"]
        assert len(workers) == 1 and workers[0]["device"]["device"] == "cpu"
        assert set(workers[0]["queues"]) == {"amend.merge", "amend.compress", "amend.unlearn"}
        probe = (ROOT / "docker" / "Dockerfile.worker").read_text()
        assert 'CMD ["python", "-m", "workers.health"]' in probe  # the image's HEALTHCHECK, run here
        health = subprocess.run(local(["python", "-m", "workers.health"]),
                                env={**subprocess.os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stderr
        assert beat.alive(), (tmp_path / "beat.log").read_text()[-2000:]
        assert "beat: Starting" in (tmp_path / "beat.log").read_text()
    finally:
        for service in reversed(services):
            service.stop()
