"""The writers of `richpref export`: one per trainer layout, each following the layout its trainer
documents (linked in each writer). Image files are the stored bytes, never re-encoded; file names come
from `item_id`. A writer says per pair whether it can hold it (`holds` -> None or `reason: detail`);
the caller (richpref/exports/writer.py) counts and reports what it cannot hold.

Every file goes to a temporary name and is renamed into place; a file already holding the same bytes
is left alone, so exporting the same run into the same folder twice changes nothing.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from richpref.common.atomic import write_atomic

FORMATS = ("pickapic", "kohya-wl", "simpletuner", "jsonl")
KNOWN_LABELS = (0, 1)


def image_ext(data: bytes | None) -> str | None:
    """The file extension of encoded image bytes (from their magic number), None if not PNG/JPEG/WebP."""
    if not data:
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def one_line(caption: str | None) -> str:
    """The caption on one line: kohya reads a caption file's first line, SimpleTuner splits on newlines."""
    return " ".join((caption or "").split())


@dataclass
class Pair:
    """One row of a run's `pairs/` as the writers see it; `name` is unique within the export."""

    name: str
    row: dict

    @property
    def winner(self) -> bytes:
        return self.row["jpg_0"] if self.row["label_0"] == 1 else self.row["jpg_1"]

    @property
    def loser(self) -> bytes:
        return self.row["jpg_1"] if self.row["label_0"] == 1 else self.row["jpg_0"]

    @property
    def original_vs_edit(self) -> bool:
        c0 = self.row.get("candidate_0")
        return c0 is None or c0 < 0


def common_reason(p: Pair) -> str | None:
    """What no format can hold: a missing image or a label that is not 0 or 1."""
    r = p.row
    for side in ("jpg_0", "jpg_1"):
        if not r.get(side):
            return f"missing_image: {side} is empty"
    if r.get("label_0") not in KNOWN_LABELS:
        return f"bad_label: label_0={r.get('label_0')!r}, expected 0 or 1"
    return None


def file_reason(p: Pair) -> str | None:
    """What a format writing each image to its own file cannot hold: `common_reason`, or an image
    without a known file extension."""
    reason = common_reason(p)
    if reason:
        return reason
    for side in ("jpg_0", "jpg_1"):
        if image_ext(p.row[side]) is None:
            return f"unknown_image_format: {side} is not PNG, JPEG or WebP"
    return None


def folder_reason(p: Pair, empty_caption: str) -> str | None:
    """What an image-folder format cannot hold: `common_reason`, an image without a known file
    extension, or an empty caption file (`empty_caption` says why the trainer refuses it)."""
    reason = file_reason(p)
    if reason:
        return reason
    if not one_line(p.row.get("caption")):
        return f"empty_caption: {empty_caption}"
    return None


def _json_safe(v):
    """JSON without NaN or infinity (Flow-Factory's schema refuses them): those become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


@dataclass
class Writer:
    """Base of the writers: where files go, which were written (relative paths) and how."""

    out: Path
    run: str = ""
    files: list[str] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)

    fmt = ""
    doc = ""

    def __post_init__(self) -> None:
        """Per-writer state (subclasses)."""

    def put(self, rel: str, data: bytes) -> None:
        path = self.out / rel
        self.files.append(rel)
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return
        write_atomic(path, data)

    def note(self, key: str) -> None:
        self.notes[key] = self.notes.get(key, 0) + 1

    def holds(self, p: Pair) -> str | None:
        return common_reason(p)

    def begin_shard(self, shard: int, schema: pa.Schema) -> None:
        pass

    def add(self, p: Pair) -> None:
        raise NotImplementedError

    def end_shard(self, shard: int) -> None:
        pass

    def finish(self) -> dict:
        """Write the trainer's config files; return what the manifest should say beyond the counts."""
        return {}


class PickapicWriter(Writer):
    """Pick-a-Pic: the pairs' own Parquet (`caption`, `jpg_0`, `jpg_1`, `label_0` + provenance), one file
    per committed shard under `data/` (the split layout `datasets.load_dataset(DIR)` reads as "train").
    Columns as the Pick-a-Pic card (https://huggingface.co/datasets/yuvalkirstain/pickapic_v2) and the
    Diffusion-DPO trainer read them (https://github.com/huggingface/diffusers/blob/main/examples/
    research_projects/diffusion_dpo/train_diffusion_dpo.py: label_0 = 1 means jpg_0 won)."""

    fmt = "pickapic"
    doc = "https://huggingface.co/datasets/yuvalkirstain/pickapic_v2"

    def begin_shard(self, shard: int, schema: pa.Schema) -> None:
        self._schema, self._rows = schema, []

    def add(self, p: Pair) -> None:
        self._rows.append(p.row)

    def end_shard(self, shard: int) -> None:
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=self._schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.put(f"data/train-{shard:05d}.parquet", sink.getvalue().to_pybytes())


