"""The benchmark harness every script in bench/ uses (imported as `harness`: a script's folder is on sys.path).

- repeats (default 3), the sides of a ratio alternated: repeat i runs the sides rotated by i
  (a, b / b, a / a, b ...), so neither side always runs first;
- each side a fresh process with its own Prefect home and caches (`fresh_env`): HF caches, the
  `datasets` cache, XDG caches and a temp dir all under a new folder;
- the commit and the machine (cpus, load average before and after, python and torch versions)
  recorded; every run's raw figures written to bench/results/<bench>-<shortcommit>.json with the keys
  `bench, commit, date, machine, command, repeats, runs, summary, headline`;
- the median and the spread (min, max) of every metric printed.

`bench/report.py` turns the result files into the tables of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
KEYS = ("bench", "commit", "date", "machine", "command", "repeats", "runs", "summary", "headline")


# ---- pure parts -------------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(min, max) of the values."""
    if not values:
        raise ValueError("spread of no values")
    return float(min(values)), float(max(values))


def alternation(sides: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """The order to run `sides` in, `repeats` times: (repeat, side) pairs, each repeat the sides
    rotated by one more place, so every side runs first as often as the others (two sides: a b, b a, ...)."""
    if not sides:
        raise ValueError("no sides to alternate")
    n = len(sides)
    order = []
    for r in range(repeats):
        k = r % n
        order += [(r, s) for s in list(sides[k:]) + list(sides[:k])]
    return order


def summarize(runs: Iterable[dict], by_side: bool = True) -> dict:
    """{metric: {"median", "min", "max", "n"}} over the runs' numeric figures; with by_side, a metric
    of a run of side s is named "s.metric" when the runs have more than one side."""
    runs = list(runs)
    sides = {r.get("side") for r in runs}
    values: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r.items():
            if k in ("side", "repeat") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            name = f"{r.get('side')}.{k}" if by_side and len(sides) > 1 and r.get("side") != "derived" else k
            values.setdefault(name, []).append(float(v))
    out = {}
    for k, vs in values.items():
        lo, hi = spread(vs)
        out[k] = {"median": median(vs), "min": lo, "max": hi, "n": len(vs)}
    return out


def ratios(runs: Sequence[dict], num: tuple[str, str], den: tuple[str, str], name: str) -> list[dict]:
    """One derived run per repeat: num side's metric / den side's metric of the same repeat."""
    by = {(r.get("side"), r.get("repeat"), ): r for r in runs}
    out = []
    for (side, rep), r in sorted(by.items(), key=lambda x: (x[0][1], str(x[0][0]))):
        if side != num[0] or (den[0], rep) not in by:
            continue
        d = by[(den[0], rep)].get(den[1])
        if r.get(num[1]) is not None and d:
            out.append({"side": "derived", "repeat": rep, name: r[num[1]] / d})
    return out


def goal_met(value: float | None, goal: str | None) -> bool | None:
    """Whether `value` meets a goal written "<= 1.15", ">= 3", "< 15", "> 0.9" or "in [0.75, 1.25]"; None
    without one."""
    if value is None or not goal:
        return None
    g = goal.strip()
    if g.startswith("in [") and g.endswith("]"):  # a range: "in [0.75, 1.25]"
        try:
            lo, hi = (float(x) for x in g[4:-1].split(","))
        except ValueError:
            return None
        return bool(lo <= value <= hi)
    for op, fn in (("<=", lambda a, b: a <= b), (">=", lambda a, b: a >= b),
                   ("<", lambda a, b: a < b), (">", lambda a, b: a > b)):
        if g.startswith(op):
            try:
                return bool(fn(value, float(g[len(op):].strip().split()[0])))
            except ValueError:
                return None
    return None


def headline(name: str, value: float | None, unit: str, goal: str | None, **extra) -> dict:
    return {"name": name, "value": value, "unit": unit, "goal": goal, "met": goal_met(value, goal), **extra}


def result(bench: str, commit: str, machine: dict, command: str, repeats: int, runs: list[dict],
           head: dict, date: str | None = None, summary: dict | None = None) -> dict:
    """The result record, keys in the shared order."""
    return {"bench": bench, "commit": commit,
            "date": date or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "machine": machine, "command": command, "repeats": repeats, "runs": runs,
            "summary": summary if summary is not None else summarize(runs), "headline": head}


def format_summary(summary: dict) -> str:
    lines = []
    for k, s in summary.items():
        lines.append(f"  {k:40s} median {s['median']:.4g}   spread {s['min']:.4g} .. {s['max']:.4g}   (n={s.get('n', '?')})")
    return "\n".join(lines)


# ---- machine, commit, processes ----------------------------------------------------------------

def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    return {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg()), "python": platform.python_version(),
            "torch": _version("torch"), "platform": platform.platform()}


def cpu_seconds() -> dict | None:
    """CPU seconds so far: the whole machine's busy time (/proc/stat) and this process's own, its
    waited-for children included; None where /proc/stat is missing."""
    import resource

    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return {"t": time.monotonic(), "busy_s": (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), "own_s": own}


