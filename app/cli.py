"""`amend dev` (the embedded stack behind `make run`) and `amend reindex` (rebuild the Redis index)."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from pathlib import Path


def _dev(args: argparse.Namespace) -> int:
    from app import devstack
    from app.settings import DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY

    data = Path(os.environ.get("AMEND_DATA_DIR", ".amend-data")).resolve()
    (data / "logs").mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    services: list[devstack.Service] = []
    try:
        if not os.environ.get("REDIS_URL"):
            redis_service, env["REDIS_URL"] = devstack.start_redis(data / "redis", log_path=data / "logs/redis.log")
            services.append(redis_service)
        if not os.environ.get("AMEND_S3_ENDPOINT_URL"):
            access = os.environ.get("AMEND_S3_ACCESS_KEY_ID", DEV_S3_ACCESS_KEY)
            secret = os.environ.get("AMEND_S3_SECRET_ACCESS_KEY", DEV_S3_SECRET_KEY)
            s3_service, env["AMEND_S3_ENDPOINT_URL"] = devstack.start_seaweed(
                data / "s3", access, secret, log_path=data / "logs/seaweedfs.log"
            )
            env.update({"AMEND_S3_ACCESS_KEY_ID": access, "AMEND_S3_SECRET_ACCESS_KEY": secret})
            services.append(s3_service)
        if not os.environ.get("AMEND_API_KEYS"):
            key_file = data / "dev-api-key"
            key = key_file.read_text().strip() if key_file.exists() else "amend-dev-" + secrets.token_urlsafe(24)
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
            env["AMEND_API_KEYS"] = f"{key}:dev:read+write+admin"
            print(f"development API key (also in {key_file}): {key}")
        services.append(devstack.start_worker(env, log_path=data / "logs/worker.log"))
        services.append(devstack.start_api(env, args.port, log_path=data / "logs/api.log"))
        print(f"Amend is up at http://127.0.0.1:{args.port}  (docs: /docs, logs: {data / 'logs'}); Ctrl-C stops it")
        stop = False

        def request_stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not stop:
            for service in services:
                if not service.alive():
                    print(f"{service.name} exited; stopping", file=sys.stderr)
                    stop = True
            time.sleep(0.5)
    finally:
        for service in reversed(services):
            service.stop()
        print("stopped")
    return 0


def _reindex(args: argparse.Namespace) -> int:
    import json

    import redis

    from app.queue import make_celery, reindex_and_requeue
    from app.records import Records
    from app.settings import get_settings
    from app.storage import Storage

    settings = get_settings()
    records = Records(Storage(settings), redis.Redis.from_url(settings.redis_url))
    print(json.dumps(reindex_and_requeue(records, make_celery(settings, "amend-reindex"))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amend")
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="run API + worker + Redis + S3 on the embedded defaults")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(run=_dev)
    reindex = commands.add_parser("reindex", help="rebuild the Redis index from object storage")
    reindex.set_defaults(run=_reindex)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
