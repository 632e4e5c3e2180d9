"""duckdb views over a run: one view per stage (joined on item_id), and the summary the demo prints."""
from __future__ import annotations

import json

import duckdb

from richpref.run.runner import ShardManifest, stage_manifests
from richpref.run.shard_contract import reason_counts
from richpref.run.storage import RunStore, join
from richpref.tasks import ALL_OUTPUTS, PAIR_KEYED

SQL_STRING = str.maketrans({"'": "''"})


def connect(data_dir: str, run: str) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory duckdb with a view per stage that has shards (`source`, `sample`, … `pairs`)."""
    store = RunStore(data_dir, run)
    con = _duckdb_for(store)
    views = []
    for out in ALL_OUTPUTS:
        if _create_stage_view(con, out, stage_manifests(store, out)):
            views.append(out)
    if not views:
        raise RunNotFound(_no_shards(store, run))
    # A rebuild's pairs (several per item, keyed by pair index) are looked up, not joined.
    apart = PAIR_KEYED & set(views)
    _create_pairs_full(con, [v for v in views if v not in apart and not (apart and v == "pairs")], pairs_apart=bool(apart))
    return con, views + ["pairs_full"]


def _duckdb_for(store: RunStore) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    if "://" in store.data_dir:
        # Remote runs are read through the run's own fsspec filesystem (same endpoint and credentials
        # as the curate that wrote them), not duckdb's httpfs extension, which would be downloaded on
        # first use (impossible offline) and configured apart.
        con.execute("SET autoinstall_known_extensions = false")
        con.register_filesystem(store.fs)
    return con


def _create_stage_view(con: duckdb.DuckDBPyConnection, out: str, manifests: dict[int, ShardManifest]) -> bool:
    """A view of the stage's committed shards (those `manifests` name); False where it has none."""
    files = [m.uri for _, m in sorted(manifests.items())]
    if not files:
        return False
    listing = ", ".join("'" + f.translate(SQL_STRING) + "'" for f in files)
    con.execute(f'create view "{out}" as select * from read_parquet([{listing}], union_by_name=true)')
    return True


class RunNotFound(FileNotFoundError):
    """A view of a run that has no committed shard (a typo in the run's name, or another --data-dir)."""


def _no_shards(store: RunStore, run: str) -> str:
    return f"run {run!r} has no shards under {store.uri(store.root)}; run `richpref curate --run {run}` first"


def _create_pairs_full(con: duckdb.DuckDBPyConnection, views: list[str], pairs_apart: bool = False) -> None:
    """Every item with its furthest stage: one row per source item and edit candidate, each stage's
    columns left-joined (on item_id, and on candidate from the edit stage on).

    A column name already taken by an earlier stage gets the stage as prefix (`critique_status`);
    image columns are left out to keep the view light (join the stage view for them). `exported`
    says the item has a pair, `in_pair` that this candidate's edit is in it.
    """
    seen: set[str] = set()
    select, joins = [], []
    candidate_from = None
    for v in views:
        cols = con.execute(f'describe "{v}"').fetchall()
        names = {name for name, *_ in cols}
        alias = f"t_{v}"
        for name, ctype, *_ in cols:
            if name == "item_id" or ctype.upper().startswith("BLOB") or (name == "candidate" and candidate_from):
                continue
            out = name if name not in seen else f"{v}_{name}"
            seen.add(out)
            select.append(f'{alias}."{name}" as "{out}"')
        if v == views[0]:
            joins.append(f'"{v}" {alias}')
        elif "candidate" in names and candidate_from:
            joins.append(f'left join "{v}" {alias} on {alias}.item_id = t_{views[0]}.item_id '
                         f'and {alias}.candidate = t_{candidate_from}.candidate')
        else:
            joins.append(f'left join "{v}" {alias} on {alias}.item_id = t_{views[0]}.item_id')
        if "candidate" in names and not candidate_from:
            candidate_from = v
    if pairs_apart:  # rebuild: an item may have several pairs, each of two samples
        first = f"t_{views[0]}.item_id"
        select.append(f"exists (select 1 from pairs p where p.item_id = {first}) as exported")
        if candidate_from:
            select.append(f"coalesce(exists (select 1 from pairs p where p.item_id = {first} and "
                          f"t_{candidate_from}.candidate in (p.candidate_0, p.candidate_1)), false) as in_pair")
    elif "pairs" in views:
        select.append("(t_pairs.item_id is not null) as exported")
        # A relabelled Pick-a-Pic dataset's pairs name no candidates: its pair is the item's two images.
        if candidate_from and "candidate_0" in {name for name, *_ in con.execute('describe "pairs"').fetchall()}:
            select.append(f"coalesce(t_{candidate_from}.candidate in (t_pairs.candidate_0, t_pairs.candidate_1), false) as in_pair")
    con.execute(f"create view pairs_full as select t_{views[0]}.item_id, {', '.join(select)} from {' '.join(joins)}")


