"""Owned children (model servers): they outlive the thread that started them, not the process."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

from richpref.procs import registry_dir, spawn_owned, stop_owned

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_child_started_from_a_task_thread_outlives_that_thread_and_stops_by_pid():
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("p", spawn_owned(SLEEPER, name="sleeper")))
    t.start()
    t.join()
    time.sleep(0.5)
    proc = box["p"]
    try:
        # the kernel's parent-death signal follows the forking thread: a task thread that ends must not kill it
        assert proc.poll() is None
        assert (registry_dir() / f"{proc.pid}.json").exists()
    finally:
        stop_owned(proc, timeout=5)
    assert proc.poll() is not None and not (registry_dir() / f"{proc.pid}.json").exists()


def test_a_child_dies_with_its_owner_process():
    code = ("import sys, time; from richpref.procs import spawn_owned; "
            f"p = spawn_owned({SLEEPER!r}, name='sleeper'); print(p.pid, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(owner.stdout.readline())
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ", 1)[1][0] in "ZX":
                    break
        except OSError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"child {child} outlived its killed owner")
    from richpref.procs import reap_orphans

    reap_orphans()  # forget the dead owner's record
    assert not (registry_dir() / f"{child}.json").exists()
