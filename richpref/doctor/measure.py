"""`richpref doctor`: know before a long run that every model loads and fits, and what the run costs.

The doctor checks every model reference first (doctor_checks.preflight: nothing loads until all of
them resolve and fit), then, stage by stage, loads the stage's models through the stage's own loader
(one stage's models at a time), pushes N source items through the shard runner's own path
(runner.run_shard: key, lease, read, compute, rows-accounted check, commit, work log) into a fresh
scratch run, so it measures what a run does, and measures: load seconds, peak memory (process RSS; the GPU's max allocated where
there is one), items/s and disk bytes per item. From those it projects a run of `project_items`
items on `workers` workers, each loading every model once.

A `pipeline: rebuild` profile is measured on its own stages (samples, rewards, ranked, rebuild_export),
a `pipeline: relabel_dataset` profile on its (pickapic_source, pickapic_score, ...).

Projection, per stage: load + warm-up + items × steady seconds per source item, where the steady rate
comes from the shards after the first (the first pays one-time costs: kernels, caches) when the
scratch run has more than one shard. What a worker process pays once before its first model, whichever
it is (importing the model libraries, starting the accelerator), is timed apart as the worker start
(models/runtime.start_process) and projected once per worker: charged to the first model stage's
load, it made that stage's model look slow to load again (10.3 s for the tiny SD1.5 pipeline on an
H200, whose ControlNet pipeline then loaded in 1.4 s).
"""
from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from richpref.doctor.checks import DoctorError, ModelProblem, ModelRef, memory_fix, preflight
from richpref.schemas.config import Profile

log = logging.getLogger("richpref")


@dataclass
class StageCost:
    """What one stage cost on the scratch run, and what it projects to."""

    stage: str
    models: list[str]
    device: str
    weights_gib: float
    load_s: float
    items: int  # source items that went through the stage
    rows: int  # rows it wrote (kept + rejected)
    shards: int
    compute_s: float  # every shard: read inputs, compute, write
    warmup_s: float  # what the first shard cost beyond the steady rate
    s_per_item: float  # steady seconds per source item
    peak_rss_mib: float
    gpu_peak_mib: float | None
    disk_bytes: int
    projected: dict[str, float] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return 1.0 / self.s_per_item if self.s_per_item > 0 else float("inf")


@dataclass
class DoctorReport:
    profile: str
    items: int
    project_items: int
    workers: int
    stages: list[StageCost]
    total: dict[str, float]
    scratch: str | None = None
    start_s: float = 0.0  # a worker process's start before its first model, paid once per worker
    start_devices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for s, cost in zip(data["stages"], self.stages):
            s["items_per_s"] = round(cost.items_per_s, 4)
        return data


def project(cost: StageCost, items: int, workers: int) -> dict[str, float]:
    """Hours for `items` items on `workers` workers: each worker loads the models once and takes an
    equal share; `hours_per_worker` is also the stage's wall time, `worker_hours` what it bills."""
    fixed = cost.load_s + cost.warmup_s
    per_worker = fixed + items / workers * cost.s_per_item
    return {"hours_per_worker": per_worker / 3600, "worker_hours": (workers * fixed + items * cost.s_per_item) / 3600,
            "disk_gb": cost.disk_bytes / max(cost.items, 1) * items / 1e9}


