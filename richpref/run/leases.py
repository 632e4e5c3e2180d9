"""Shard leases: which process computes a shard right now, so processes sharing a run split the work.

A lease is a small JSON record beside the shard, `part-00003.lease-0000` (holder host, pid, token,
expiry), created with an exclusive create: of several processes asking at once, exactly one gets
it. While it computes, a background thread pushes the expiry forward. A lease is respected while its
holder lives: until its expiry, or, on the same host, until its process is gone. A dead holder's lease
is taken over by creating the next generation (`lease-0001`) exclusively, so a takeover is also won
by one process only. The holder removes its records when it is done.

The exclusive create is `open(path, "x")` on local and NFSv3+ filesystems (and fsspec's "xb" mode
where a filesystem implements it); see docs/operations.md for object stores.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem

from richpref.common.atomic import write_atomic
from richpref.common.objstore import cat_small, list_names, protocols

log = logging.getLogger("richpref")

LEASE_SECONDS_ENV = "RICHPREF_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 60.0


def lease_seconds() -> float:
    """How long a lease lives without renewal (RICHPREF_LEASE_SECONDS; short in tests)."""
    return float(os.environ.get(LEASE_SECONDS_ENV, DEFAULT_LEASE_SECONDS))


def _process_started(pid: int) -> float | None:
    """When process `pid` started (tells a live holder from a new process that reuses its pid)."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - no such process
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(record: dict, now: float | None = None) -> bool:
    """Whether a lease record's holder still holds it: not expired and, on this host, still running."""
    now = time.time() if now is None else now
    if float(record.get("expires", 0)) <= now:
        return False
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", -1))
        if pid <= 0 or not _process_alive(pid):
            return False  # the holder's process is gone
        started = _process_started(pid)
        if started is not None and record.get("started") is not None and abs(started - float(record["started"])) > 1.0:
            return False  # its pid now belongs to another process
    return True


@dataclass
class Lease:
    """A held lease; a context manager that renews it in the background and releases it on exit."""

    fs: object
    path: str
    prefix: str
    generation: int
    record: dict
    seconds: float
    older: tuple[int, ...] = ()  # the generations before ours, seen when it was taken (their holders are gone)
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "Lease":
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-renew {self.path}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; expiry is the backstop
                log.warning("could not renew lease %s: %s", self.path, exc)

    def still_held(self) -> bool:
        """Ask the store now (one listing) whether this lease is still the newest generation; sets
        `lost` when another process has taken it over (or it was removed). Checked right before a commit."""
        if not self.lost and _generations(self.fs, self.prefix)[-1:] != [self.generation]:
            log.warning("lease %s was taken over by another process (this one was presumed dead)", self.path)
            self.lost = True
        return not self.lost

    @property
    def fencing_token(self) -> str:
        """Names this holding: the generation and the holder's token (recorded in the commit claim)."""
        return f"{self.generation:04d}-{self.record['token']}"

    def renew(self) -> None:
        if not self.still_held():
            return
        self.record = {**self.record, "expires": time.time() + self.seconds}
        # seen whole: a temporary name and os.replace on a local disk, one PUT on an object store
        write_atomic(self.path, json.dumps(self.record).encode(),
                     fs=None if isinstance(self.fs, LocalFileSystem) else self.fs)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for g in (*self.older, self.generation):  # ours and the dead holders' before us, without a listing
            try:
                self.fs.rm_file(f"{self.prefix}{g:04d}")
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class Busy:
    """The shard is leased by a live holder (its record; None when it was released a moment ago)."""

    holder: dict | None


def lease_prefix(shard_path: str) -> str:
    return re.sub(r"\.parquet$", "", shard_path) + ".lease-"


def _generations(fs, prefix: str) -> list[int]:
    folder, name = prefix.rsplit("/", 1)
    try:
        if isinstance(fs, LocalFileSystem):
            entries = os.listdir(folder)
        else:  # on S3 a listing of this shard's lease keys only, whatever the folder holds
            entries = list_names(fs, folder, name)
    except FileNotFoundError:
        return []
    return sorted(int(e[len(name):]) for e in entries if e.startswith(name) and e[len(name):].isdigit())


def _read(fs, path: str) -> dict | None:
    try:
        return json.loads(cat_small(fs, path))
    except (FileNotFoundError, ValueError):
        return None  # released a moment ago, or being written right now


_warned_no_exclusive: set[str] = set()


def _put_is_conditional(fs) -> bool:
    """Whether `fs.open(path, "xb")` is one conditional request that the store decides (s3fs: a PUT with
    `If-None-Match: *`). Elsewhere "xb" may be an exists() check before the write, so the winner
    reads its bytes back."""
    return bool({"s3", "s3a"} & set(protocols(fs)))


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` only if it does not exist; False when another process created it first. Where
    the store cannot refuse a second create, a later writer's bytes may replace ours: then False too."""
    if isinstance(fs, LocalFileSystem):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return _put_is_conditional(fs) or _reads_back(fs, path, data)
    except FileExistsError:
        return False
    except (NotImplementedError, ValueError, TypeError):
        proto = str(getattr(fs, "protocol", "?"))
        if proto not in _warned_no_exclusive:
            _warned_no_exclusive.add(proto)
            log.warning("filesystem %s has no exclusive create: leases are advisory there; run one process per "
                        "run or keep the run on a shared POSIX filesystem (docs/operations.md)", proto)
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return _reads_back(fs, path, data)


def _reads_back(fs, path: str, data: bytes) -> bool:
    try:
        return cat_small(fs, path) == data
    except FileNotFoundError:
        return False


def current_holder(fs, shard_path: str) -> dict | None:
    """The live holder's record of the shard's lease, or None when nobody holds it."""
    prefix = lease_prefix(shard_path)
    gens = _generations(fs, prefix)
    if not gens:
        return None
    record = _read(fs, f"{prefix}{gens[-1]:04d}")
    return record if record is not None and holder_alive(record) else None


def try_lease(fs, shard_path: str, seconds: float | None = None) -> Lease | Busy:
    """Take the shard's lease unless a live holder has it. Not started: use it as a context manager."""
    seconds = lease_seconds() if seconds is None else seconds
    prefix = lease_prefix(shard_path)
    gens = _generations(fs, prefix)
    generation = 0
    if gens:
        top = f"{prefix}{gens[-1]:04d}"
        record = _read(fs, top)
        if record is None or holder_alive(record):
            return Busy(record)
        log.warning("taking over the lease of %s: its holder %s (pid %s) is gone or expired",
                    shard_path.rsplit("/", 1)[-1], record.get("host"), record.get("pid"))
        generation = gens[-1] + 1
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_started(os.getpid()),
              "token": uuid.uuid4().hex, "expires": time.time() + seconds}
    path = f"{prefix}{generation:04d}"
    if not create_exclusive(fs, path, json.dumps(record).encode()):
        return Busy(_read(fs, path))
    return Lease(fs=fs, path=path, prefix=prefix, generation=generation, record=record, seconds=seconds,
                 older=tuple(gens))
