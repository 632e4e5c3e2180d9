"""`richpref report RUN`: one static, self-contained HTML page to look at a run's pairs.

Per item that reached the edit stage: original and edited thumbnails, prompt, critique,
instructions, filter verdict, every reward score and the chosen side; filters by verdict and flip;
the relabel plots when the run has them. A run without an edit stage (`pipeline: rebuild`,
`relabel-dataset`) shows its exported pairs: both images, the preferred one framed, the scores, and
for a relabelled dataset the source's label (the flip filter then shows the pairs whose label
changed). Images are inlined (data URIs): the file can be mailed or opened from any folder, and the
page loads nothing from the network.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from richpref.views.card_parts import PLOTS_DIR
from richpref.views.inspect import RunNotFound, connect
from richpref.run.storage import RunStore, join

THUMB = 160

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>richpref run {run}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
.bar {{ position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ddd; }}
.pair {{ display: flex; gap: 1em; border-bottom: 1px solid #eee; padding: .8em 0; }}
.pair img {{ width: {thumb}px; height: auto; border: 3px solid transparent; }}
.pair img.chosen {{ border-color: #2a2; }}
.meta {{ flex: 1; min-width: 0; }} .meta p {{ margin: .2em 0; overflow-wrap: anywhere; }}
.drop {{ color: #b22; }} .keep {{ color: #272; }} table.s td {{ padding: 0 .6em 0 0; }}
.plots img {{ max-width: 420px; margin: .3em; border: 1px solid #ddd; }}
</style></head><body>
<h1>richpref run <code>{run}</code></h1>
<p id="counts">{counts}</p>
<div class="bar">
 verdict <select id="verdict"><option value="">any</option><option>keep</option><option>drop</option><option value="none">not filtered</option></select>
 <label><input type="checkbox" id="flipped"> {flip_label} only</label>
 <label><input type="checkbox" id="exported"> exported only</label>
 <span id="shown"></span>
</div>
<div id="pairs">{pairs}</div>
<h2>Plots</h2><div class="plots">{plots}</div>
<script>
function apply() {{
  const v = document.getElementById('verdict').value, f = document.getElementById('flipped').checked,
        e = document.getElementById('exported').checked;
  let n = 0;
  for (const el of document.querySelectorAll('.pair')) {{
    const ok = (!v || el.dataset.verdict === v) && (!f || el.dataset.flipped === 'true') && (!e || el.dataset.exported === 'true');
    el.style.display = ok ? '' : 'none'; n += ok;
  }}
  document.getElementById('shown').textContent = n + ' shown';
}}
for (const id of ['verdict', 'flipped', 'exported']) document.getElementById(id).addEventListener('change', apply);
apply();
</script></body></html>
"""