class PeakMemory:
    """Peak process RSS (sampled every 10 ms on a thread) and the GPU's peak allocation in a block."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.rss = 0
        self.gpu: int | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.rss = max(self.rss, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> "PeakMemory":
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self.rss = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.rss = max(self.rss, self._proc.memory_info().rss)
        if self._cuda:
            self.gpu = int(torch.cuda.max_memory_allocated())


def stage_loaders(profile: Profile) -> dict[str, Callable[[], list[str]]]:
    """Per stage, a function that loads its models through the stage's own loader (`Stage.load`: the
    stage then finds them resident) and returns what it loaded. Stages without a model are absent."""
    from richpref.tasks import stages_for

    return {stage.name: partial(stage.load, profile) for stage in stages_for(profile) if stage.load is not None}


def _load_problem(stage: str, refs: list[ModelRef], exc: BaseException, profile: Profile) -> ModelProblem:
    from richpref.common.faults import is_out_of_memory

    models = ", ".join(r.ref for r in refs if r.stage == stage) or stage
    if is_out_of_memory(exc):
        return ModelProblem(stage, models, f"out of memory ({type(exc).__name__}: {exc})", memory_fix(stage, profile),
                            kind="memory")
    if isinstance(exc, ImportError):
        package = getattr(exc, "name", None) or "the missing package"
        return ModelProblem(stage, models, f"{type(exc).__name__}: {exc}",
                            f"install {package} (pip install {package}) into this environment; a model package's "
                            "own dependencies are not always pulled in (pip check lists what is missing)",
                            kind="missing_package")
    return ModelProblem(stage, models, f"{type(exc).__name__}: {exc}",
                        "check that the directory holds a complete checkpoint of the architecture this stage "
                        "expects (re-download or rebuild it); the cause above names the file or key",
                        kind="load_failed")


def scratch_profile(profile: Profile, items: int) -> Profile:
    """The profile reading only `items` source rows, in shards no larger than the profile's."""
    src = profile.source.model_copy(update={"limit": items, "shard_size": min(profile.source.shard_size, items)})
    return profile.model_copy(update={"source": src})


def _stage_disk_bytes(store, stage: str) -> int:
    return sum(store.fs.size(store.shard_path(stage, s)) for s in store.shards(stage))


def run_stage_shards(stage, store, profile: Profile, upstream: dict) -> tuple[dict, list[float]]:
    """Every shard of `stage` through the shard runner itself (richpref/run/runner.run_shard: content
    key, lease, input read, the stage's function with out-of-memory halving, the rows-accounted
    check, Parquet then manifest, the work log), exactly as a run computes it. Returns the stage's
    manifests and the seconds of each shard."""
    from richpref.run.leases import Busy
    from richpref.run.runner import content_key, run_shard, stage_shards

    manifests, seconds = {}, []
    for s in stage_shards(stage, profile, upstream):
        inputs = {r: upstream[r][s] for r in stage.reads}
        t0 = time.perf_counter()
        result = run_shard(stage, s, inputs, store, profile, content_key(stage, profile, s, inputs))
        seconds.append(time.perf_counter() - t0)
        if isinstance(result, Busy):
            raise DoctorError(f"{stage.name} shard {s} of the scratch run {store.uri(store.root)} is leased by another "
                              "process: give each doctor its own scratch_dir")
        manifests[s] = result
    return manifests, seconds


def fresh_store(data_dir: str, run: str):
    """An empty scratch run: a doctor measures computing shards, never finding them committed."""
    from richpref.run.storage import RunStore

    store = RunStore(data_dir, run)
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)
    return store


def steady_rate(seconds: list[float], items: list[int]) -> tuple[float, float]:
    """(warm-up seconds, steady seconds per item): the shards after the first give the steady rate;
    with a single shard it is all steady (the projection then errs high, never low)."""
    if len(seconds) < 2 or sum(items[1:]) == 0:
        return 0.0, sum(seconds) / max(sum(items), 1)
    rate = sum(seconds[1:]) / sum(items[1:])
    return max(0.0, seconds[0] - rate * items[0]), rate


