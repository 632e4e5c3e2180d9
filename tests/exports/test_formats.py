"""`richpref export`: each format read back the way its trainer reads it (the reader in each test is
written here after the trainer file it cites), with caption, winner and loser bytes and the label
direction (label_0 = 1: jpg_0 won) checked, and the pairs a format cannot hold counted by reason.

The run is written by hand (runner.write_shard, the way the export stage commits): shard 0 and 1
committed, shard 2 a Parquet file without manifest (not committed), shard 3 with bytes its manifest
did not record. No model is needed."""
from __future__ import annotations

import glob
import io
import json
import os
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from richpref.exports.writer import MANIFEST, ExportError, export_run
from richpref.run.runner import write_shard
from richpref.schemas.tables import PAIRS, rows_to_table
from richpref.run.storage import RunStore

SCHEMA = PAIRS  # with the edit_mask column (PNG "L", 255 = changed)


def img(color, fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


RED, BLUE, GREEN, GREY = img((255, 0, 0)), img((0, 0, 255)), img((0, 255, 0)), img((90, 90, 90))
YELLOW_JPG = img((255, 255, 0), "JPEG")
MASK = img(255, mode="L")


def row(item, caption, jpg_0, jpg_1, label_0, c0=-1, c1=0, mask=None):
    return {"item_id": item, "caption": caption, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0,
            "candidate_0": c0, "candidate_1": c1, "edit_mask": mask, "margin": 0.5, "flipped": label_0 == 1,
            "scores": json.dumps({"imagereward_0": 0.1, "imagereward_1": float("nan")}), "model_ids": "{}",
            "source": "test", "editor": "instruct_pix2pix", "config_hash": "h"}


SHARD0 = [
    row("a", "a red\nbicycle", RED, BLUE, 1, mask=MASK),  # original won (flipped)
    row("b", "a yellow kite", YELLOW_JPG, GREEN, 0),  # the edit won; a JPEG original beside a PNG edit
    row("c", "three apples", GREY, RED, 1, c0=0, c1=1, mask=MASK),  # two edits: no mask for them
    row("d", "a cat", RED, b"", 0),  # an edit with no bytes
]
SHARD1 = [row("e", "", BLUE, GREY, 0),  # no caption
          row("f", "a blue teapot", GREEN, BLUE, 0, mask=MASK)]
# (item, caption the trainer reads, winner, loser) of the pairs every folder format holds
HELD = {"a": ("a red bicycle", RED, BLUE), "c": ("three apples", GREY, RED), "f": ("a blue teapot", BLUE, GREEN)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("export-data")
    store = RunStore(str(data), "r")
    write_shard(store, "pairs", 0, rows_to_table(SHARD0, SCHEMA), key="k0")
    write_shard(store, "pairs", 1, rows_to_table(SHARD1, SCHEMA), key="k1")
    # shard 2: a Parquet file and no manifest (its writer stopped before committing it)
    store.write_bytes(store.shard_path("pairs", 2), Path(store.shard_path("pairs", 0)).read_bytes())
    # shard 3: committed, then its file replaced by a recompute that never wrote its manifest
    write_shard(store, "pairs", 3, rows_to_table([row("g", "a kite", RED, BLUE, 1)], SCHEMA), key="k3")
    store.write_bytes(store.shard_path("pairs", 3), Path(store.shard_path("pairs", 1)).read_bytes())
    return str(data)


def skipped(m):
    return {s["item_id"]: s["reason"].split(":", 1)[0] for s in m["skipped_pairs"]}


def test_pickapic_reads_back_with_datasets(run_dir, tmp_path):
    """diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py: `load_dataset(...)`,
    then per row jpg_0/jpg_1 swapped when label_0 == 0 so the winner comes first."""
    import datasets

    out = tmp_path / "pp"
    m = export_run(run_dir, "r", "pickapic", out)
    assert m["written"] == 5 and skipped(m) == {"d": "missing_image"}
    assert [s["shard"] for s in m["shards"]] == [0, 1] and m["shards_skipped"][0]["shard"] == 3
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    rows = {r["item_id"]: r for r in ds}
    assert sorted(rows) == ["a", "b", "c", "e", "f"] and "g" not in rows
    expected = {**HELD, "a": ("a red\nbicycle", RED, BLUE), "b": ("a yellow kite", GREEN, YELLOW_JPG), "e": ("", GREY, BLUE)}
    for item, (caption, win, lose) in expected.items():
        r = rows[item]
        winner, loser = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1 else (r["jpg_1"], r["jpg_0"])
        assert (r["caption"], winner, loser) == (caption, win, lose), item
    assert rows["a"]["edit_mask"] == MASK and rows["c"]["candidate_0"] == 0
    # the pairs' own columns, order and types (caption, jpg_0, jpg_1, label_0 first), zstd-compressed
    for name in ("train-00000.parquet", "train-00001.parquet"):
        meta = pq.ParquetFile(out / "data" / name).metadata
        assert meta.schema.to_arrow_schema().remove_metadata().equals(SCHEMA.remove_metadata()), name
        assert meta.row_group(0).column(0).compression == "ZSTD"


@pytest.mark.parametrize("data, ext", [
    (RED, ".png"), (YELLOW_JPG, ".jpg"), (img((1, 2, 3), "WEBP"), ".webp"), (img((1, 2, 3), "GIF"), None),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", None), (b"RIFX\x00\x00\x00\x00WEBPVP8 ", None), (b"", None), (None, None)])
def test_an_image_file_extension_comes_from_its_magic_number(data, ext):
    from richpref.exports.formats import image_ext

    assert image_ext(data) == ext


@pytest.mark.parametrize("label, reason", [(1, None), (0, None), (2, "bad_label: label_0=2, expected 0 or 1"),
                                           (None, "bad_label: label_0=None, expected 0 or 1")])
def test_a_label_other_than_0_or_1_is_a_reason_naming_it(label, reason):
    from richpref.exports.formats import Pair, common_reason

    assert common_reason(Pair("x", row("x", "a kite", RED, BLUE, label))) == reason


def kohya_pairs(image_dir: str, caption_extension: str) -> dict[str, tuple[str, bytes, bytes]]:
    """kohya-ss/sd-scripts PR #1427, library/train_util.py (DreamBoothDataset, `subset.preference`):
    glob_images(image_dir/w), caption = first line of the caption file beside the w image (stripped),
    the loser = the same path with the folder w -> l, trying other extensions if that file is missing."""
    exts = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
    out = {}
    for path in sorted(p for e in exts for p in glob.glob(os.path.join(glob.escape(image_dir), "w", "*" + e))):
        base = os.path.splitext(path)[0]
        with open(base + caption_extension, encoding="utf-8") as f:
            lines = f.readlines()
        assert lines, "kohya asserts a caption file is not empty"
        head, file = os.path.split(path)
        loser = Path(os.path.join(os.path.dirname(head), "l", file))
        if not loser.exists():
            loser = next(loser.with_suffix(e) for e in [".webp", ".png", ".jpg", ".jpeg"] if loser.with_suffix(e).exists())
        out[Path(path).stem] = (lines[0].strip(), Path(path).read_bytes(), loser.read_bytes())
    return out


def test_kohya_wl_reads_back_as_a_preference_subset(run_dir, tmp_path):
    out = tmp_path / "kohya"
    m = export_run(run_dir, "r", "kohya-wl", out)
    assert skipped(m) == {"d": "missing_image", "e": "empty_caption"} and m["skipped"] == {"empty_caption": 1, "missing_image": 1}
    assert m["config"] == "dataset_config.toml"  # the printed result names it
    config = tomllib.loads((out / "dataset_config.toml").read_text())
    subset = config["datasets"][0]["subsets"][0]
    assert subset["preference"] is True and Path(subset["image_dir"]) == (out / "1_pairs").resolve()
    assert subset["num_repeats"] == 1  # each pair once per epoch, as the folder's "1_" prefix says
    got = kohya_pairs(subset["image_dir"], config["general"]["caption_extension"])
    assert got == {**HELD, "b": ("a yellow kite", GREEN, YELLOW_JPG)}  # a .png winner beside a .jpg loser


def simpletuner_pairs(config: list[dict]) -> dict[str, tuple]:
    """SimpleTuner documentation/experimental/FLOW_DPO.md and simpletuner/helpers/multiaspect/sampler.py
    (get_conditioning_sample): the image dataset's files, captions from `textfile` (newline-separated),
    the reference_strict (and mask) conditioning image at the same relative path in its own folder."""
    by_id = {d["id"]: d for d in config}
    assert all(d["type"] == "local" for d in config)
    (src,) = [d for d in config if d.get("dataset_type") == "image"]
    assert src["caption_strategy"] == "textfile"  # else SimpleTuner captions each image by its file name
    conds = {by_id[c]["conditioning_type"]: by_id[c] for c in src["conditioning_data"]}
    assert all(c["source_dataset_id"] == src["id"] and c["dataset_type"] == "conditioning" for c in conds.values())
    (text,) = [d for d in config if d.get("dataset_type") == "text_embeds"]
    assert text["default"] is True  # the text embeds of every dataset without its own
    root = Path(src["instance_data_dir"]).parent  # caches inside the export folder, one per kind
    caches = [Path(src["cache_dir_vae"]), Path(text["cache_dir"])]
    assert all(c.is_relative_to(root) for c in caches) and caches[0] != caches[1]
    out = {}
    for path in sorted(Path(src["instance_data_dir"]).iterdir()):
        if path.suffix not in (".png", ".jpg", ".jpeg", ".webp"):
            continue
        captions = path.with_suffix(".txt").read_text(encoding="utf-8").split("\n")
        captions = [c.strip() for c in captions if c.strip()]
        lose = Path(conds["reference_strict"]["instance_data_dir"]) / path.name
        mask = Path(conds["mask"]["instance_data_dir"]) / path.name if "mask" in conds else None
        out[path.stem] = (captions, path.read_bytes(), lose.read_bytes(), mask.read_bytes() if mask else None)
    return out


def test_simpletuner_reads_back_as_flow_dpo_datasets(run_dir, tmp_path):
    out = tmp_path / "st"
    m = export_run(run_dir, "r", "simpletuner", out)
    assert skipped(m) == {"b": "image_formats_differ", "d": "missing_image", "e": "empty_caption"}
    assert m["config"] == "multidatabackend.json"
    got = simpletuner_pairs(json.loads((out / "multidatabackend.json").read_text()))
    assert got == {k: ([cap], win, lose, None) for k, (cap, win, lose) in HELD.items()}
    # masks: on the original-vs-edit pairs a and f; not on the two edits c, so no masked config
    assert (m["masks_written"], m["masks_absent"]) == (2, 1) and "config_masked" not in m
    assert (out / "mask" / "a.png").read_bytes() == MASK and not (out / "mask" / "c.png").exists()


def test_simpletuner_masked_config_when_every_pair_has_a_mask(tmp_path):
    data = tmp_path / "data"
    write_shard(RunStore(str(data), "m"), "pairs", 0, rows_to_table([SHARD0[0], SHARD1[1]], SCHEMA), key="k")
    m = export_run(str(data), "m", "simpletuner", tmp_path / "st")
    got = simpletuner_pairs(json.loads((tmp_path / "st" / m["config_masked"]).read_text()))
    assert got == {"a": (["a red bicycle"], RED, BLUE, MASK), "f": (["a blue teapot"], BLUE, GREEN, MASK)}
    assert (m["masks_written"], m["masks_absent"]) == (2, 0)
    # one pair, without a mask: no masked config
    write_shard(RunStore(str(data), "one"), "pairs", 0, rows_to_table([row("z", "a kite", RED, BLUE, 1)], SCHEMA), key="k")
    m = export_run(str(data), "one", "simpletuner", tmp_path / "st1")
    assert (m["masks_written"], m["masks_absent"]) == (0, 1) and "config_masked" not in m


def flow_factory_records(manifest: Path) -> list[dict]:
    """Flow-Factory src/flow_factory/data_utils/offline_dataset.py (load_offline_manifest) and
    schema.py (DatasetRecordV2, strict, extra keys forbidden): one JSON object a line, no blank line,
    schema_version 2, preference supervision, media paths relative to the manifest's folder."""
    records = []
    for line in manifest.read_text(encoding="utf-8").split("\n")[:-1]:
        assert line.strip(), "Flow-Factory refuses a blank line"
        r = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in a strict record"))
        assert set(r) <= {"schema_version", "input", "supervision", "metadata"} and r["schema_version"] == 2
        assert set(r["input"]) <= {"prompt", "negative_prompt", "media"} and r["supervision"]["type"] == "preference"
        side = lambda s: (manifest.parent / s["media"][0]["path"]).read_bytes()  # noqa: E731
        assert [x["type"] for x in r["supervision"]["chosen"]["media"]] == ["image"]
        assert [x["type"] for x in r["supervision"]["rejected"]["media"]] == ["image"]
        records.append({"prompt": r["input"]["prompt"], "chosen": side(r["supervision"]["chosen"]),
                        "rejected": side(r["supervision"]["rejected"]), "metadata": r["metadata"]})
    return records


def test_jsonl_reads_back_as_flow_factory_offline_dpo(run_dir, tmp_path):
    out = tmp_path / "ff"
    m = export_run(run_dir, "r", "jsonl", out)
    assert skipped(m) == {"d": "missing_image"}
    recs = {r["metadata"]["item_id"]: r for r in flow_factory_records(out / "train.jsonl")}
    expected = {**HELD, "a": ("a red\nbicycle", RED, BLUE), "b": ("a yellow kite", GREEN, YELLOW_JPG), "e": ("", GREY, BLUE)}
    assert {k: (r["prompt"], r["chosen"], r["rejected"]) for k, r in recs.items()} == expected
    assert recs["a"]["metadata"]["label_0"] == 1 and recs["b"]["metadata"]["label_0"] == 0
    assert recs["a"]["metadata"]["scores"] == {"imagereward_0": 0.1, "imagereward_1": None}  # NaN -> null
    assert recs["a"]["metadata"]["model_ids"] == {} and recs["a"]["metadata"]["run"] == "r"
    assert m["config"] == "train.jsonl"
    # each image file named with its own encoding's extension (b: a PNG winner, a JPEG loser)
    (line_b,) = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines() if '"item_id": "b"' in x]
    assert [line_b["supervision"][s]["media"][0]["path"] for s in ("chosen", "rejected")] == [
        "images/chosen/b.png", "images/rejected/b.jpg"]


def test_rerun_is_idempotent_and_drops_files_no_longer_exported(run_dir, tmp_path):
    out = tmp_path / "k"
    first = export_run(run_dir, "r", "kohya-wl", out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    again = export_run(run_dir, "r", "kohya-wl", out)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != MANIFEST} == stamps
    assert not list(out.rglob("*.tmp-*"))
    stale = out / "1_pairs" / "w" / "old.png"  # a pair an earlier export wrote and this run no longer has
    stale.write_bytes(RED)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "files": manifest["files"] + ["1_pairs/w/old.png"]}))
    export_run(run_dir, "r", "kohya-wl", out)
    assert not stale.exists()
    with pytest.raises(ExportError, match="holds a 'kohya-wl' export"):
        export_run(run_dir, "r", "jsonl", out)


