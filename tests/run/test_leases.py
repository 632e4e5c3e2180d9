"""Shard leases: one holder at a time, respected while it lives, taken over when it is dead or expired."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from richpref.run.leases import Busy, Lease, current_holder, lease_prefix, try_lease

FS = fsspec.filesystem("file")


def _shard(tmp_path) -> str:
    return str(tmp_path / "part-00000.parquet")


def _write_record(path: str, **fields) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": "t", "expires": time.time() + 60, **fields}
    with open(path, "w") as f:
        json.dump(record, f)


def test_a_live_lease_is_respected_and_released(tmp_path):
    shard = _shard(tmp_path)
    lease = try_lease(FS, shard, seconds=30)
    assert isinstance(lease, Lease)
    with lease:
        other = try_lease(FS, shard, seconds=30)
        assert isinstance(other, Busy) and other.holder["token"] == lease.record["token"]
        assert current_holder(FS, shard)["pid"] == os.getpid()
    assert current_holder(FS, shard) is None
    assert not [p for p in os.listdir(tmp_path) if ".lease-" in p]
    again = try_lease(FS, shard, seconds=30)
    assert isinstance(again, Lease) and again.generation == 0
    again.release()


def test_of_many_concurrent_askers_exactly_one_gets_the_lease(tmp_path):
    shard = _shard(tmp_path)
    start, results = threading.Barrier(8), []

    def ask():
        start.wait()
        results.append(try_lease(FS, shard, seconds=30))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [r for r in results if isinstance(r, Lease)]
    assert len(held) == 1 and len(results) == 8
    held[0].release()


def test_an_expired_lease_of_another_host_is_taken_over_and_its_holder_learns_it(tmp_path):
    shard = _shard(tmp_path)
    old = try_lease(FS, shard, seconds=30)
    assert isinstance(old, Lease)
    # The same record as seen from another machine whose holder stopped renewing: expiry is all we know.
    _write_record(old.path, host="another-host", pid=1, expires=time.time() - 1)
    new = try_lease(FS, shard, seconds=30)
    assert isinstance(new, Lease) and new.generation == 1
    old.renew()
    assert old.lost  # the presumed-dead holder finds out at its next renewal
    assert isinstance(try_lease(FS, shard, seconds=30), Busy)
    new.release()
    assert current_holder(FS, shard) is None


def test_a_lease_of_another_host_is_respected_until_it_expires(tmp_path):
    shard = _shard(tmp_path)
    _write_record(lease_prefix(shard) + "0000", host="another-host", pid=1, expires=time.time() + 0.5)
    assert isinstance(try_lease(FS, shard, seconds=30), Busy)
    time.sleep(0.6)
    taken = try_lease(FS, shard, seconds=30)
    assert isinstance(taken, Lease)
    taken.release()


def test_a_dead_holder_on_this_host_loses_its_lease_at_once(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    shard = _shard(tmp_path)
    _write_record(lease_prefix(shard) + "0000", pid=gone.pid, expires=time.time() + 600)
    assert current_holder(FS, shard) is None
    taken = try_lease(FS, shard, seconds=30)
    assert isinstance(taken, Lease) and taken.generation == 1
    taken.release()


def test_a_shard_whose_holders_died_twice_is_taken_by_a_third_and_its_release_removes_all_three(tmp_path):
    shard = _shard(tmp_path)
    for generation in (0, 1):
        _write_record(f"{lease_prefix(shard)}{generation:04d}", host="another-host", expires=time.time() - 1)
    taken = try_lease(FS, shard, seconds=30)
    assert isinstance(taken, Lease) and taken.generation == 2
    taken.release()
    assert not [p for p in os.listdir(tmp_path) if ".lease-" in p]


def test_whether_a_holder_holds_by_hand():
    """Expired at its expiry; on this host also gone when its pid is no process, or when that pid now
    belongs to a process started at another time (pid reuse); a holder of another host only expires."""
    import psutil

    from richpref.run.leases import holder_alive

    now, me = time.time(), socket.gethostname()
    started = psutil.Process(os.getpid()).create_time()
    live = {"host": me, "pid": os.getpid(), "started": started, "expires": now + 60}
    assert holder_alive(live, now)
    assert not holder_alive({**live, "expires": now}, now)
    assert not holder_alive({**live, "pid": 0}, now)
    assert not holder_alive({**live, "started": started - 5}, now) and not holder_alive({**live, "started": started + 5}, now)
    assert holder_alive({**live, "started": started + 0.5}, now)  # create times are rounded
    assert holder_alive({**live, "host": me + "-elsewhere", "pid": 0}, now)


def test_a_holder_whose_process_this_user_may_not_signal_is_alive(monkeypatch):
    """Asking about another user's process is refused (EPERM): the process exists."""
    from richpref.run import leases

    def refused(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(leases.os, "kill", refused)
    monkeypatch.setattr(leases, "_process_started", lambda pid: None)
    assert leases.holder_alive({"host": socket.gethostname(), "pid": 12345, "expires": time.time() + 60})


def test_a_computing_holder_keeps_its_lease_past_the_first_expiry(tmp_path):
    shard = _shard(tmp_path)
    lease = try_lease(FS, shard, seconds=0.6)
    with lease:
        first_expiry = lease.record["expires"]
        time.sleep(1.2)  # two lease lifetimes: renewed in the background meanwhile
        record = json.loads(open(lease.path).read())
        assert record["expires"] > first_expiry
        other = try_lease(FS, shard, seconds=0.6)
        assert isinstance(other, Busy)


def test_where_a_store_cannot_refuse_a_second_create_the_writer_whose_bytes_were_replaced_does_not_win(monkeypatch):
    """A store without a conditional put: its exclusive create is a check, then a write. When another
    writer's bytes land between our write and our look, ours are gone: we must not count as the creator
    (the commit claim relied on that, and the lease now does too)."""
    from richpref.run import leases

    class NoConditionalPut(MemoryFileSystem):
        protocol = ("nocond",)

        def _open(self, path, mode="rb", **kw):
            if mode == "xb":
                raise NotImplementedError("no conditional put")
            return super()._open(path, mode, **kw)

    fs = NoConditionalPut(skip_instance_cache=True)
    fs.store.clear()
    assert leases.create_exclusive(fs, "/claims/a", b"ours")
    assert not leases.create_exclusive(fs, "/claims/a", b"again")  # it exists
    plain = fs.pipe_file
    monkeypatch.setattr(fs, "pipe_file", lambda p, data, **kw: (plain(p, data), plain(p, b"theirs")))
    assert not leases.create_exclusive(fs, "/claims/b", b"ours")
    assert fs.cat_file("/claims/b") == b"theirs"
    # removed right after our write (its holder released it): not ours either
    monkeypatch.setattr(fs, "pipe_file", lambda p, data, **kw: (plain(p, data), fs.rm_file(p)))
    assert not leases.create_exclusive(fs, "/claims/c", b"ours")