def summary(data_dir: str, run: str) -> dict:
    """Rows, kept, rejected and reasons of every stage with shards, from its manifests (the runner
    counts them as it commits: no shard is opened), and the flip rate and label counts, from the
    relabel and pairs shards' columns. Every curate prints it at its end: read through duckdb, every
    shard of every stage was opened, on S3 about 30 requests a shard."""
    store = RunStore(data_dir, run)
    con = None  # duckdb, only for manifests written before they held the reasons
    stages, present = [], {}
    for out in ALL_OUTPUTS:
        manifests = stage_manifests(store, out)
        if not manifests:
            continue
        present[out] = manifests
        rows = sum(m.rows for m in manifests.values())
        kept = sum(m.kept for m in manifests.values())  # a table without a status column (pairs): all rows
        reasons = reason_counts(manifests.values())
        if sum(reasons.values()) != rows - kept:  # manifests written before they held the reasons
            con = con or _duckdb_for(store)
            _create_stage_view(con, out, manifests)
            reasons = dict(con.execute(f"select split_part(reason, ':', 1), count(*) from \"{out}\" "
                                       "where status <> 'ok' group by 1").fetchall())
        reasons = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        stages.append({"stage": out, "rows": rows, "kept": kept, "rejected": rows - kept, "reasons": reasons})
    if not present:
        raise RunNotFound(_no_shards(store, run))
    out = {"run": run, "stages": stages}
    relabelled = _relabel_dataset_summary(store)
    if relabelled is not None:
        # jpg_1 is no edit of jpg_0 here: what the run changed is the source's labels
        out["agreement_with_source_label"] = relabelled.get("agreement_with_source_label")
    elif "relabel" in present:
        # over the pairs that hold the original (best-vs-worst pairs of two edits cannot flip)
        n = flipped = 0
        for status, flip, candidate_0 in _columns(store, "relabel", present["relabel"], ["status", "flipped", "candidate_0"]):
            if status == "ok" and (candidate_0 is None or candidate_0 == -1):
                n, flipped = n + 1, flipped + (flip is True)
        out["flip_rate"] = (flipped / n) if n else None
    if "pairs" in present:
        labels: dict = {}
        for (label,) in _columns(store, "pairs", present["pairs"], ["label_0"]):
            labels[label] = labels.get(label, 0) + 1
        out["label_0"] = dict(sorted(labels.items(), key=lambda kv: (kv[0] is None, kv[0])))
    return out


def _relabel_dataset_summary(store: RunStore) -> dict | None:
    """A relabel-dataset run's relabel.json ({} before the command wrote it); None for other runs."""
    profile = join(store.root, "profile.json")
    if not store.fs.exists(profile) or json.loads(store.fs.cat_file(profile)).get("pipeline") != "relabel_dataset":
        return None
    path = join(store.root, "relabel.json")
    return json.loads(store.fs.cat_file(path)) if store.fs.exists(path) else {}


def _columns(store: RunStore, out: str, manifests: dict[int, ShardManifest], columns: list[str]):
    """The rows of `columns` of the stage's committed shards, as tuples: only those column chunks are read."""
    for s in sorted(manifests):
        t = store.read_shard(out, s, columns)
        yield from zip(*(t.column(c).to_pylist() for c in columns))