def run_doctor(profile: Profile, *, items: int = 8, project_items: int = 100_000, workers: int = 1,
               scratch_dir: str | None = None, progress: Callable[[str], None] | None = None) -> DoctorReport:
    """Check, load and run every stage of `profile` on `items` source items; raise ModelProblem on the
    first model that cannot be loaded (before anything else starts when the preflight finds it)."""
    from richpref.models.runtime import resident
    from richpref.tasks import stages_for

    if items < 1 or project_items < 1 or workers < 1:
        raise DoctorError("--items, --project-items and --workers must be at least 1")
    say = progress or (lambda msg: log.info("%s", msg))
    refs, weights = preflight(profile)
    say(f"doctor: {len(refs)} model reference(s) resolve and fit; running {items} item(s) through every stage")
    prof = scratch_profile(profile, items)
    source, *stages = stages_for(prof)
    tmp = None if scratch_dir else tempfile.TemporaryDirectory(prefix="richpref-doctor-")
    root = scratch_dir or tmp.name
    store = fresh_store(root, "doctor")
    costs: list[StageCost] = []
    try:
        with PeakMemory() as mem:
            # Opening a source is a fixed cost paid once per process (imports, a dataset's Arrow
            # conversion, footers): a one-row scratch run pays it; the N-row run's shards then give
            # the per-item rate, as every other stage's do.
            opened = fresh_store(root, "doctor-open")
            t0 = time.perf_counter()
            run_stage_shards(source, opened, prof.model_copy(update={"source": prof.source.model_copy(
                update={"limit": 1, "shard_size": 1})}), {})
            load_s = time.perf_counter() - t0
            done, seconds = run_stage_shards(source, store, prof, {})
        opened.fs.rm(opened.root, recursive=True)
        manifests = {source.out: done}
        per_shard_items = [done[s].rows for s in sorted(done)]
        n = sum(per_shard_items)
        warmup, rate = steady_rate(seconds, per_shard_items)
        costs.append(StageCost(source.name, [], "cpu", 0.0, load_s, n, n, len(done), sum(seconds), warmup, rate,
                               mem.rss / 2**20, None, _stage_disk_bytes(store, source.out)))
        start_s, devices = _time_start(refs, say)
        loaders = stage_loaders(prof)
        for stage in stages:  # the edit pipeline, or the rebuild's samples, rewards, ranked, export
            resident.release()  # one stage's models at a time, as in a run
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                try:
                    models = loaders[stage.name]() if stage.name in loaders else []
                except DoctorError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every load failure is reported the same way
                    raise _load_problem(stage.name, refs, exc, prof) from exc
                load_s = time.perf_counter() - t0
                try:
                    manifests[stage.out], seconds = run_stage_shards(stage, store, prof, manifests)
                except DoctorError:
                    raise
                except Exception as exc:  # noqa: BLE001 - out of memory while computing is a settings problem
                    from richpref.common.faults import is_out_of_memory

                    if is_out_of_memory(exc):
                        raise _load_problem(stage.name, refs, exc, prof) from exc
                    raise
            warmup, rate = steady_rate(seconds, per_shard_items)
            device = {r.stage: r.device for r in refs}.get(stage.name, "cpu")
            rows = sum(m.rows for m in manifests[stage.out].values())
            cost = StageCost(stage.name, models, device, weights.get(stage.name, 0) / 2**30, load_s, n, rows,
                             len(seconds), sum(seconds), warmup, rate, mem.rss / 2**20,
                             None if mem.gpu is None else mem.gpu / 2**20, _stage_disk_bytes(store, stage.out))
            costs.append(cost)
            say(f"doctor: {stage.name}: load {load_s:.2f}s, {n / sum(seconds):.2f} items/s, peak RSS {cost.peak_rss_mib:.0f} MiB")
        resident.release()
    finally:
        if tmp is not None:
            tmp.cleanup()
    for c in costs:
        # One process reads the source for the whole run; the model stages spread over the workers.
        c.projected = project(c, project_items, 1 if c is costs[0] else workers)
    return DoctorReport(profile.name, items, project_items, workers, costs, project_total(costs, start_s, workers),
                        scratch=scratch_dir, start_s=start_s, start_devices=devices)


def project_total(costs: list[StageCost], start_s: float, workers: int) -> dict[str, float]:
    """The run's projection: its stages' (each projected) plus each worker's start, paid once per worker."""
    total = {
        "hours_per_worker": sum(c.projected["hours_per_worker"] for c in costs) + start_s / 3600,
        "worker_hours": sum(c.projected["worker_hours"] for c in costs) + workers * start_s / 3600,
        "disk_gb": sum(c.projected["disk_gb"] for c in costs),
        "disk_bytes_per_item": sum(c.disk_bytes for c in costs) / max(costs[0].items, 1),
        "peak_rss_mib": max(c.peak_rss_mib for c in costs),
    }
    gpu = [c.gpu_peak_mib for c in costs if c.gpu_peak_mib is not None]
    if gpu:
        total["gpu_peak_mib"] = max(gpu)
    return total


