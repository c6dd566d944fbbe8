"""Direct vs presigned upload of the same adapters, side by side, on loopback.

Starts its own redis-server, SeaweedFS and API on loopback free ports (no worker: uploads need none),
generates T Llama-2-7B-shaped adapters (`bench.merge_bench.generate`: q/k/v/o/gate/up/down, rank 16), then
uploads each set twice and prints the wall time and throughput of each path:

- direct: `POST /v1/adapters`, every byte through the API process (multipart form, spooled, validated, put);
- presigned: `Client.upload_adapter(presigned=True)` — `POST /v1/uploads`, parts PUT straight to SeaweedFS
  (`app.client.PART_WORKERS` at a time), then `complete` (the API reads the files back from the store to
  validate and publish them, as a direct upload is validated and published).

Sizes are bounded (--tasks ≤ 16, --layers ≤ 32) and everything stops by itself.

    python -m bench.upload_bench [--tasks 4] [--layers 32] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from app import devstack
from app.client import Client
from bench.merge_bench import generate


def direct(client: httpx.Client, path: Path) -> None:
    with (path / "adapter_model.safetensors").open("rb") as weights:
        response = client.post("/v1/adapters", files={
            "config": ("adapter_config.json", (path / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", weights),
        })
    response.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4, choices=range(1, 17), metavar="1..16")
    parser.add_argument("--layers", type=int, default=32, choices=range(1, 33), metavar="1..32")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="amend-uploadbench-"))
    paths = generate(root / "adapters", args.tasks, args.layers, args.dtype)
    size_mb = sum((p / name).stat().st_size for p in paths
                  for name in ("adapter_config.json", "adapter_model.safetensors")) / 1e6
    key = "bench-" + secrets.token_hex(8)
    services: list[devstack.Service] = []
    keep = False
    try:
        env = devstack.start_backends(root, services) | {
            "AMEND_API_KEYS": f"{key}:bench", "AMEND_LOG_LEVEL": "WARNING",
            "AMEND_MAX_BYTES_PER_TENANT": str(100 * 2**30),
        }
        port = devstack.free_port()
        services.append(devstack.start_api(env, port, log_path=root / "api.log"))
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                            timeout=600)
        amend = Client(http=http)
        direct(http, paths[0])  # warm both paths outside the measurement
        amend.upload_adapter(paths[0], presigned=True)

        completing = [0.0]  # seconds spent in POST /v1/uploads/{id}/complete (read back, validate, publish)
        request = amend._request

        def timed(method: str, url: str, **kwargs: object) -> httpx.Response:
            start = time.perf_counter()
            try:
                return request(method, url, **kwargs)
            finally:
                if url.endswith("/complete"):
                    completing[0] += time.perf_counter() - start

        amend._request = timed  # type: ignore[method-assign]
        results = {}
        for label, upload in (("direct", lambda p: direct(http, p)),
                              ("presigned", lambda p: amend.upload_adapter(p, presigned=True))):
            start = time.perf_counter()
            for path in paths:
                upload(path)
            results[label] = time.perf_counter() - start

        each = size_mb / args.tasks
        print(f"upload: {args.tasks} adapters of {each:.0f} MB ({args.layers} layers, rank 16, {args.dtype}), "
              f"{size_mb:.0f} MB in all, one after another, on loopback")
        print(f"{'path':<12}{'seconds':>9}{'MB/s':>9}")
        for label, seconds in results.items():
            print(f"{label:<12}{seconds:>9.2f}{size_mb / seconds:>9.1f}")
        print(f"presigned / direct throughput: {results['direct'] / results['presigned']:.2f}x; of the presigned "
              f"time, {completing[0]:.2f} s in complete (the API reads the files back, validates and publishes "
              f"them) and {results['presigned'] - completing[0]:.2f} s hashing and PUTting parts "
              f"({size_mb / (results['presigned'] - completing[0]):.1f} MB/s)")
    except BaseException:
        keep = True
        print(f"stopped by an error; the services' logs are kept under {root}")
        raise
    finally:
        for service in services[::-1]:
            service.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
