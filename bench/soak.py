"""Soak test: a stream of small merge jobs through the real stack while workers are killed at random.

Starts its own redis-server, SeaweedFS, API and two Celery workers on loopback free ports, submits small
merge jobs for `--minutes`, kills a random worker with SIGKILL every `--kill-every` seconds (and starts a
fresh one), then drains and prints: jobs submitted, succeeded, failed, lost (not finished after the drain;
must be 0), duplicated (more than one output or more than one success event; must be 0), and the p50/p99
queue wait. Bounded in time; stops everything it started.

    python -m bench.soak --minutes 10
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from app import devstack


def write_adapter(directory: Path, seed: int, hidden: int = 64, layers: int = 2, rank: int = 4) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) / hidden**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) / rank**0.5
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "soak-base", "task_type": "CAUSAL_LM", "fan_in_fan_out": False}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kills")
    parser.add_argument("--rate", type=float, default=1.0, help="jobs submitted per second")
    parser.add_argument("--drain-minutes", type=float, default=4.0)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="amend-soak-"))
    key = "soak-" + secrets.token_hex(8)
    services: list[devstack.Service] = []
    workers: list[devstack.Service] = []
    keep = False
    try:
        env = devstack.start_backends(root, services) | {
            "AMEND_API_KEYS": f"{key}:soak", "AMEND_JOB_LEASE_SECONDS": "6",
            "AMEND_MAX_JOBS_PER_TENANT": "100000", "AMEND_LOG_LEVEL": "WARNING",
        }
        port = devstack.free_port()
        services.append(devstack.start_api(env, port, log_path=root / "api.log"))

        def new_worker() -> None:
            workers.append(devstack.start_worker(env, log_path=root / f"worker{len(workers)}.log",
                                                 name=f"soak{len(workers)}"))

        new_worker()
        new_worker()
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                              timeout=30)
        adapter_ids = []
        for seed in range(4):
            directory = write_adapter(root / f"adapter{seed}", seed)
            files = {name: (name, (directory / name).read_bytes())
                     for name in ("adapter_config.json", "adapter_model.safetensors")}
            response = client.post("/v1/adapters", files={"config": files["adapter_config.json"],
                                                          "weights": files["adapter_model.safetensors"]})
            response.raise_for_status()
            adapter_ids.append(response.json()["id"])

        rng = random.Random(0)
        job_ids: list[str] = []
        kills = 0
        end = time.monotonic() + args.minutes * 60
        next_kill = time.monotonic() + args.kill_every
        while time.monotonic() < end:
            chosen = rng.sample(adapter_ids, 2)
            method = rng.choice(["cat", "task_arithmetic", "ties", "ctm", "merge_then_compress"])
            body = {"type": "merge", "adapters": [{"id": i, "weight": rng.uniform(0.2, 1.0)} for i in chosen],
                    "method": method, "output": {"name": "soak", "rank": 4}}
            response = client.post("/v1/jobs", json=body)
            if response.status_code == 202:
                job_ids.append(response.json()["id"])
            if time.monotonic() >= next_kill:
                alive = [w for w in workers if w.alive()]
                victim = rng.choice(alive)
                victim.signal(signal.SIGKILL)
                victim.process.wait(10)
                kills += 1
                new_worker()
                next_kill = time.monotonic() + args.kill_every
            time.sleep(1.0 / args.rate)

        drain_end = time.monotonic() + args.drain_minutes * 60
        jobs: dict[str, dict] = {}
        while time.monotonic() < drain_end:
            pending = [j for j in job_ids if jobs.get(j, {}).get("state") not in ("succeeded", "failed", "cancelled")]
            if not pending:
                break
            for job_id in pending:
                jobs[job_id] = client.get(f"/v1/jobs/{job_id}").json()
            time.sleep(1.0)

        adapters = []
        cursor = None
        while True:
            page = client.get("/v1/adapters", params={"limit": 200} | ({"cursor": cursor} if cursor else {})).json()
            adapters += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        outputs: dict[str, int] = {}
        for adapter in adapters:
            if adapter["source_job_id"]:
                outputs[adapter["source_job_id"]] = outputs.get(adapter["source_job_id"], 0) + 1

        final = {j: jobs.get(j) or client.get(f"/v1/jobs/{j}").json() for j in job_ids}
        succeeded = [j for j, job in final.items() if job["state"] == "succeeded"]
        failed = [j for j, job in final.items() if job["state"] == "failed"]
        lost = [j for j, job in final.items() if job["state"] not in ("succeeded", "failed", "cancelled")]
        events = {j: client.get(f"/v1/jobs/{j}").json() for j in succeeded}
        duplicated = [j for j in job_ids if outputs.get(j, 0) > 1]
        missing_output = [j for j in succeeded if outputs.get(j, 0) != 1]
        waits = sorted(parse_time(job["started_at"]) - parse_time(job["created_at"])
                       for job in events.values() if job.get("started_at"))
        retried = sum(1 for job in events.values() if job["attempts"] > 1)

        def quantile(q: float) -> float:
            return waits[min(len(waits) - 1, int(q * len(waits)))] if waits else float("nan")

        print(f"soak: {args.minutes:g} min, 2 workers, {kills} worker kills (SIGKILL), rate {args.rate:g} job/s")
        print(f"{'submitted':>10} {'succeeded':>10} {'failed':>7} {'lost':>5} {'duplicated':>11} "
              f"{'no-output':>10} {'retried':>8} {'wait p50':>9} {'wait p99':>9}")
        print(f"{len(job_ids):>10} {len(succeeded):>10} {len(failed):>7} {len(lost):>5} {len(duplicated):>11} "
              f"{len(missing_output):>10} {retried:>8} {statistics.median(waits) if waits else float('nan'):>8.2f}s "
              f"{quantile(0.99):>8.2f}s")
        if failed:
            print("failures:", {final[j]["error"]["code"] for j in failed})
        for job_id in lost:
            job = client.get(f"/v1/jobs/{job_id}").json()
            print(f"lost {job_id}: state={job['state']} attempts={job['attempts']} stage={job['stage']!r}")
        passed = not lost and not duplicated and not missing_output
        print("PASS" if passed else "FAIL: jobs lost or duplicated")
        if not passed:
            keep = True
            print(f"the services' logs are kept under {root}")
            return 1
        return 0
    except BaseException:
        keep = True
        print(f"stopped by an error; the services' logs are kept under {root}")
        raise
    finally:
        for service in workers + services[::-1]:
            service.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)  # the adapters and the S3 data (gigabytes)


if __name__ == "__main__":
    sys.exit(main())
