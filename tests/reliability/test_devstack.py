"""`amend dev` as a supervisor: a child that dies comes back (and the job it held still ends exactly once), Ctrl-C
stops everything in reverse start order, and nothing it started outlives it, even when it is SIGKILLed.

Processes are followed by PID (and start time, so a reused PID is not mistaken for a survivor) through /proc.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app import devstack
from tests.reliability.conftest import wait_until

pytestmark = pytest.mark.reliability
log = logging.getLogger(__name__)  # the measured delays: run with --log-cli-level=INFO to see them
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="follows processes through /proc")

TIE = str(Path(devstack.__file__).resolve())  # the death tie's wrapper, in a child's command line until it execs
EVERY_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- processes, by PID --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot: tells the process apart from a later one with its PID


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat from `state` (field 3) on."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def alive(proc: Proc) -> bool:
    fields = _stat(proc.pid)
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == proc.start


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> list[str]:
    with suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    return []


def started_by(root: int) -> set[Proc]:
    """Every living process `root` started: its descendants, and everything else in its children's sessions
    (each child leads one; the death tie's guardians are orphaned into them on purpose)."""
    pids, todo = set(), [root]
    while todo:
        for child in children(todo.pop()):
            pids.add(child)
            todo.append(child)
    sessions = set(children(root))
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[3]) in sessions:
            pids.add(int(entry.name))
    procs = set()
    for pid in pids:
        fields = _stat(pid)
        if fields is not None and fields[0] not in ("Z", "X"):
            procs.add(Proc(pid, int(fields[19])))
    return procs


def kill_leftovers(procs: set[Proc]) -> None:
    for proc in procs:
        if alive(proc):
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


def survivors_after(procs: set[Proc], timeout: float) -> tuple[set[Proc], float]:
    """The processes of `procs` still alive after `timeout` seconds (none, as soon as that is so), and when."""
    start = time.monotonic()
    while True:
        left = {proc for proc in procs if alive(proc)}
        elapsed = time.monotonic() - start
        if not left or elapsed > timeout:
            return left, elapsed
        time.sleep(0.02)


# -- `amend dev` as a subprocess -------------------------------------------------------------------------------------

@dataclass
class Dev:
    service: devstack.Service  # `amend dev` itself, tied to this test process like any Service
    port: int
    key: str
    output: Path

    @property
    def pid(self) -> int:
        return self.service.pid

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30,
                            headers={"Authorization": f"Bearer {self.key}"})

    def child(self, program: str) -> int | None:
        """The PID of the supervisor's child running `program` (part of its command line), once it runs it
        rather than the death tie that execs it."""
        for pid in children(self.pid):
            words = cmdline(pid)
            if TIE not in words and any(program in word for word in words):
                return pid
        return None

    def said(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> None:
        procs = started_by(self.pid) if self.service.alive() else set()
        self.service.stop(timeout=60)
        kill_leftovers(procs)


def start_dev(root: Path) -> Dev:
    port, key = devstack.free_port(), f"key-{uuid.uuid4().hex}"
    service = devstack.Service(
        "amend-dev",
        [sys.executable, "-m", "app.cli", "dev", "--port", str(port)],
        env={
            "AMEND_DATA_DIR": str(root / "data"),
            "AMEND_API_KEYS": f"{key}:tenant-a:read+write+admin",
            "AMEND_JOB_LEASE_SECONDS": "3",
            "HF_HUB_OFFLINE": "1",
            "REDIS_URL": "",  # empty: its own Redis and S3, whatever this environment points at
            "AMEND_S3_ENDPOINT_URL": "",
        },
        log_path=root / "amend-dev.log",
    ).start()
    dev = Dev(service, port, key, root / "amend-dev.log")
    try:
        wait_until(lambda: not service.alive() or "Amend is up" in dev.said(), 90, "amend dev to start")
        assert service.alive(), dev.said()
    except BaseException:
        dev.stop()
        raise
    return dev


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Dev]]:
    """A running `amend dev`: the one the previous test left, or a new one if that test stopped it."""
    started: list[Dev] = []

    def running() -> Dev:
        if not started or not started[-1].service.alive():
            started.append(start_dev(tmp_path_factory.mktemp("dev")))
        return started[-1]

    try:
        yield running
    finally:
        for stack in started:
            stack.stop()