def others_share(start: dict | None, end: dict | None, cpus: int) -> float | None:
    """The share of the machine's cores that other processes kept busy between two `cpu_seconds()`."""
    if not start or not end or end["t"] <= start["t"]:
        return None
    others = (end["busy_s"] - start["busy_s"]) - (end["own_s"] - start["own_s"])
    return max(0.0, others) / ((end["t"] - start["t"]) * cpus)


def under_load(m: dict) -> bool:
    """Whether other work shared the machine: other processes kept over a quarter of its cores busy
    during the benchmark (`others_cpu_share`, measured); without that figure, a 1-minute load average
    before or after over a quarter of the cores (which the benchmark's own processes also reach)."""
    cpus = m.get("cpus") or 1
    if m.get("others_cpu_share") is not None:
        return m["others_cpu_share"] > 0.25
    loads = [m.get("loadavg") or [0], m.get("loadavg_after") or [0]]
    return max(l[0] for l in loads) > cpus / 4


def fresh_env(root: Path, **extra: str) -> dict:
    """Environment of a fresh process: its own Prefect home, HF / datasets / XDG caches and temp dir
    under `root`; offline Hub; this checkout first on PYTHONPATH."""
    root.mkdir(parents=True, exist_ok=True)
    drop = ("RICHPREF_FAULTS", "PREFECT_API_URL", "RICHPREF_CPU_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    for sub in ("prefect", "hf", "hf/datasets", "xdg-cache", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    env.update(PREFECT_HOME=str(root / "prefect"), HF_HOME=str(root / "hf"), HF_DATASETS_CACHE=str(root / "hf/datasets"),
               XDG_CACHE_HOME=str(root / "xdg-cache"), TMPDIR=str(root / "tmp"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO) + (os.pathsep + os.environ["PYTHONPATH"]
                                                                if os.environ.get("PYTHONPATH") else ""))
    env.update(extra)
    return env


def run_process(cmd: list[str], env: dict, timeout: float = 1800, cwd: str | None = None) -> dict:
    """Run `cmd` to its end: {"wall_s", "rc", "maxrss_mib" (peak RSS of that process, from wait4),
    "cpu_s" (its user + system seconds), "stdout", "stderr"}. A timeout kills its process group (rc -9) rather than raising."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True, start_new_session=True)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, 9)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return {"wall_s": wall, "rc": proc.returncode, "maxrss_mib": usage.ru_maxrss / 1024,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "stdout": out.read(), "stderr": err.read()}


def child_result(stdout: str, tag: str = "RESULT ") -> dict:
    """The JSON a child process printed on its last line starting with `tag`."""
    lines = [l for l in stdout.splitlines() if l.startswith(tag)]
    if not lines:
        raise ValueError(f"no {tag.strip()} line in the child's output")
    return json.loads(lines[-1][len(tag):])


def print_child(tag: str, figures: dict) -> None:
    print(tag + json.dumps(figures), flush=True)


def child_args(ap: argparse.ArgumentParser, repeats: int = 3) -> argparse.ArgumentParser:
    """--repeats, and the hidden --child / --order of a script whose repeats are fresh processes of itself
    (`Bench.per_repeat`)."""
    ap.add_argument("--repeats", type=int, default=repeats, help=f"fresh processes, sides alternated (default {repeats})")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--order", nargs="+", help=argparse.SUPPRESS)
    return ap


def child_argv(argv: Sequence[str]) -> list[str]:
    """A script's own arguments less --repeats and its value (a child runs one repeat)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--repeats":
            skip = True
        elif not a.startswith("--repeats="):
            out.append(a)
    return out


def rate_ratios(res: dict, sides: Sequence[str], metric: str, name: str = "speedup") -> dict:
    """One repeat's ratios of `metric` between the last side and the first, for every figure named
    `<thing>.<metric>` of both: {"<thing>.<name>": last / first} plus "worst_<name>" (the smallest)."""
    first, last = res[sides[0]], res[sides[-1]]
    out = {}
    for k, v in first.items():
        if k.endswith("." + metric) and v and last.get(k) is not None:
            out[k[: -len(metric) - 1] + "." + name] = last[k] / v
    if out:
        out["worst_" + name] = min(out.values())
    return out


