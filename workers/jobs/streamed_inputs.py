"""Merge inputs that stream into the merge: the adapters' weights are downloaded by parallel ranged GETs in
the order the merge reads them, and the merge reads each tensor as soon as its bytes have arrived, so
fetching and merging overlap instead of running one after the other.

Guarantees kept from `workers/jobs/inputs.py`: each file is SHA-256-checked against its record, hashed in file
order as it arrives (read back from the page cache right after it is written, never downloaded twice), and
`StreamedAdapters.verify` — called before anything is published, and before a failed merge's error is
reported — raises `InputCorrupted` when one does not match, so a changed input ends the job `input_corrupted`
with no output. Memory stays bounded: chunks go to the job's scratch files as they arrive, one 1 MiB piece
per download thread at a time. A failed download fails every pending read with its error (a read never hangs
on bytes that will not come); leaving the context stops the downloads.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app.records import Records
from app.schemas.adapters import AdapterRecord
from app.storage import Storage, keys
from workers.jobs.context import InputCorrupted
from workers.jobs.inputs import fetch_adapter_config

log = logging.getLogger(__name__)
CHUNK = 16 * 2**20  # bytes per ranged GET
PIECE = 2**20  # bytes read (and hashed) at a time
HEAD = 256 * 2**10  # the first GET of each file: its header (~50 KiB for a 7B model's LoRA), then tensors
# parallel GETs beside the merge. On 2 cores (fp32 T=8 Llama-7B-shaped, 1.2 GB, merge_then_compress on 2 threads,
# idle machine): streamed 2.96-3.54 s with 2, 4 or 8 threads alike, everything downloaded first 3.1-3.2 s, the
# engine alone on local files 1.4-1.9 s: the download's CPU (SHA-256, copies, the store serving it) competes with
# a merge that uses both cores, so there the overlap saves little; it pays where the merge leaves CPU idle.
# Niced download threads (nice 10 or 19) left the merge waiting for bytes.
THREADS = 2
START_THREADS = 8  # the configs and headers, before the merge can start: small GETs, latency-bound
WEIGHTS = "adapter_model.safetensors"
# the byte spans of each file's tensors in the order the merge reads them (`workers.formats.lora.read_spans`)
ReadSpans = Callable[[Sequence[Path]], list[list[tuple[int, int]]]]


class DownloadStopped(Exception):
    """The downloads were stopped (the job ended) before these bytes arrived."""


class ArrivingFile:
    """A local file filled in fixed-size chunks, in any order, by download threads: `wait(start, end)` blocks
    until those bytes are written (or raises why they never will be); the SHA-256 of the whole file is
    computed in file order as the chunks arrive (read back from the page cache just after they are written,
    not from the disk after the download)."""

    def __init__(self, path: Path, size: int, sha256: str, what: str, chunk: int = CHUNK, head: int = HEAD) -> None:
        self.path, self.size, self.what = Path(path), size, what
        self._expected = sha256
        # chunk i holds bytes bounds[i]..bounds[i+1]-1: a short first one (the header arrives fast), then `chunk`
        self._bounds = [0, *range(min(head, size), size, chunk), size] if size > head else [0, size]
        self.count = len(self._bounds) - 1
        self._arrived = [False] * self.count
        self._pending = self.count
        self._error: BaseException | None = None
        self.waited = 0.0  # seconds readers spent waiting for bytes not yet there
        self._changed = threading.Condition()
        self._hash = hashlib.sha256()
        self._hashed = 0  # chunks hashed so far, in file order
        self._hashing = threading.Lock()
        self._buffer = bytearray(PIECE)
        self.digest: str | None = None  # hex SHA-256, once every chunk has arrived
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        return self._bounds[index], self._bounds[index + 1]

    def arrived(self, index: int) -> bool:
        return self._arrived[index]

    def header_end(self) -> int:
        """Where the safetensors header ends (its first 8 bytes must have arrived)."""
        return 8 + int.from_bytes(os.pread(self._fd, 8, 0), "little")

    def chunks(self, start: int, end: int) -> range:
        """The chunks holding bytes start..end-1."""
        if end <= start:
            return range(0)
        first = bisect.bisect_right(self._bounds, start) - 1
        return range(first, min(self.count, bisect.bisect_left(self._bounds, end)))

    def write(self, index: int, pieces: Iterable[bytes]) -> None:
        """Chunk `index` arrives as `pieces` (in order): write them — hashing them on the way when this chunk is
        the next one the hash needs — then hash what is now contiguous and wake the readers waiting for it."""
        start, end = self.chunk_range(index)
        inline = self._hashed == index and self._hashing.acquire(blocking=False)
        if inline and self._hashed != index:  # another thread hashed up to here meanwhile: not ours to hash
            self._hashing.release()
            inline = False
        try:
            position = start
            for piece in pieces:
                if position + len(piece) > end:
                    break
                os.pwrite(self._fd, piece, position)
                if inline:
                    self._hash.update(piece)
                position += len(piece)
            if position != end:  # (a hash that took part of this chunk is never used: the download failed)
                raise InputCorrupted(f"{self.what} is not the size it was stored with")
            with self._changed:
                self._arrived[index] = True
            if inline:
                self._hashed += 1
                self._hash_arrived()
        finally:
            if inline:
                self._hashing.release()
        self._advance_hash()
        with self._changed:
            self._pending -= 1
            self._changed.notify_all()

    def _advance_hash(self) -> None:
        """Hash the chunks that are now contiguous from the last hashed one. Never waits: when another thread
        is hashing, it re-checks after it lets go, so a chunk that arrives meanwhile is not left out."""
        while self._hashing.acquire(blocking=False):
            try:
                self._hash_arrived()
            finally:
                self._hashing.release()
            if self._hashed >= self.count or not self._arrived[self._hashed]:
                return

    def _hash_arrived(self) -> None:
        """(holding `_hashing`) Hash the arrived chunks from the next one on, read back from the page cache into
        one reused buffer (the arriving pieces are gone by then; fresh memory would cost page faults)."""
        view = memoryview(self._buffer)
        while self._hashed < self.count and self._arrived[self._hashed]:
            position, end = self.chunk_range(self._hashed)
            while position < end:
                read = os.preadv(self._fd, [view[: min(len(view), end - position)]], position)
                if read <= 0:
                    raise InputCorrupted(f"{self.what}: the scratch file ended early")
                self._hash.update(view[:read])
                position += read
            self._hashed += 1
        if self._hashed == self.count and self.digest is None:
            self.digest = self._hash.hexdigest()

    def fail(self, error: BaseException) -> None:
        """Nothing more will arrive: pending and future waits raise `error` (the first one given)."""
        with self._changed:
            if self._error is None:
                self._error = error
            self._changed.notify_all()

    def wait(self, start: int, end: int) -> None:
        """Return once bytes start..end-1 are in the file; raise the download's error if they never will be."""
        needed = self.chunks(start, end)
        with self._changed:
            began = None
            while not all(self._arrived[i] for i in needed):
                if self._error is not None:
                    raise self._error
                began = began or time.monotonic()
                self._changed.wait()
            if began is not None:
                self.waited += time.monotonic() - began

    def complete(self) -> None:
        """Wait for every chunk (raising a failed download's error)."""
        with self._changed:
            while self._pending:
                if self._error is not None:
                    raise self._error
                self._changed.wait()

    def check(self) -> None:
        """Wait for every chunk, then refuse a file whose SHA-256 is not the recorded one."""
        self.complete()
        with self._hashing:  # (every writer has hashed or handed on its chunk by now; this only makes sure)
            self._hash_arrived()
        if self.digest != self._expected:
            raise InputCorrupted(f"{self.what} does not match its recorded SHA-256")

    def close(self) -> None:
        os.close(self._fd)