def upload(http: httpx.Client, directory: Path) -> dict:
    response = http.post("/v1/adapters", data={"name": directory.name}, files={
        "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes()),
    })
    assert response.status_code == 201, response.text
    return response.json()


# -- tests -----------------------------------------------------------------------------------------------------------

def test_backoff_doubles_from_one_second_to_the_cap_and_starts_over_after_a_stable_run():
    backoff = devstack.Backoff(first=1.0, cap=30.0, stable=60.0)
    assert [backoff.delay(uptime=0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(uptime=60.0) == 1
    assert backoff.delay(uptime=59.0) == 2


def test_exit_descriptions_name_the_code_or_the_signal():
    assert devstack.describe_exit(3) == "exit code 3"
    assert devstack.describe_exit(-signal.SIGKILL) == "signal SIGKILL"


@linux_only
def test_supervisor_restarts_an_exited_process_after_its_delay_and_says_so():
    now = [0.0]
    lines: list[str] = []
    supervisor = devstack.Supervisor(report=lines.append, clock=lambda: now[0])
    service = supervisor.add(devstack.Service("quitter", ["sh", "-c", "exit 3"]).start())
    try:
        first = service.pid
        service.process.wait(10)
        supervisor.poll()
        assert lines == [f"quitter (pid {first}) exited with exit code 3; restarting in 1 s"]
        now[0] = 0.9
        supervisor.poll()
        assert service.pid == first  # not yet
        now[0] = 1.0
        supervisor.poll()
        assert service.pid != first and lines[-1] == f"quitter restarted (pid {service.pid})"
        service.process.wait(10)
        now[0] = 1.5  # it died again at once: twice the delay
        supervisor.poll()
        assert lines[-1].endswith("restarting in 2 s")
    finally:
        supervisor.stop()


@linux_only
def test_death_tie_kills_the_child_and_grandchildren_of_a_sigkilled_starter():
    """`sh` dies by PDEATHSIG; its `sleep` children, which no signal of their own ties to anything, die by the
    guardian that kills the process group."""
    starter = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from app import devstack; "
         "devstack.Service('sleepers', ['sh', '-c', 'sleep 60 & sleep 60']).start(); "
         "print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    procs: set[Proc] = set()
    try:
        assert starter.stdout is not None and starter.stdout.readline() == "up\n"
        procs = wait_until(lambda: started_by(starter.pid) if len(started_by(starter.pid)) >= 4 else None, 10,
                           "sh, its two sleeps and the guardian")
        starter.kill()
        starter.wait(10)
        survivors, _ = survivors_after(procs, timeout=5)
        assert not survivors
    finally:
        starter.kill()
        starter.wait(10)
        kill_leftovers(procs)


@linux_only
def test_killed_worker_is_restarted_and_its_job_succeeds_exactly_once(dev, tmp_path):
    from tests.factories import make_adapter

    stack = dev()
    http = stack.http()
    # large enough to still be running when the worker is killed: about 4 s on a fresh worker, 2 cores
    shape = {"r": 128, "alpha": 256, "targets": EVERY_LINEAR, "hidden_size": 1024, "intermediate_size": 2048,
             "num_hidden_layers": 4}
    ids = [upload(http, make_adapter(tmp_path / name, seed=seed, **shape))["id"] for name, seed in (("a", 1), ("b", 2))]
    body = {"type": "merge", "adapters": [{"id": i} for i in ids], "method": "ctm",
            "params": {"rule": "ties", "density": 0.5, "beta": 0.25}, "output": {"name": "after-kill", "rank": 16}}
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 60, "the job to start",
               interval=0.05)

    old = stack.child("celery")
    assert old is not None
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    health: list[int | str] = []

    def api_health() -> None:
        try:
            health.append(http.get("/healthz", timeout=2).status_code)
        except httpx.HTTPError as error:
            health.append(repr(error))

    def new_worker() -> int | None:
        # the supervisor's own word, not any celery process among its children: the killed worker's pool
        # process is orphaned to the supervisor (a subreaper) for the moment before its death signal lands
        api_health()
        restarted = re.findall(r"worker restarted \(pid (\d+)\)", stack.said())
        pid = int(restarted[-1]) if restarted else None
        return pid if pid is not None and pid != old and Path(f"/proc/{pid}").exists() else None

    new = wait_until(new_worker, 10, "a new worker process", interval=0.1)
    restarted_after = time.monotonic() - killed

    def finished() -> dict | None:
        api_health()
        job = http.get(f"/v1/jobs/{job_id}").json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    done = wait_until(finished, 90, "the job to finish", interval=0.25)
    log.info("new worker process %.2f s after the kill; job %s %.1f s after it; %d health checks",
             restarted_after, done["state"], time.monotonic() - killed, len(health))
    assert set(health) == {200}, health
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2  # killed mid-job once, then run again by the new worker
    named = [a for a in http.get("/v1/adapters", params={"limit": 200}).json()["items"] if a["name"] == "after-kill"]
    assert [a["id"] for a in named] == [done["result"]["adapter_id"]]
    assert f"worker (pid {old}) exited with signal SIGKILL; restarting in 1 s" in stack.said()
    assert f"worker restarted (pid {new})" in stack.said()
    assert restarted_after < 10


@linux_only
def test_killed_redis_and_s3_come_back_on_their_ports_with_their_data(dev, adapter_dir):
    stack = dev()
    http = stack.http()
    adapter = upload(http, adapter_dir("kept", seed=3))
    before = {program: stack.child(program) for program in ("redis-server", "weed")}
    argv = {program: cmdline(pid) for program, pid in before.items() if pid is not None}
    assert len(argv) == 2
    for pid in before.values():
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    def restarted() -> dict | None:
        now = {program: stack.child(program) for program in before}
        return now if all(pid not in (None, before[program]) for program, pid in now.items()) else None

    after = wait_until(restarted, 10, "Redis and S3 to restart")
    assert {program: cmdline(pid) for program, pid in after.items()} == argv  # same ports, same data directories
    wait_until(lambda: http.get("/readyz").status_code == 200, 60, "the API to reach both again")
    log.info("Redis and S3 restarted and reachable %.2f s after the kill", time.monotonic() - killed)
    assert http.get(f"/v1/adapters/{adapter['id']}").json()["sha256"] == adapter["sha256"]
    weights = http.get(f"/v1/adapters/{adapter['id']}/files/adapter_model.safetensors")
    assert weights.status_code == 200 and len(weights.content) == adapter["size_bytes"]


@linux_only
def test_sigterm_stops_every_process_in_reverse_start_order(dev):
    stack = dev()
    procs = started_by(stack.pid)
    try:
        stack.service.signal(signal.SIGTERM, group=False)
        assert stack.service.process.wait(60) == 0
        stopping = [line.split()[1] for line in stack.said().splitlines() if line.startswith("stopping ")]
        assert stopping == ["api", "beat", "worker", "seaweedfs", "redis"]
        survivors, _ = survivors_after(procs, timeout=5)
        assert not survivors
    finally:
        kill_leftovers(procs)


@linux_only
def test_sigkilled_supervisor_leaves_no_process_behind(dev):
    stack = dev()
    # redis-server, weed, uvicorn, celery and (once it has booted) its prefork child, and 4 guardians
    procs = wait_until(lambda: found if len(found := started_by(stack.pid)) >= 9 else None, 60,
                       "the worker's pool process")
    try:
        stack.service.signal(signal.SIGKILL, group=False)
        survivors, elapsed = survivors_after(procs, timeout=5)
        log.info("%d processes, %d left %.3f s after SIGKILL", len(procs), len(survivors), elapsed)
        assert not survivors, [cmdline(proc.pid) for proc in survivors]
        assert elapsed < 5
    finally:
        kill_leftovers(procs)
