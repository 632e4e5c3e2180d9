"""Looking at a run: status, summary, duckdb views, the HTML report (rendered in headless Chromium)."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from relabel_helpers import _flip_rate
from richpref.views.inspect import connect, format_summary, status, summary


def test_summary_counts_add_up(finished_run, runs_dir):
    s = summary(str(runs_dir), "ref")
    stages = {st["stage"]: st for st in s["stages"]}
    assert stages["source"]["rows"] == 12
    order = ["source", "sample", "critique", "instruct", "edit", "cutout", "check", "filter", "relabel", "pairs"]
    for a, b in zip(order, order[1:]):
        assert stages[b]["rows"] == stages[a]["kept"], (a, b)
        assert stages[a]["rows"] == stages[a]["kept"] + stages[a]["rejected"]
        assert sum(stages[a]["reasons"].values()) == stages[a]["rejected"]
    assert stages["score"]["rows"] == stages["check"]["kept"]  # every answered pair is scored, whatever the filter says
    # the flip rate and the label counts, from the relabel and pairs tables read here
    run = runs_dir / "runs" / "ref"
    relabel = [r for p in sorted((run / "relabel").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert s["flip_rate"] == pytest.approx(_flip_rate(relabel))
    labels = [x for p in sorted((run / "pairs").glob("part-*.parquet"))
              for x in pq.read_table(p, columns=["label_0"]).column("label_0").to_pylist()]
    assert s["label_0"] == {0: labels.count(0), 1: labels.count(1)} and len(labels) == stages["pairs"]["kept"]
    printed = format_summary(s).splitlines()  # what every curate prints at its end
    assert printed[-2:] == [f"flip rate (edit scored lower than the original): {_flip_rate(relabel):.1%}",
                            f'pairs label_0 counts: {{"0": {labels.count(0)}, "1": {labels.count(1)}}}']


def test_the_summary_counts_from_the_manifests_and_reads_only_relabel_and_pairs(finished_run, runs_dir):
    """Every curate prints the summary at its end; it opened every shard of every stage to count rows
    (on S3 about 35 requests a shard). The other stages' shards are garbage here: the summary is the same."""

    from richpref.run.runner import manifest_path, stage_manifests
    from richpref.run.storage import RunStore
    from richpref.tasks import ALL_OUTPUTS

    want = summary(str(runs_dir), "ref")
    store = RunStore(str(runs_dir), "copied-for-summary")
    shutil.copytree(RunStore(str(runs_dir), "ref").root, store.root)
    for out in ALL_OUTPUTS:
        for s in stage_manifests(store, out) if out not in ("relabel", "pairs") else ():
            Path(store.shard_path(out, s)).write_bytes(b"not parquet")
    assert summary(str(runs_dir), "copied-for-summary") == {**want, "run": "copied-for-summary"}
    # Manifests written before they held the reject reasons: those are counted from the stage's rows.
    plain = RunStore(str(runs_dir), "copied-without-reasons")
    shutil.copytree(RunStore(str(runs_dir), "ref").root, plain.root)
    for s in stage_manifests(plain, "filter"):
        path = Path(manifest_path(plain, "filter", s))
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "reasons"}))
    assert any(st["reasons"] for st in want["stages"] if st["stage"] == "filter")
    assert summary(str(runs_dir), "copied-without-reasons") == {**want, "run": "copied-without-reasons"}


def test_status_reports_missing_and_failed_shards(finished_run, runs_dir):
    st = status(str(runs_dir), "ref")
    assert st["shards"] == 3
    assert all(s["done"] == 3 and not s["missing"] and not s["failed"] for s in st["stages"])
    # A run whose edit shard 1 failed (see test_curate_flow) would list it; simulate by reading run.json.
    store_root = Path(runs_dir) / "runs" / "ref"
    data = json.loads((store_root / "run.json").read_text())
    data["failed"] = ["edit/part-00001: InjectedFault: x"]
    (store_root / "run.json").write_text(json.dumps(data))
    try:
        st = status(str(runs_dir), "ref")
        assert {s["stage"]: s["failed"] for s in st["stages"]}["edit"] == [1]
    finally:
        data["failed"] = []
        (store_root / "run.json").write_text(json.dumps(data))