class Bench:
    """One benchmark's record: `run` sides alternated, collect runs, write and print."""

    def __init__(self, name: str, repeats: int = 3, command: str | None = None, results_dir: Path | None = None):
        self.name, self.repeats = name, repeats
        self.command = command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)
        self.results_dir = results_dir or RESULTS
        self.machine = machine()
        self._cpu_start = cpu_seconds()
        self.commit = commit()
        self.runs: list[dict] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"richpref-bench-{name}-"))

    def fresh(self, label: str, **extra: str) -> tuple[Path, dict]:
        """A new folder and the environment of a fresh process living in it."""
        root = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.tmp))
        return root, fresh_env(root, **extra)

    def alternate(self, sides: Sequence[str], fn: Callable[[str, int], dict]) -> list[dict]:
        """fn(side, repeat) -> figures, in alternated order; each becomes a run."""
        for rep, side in alternation(sides, self.repeats):
            figures = fn(side, rep)
            run = {"side": side, "repeat": rep, **figures}
            self.runs.append(run)
            print(f"[{self.name}] repeat {rep} side {side}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()), flush=True)
        return self.runs

    def per_repeat(self, script: str, args: Sequence[str], sides: Sequence[str], derive: Callable[[dict], dict] | None = None,
                   timeout: float = 3600, echo: bool = False, **env: str) -> list[dict]:
        """Each repeat one fresh process `python script *args --child --order <sides rotated by the repeat>`
        (own Prefect home and caches) that prints `RESULT {side: {figure: value}}`; every side becomes a
        run, `derive(result)` (ratios within the repeat) a "derived" run, and the process's wall, CPU seconds
        and peak RSS a "process" run. For benchmarks whose sides share models loaded once per process.
        `echo`: also print the rest of the child's output (the figures it explains its result with)."""
        for rep in range(self.repeats):
            order = [s for r, s in alternation(sides, self.repeats) if r == rep]
            _, e = self.fresh(f"rep{rep}", **env)
            r = run_process([sys.executable, script, *args, "--child", "--order", *order], e, timeout=timeout)
            if r["rc"] != 0:
                raise RuntimeError(f"{self.name} repeat {rep} exited {r['rc']}:\n{r['stderr'][-3000:]}")
            res = child_result(r["stdout"])
            if echo:
                print("\n".join(l for l in r["stdout"].splitlines() if not l.startswith("RESULT ")), flush=True)
            for side in order:
                self.runs.append({"side": side, "repeat": rep, **res[side]})
            if derive is not None:
                self.runs.append({"side": "derived", "repeat": rep, **derive(res)})
            self.runs.append({"side": "process", "repeat": rep, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                              "maxrss_mib": r["maxrss_mib"]})
            print(f"[{self.name}] repeat {rep} ({' then '.join(order)}): process {r['wall_s']:.1f} s wall, "
                  f"{r['cpu_s']:.1f} s CPU", flush=True)
        return self.runs

    def write(self, head: dict, runs: list[dict] | None = None, name: str | None = None,
              extra_machine: dict | None = None) -> Path:
        runs = self.runs if runs is None else runs
        m = {**self.machine, "loadavg_after": list(os.getloadavg()),
             "others_cpu_share": others_share(self._cpu_start, cpu_seconds(), self.machine["cpus"] or 1),
             **(extra_machine or {})}
        m["under_load"] = under_load(m)
        rec = result(name or self.name, self.commit, m, self.command, self.repeats, runs, head)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{rec['bench']}-{rec['commit']}.json"
        path.write_text(json.dumps(rec, indent=1) + "\n")
        print(f"\n{rec['bench']} at {rec['commit']}, N={self.repeats}, load {m['loadavg'][0]:.1f} -> "
              f"{m['loadavg_after'][0]:.1f} on {m['cpus']} cpus")
        print(format_summary(rec["summary"]))
        v = head.get("value")
        print(f"headline: {head['name']} = {v if v is None else round(v, 4)} {head.get('unit', '')} "
              f"(goal {head.get('goal')}: {'met' if head.get('met') else 'not met' if head.get('met') is False else '-'})")
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
        return path

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def run(name: str, repeats: int, sides: Sequence[str], metric: str | Callable[[dict], str], unit: str,
        goal: str | None = None, *, script: str | None = None, args: Sequence[str] = (),
        derive: Callable[[dict], dict] | None = None, side: Callable[["Bench", str, int], dict] | None = None,
        extra_runs: Callable[[list[dict]], list[dict]] | None = None, results_dir: Path | None = None,
        timeout: float = 3600, **head: object) -> dict:
    """One benchmark from start to written record: a `Bench`, its runs (`script` given: `per_repeat`, each
    repeat a fresh process of the script; else `side(bench, side, repeat)` alternated, the bench giving
    `fresh` folders), `extra_runs(runs)` added
    (ratios within a repeat), the summary, the headline (the median of `metric`, or of the metric that
    `metric(summary)` names) written to bench/results, and the temp folder removed. A value of `head`
    that is callable is called with the summary (a note that names the worst side). Returns the record."""
    if (script is None) == (side is None):
        raise ValueError("give exactly one of script (per_repeat) or side (alternate)")
    b = Bench(name, repeats, results_dir=results_dir)
    try:
        if script is not None:
            b.per_repeat(script, args, sides, derive=derive, timeout=timeout)
        else:
            b.alternate(sides, lambda s, rep: side(b, s, rep))
        runs = b.runs + (extra_runs(b.runs) if extra_runs else [])
        s = summarize(runs)
        key = metric(s) if callable(metric) else metric
        extra = {k: v(s) if callable(v) else v for k, v in head.items()}
        path = b.write(headline(key, s[key]["median"], unit, goal, **extra), runs=runs)
    finally:
        b.cleanup()
    return json.loads(path.read_text())
