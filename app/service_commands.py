"""The service's own commands: `amend dev` (the supervised embedded stack behind `make run`) and `amend reindex`
(rebuild the Redis index). `app/cli.py` dispatches to them; every other command is the API client's
(app/commands.py)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
from pathlib import Path


class _StopRequest:
    """SIGINT, SIGTERM and SIGHUP stop `amend dev`: while the stack starts they interrupt the start; once it is
    up they end the supervision at its next round; while the services stop in order they are ignored."""

    def __init__(self) -> None:
        self.requested = False
        self.supervising = False
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.supervising:
            raise KeyboardInterrupt
        self.requested = True

    @staticmethod
    def ignore() -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _log_to(path: Path) -> None:
    """The supervisor's structured log: JSON lines in `path`; the terminal gets the short lines."""
    from app.logs import JsonFormatter

    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("app").setLevel(logging.INFO)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _dev(args: argparse.Namespace) -> int:
    """Start Redis, S3, the worker and the API, then supervise them: restart what exits (with backoff), stop them
    all in reverse order on Ctrl-C or SIGTERM. Every child dies with this process, even on SIGKILL."""
    from app import devstack
    from app.settings import DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY

    data = Path(os.environ.get("AMEND_DATA_DIR", ".amend-data")).resolve()
    (data / "logs").mkdir(parents=True, exist_ok=True)
    _log_to(data / "logs/supervisor.log")
    env: dict[str, str] = {}
    supervisor = devstack.Supervisor(report=_say)
    stop = _StopRequest()
    status = 0
    try:
        if not os.environ.get("REDIS_URL"):
            redis_service, env["REDIS_URL"] = devstack.start_redis(data / "redis", log_path=data / "logs/redis.log")
            supervisor.add(redis_service)
        if not os.environ.get("AMEND_S3_ENDPOINT_URL"):
            access = os.environ.get("AMEND_S3_ACCESS_KEY_ID", DEV_S3_ACCESS_KEY)
            secret = os.environ.get("AMEND_S3_SECRET_ACCESS_KEY", DEV_S3_SECRET_KEY)
            s3_service, env["AMEND_S3_ENDPOINT_URL"] = devstack.start_seaweed(
                data / "s3", access, secret, log_path=data / "logs/seaweedfs.log"
            )
            env.update({"AMEND_S3_ACCESS_KEY_ID": access, "AMEND_S3_SECRET_ACCESS_KEY": secret})
            supervisor.add(s3_service)
        if not os.environ.get("AMEND_API_KEYS"):
            key_file = data / "dev-api-key"
            key = key_file.read_text().strip() if key_file.exists() else "amend-dev-" + secrets.token_urlsafe(24)
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
            env["AMEND_API_KEYS"] = f"{key}:dev:read+write+admin"
            print(f"development API key (also in {key_file}): {key}")
        supervisor.add(devstack.start_worker(env, log_path=data / "logs/worker.log"))
        supervisor.add(devstack.start_beat(env, log_path=data / "logs/beat.log"))
        supervisor.add(devstack.start_api(env, args.port, log_path=data / "logs/api.log"))
        pids = ", ".join(f"{service.name} {service.pid}" for service in supervisor.services)
        print(f"Amend is up at http://127.0.0.1:{args.port}  (docs: /docs, logs: {data / 'logs'}; pids: {pids}); "
              "Ctrl-C stops it", flush=True)
        stop.supervising = True
        supervisor.run(lambda: stop.requested)
    except KeyboardInterrupt:
        pass
    except devstack.StackError as error:
        _say(f"amend dev: {error}")
        status = 1
    finally:
        stop.ignore()
        supervisor.stop()
        print("stopped", flush=True)
    return status


def _reindex(args: argparse.Namespace) -> int:
    import json

    from app.queue import make_celery
    from app.records import Records
    from app.reindex import reindex_and_requeue
    from app.settings import get_settings

    settings = get_settings()
    records = Records.connect(settings, socket_timeout=30.0)
    print(json.dumps(reindex_and_requeue(records, make_celery(settings, "amend-reindex"))))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="amend")
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="run API + worker + Redis + S3 on the embedded defaults")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(run=_dev)
    reindex = commands.add_parser("reindex", help="rebuild the Redis index from object storage")
    reindex.set_defaults(run=_reindex)
    args = parser.parse_args(argv)
    return int(args.run(args))