def test_same_item_twice_gets_two_names(tmp_path):
    data = tmp_path / "data"
    # the original against its second edit, and two edits (the names come from the candidates, not the rows)
    two = [row("x", "a kite", RED, BLUE, 1, c0=-1, c1=1), row("x", "a kite", RED, GREEN, 0, c0=0, c1=2)]
    write_shard(RunStore(str(data), "two"), "pairs", 0, rows_to_table(two, SCHEMA), key="k")
    export_run(str(data), "two", "kohya-wl", tmp_path / "k")
    got = kohya_pairs(str(tmp_path / "k" / "1_pairs"), ".txt")
    assert got == {"x__orig_e1": ("a kite", RED, BLUE), "x__e0_e2": ("a kite", GREEN, RED)}


def test_cli_prints_counts_and_refuses_a_run_without_pairs(run_dir, tmp_path, capsys):
    from richpref.cli.commands import main

    assert main(["--data-dir", run_dir, "export", "r", "--format", "simpletuner", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "exported 3 pair(s)" in text and "image_formats_differ=1" in text and "b (shard 0, row 1): image_formats_differ" in text
    assert "shard 3 left out: not_committed" in text
    assert main(["--data-dir", str(tmp_path / "none"), "export", "r", "--format", "jsonl", "--out", str(tmp_path / "p")]) == 2
    assert "no committed pairs shards" in capsys.readouterr().err
    # a run that kept none: before, an empty dataset and its trainer config were written, exit 0
    write_shard(RunStore(str(tmp_path / "kept-none"), "r"), "pairs", 0, rows_to_table([], SCHEMA), key="k")
    assert main(["--data-dir", str(tmp_path / "kept-none"), "export", "r", "--format", "kohya-wl", "--out",
                 str(tmp_path / "q")]) == 2
    assert "run 'r' kept no pairs (its 1 pairs shard(s) hold 0 rows)" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_the_printed_result_names_the_trainer_configs_and_cuts_a_long_skip_list(tmp_path):
    from richpref.exports.writer import MANIFEST, format_result

    skipped = [{"item_id": f"i{k}", "shard": 0, "row": k, "reason": "image_formats_differ"} for k in range(3)]
    m = {"written": 5, "run": "r", "format": "simpletuner", "layout_doc": "docs/exports.md", "skipped_pairs": skipped,
         "skipped": {"image_formats_differ": 3}, "shards_skipped": [], "config": "multidatabackend.json",
         "config_masked": "multidatabackend.masked.json"}
    assert format_result(m, tmp_path, show=2).splitlines() == [
        f"exported 5 pair(s) of run r as simpletuner into {tmp_path} (layout: docs/exports.md)",
        "skipped 3 pair(s) the format cannot hold: image_formats_differ=3",
        "  i0 (shard 0, row 0): image_formats_differ",
        "  i1 (shard 0, row 1): image_formats_differ",
        f"  … and 1 more (all in {MANIFEST})",
        f"trainer config: {tmp_path / 'multidatabackend.json'}",
        f"with the edit masks (masked Flow-DPO): {tmp_path / 'multidatabackend.masked.json'}",
        f"manifest: {tmp_path / MANIFEST}"]
    assert "… and" not in format_result(m, tmp_path, show=3)
    m.update(skipped_pairs=[], skipped={}, config=None, config_masked=None)
    assert format_result(m, tmp_path).splitlines()[1:] == ["skipped 0 pairs", f"manifest: {tmp_path / MANIFEST}"]


def test_every_format_takes_the_export_stage_output(mini_run, tmp_path):
    """The pairs the real export stage wrote (the session's mini run): every pair lands in every format,
    the winner being jpg_0 exactly where label_0 = 1."""
    data, store, _profile = mini_run
    pairs = store.read_stage("pairs").to_pylist()
    assert pairs
    expected = {p["item_id"]: (" ".join(p["caption"].split()), p["jpg_0"] if p["label_0"] == 1 else p["jpg_1"],
                               p["jpg_1"] if p["label_0"] == 1 else p["jpg_0"]) for p in pairs}
    counts = {f: export_run(str(data), "mini", f, tmp_path / f)["written"] for f in ("pickapic", "kohya-wl", "simpletuner", "jsonl")}
    assert counts == dict.fromkeys(counts, len(pairs))
    assert kohya_pairs(str(tmp_path / "kohya-wl" / "1_pairs"), ".txt") == expected
    got = simpletuner_pairs(json.loads((tmp_path / "simpletuner" / "multidatabackend.json").read_text()))
    assert {k: (c[0], w, l) for k, (c, w, l, _m) in got.items()} == expected
    recs = flow_factory_records(tmp_path / "jsonl" / "train.jsonl")
    assert {r["metadata"]["item_id"]: (r["prompt"], r["chosen"], r["rejected"]) for r in recs} == expected
