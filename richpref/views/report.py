"""`richpref report RUN`: one static, self-contained HTML page to look at a run's pairs.

Per item that reached the edit stage: original and edited thumbnails, prompt, critique,
instructions, filter verdict, every reward score and the chosen side; filters by verdict and flip;
the relabel plots when the run has them. Images are inlined (data URIs): the file can be mailed or
opened from any folder, and the page loads nothing from the network.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

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
 <label><input type="checkbox" id="flipped"> flipped only</label>
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
    if not data:
        return ""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((THUMB * 2, THUMB * 2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _margin(value) -> str:
    return "" if value is None else f", margin {value:.4g}"


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def build_report(data_dir: str, run: str) -> str:
    con, views = connect(data_dir, run)
    if "edit" not in views:
        raise RunNotFound(f"run {run!r} has no edit stage output yet: nothing to show")
    has = set(views)
    score_cols = []
    if "relabel" in has:
        score_cols = [c for (c, *_r) in con.execute('describe "relabel"').fetchall()
                      if c.endswith(("_0", "_1")) and not c.startswith("composite")]
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
        scores = "".join(
            f"<tr><td>{_esc(c[:-2])}</td><td>{it[c[:-2] + '_0']:.4g}</td><td>{it[c[:-2] + '_1']:.4g}</td></tr>"
            for c in score_cols if c.endswith("_0") and it.get(c) is not None and it.get(c[:-2] + "_1") is not None)
        comp = (f"<tr><td><b>composite</b></td><td>{it['composite_0']:.4g}</td><td>{it['composite_1']:.4g}</td></tr>"
                if it["composite_0"] is not None else "")
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
            f'<table class="s"><tr><td></td><td>original</td><td>edited</td></tr>{scores}{comp}</table>'
            f'<p>chosen: {"edited" if chosen == 1 else "original (flipped)" if chosen == 0 else "-"}'
            f'{_margin(it["margin"])}</p></div></div>')

    store = RunStore(data_dir, run)
    plots = []
    for d in (join(store.root, "plots"), store.stage_dir("pairs")):
        if store.fs.exists(d):
            for p in sorted(store.fs.ls(d, detail=False)):
                if p.endswith(".png"):
                    data = base64.b64encode(store.fs.cat_file(p)).decode()
                    plots.append(f'<img alt="{_esc(p.rsplit("/", 1)[-1])}" src="data:image/png;base64,{data}">')
    kept = sum(1 for it in items if it["verdict"] == "keep")
    counts = (f"{len(items)} edits, {kept} kept by the filter, "
              f"{sum(1 for it in items if it['exported'])} in exported pairs, "
              f"{sum(1 for it in items if it['flipped'])} flipped")
    return PAGE.format(run=_esc(run), thumb=THUMB, counts=_esc(counts), pairs="\n".join(blocks),
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