class KohyaWLWriter(Writer):
    """kohya-ss sd-scripts preference datasets: `<image_dir>/w/NAME.ext` (preferred) and
    `<image_dir>/l/NAME.ext` (not preferred) share a file name; the caption is `NAME.txt` beside
    the `w` image (read as the first line). Layout of the preference subset
    (`preference = true`) in https://github.com/kohya-ss/sd-scripts/pull/1427 (library/train_util.py:
    DreamBoothDataset globs `w/`, swaps the folder to `l/` and tries other image extensions),
    as discussed in https://github.com/kohya-ss/sd-scripts/issues/1040. The image_dir is `1_pairs`
    (kohya's `<repeats>_<name>` folder), and `dataset_config.toml` points a preference subset at it."""

    fmt = "kohya-wl"
    doc = "https://github.com/kohya-ss/sd-scripts/pull/1427"
    image_dir = "1_pairs"

    def holds(self, p: Pair) -> str | None:
        return folder_reason(p, "kohya fails on an empty caption file")

    def add(self, p: Pair) -> None:
        caption = (one_line(p.row["caption"]) + "\n").encode()
        for side, data in (("w", p.winner), ("l", p.loser)):
            self.put(f"{self.image_dir}/{side}/{p.name}{image_ext(data)}", data)
            self.put(f"{self.image_dir}/{side}/{p.name}.txt", caption)

    def finish(self) -> dict:
        image_dir = json.dumps(str((self.out / self.image_dir).resolve()))  # a TOML basic string
        toml = (f"# richpref export of run {self.run}: a kohya-ss sd-scripts preference dataset ({self.doc}).\n"
                "# Pass it with --dataset_config; set resolution and batch size as usual.\n"
                "[general]\ncaption_extension = \".txt\"\n\n[[datasets]]\n\n  [[datasets.subsets]]\n"
                f"  image_dir = {image_dir}\n  preference = true\n  num_repeats = 1\n")
        self.put("dataset_config.toml", toml.encode())
        return {"config": "dataset_config.toml"}