def _thumb(data: bytes | None) -> str:
    """A JPEG data URL of the image as the stages saw it (common/images.py: transparency over white); ""
    for none or one that cannot be decoded."""
    from richpref.common.images import BadImage, decode_image

    try:
        img = decode_image(data)
    except BadImage:
        return ""
    img.thumbnail((THUMB * 2, THUMB * 2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _margin(value) -> str:
    return "" if value is None else f", margin {value:.4g}"


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _score_rows(scores: dict) -> str:
    """One table row per score with both sides (`<name>_0`, `<name>_1`), the composite last."""
    names = sorted(k[:-2] for k in scores if k.endswith("_0") and scores.get(k[:-2] + "_1") is not None
                   and scores[k] is not None)
    names = [n for n in names if n != "composite"] + [n for n in names if n == "composite"]
    return "".join(f"<tr><td>{'<b>composite</b>' if n == 'composite' else _esc(n)}</td><td>{scores[n + '_0']:.4g}</td>"
                   f"<td>{scores[n + '_1']:.4g}</td></tr>" for n in names)


def _exported_pairs(con) -> tuple[list[str], str]:
    """(blocks, counts) of a run without an edit stage: one block per exported pair."""
    cols = {c for (c, *_r) in con.execute('describe "pairs"').fetchall()}
    source_label = "label_0_source" if "label_0_source" in cols else "null"
    order = "item_id, candidate_0, candidate_1" if "candidate_0" in cols else "item_id"
    rows = con.execute(f'select item_id, caption, jpg_0, jpg_1, label_0, margin, scores, {source_label} from "pairs" '
                       f"order by {order}").fetchall()
    blocks, changed = [], 0
    for item, caption, jpg_0, jpg_1, label_0, margin, scores, source in rows:
        chosen = 0 if label_0 == 1 else 1
        # the source's preference (label_0 1: jpg_0, 0: jpg_1; 0.5: a tie, which no label contradicts)
        differs = source is not None and source != 0.5 and (source > 0.5) != (label_0 == 1)
        changed += differs
        was = "" if source is None else (f"<p>source label_0 {source:g}: "
                                         f"{'changed' if differs else 'tie' if source == 0.5 else 'kept'}</p>")
        blocks.append(
            f'<div class="pair" data-verdict="keep" data-flipped="{str(differs).lower()}" data-exported="true" '
            f'data-item="{_esc(item)}">'
            f'<div><img alt="jpg_0" src="{_thumb(jpg_0)}" class="{"chosen" if chosen == 0 else ""}"><br>jpg_0</div>'
            f'<div><img alt="jpg_1" src="{_thumb(jpg_1)}" class="{"chosen" if chosen == 1 else ""}"><br>jpg_1</div>'
            f'<div class="meta"><p><b>{_esc(caption)}</b> <small>{_esc(item)}</small></p>'
            f'<table class="s"><tr><td></td><td>jpg_0</td><td>jpg_1</td></tr>{_score_rows(json.loads(scores or "{}"))}</table>'
            f'<p>preferred: jpg_{chosen}{_margin(margin)}</p>{was}</div></div>')
    counts = f"{len(rows)} exported pairs" + (f", {changed} with a label other than the source's"
                                              if source_label != "null" else "")
    return blocks, counts


def build_report(data_dir: str, run: str) -> str:
    con, views = connect(data_dir, run)
    if "edit" not in views:
        if "pairs" not in views:
            raise RunNotFound(f"run {run!r} has no edit stage output and no exported pairs yet: nothing to show")
        blocks, counts = _exported_pairs(con)
        return _page(data_dir, run, blocks, counts, "label changed")
    has = set(views)
    score_cols = []
    if "relabel" in has:
        score_cols = [c for (c, *_r) in con.execute('describe "relabel"').fetchall()
                      if c.endswith(("_0", "_1")) and not c.startswith(("composite", "candidate"))]  # indexes, not scores
    q = ["select e.item_id, e.candidate, s.prompt, s.image as img0, e.image as img1, e.status as edit_status, e.reason as edit_reason"]
    q.append(", c.critique" if "critique" in has else ", null as critique")
    q.append(", i.instructions" if "instruct" in has else ", null as instructions")
    q.append(", f.verdict, f.reason as filter_reason" if "filter" in has else ", null as verdict, null as filter_reason")
    q.append(", r.status as relabel_status, r.reason as relabel_reason, r.chosen, r.flipped, r.margin, r.composite_0, r.composite_1"
             + "".join(f', r."{c}"' for c in score_cols) if "relabel" in has else
             ", null as relabel_status, null as relabel_reason, null as chosen, null as flipped, null as margin, null as composite_0, null as composite_1")
    q.append(", coalesce(e.candidate in (p.candidate_0, p.candidate_1), false) as exported" if "pairs" in has
             else ", false as exported")
    q.append(" from edit e join sample s using (item_id)")
    for v, a in (("critique", "c"), ("instruct", "i"), ("filter", "f"), ("relabel", "r"), ("pairs", "p")):
        if v in has:
            on_candidate = f" and {a}.candidate = e.candidate" if v in ("filter", "relabel") else ""
            q.append(f' left join "{v}" {a} on {a}.item_id = e.item_id{on_candidate}')
    q.append(" order by e.item_id, e.candidate")
    cur = con.execute("".join(q))
    names = [d[0] for d in cur.description]
    items = [dict(zip(names, row)) for row in cur.fetchall()]

    blocks = []
    for it in items:
        verdict = it["verdict"] or "none"
        chosen = it["chosen"]
        scores = _score_rows({c: it[c] for c in (*score_cols, "composite_0", "composite_1")})
        instructions = "".join(f"<li>{_esc(x)}</li>" for x in (it["instructions"] or []))
        reason = it["filter_reason"] or it["relabel_reason"] or it["edit_reason"] or ""
        blocks.append(
            f'<div class="pair" data-verdict="{_esc(verdict)}" data-flipped="{str(bool(it["flipped"])).lower()}" '
            f'data-exported="{str(bool(it["exported"])).lower()}" data-item="{_esc(it["item_id"])}" '
            f'data-candidate="{it["candidate"]}">'
            f'<div><img alt="original" src="{_thumb(it["img0"])}" class="{"chosen" if chosen == 0 else ""}"><br>original</div>'
            f'<div><img alt="edited" src="{_thumb(it["img1"])}" class="{"chosen" if chosen == 1 else ""}"><br>edit {it["candidate"]}</div>'
            f'<div class="meta"><p><b>{_esc(it["prompt"])}</b> <small>{_esc(it["item_id"])}</small></p>'
            f'<p><i>critique:</i> {_esc(it["critique"])}</p><p><i>instructions:</i></p><ul>{instructions}</ul>'
            f'<p class="{"keep" if verdict == "keep" else "drop"}">filter: {_esc(verdict)} {_esc(reason)}</p>'
            f'<table class="s"><tr><td></td><td>original</td><td>edited</td></tr>{scores}</table>'
            f'<p>chosen: {"edited" if chosen == 1 else "original (flipped)" if chosen == 0 else "-"}'
            f'{_margin(it["margin"])}</p></div></div>')

    kept = sum(1 for it in items if it["verdict"] == "keep")
    counts = (f"{len(items)} edits, {kept} kept by the filter, "
              f"{sum(1 for it in items if it['exported'])} in exported pairs, "
              f"{sum(1 for it in items if it['flipped'])} flipped")
    return _page(data_dir, run, blocks, counts, "flipped")


def _page(data_dir: str, run: str, blocks: list[str], counts: str, flip_label: str) -> str:
    store = RunStore(data_dir, run)
    plots = []
    # the card's folder; the run folder's plots/ of a run carded by an earlier release
    for d in (join(store.stage_dir("pairs"), PLOTS_DIR), join(store.root, "plots")):
        if store.fs.exists(d):
            for p in sorted(store.fs.ls(d, detail=False)):
                if p.endswith(".png"):
                    data = base64.b64encode(store.fs.cat_file(p)).decode()
                    plots.append(f'<img alt="{_esc(p.rsplit("/", 1)[-1])}" src="data:image/png;base64,{data}">')
        if plots:
            break
    return PAGE.format(run=_esc(run), thumb=THUMB, counts=_esc(counts), pairs="\n".join(blocks), flip_label=flip_label,
                       plots="\n".join(plots) or "<p>none in this run</p>")


def write_report(data_dir: str, run: str, out: str | None = None) -> str:
    page = build_report(data_dir, run)
    store = RunStore(data_dir, run)
    if out is None:
        return store.write_text("report.html", page)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(page, encoding="utf-8")
    return out


__all__ = ["build_report", "write_report"]