def format_summary(s: dict) -> str:
    lines = [f"run {s['run']}", f"{'stage':<10} {'rows':>6} {'kept':>6} {'rejected':>9}  reasons"]
    for st in s["stages"]:
        reasons = ", ".join(f"{k}={v}" for k, v in st["reasons"].items())
        lines.append(f"{st['stage']:<10} {st['rows']:>6} {st['kept']:>6} {st['rejected']:>9}  {reasons}")
    if s.get("flip_rate") is not None:
        lines.append(f"flip rate (edit scored lower than the original): {s['flip_rate']:.1%}")
    if s.get("agreement_with_source_label") is not None:
        lines.append(f"agreement with the source label: {s['agreement_with_source_label']:.1%}")
    if "label_0" in s:
        lines.append(f"pairs label_0 counts: {json.dumps({str(k): v for k, v in s['label_0'].items()})}")
    return "\n".join(lines)


def status(data_dir: str, run: str) -> dict:
    """Per stage of the run's pipeline: shards done / missing / failed (as of the run's last command).
    Done is the runner's answer: committed for the key the shard has under the run's profile
    (profile.json); a run without its profile counts every committed shard. `stale`: the missing
    shards that are committed for another key (another config or richpref version)."""
    from richpref.run.plan import plan_stages
    from richpref.schemas.config import Profile
    from richpref.tasks import ALL_STAGES, stages_for

    store = RunStore(data_dir, run)
    if not store.fs.exists(store.root):  # a typo or another --data-dir: not a run with every shard missing
        raise RunNotFound(_no_shards(store, run))
    last = store.last_run()
    failed_by_stage: dict[str, list[int]] = {}
    for f in last.get("failed", []):
        where = f.split(":", 1)[0]
        for part in where.split(", "):
            stage, _, shard = part.partition("/part-")
            if shard.isdigit():
                failed_by_stage.setdefault(stage, []).append(int(shard))
    profile_json, profile, note = store.root + "/profile.json", None, None
    if store.fs.exists(profile_json):
        try:
            profile = Profile.model_validate_json(store.fs.cat_file(profile_json))
        except ValueError as exc:  # saved by another release: its keys cannot be recomputed here
            first = exc.errors()[0] if hasattr(exc, "errors") else None
            why = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(exc).splitlines()[0]
            note = (f"{store.uri(profile_json)} does not load in this release ({why}): every committed shard "
                    "is counted as done, whatever its key")
    if profile is not None:
        stages_run = stages_for(profile)
        done = {st.out: plan.done for st, plan in zip(stages_run, plan_stages(stages_run, profile, store))}
    else:
        stages_run = ALL_STAGES
        done = {st.out: sorted(stage_manifests(store, st.out)) for st in stages_run}
    expected = sorted(set(done.get("source", [])) | set(stage_manifests(store, "source")))
    stages = []
    for st in stages_run:
        have = done.get(st.out, [])
        failed = sorted(failed_by_stage.get(st.name, []))
        missing = [s for s in expected if s not in have and s not in failed]
        # committed, but for another key (another config or richpref version): the next curate redoes them
        committed = set(stage_manifests(store, st.out)) if profile is not None and missing else set()
        stale = [s for s in missing if s in committed]
        stages.append({"stage": st.out, "done": len(have), "missing": missing, "stale": stale, "failed": failed})
    return {"run": run, "state": last.get("state", "unknown"), "shards": len(expected), "stages": stages,
            **({"note": note} if note else {})}


def format_status(st: dict) -> str:
    """The table of `status`: per stage, shards done, stale (committed for another key), missing (never
    committed) and failed."""
    lines = [f"run {st['run']}: {st['shards']} shard(s), last run {st['state']}",
             f"{'stage':<10} {'done':>5} {'stale':>6} {'missing':>8} {'failed':>7}"]
    for s in st["stages"]:
        stale = len(s.get("stale", []))
        lines.append(f"{s['stage']:<10} {s['done']:>5} {stale:>6} {len(s['missing']) - stale:>8} {len(s['failed']):>7}"
                     + (f"  failed: {s['failed']}" if s["failed"] else ""))
    if any(s.get("stale") for s in st["stages"]):
        lines.append("stale: committed for another config or richpref version; the next curate of this run "
                     "redoes them (and what reads them): `curate --plan` lists them")
    if st.get("note"):
        lines.append(f"note: {st['note']}")
    return "\n".join(lines)