class StreamedAdapters:
    """The merge's adapters, streaming into `into/<id>/` (use as a context manager; leaving it stops the
    downloads). On entry: each config is fetched and checked, each weights file's size is checked against its
    record and its header fetched; the other chunks are then fetched in the background by `threads` ranged
    GETs, in the order `read_spans` says the merge reads them (module by module, all adapters of a module
    together).

    `inputs(weights)` are the merge's (config, weights path, weight) triples and `arrivals` the waits to hand
    `merge_adapter_files`; `verify()` must be called before anything made from the inputs is published."""

    def __init__(self, records: Records, adapters: Sequence[AdapterRecord], into: Path, read_spans: ReadSpans,
                 threads: int = THREADS, chunk: int = CHUNK, head: int = HEAD) -> None:
        self._storage: Storage = records.storage
        self._records, self._adapters, self._into = records, list(adapters), Path(into)
        self._read_spans, self._threads, self._chunk, self._head = read_spans, threads, chunk, head
        self.configs: list[dict[str, Any]] = []
        self.files: list[ArrivingFile] = []
        self._queue: list[tuple[int, int]] = []  # (file, chunk) in download order
        self._next = 0
        self._done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._started = 0.0
        self.download_seconds: float | None = None  # from the first GET to the last chunk

    def _key(self, adapter: AdapterRecord) -> str:
        return keys.adapter(adapter.tenant, adapter.id, WEIGHTS)

    def __enter__(self) -> StreamedAdapters:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self._started = time.monotonic()
        directory = self._into
        for adapter in self._adapters:
            self.files.append(ArrivingFile(directory / adapter.id / WEIGHTS, adapter.size_bytes, adapter.sha256,
                                           f"adapter {adapter.id}", self._chunk, self._head))
        # the configs and the headers first (the merge plans from them): the first chunk of each file (whose
        # response also tells the object's size), and more for a long header
        with ThreadPoolExecutor(max_workers=START_THREADS, thread_name_prefix="amend-fetch") as pool:
            configs = pool.map(lambda a: fetch_adapter_config(self._records, a, directory / a.id), self._adapters)
            headers = pool.map(self._fetch_header, range(len(self.files)))
            self.configs = list(configs)
            list(headers)
        wanted: list[tuple[int, int]] = []
        try:
            spans = self._read_spans([file.path for file in self.files])
        except Exception:  # noqa: BLE001 - a header the merge will refuse too: fetch in file order, so that
            spans = []  # `verify` can still tell a changed input (input_corrupted) from a malformed one
        for position in range(max((len(per_file) for per_file in spans), default=0)):
            for t, per_file in enumerate(spans):
                if position < len(per_file):
                    wanted += [(t, i) for i in self.files[t].chunks(*per_file[position])]
        wanted += [(t, i) for t, file in enumerate(self.files) for i in range(file.count)]  # the rest: the hash
        seen = {(t, i) for t, file in enumerate(self.files) for i in range(file.count) if file.arrived(i)}
        for item in wanted:
            if item not in seen:
                seen.add(item)
                self._queue.append(item)
        for number in range(min(self._threads, len(self._queue))):
            worker = threading.Thread(target=self._download, name=f"amend-fetch-{number}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _fetch(self, t: int, index: int) -> None:
        file = self.files[t]
        start, end = file.chunk_range(index)
        key = self._key(self._adapters[t])
        file.write(index, self._storage.iter_range(key, start, end - start, PIECE) if end > start else ())

    def _fetch_header(self, t: int) -> None:
        file = self.files[t]
        start, end = file.chunk_range(0)
        data, size = self._storage.get_range_and_size(self._key(self._adapters[t]), start, max(1, end - start))
        if size != file.size:  # the hash would catch it too; this says it before any more is fetched
            raise InputCorrupted(f"{file.what} is not the size it was stored with")
        file.write(0, [data[: end - start]])
        if file.size >= 8:
            for index in file.chunks(0, min(file.header_end(), file.size))[1:]:
                self._fetch(t, index)

    def _download(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._next >= len(self._queue):
                    return
                t, index = self._queue[self._next]
                self._next += 1
            try:
                self._fetch(t, index)
                with self._lock:
                    self._done += 1
                    if self._done == len(self._queue):
                        self.download_seconds = time.monotonic() - self._started
            except BaseException as error:  # every pending read raises it; the job reports it
                self._stop.set()
                for file in self.files:
                    file.fail(error)
                return

    @property
    def arrivals(self) -> list[Callable[[int, int], None]]:
        return [file.wait for file in self.files]

    def inputs(self, weights: Sequence[float]) -> list[tuple[dict[str, Any], Path, float]]:
        return [(config, file.path, w) for config, file, w in zip(self.configs, self.files, weights, strict=True)]

    def verify(self) -> None:
        """Wait for every file; raise `InputCorrupted` if one does not match its recorded SHA-256 (a failed
        download's error if one failed)."""
        for file in self.files:
            file.check()
        log.info("inputs streamed", extra={
            "files": len(self.files), "bytes": sum(file.size for file in self.files),
            "download_seconds": round(self.download_seconds or 0.0, 3),
            "merge_waited_seconds": round(sum(file.waited for file in self.files), 3),
        })

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        stopped = DownloadStopped("the job ended before its inputs were downloaded")
        for file in self.files:
            file.fail(stopped)
        for worker in self._workers:
            worker.join()
        for file in self.files:
            file.close()