def test_status_of_a_run_saved_by_another_release_counts_its_shards_and_says_why(finished_run, runs_dir, tmp_path):
    from richpref.run.storage import RunStore
    from richpref.views.inspect import format_status

    copy = RunStore(str(tmp_path), "ref")
    shutil.copytree(RunStore(str(runs_dir), "ref").root, copy.root)
    profile = json.loads((Path(copy.root) / "profile.json").read_text())
    profile["sample"]["key_of_a_newer_release"] = 1
    (Path(copy.root) / "profile.json").write_text(json.dumps(profile))
    st = status(str(tmp_path), "ref")  # before: a pydantic ValidationError traceback
    assert st["shards"] == 3 and all(s["done"] == 3 for s in st["stages"] if s["stage"] in ("source", "pairs"))
    assert format_status(st).endswith("does not load in this release (sample.key_of_a_newer_release: Extra inputs "
                                      "are not permitted): every committed shard is counted as done, whatever its key")


def test_status_tells_stale_shards_from_missing_ones(finished_run, runs_dir, tmp_path):
    # before: shards committed for another config or version were counted "missing", as if never made
    from richpref.run.storage import RunStore
    from richpref.views.inspect import format_status

    copy = RunStore(str(tmp_path), "ref")
    shutil.copytree(RunStore(str(runs_dir), "ref").root, copy.root)
    for part in (Path(copy.root) / "pairs").glob("part-00002.*"):
        part.unlink()  # one pairs shard never committed
    profile = json.loads((Path(copy.root) / "profile.json").read_text())
    profile["filter"]["min_executed"] = 0.123  # the filter's key changes, and with it relabel's and export's
    (Path(copy.root) / "profile.json").write_text(json.dumps(profile))
    st = {s["stage"]: s for s in status(str(tmp_path), "ref")["stages"]}
    assert (st["score"]["done"], st["filter"]["done"], st["filter"]["stale"], st["relabel"]["stale"]) == (3, 0, [0, 1, 2], [0, 1, 2])
    assert st["pairs"]["missing"] == [0, 1, 2] and st["pairs"]["stale"] == [0, 1]
    table = format_status(status(str(tmp_path), "ref")).splitlines()
    assert table[1].split() == ["stage", "done", "stale", "missing", "failed"]
    assert next(line for line in table if line.startswith("pairs")).split() == ["pairs", "0", "2", "1", "0"]
    assert table[-1].startswith("stale: committed for another config or richpref version")


def test_pairs_full_view_has_one_row_per_source_item(finished_run, runs_dir):
    con, views = connect(str(runs_dir), "ref")
    assert "pairs_full" in views
    n, ids, exported = con.execute("select count(*), count(distinct item_id), count(*) filter (where exported) from pairs_full").fetchone()
    assert n == ids == 12
    assert exported == con.execute("select count(*) from pairs").fetchone()[0]
    columns = con.execute("describe pairs_full").fetchall()
    names = [name for name, *_ in columns]
    assert not [name for name, ctype, *_ in columns if ctype.upper().startswith("BLOB")]  # images: in the stage views
    # item_id and the edit's candidate once; a name an earlier stage took gets its stage as prefix
    assert names.count("item_id") == names.count("candidate") == 1 and {"critique_status", "relabel_status"} <= set(names)


def test_every_query_in_the_docs_runs_against_a_run(finished_run, runs_dir):
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "queries.md").read_text()
    queries = [q.strip() for q in re.findall(r"```sql\n(.*?)```", text, flags=re.S)]
    assert len(queries) >= 10
    con, _ = connect(str(runs_dir), "ref")
    item = con.execute("select item_id from pairs limit 1").fetchone()[0]
    for q in queries:
        con.execute(q.replace("<item_id>", item)).fetchall()


