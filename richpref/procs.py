"""Child processes this process owns (model servers): they never outlive it.

`spawn_owned` starts a command in its own process group, asks the kernel to kill it when its parent
dies (PR_SET_PDEATHSIG, Linux), and records its pid in a registry file; `stop_owned` ends the group
(SIGTERM, then SIGKILL after `timeout`) and forgets the pid; `reap_orphans` kills recorded children
whose owner is gone (e.g. after a SIGKILL on a platform without PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_lock = threading.Lock()
# PDEATHSIG fires when the *thread* that forked the child ends, not the process: children are forked
# from this one long-lived thread, so a child outlives the (e.g. task-runner) thread that asked for it.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="richpref-spawn")


def registry_dir() -> Path:
    root = os.environ.get("RICHPREF_PID_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "richpref", "pids")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawn_owned(cmd: list[str], *, name: str, log_path: str | None = None, env: dict | None = None,
                cwd: str | None = None) -> subprocess.Popen:
    """Start `cmd` as an owned child (own process group, dies with this process, pid recorded)."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = _SPAWNER.submit(subprocess.Popen, cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent).result()
    finally:
        if log_path:
            log.close()
    record = {"pid": proc.pid, "owner": os.getpid(), "name": name, "cmd": cmd}
    with _lock:
        (registry_dir() / f"{proc.pid}.json").write_text(json.dumps(record))
    return proc


def _forget(pid: int) -> None:
    with _lock:
        (registry_dir() / f"{pid}.json").unlink(missing_ok=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own group: this reaches its workers too
    except (ProcessLookupError, PermissionError):
        pass


def stop_owned(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """End an owned child and its process group: SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers of the group
    _forget(proc.pid)


def reap_orphans() -> list[int]:
    """Kill recorded children whose owner process is gone; returns their pids."""
    reaped = []
    for path in sorted(registry_dir().glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if _alive(int(record["owner"])):
            continue
        pid = int(record["pid"])
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            reaped.append(pid)
        path.unlink(missing_ok=True)
    return reaped


__all__ = ["reap_orphans", "registry_dir", "spawn_owned", "stop_owned"]