def _time_start(refs: list[ModelRef], say: Callable[[str], None]) -> tuple[float, list[str]]:
    """Seconds of this process's start before its first model (model libraries, each device the
    models run on), and those devices."""
    from richpref.models.runtime import start_process

    devices = sorted({r.device for r in refs} or {"cpu"})
    t0 = time.perf_counter()
    start_process(set(devices))
    start_s = time.perf_counter() - t0
    say(f"doctor: worker start (model libraries, {', '.join(devices)}): {start_s:.2f}s")
    return start_s, devices


def table_rows(report: DoctorReport) -> list[dict[str, Any]]:
    """One row per stage plus the total: the doctor's table for JSON, Prefect artifacts and printing."""
    k = report.workers
    rows = []
    for c in report.stages:
        if len(rows) == 1:  # after the source, which the flow's process reads
            rows.append(_start_row(report))
        rows.append({
            "stage": c.stage, "device": c.device, "models": ", ".join(c.models) or "-",
            "weights_gib": round(c.weights_gib, 3), "load_s": round(c.load_s, 2),
            "peak_rss_mib": round(c.peak_rss_mib), "gpu_peak_mib": None if c.gpu_peak_mib is None else round(c.gpu_peak_mib),
            "items_per_s": round(c.items_per_s, 3), "warmup_s": round(c.warmup_s, 2),
            "hours_per_worker": round(c.projected["hours_per_worker"], 4),
            "worker_hours": round(c.projected["worker_hours"], 4),
            "disk_kib_per_item": round(c.disk_bytes / max(c.items, 1) / 1024, 2),
            "disk_gb": round(c.projected["disk_gb"], 3),
        })
    t = report.total
    rows.append({"stage": "total", "device": "", "models": "", "weights_gib": None,
                 "load_s": round(sum(c.load_s for c in report.stages) + report.start_s, 2),
                 "peak_rss_mib": round(t["peak_rss_mib"]), "gpu_peak_mib": t.get("gpu_peak_mib") and round(t["gpu_peak_mib"]),
                 "items_per_s": None, "warmup_s": None, "hours_per_worker": round(t["hours_per_worker"], 4),
                 "worker_hours": round(t["worker_hours"], 4),
                 "disk_kib_per_item": round(t["disk_bytes_per_item"] / 1024, 2), "disk_gb": round(t["disk_gb"], 3)})
    if k == 1:
        for r in rows:
            r.pop("worker_hours")
    return rows


START_ROW = "start"  # the table's row of a worker process's start before its first model


def _start_row(report: DoctorReport) -> dict[str, Any]:
    k, s = report.workers, report.start_s
    return {"stage": START_ROW, "device": ",".join(report.start_devices), "models": "model libraries, device start",
            "weights_gib": None, "load_s": round(s, 2), "peak_rss_mib": None, "gpu_peak_mib": None, "items_per_s": None,
            "warmup_s": None, "hours_per_worker": round(s / 3600, 4), "worker_hours": round(k * s / 3600, 4),
            "disk_kib_per_item": 0.0, "disk_gb": 0.0}


def format_report(report: DoctorReport) -> str:
    rows = table_rows(report)
    k = report.workers
    heads = {"stage": "stage", "device": "device", "load_s": "load s", "peak_rss_mib": "peak RSS MiB",
             "gpu_peak_mib": "GPU max MiB", "items_per_s": "items/s", "warmup_s": "warm-up s",
             "hours_per_worker": "h/worker" if k > 1 else "hours", "worker_hours": f"worker-h (x{k})",
             "disk_kib_per_item": "KiB/item", "disk_gb": "disk GB"}
    cols = [c for c in heads if c in rows[0]]
    cells = [[heads[c] for c in cols]] + [["-" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = [f"doctor: profile {report.profile}, measured on {report.items} item(s), projected to "
             f"{report.project_items} item(s) on {k} worker(s)"]
    for j, row in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
        if j == 0 or j == len(cells) - 2:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"{START_ROW}: what each worker process pays once before its first model (importing the model "
                 "libraries, starting the device); a model stage's load s is its own")
    lines.append("models: " + "; ".join(f"{c.stage}: {', '.join(c.models)}" for c in report.stages if c.models))
    return "\n".join(lines)


def write_json(report: DoctorReport, path: str) -> str:
    data = {"report": report.to_dict(), "table": table_rows(report)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path