def _read(run: Path, table: str) -> list[dict]:
    return [r for p in sorted((run / table).glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_each_edit_of_the_report_shows_its_filter_verdict_choice_and_export(finished_run, runs_dir):
    """Read from the run's tables here: per edit, the filter's verdict, the side relabel chose (framed),
    whether it flipped and whether a pair holds it; and the counts above the pairs."""
    import html
    import re

    from richpref.views.report import build_report

    run = runs_dir / "runs" / "ref"
    page = build_report(str(runs_dir), "ref")
    verdicts = {(r["item_id"], r["candidate"]): r["verdict"] for r in _read(run, "filter")}
    relabel = {(r["item_id"], r["candidate"]): r for r in _read(run, "relabel") if r["status"] == "ok"}
    exported = {(r["item_id"], c) for r in _read(run, "pairs") for c in (r["candidate_0"], r["candidate_1"])}
    edits = sorted((r["item_id"], r["candidate"]) for r in _read(run, "edit"))
    critiques = {r["item_id"]: r["critique"] for r in _read(run, "critique")}
    instructions = {r["item_id"]: r["instructions"] for r in _read(run, "instruct")}
    reasons = {(r["item_id"], r["candidate"]): r["reason"] for t in ("edit", "relabel", "filter")  # the filter's first
               for r in _read(run, t) if r["reason"]}
    blocks = re.findall(r'<div class="pair" data-verdict="([^"]*)" data-flipped="(\w+)" data-exported="(\w+)" '
                        r'data-item="([^"]*)" data-candidate="(-?\d+)">(.*?)</div></div>', page, re.S)
    assert [(item, int(c)) for *_, item, c, _ in blocks] == edits
    assert len(relabel) > 0 and any(r["flipped"] for r in relabel.values()) and exported
    assert {reasons.get((item, int(c))) for *_, item, c, _ in blocks} - {None}  # some edits show why they dropped
    for verdict, flipped, in_pairs, item, c, body in blocks:
        key = (item, int(c))
        assert verdict == (verdicts.get(key) or "none")
        r = relabel.get(key)
        assert flipped == str(bool(r and r["flipped"])).lower()
        assert in_pairs == str(key in exported).lower()
        framed = re.findall(r'<img alt="(original|edited)" src="[^"]*" class="chosen">', body)
        assert framed == ([] if r is None else ["original" if r["chosen"] == 0 else "edited"])
        assert ("original (flipped)" in body) == bool(r and r["chosen"] == 0)
        scored = [c[:-2] for c in (r or {}) if c.endswith("_0") and not c.startswith("candidate")
                  and r[c] is not None and r.get(c[:-2] + "_1") is not None]
        for name in scored:  # each score of both images, the composite in bold
            label = "<b>composite</b>" if name == "composite" else name
            assert f"<tr><td>{label}</td><td>{r[name + '_0']:.4g}</td><td>{r[name + '_1']:.4g}</td></tr>" in body
        assert body.count("<tr>") == 1 + len(scored)
        assert f"<i>critique:</i> {html.escape(critiques[item] or '')}</p>" in body
        assert f">filter: {html.escape(verdict)} {html.escape(reasons.get(key, ''))}</p>" in body
        assert f"<ul>{''.join(f'<li>{html.escape(x)}</li>' for x in instructions[item] or [])}</ul>" in body
    kept = sum(v == "keep" for v in verdicts.values())
    flips = sum(bool(r["flipped"]) for r in relabel.values())
    assert (f"{len(edits)} edits, {kept} kept by the filter, {len(exported & set(edits))} in exported pairs, "
            f"{flips} flipped") in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_report_renders_the_pairs_in_headless_chromium(finished_run, runs_dir, tmp_path):
    from richpref.views.report import write_report

    page = write_report(str(runs_dir), "ref", str(tmp_path / "report.html"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tempfile.mkdtemp()}"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", f"file://{page}"], capture_output=True, text=True,
                         timeout=120).stdout
    edited = summary(str(runs_dir), "ref")["stages"][4]["rows"]
    assert edited > 0, "the reference run should reach the edit stage"
    assert dom.count('class="pair"') == edited
    assert f"{edited} shown" in dom  # the page's script ran and counted the visible pairs
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, "--window-size=1000,1600", f"--screenshot={shot}", f"file://{page}"],
                   capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("HSV"))
    colourful = (img[..., 1] > 80) & (img[..., 2] > 60)  # the noise thumbnails; text and page are grey/white
    assert colourful.mean() > 0.02, "the screenshot shows no image thumbnails"


def test_inspect_notebook_executes_against_a_run(finished_run, runs_dir, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb_path = Path(__file__).resolve().parents[2] / "notebooks" / "inspect.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    monkeypatch.setenv("RICHPREF_DATA_DIR", str(runs_dir))
    monkeypatch.setenv("RICHPREF_RUN", "ref")
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(nb_path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "source" in text and "pairs" in text  # the summary table printed
    assert any("image/png" in o.get("data", {}) for o in outputs), "the pair grid was not drawn"


def test_a_thumbnail_shows_the_image_as_the_stages_saw_it():
    import base64
    import io

    from image_helpers import encoded
    from richpref.views.report import _thumb

    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # black under full transparency
    url = _thumb(encoded(transparent))
    shown = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.asarray(shown).min() > 240  # white, as decode_image composites it (before: black)
    assert _thumb(None) == "" and _thumb(b"not an image") == ""  # before: the report failed on it
