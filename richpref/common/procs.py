"""Child processes richpref owns (a Prefect server, model servers): they never outlive it.

`spawn_owned` starts a command in its own process group, asks the kernel to SIGKILL it when this
process dies (Linux PR_SET_PDEATHSIG) and records it in a pid registry: one small JSON file per child
under `registry_dir()` (pid, start time, owner pid and start time, command). `stop_owned` ends the
group (SIGTERM, then SIGKILL) and forgets the child. `reap_orphans` kills recorded children whose
owner is gone: the safety net where PDEATHSIG does not exist (macOS) or did not fire. A pid is only
ever signalled when its start time matches the record, so a recycled pid is never touched.

PDEATHSIG fires when the *thread* that forked the child ends, so every child is forked by one thread
that lives as long as the process: a child spawned from a short-lived worker thread survives that
thread.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from richpref.common.atomic import write_atomic

log = logging.getLogger("richpref")

PID_DIR_ENV = "RICHPREF_PID_DIR"
_PR_SET_PDEATHSIG = 1
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="richpref-spawner")


def registry_dir() -> Path:
    """$RICHPREF_PID_DIR, else $XDG_STATE_HOME/richpref/pids (~/.local/state/richpref/pids)."""
    root = os.environ.get(PID_DIR_ENV) or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "richpref", "pids")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None if it is gone (or a zombie)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same_process(pid: int, started: float | None) -> bool:
    now = start_time(pid)
    return now is not None and started is not None and abs(now - started) < 0.05


def _die_with_parent():
    """The preexec_fn: in the child, between fork and exec, ask for SIGKILL when the parent dies.
    libc is resolved here, in the parent, so the child only makes the one system call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    owner = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != owner:  # the owner died before prctl took effect
            os._exit(1)

    return preexec


def _record_path(pid: int) -> Path:
    return registry_dir() / f"{pid}.json"


def _register(proc: subprocess.Popen, name: str, cmd: list[str]) -> None:
    record = {"pid": proc.pid, "start_time": start_time(proc.pid), "name": name, "parent_pid": os.getpid(),
              "parent_start_time": start_time(os.getpid()), "cmd": [str(c) for c in cmd]}
    path = _record_path(proc.pid)
    write_atomic(path, json.dumps(record).encode())


def _unregister(pid: int) -> None:
    _record_path(pid).unlink(missing_ok=True)


def spawn_owned(cmd: list[str], *, name: str, log_path: str | None = None, env: dict | None = None,
                cwd: str | None = None) -> subprocess.Popen:
    """Start `cmd` as a child that dies with this process (own process group, pid recorded).
    stdout and stderr go to `log_path` (appended), else to this process's. Orphans of earlier runs
    are reaped first."""
    reap_orphans()
    out = open(log_path, "ab") if log_path else None
    try:
        proc = _spawner.submit(subprocess.Popen, [str(c) for c in cmd], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True,
                               preexec_fn=_die_with_parent()).result()
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor
    _register(proc, name, cmd)
    log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(map(str, cmd)))
    return proc


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_owned(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after `timeout` seconds, reap it, forget it."""
    if proc.poll() is None:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    else:
        _kill_group(proc.pid, signal.SIGKILL)  # the leader is gone; anything left in its group goes too
    _unregister(proc.pid)


def _end(pid: int, started: float | None, timeout: float) -> None:
    if not _same_process(pid, started):
        return
    _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _same_process(pid, started):
        time.sleep(0.05)
    if _same_process(pid, started):
        _kill_group(pid, signal.SIGKILL)


def reap_orphans(timeout: float = 5.0) -> list[int]:
    """Kill every recorded child whose owner has died; return their pids. Records of children that
    already ended are dropped. Children of live owners (other richpref processes) are left alone."""
    reaped = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written by its owner, or not ours
        if _same_process(rec["parent_pid"], rec.get("parent_start_time")):
            continue
        if _same_process(rec["pid"], rec.get("start_time")):
            log.warning("stopping %s (pid %d), left running by pid %d", rec.get("name"), rec["pid"], rec["parent_pid"])
            _end(rec["pid"], rec.get("start_time"), timeout)
            reaped.append(rec["pid"])
        path.unlink(missing_ok=True)
    return reaped


def wait_healthy(url: str, what: str, proc=None, timeout: float = 90.0, poll_s: float = 0.2) -> None:
    """Wait until `GET {url}/health` answers 200. Fails fast when `proc` (the server's process) exits,
    and after `timeout` seconds otherwise, naming `what` (e.g. "the Prefect server") and the url."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
            try:
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(poll_s)
    raise TimeoutError(f"{what} at {url} was not ready after {timeout:.0f}s")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server this process starts (parallel runs do not collide)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PortInUse(RuntimeError):
    """A server's port that something already listens on; the message names it and the fix."""


def check_port_free(host: str, port: int) -> None:
    """Before a server starts (and loads anything): refuse a port another server holds."""
    if port_in_use(host, port):
        raise PortInUse(f"port {port} on {host} is in use (another server listens there): stop it, or give --port")


def port_in_use(host: str, port: int) -> bool:
    """Whether a server already listens on (host, port): bound as servers bind (SO_REUSEADDR), so a
    port a stopped server left in TIME_WAIT counts as free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False