class SimpleTunerWriter(Writer):
    """SimpleTuner Flow-DPO: the preferred images in an `image` dataset (`win/NAME.ext` + `win/NAME.txt`,
    caption_strategy `textfile`) and the rejected ones in a `conditioning` dataset with
    `conditioning_type: reference_strict` (`lose/NAME.ext`), paired by the same file name, as
    https://github.com/bghira/SimpleTuner/blob/main/documentation/experimental/FLOW_DPO.md ("Dataset
    Shape") and documentation/DATALOADER.md (conditioning_type, caption_strategy) describe. With an
    `edit_mask` (255 = changed) on an original-vs-edit pair, `mask/NAME.png` is written for masked
    Flow-DPO (a `conditioning_type: mask` dataset); `multidatabackend-masked.json` lists it when every
    written pair has one. Both sides need the same encoding: the conditioning image is looked up
    under the preferred image's own file name, extension included."""

    fmt = "simpletuner"
    doc = "https://github.com/bghira/SimpleTuner/blob/main/documentation/experimental/FLOW_DPO.md"

    def holds(self, p: Pair) -> str | None:
        reason = folder_reason(p, "a textfile caption must not be empty")
        if reason:
            return reason
        ext0, ext1 = image_ext(p.row["jpg_0"]), image_ext(p.row["jpg_1"])
        if ext0 != ext1:
            return (f"image_formats_differ: jpg_0 is {ext0[1:]}, jpg_1 is {ext1[1:]}; SimpleTuner pairs the "
                    "rejected image by the preferred one's file name, extension included")
        return None

    def add(self, p: Pair) -> None:
        ext = image_ext(p.winner)
        self.put(f"win/{p.name}{ext}", p.winner)
        self.put(f"win/{p.name}.txt", (one_line(p.row["caption"]) + "\n").encode())
        self.put(f"lose/{p.name}{ext}", p.loser)
        self.note("pairs")
        # A mask is the edit against the original (it says nothing about two edits) and must carry the
        # preferred image's file name: a PNG mask under a .png name only.
        mask = p.row.get("edit_mask")
        if mask is not None and p.original_vs_edit and ext == ".png" and image_ext(mask) == ".png":
            self.put(f"mask/{p.name}{ext}", mask)
            self.note("mask_written")
        else:
            self.note("mask_absent")

    def _backends(self, masked: bool) -> list[dict]:
        root = self.out.resolve()
        win = {"id": "richpref-win", "type": "local", "dataset_type": "image", "instance_data_dir": str(root / "win"),
               "caption_strategy": "textfile", "cache_dir_vae": str(root / "cache" / "vae" / "win"),
               "conditioning_data": ["richpref-lose"] + (["richpref-mask"] if masked else [])}
        out = [win, {"id": "richpref-lose", "type": "local", "dataset_type": "conditioning",
                     "conditioning_type": "reference_strict", "instance_data_dir": str(root / "lose"),
                     "source_dataset_id": "richpref-win"}]
        if masked:
            out.append({"id": "richpref-mask", "type": "local", "dataset_type": "conditioning",
                        "conditioning_type": "mask", "instance_data_dir": str(root / "mask"),
                        "source_dataset_id": "richpref-win"})
        out.append({"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
                    "cache_dir": str(root / "cache" / "text")})
        return out

    def finish(self) -> dict:
        self.put("multidatabackend.json", (json.dumps(self._backends(False), indent=2) + "\n").encode())
        written, masks = self.notes.get("pairs", 0), self.notes.get("mask_written", 0)
        out = {"config": "multidatabackend.json", "masks_written": masks, "masks_absent": self.notes.get("mask_absent", 0)}
        if written and masks == written:
            self.put("multidatabackend-masked.json", (json.dumps(self._backends(True), indent=2) + "\n").encode())
            out["config_masked"] = "multidatabackend-masked.json"
        return out


META_COLUMNS = ("item_id", "label_0", "candidate_0", "candidate_1", "margin", "flipped", "source", "editor",
                "edit_prompt", "config_hash")


class JsonlWriter(Writer):
    """Flow-Factory offline DPO: `train.jsonl` of strict V2 records, `{"schema_version": 2, "input":
    {"prompt", "media": []}, "supervision": {"type": "preference", "chosen": {"media": [{"type":
    "image", "path"}]}, "rejected": {...}}, "metadata": {...}}`, paths relative to the folder (the
    dataset_dir), as https://github.com/X-GenGroup/Flow-Factory/blob/main/guidance/datasets.md
    ("Preference supervision") documents and src/flow_factory/data_utils/offline_dataset.py
    (load_offline_manifest) reads. The provenance goes in `metadata` (the schema forbids other keys)."""

    fmt = "jsonl"
    doc = "https://github.com/X-GenGroup/Flow-Factory/blob/main/guidance/datasets.md"

    def __post_init__(self) -> None:
        self._lines: list[str] = []

    def holds(self, p: Pair) -> str | None:
        return file_reason(p)

    def add(self, p: Pair) -> None:
        paths = {}
        for role, data in (("chosen", p.winner), ("rejected", p.loser)):
            paths[role] = f"images/{role}/{p.name}{image_ext(data)}"
            self.put(paths[role], data)
        meta = {k: p.row.get(k) for k in META_COLUMNS if k in p.row}
        for k in ("scores", "model_ids"):
            if p.row.get(k):
                meta[k] = json.loads(p.row[k])
        meta["run"] = self.run
        meta = _json_safe(meta)
        record = {"schema_version": 2, "input": {"prompt": p.row["caption"], "media": []},
                  "supervision": {"type": "preference",
                                  "chosen": {"media": [{"type": "image", "path": paths["chosen"]}]},
                                  "rejected": {"media": [{"type": "image", "path": paths["rejected"]}]}},
                  "metadata": meta}
        self._lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False, sort_keys=True))

    def finish(self) -> dict:
        self.put("train.jsonl", "".join(line + "\n" for line in self._lines).encode())
        return {"config": "train.jsonl"}


WRITERS: dict[str, type[Writer]] = {w.fmt: w for w in (PickapicWriter, KohyaWLWriter, SimpleTunerWriter, JsonlWriter)}
