"""Image stages on tiny real models: sample (dataset or SD1.5/SDXL), edit (ControlNet img2img with
every control kind), cutout (rembg sessions by name), and a tiny-SDXL curate run end to end.

Runs offline on CPU at 64×64 with 2-4 steps; the tiny models are built once per session.
"""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from richpref.images import encode_png
from richpref.models.cutout import BackgroundRemover, foreground_ratio
from richpref.models.editor import ANNOTATOR_FILES, ControlDetector, ControlNetEditor, annotator_network
from richpref.models.generator import TextToImage
from richpref.models.runtime import ModelNotAvailable, resident
from richpref.models.tiny import LAYOUT
from richpref.models.tiny.diffusion import build_random_annotator, build_tiny_sdxl, build_tiny_sdxl_controlnet
from richpref.models.tiny.rembg import MODEL_FILENAME, install_as_rembg_model
from richpref.schemas.config import CutoutConfig, EditConfig, SampleConfig, SourceConfig
from richpref.schemas.tables import CUTOUTS, EDITS, INSTRUCTIONS, PROMPTS, SAMPLES, rows_to_table
from richpref.tasks.cutout import cutout_rows, load_remover
from richpref.tasks.edit import edit_prompt, edit_rows, guard_reason, load_editor
from richpref.tasks.sample import load_generator, sample_rows
from richpref.tasks.source import shard_source

GEN = dict(steps=3, guidance_scale=5.0, height=64, width=64)
EDIT = dict(steps=4, strength=0.75)


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def _png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _scene(size=(64, 64), bg=(30, 60, 90), fg=(250, 200, 40)) -> Image.Image:
    """A flat background with a bright ellipse: clear edges, clear object."""
    im = Image.new("RGB", size, bg)
    w, h = size
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=fg)
    return im


def _seed_by_hand(base: int, item_id: str) -> int:
    # Transcribed from the contract, not imported: sha256("<base>:<item_id>"), first 8 hex digits.
    return int(hashlib.sha256(f"{base}:{item_id}".encode()).hexdigest()[:8], 16)


@pytest.fixture(scope="session")
def paths(tiny_models):
    return SimpleNamespace(**{k: Path(tiny_models) / v for k, v in LAYOUT.items()}, root=Path(tiny_models))


@pytest.fixture(scope="module")
def sdxl(paths):
    gen = TextToImage.load(str(paths.sdxl), device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def sdxl_editor(paths):
    ed = ControlNetEditor.load(str(paths.sdxl), str(paths.controlnet_sdxl), device="cpu")
    yield ed
    ed.close()


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    """Random annotator weights in the lllyasviel/Annotators layout, one directory for all kinds."""
    root = tmp_path_factory.mktemp("annotators")
    for kind in ANNOTATOR_FILES:
        build_random_annotator(kind, root, seed=0)
    return root


@pytest.fixture
def release_resident():
    yield
    resident.release()  # the next test starts with no model loaded


# --- tiny SDXL ---------------------------------------------------------------------------------


def test_tiny_sdxl_has_the_sdxl_architecture(paths):
    from diffusers import ControlNetModel, DiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = DiffusionPipeline.from_pretrained(str(paths.sdxl))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    # Cross-attention reads both encoders' hidden states side by side; the added embedding is the
    # pooled projection plus six time-embedded micro-conditioning numbers.
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    cn = ControlNetModel.from_pretrained(str(paths.controlnet_sdxl)).config
    assert cn.addition_embed_type == "text_time" and cn.cross_attention_dim == unet.cross_attention_dim


def test_tiny_sdxl_builders_are_seed_deterministic(paths, tmp_path):
    def weights(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.safetensors"))}

    # build_tiny_models builds SDXL with seed 7 and its ControlNet with seed 8.
    same = build_tiny_sdxl(tmp_path / "same", seed=7)
    assert weights(same) == weights(paths.sdxl)
    other = build_tiny_sdxl(tmp_path / "other", seed=8)
    assert weights(other)["unet/diffusion_pytorch_model.safetensors"] != weights(same)["unet/diffusion_pytorch_model.safetensors"]
    cn = build_tiny_sdxl_controlnet(same, tmp_path / "cn", seed=8)
    assert weights(cn) == weights(paths.controlnet_sdxl)


def test_sdxl_text_to_image_is_seeded_and_sized(sdxl):
    a = sdxl.generate(["a red cube on a table"], [7], **GEN)
    b = sdxl.generate(["a red cube on a table"], [7], **GEN)
    assert a[0].size == (64, 64) and a[0].mode == "RGB"
    assert encode_png(a[0]) == encode_png(b[0])  # byte-identical rerun on CPU
    other_seed = sdxl.generate(["a red cube on a table"], [8], **GEN)[0]
    assert np.abs(_arr(a[0]) - _arr(other_seed)).mean() > 1.0
    assert sdxl.generate(["x"], [0], steps=2, guidance_scale=5.0, height=64, width=96)[0].size == (96, 64)


def test_sdxl_batch_composition(sdxl):
    prompts, seeds = ["a dog", "a red cube on a table", "a city at night"], [1, 7, 3]
    batch = sdxl.generate(prompts, seeds, batch_size=3, **GEN)
    again = sdxl.generate(prompts, seeds, batch_size=3, **GEN)
    # Same batch composition: byte-identical (what resume relies on).
    assert [encode_png(x) for x in batch] == [encode_png(x) for x in again]
    # Alone vs in a batch: the same per-item noise; batched CPU matmuls may round one level apart.
    alone = sdxl.generate([prompts[1]], [7], **GEN)[0]
    diff = np.abs(_arr(alone) - _arr(batch[1]))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_sdxl_controlnet_edit(sdxl_editor):
    images = [_scene((64, 64)), _scene((70, 50), bg=(200, 60, 90))]
    out = sdxl_editor.edit(images, ["a blue ball", "a green ball"], [3, 4], **EDIT)
    again = sdxl_editor.edit(images, ["a blue ball", "a green ball"], [3, 4], **EDIT)
    assert type(sdxl_editor.pipe).__name__ == "StableDiffusionXLControlNetImg2ImgPipeline"
    assert [o.size for o in out] == [(64, 64), (70, 50)]
    for o, a, src in zip(out, again, images):
        assert encode_png(o) == encode_png(a)
        assert np.abs(_arr(o) - _arr(src)).mean() > 1.0
    tile = sdxl_editor.edit(images[:1], ["a blue ball"], [3], control="tile", **EDIT)[0]
    assert np.abs(_arr(tile) - _arr(out[0])).mean() > 0.5  # the control image steers the edit


# --- control detectors with annotator networks -------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ANNOTATOR_FILES))
def test_annotator_loads_from_the_annotators_layout(kind, annotators):
    img = _scene((70, 50))
    loaded = ControlDetector.load(kind, annotators)
    # The same seeded network handed over directly gives the same map: the file round-trips.
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        direct = ControlDetector(kind, annotator_network(kind))
    a, b = loaded(img), direct(img)
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(_arr(a), _arr(b))
    # The file itself works as well as its directory.
    assert np.array_equal(_arr(ControlDetector.load(kind, annotators / ANNOTATOR_FILES[kind])(img)), _arr(a))


def test_hed_map_follows_content(annotators):
    hed = ControlDetector.load("softedge_hed", annotators)
    scene = _arr(hed(_scene()))
    shifted = _arr(hed(_scene(fg=(20, 220, 120))))
    assert scene.std() > 5.0  # not a constant map
    assert np.abs(scene - shifted).mean() > 1.0


def test_annotator_errors_name_the_problem(annotators, tmp_path):
    with pytest.raises(ValueError, match="edit.control_weights.*ControlNetHED.pth"):
        ControlDetector("softedge_hed")
    with pytest.raises(ModelNotAvailable, match=r"table5_pidinet.pth"):
        ControlDetector.load("softedge_pidi", tmp_path)
    with pytest.raises(ValueError, match="does not hold 'lineart'"):
        ControlDetector.load("lineart", annotators / ANNOTATOR_FILES["softedge_pidi"])
    with pytest.raises(ValueError, match="unknown control kind"):
        ControlDetector("depth")


def test_edit_with_a_network_control(paths, annotators):
    editor = ControlNetEditor.load(str(paths.sd15), str(paths.controlnet), device="cpu",
                                   control="softedge_hed", control_weights=str(annotators))
    try:
        assert editor.detector.kind == "softedge_hed"
        img = _scene()
        hed = editor.edit([img], ["a ball"], [5], **EDIT)[0]
        canny = editor.edit([img], ["a ball"], [5], control="canny", **EDIT)[0]
        assert hed.size == img.size
        assert np.abs(_arr(hed) - _arr(canny)).mean() > 0.5
    finally:
        editor.close()


# --- source: Pick-a-Pic-style data -------------------------------------------------------------


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    _scene((48, 40), fg=color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    """Pick-a-Pic v2 columns: label_0 = 1 (jpg_0 won), 0 (jpg_1 won), 0.5 (tie), null (unlabelled)."""
    rows = [
        ("a red apple", _jpeg((255, 0, 0)), _jpeg((0, 255, 0)), 1.0),
        ("a blue car", _jpeg((0, 0, 255)), _jpeg((255, 255, 0)), 0.0),
        ("two cats", _jpeg((0, 255, 255)), _jpeg((255, 0, 255)), 0.5),
        ("no label", _jpeg((9, 9, 9)), _jpeg((99, 99, 99)), None),
    ]
    table = pa.table({
        "caption": [r[0] for r in rows],
        "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
        "jpg_1": pa.array([r[2] for r in rows], pa.binary()),
        "label_0": pa.array([r[3] for r in rows], pa.float64()),
    })
    path = tmp_path_factory.mktemp("pickapic") / "train-00000.parquet"
    pq.write_table(table, path)
    return SimpleNamespace(path=path, rows=rows)


def test_source_takes_the_preferred_pickapic_image(pickapic):
    [shard] = shard_source(SourceConfig(kind="parquet", path=str(pickapic.path), pickapic_preferred=True))
    got = shard.to_pylist()
    assert [r["prompt"] for r in got] == ["a red apple", "a blue car", "two cats", "no label"]
    assert got[0]["image"] == pickapic.rows[0][1]  # label_0 = 1: jpg_0
    assert got[1]["image"] == pickapic.rows[1][2]  # label_0 = 0: jpg_1
    assert got[2]["status"] == "rejected" and got[2]["reason"].startswith("tie:")  # the DPO trainers skip ties
    assert got[3]["status"] == "rejected" and got[3]["reason"].startswith("no_preference:")
    [ties] = shard_source(SourceConfig(kind="parquet", path=str(pickapic.path), pickapic_preferred=True, pickapic_ties="keep"))
    assert ties.to_pylist()[2]["image"] == pickapic.rows[2][1]  # a tie kept: jpg_0
    [chosen] = shard_source(SourceConfig(kind="parquet", path=str(pickapic.path), image_column="jpg_1"))
    assert [r["image"] for r in chosen.to_pylist()] == [r[2] for r in pickapic.rows]


def test_sample_keeps_the_dataset_image(pickapic):
    [shard] = shard_source(SourceConfig(kind="parquet", path=str(pickapic.path), pickapic_preferred=True))
    rows = shard.filter(pc.equal(shard.column("status"), "ok"))

    def no_generator():
        raise AssertionError("dataset images must not load a generator")

    out = sample_rows(rows, SampleConfig(use_dataset_image=True), no_generator).to_pylist()
    assert [r["origin"] for r in out] == ["dataset"] * 2
    assert [r["image"] for r in out] == rows.column("image").to_pylist()  # the bytes, untouched
    assert {(r["width"], r["height"]) for r in out} == {(48, 40)}
    assert all(r["seed"] is None and r["model_id"] is None for r in out)


def _prompt_rows(prompts: list[str], prefix: str = "item") -> pa.Table:
    return rows_to_table([{"item_id": f"{prefix}{i}", "status": "ok", "reason": None, "prompt": p}
                          for i, p in enumerate(prompts)], PROMPTS)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_sample_generates_seeded_per_item(model, paths, release_resident):
    cfg = SampleConfig(model=model, steps=2, guidance_scale=5.0, height=64, width=64, batch_size=4, seed=11,
                       device="cpu", dtype="float32")
    rows = _prompt_rows(["a red cube", "a green hill", "a city at night"])
    get = lambda: load_generator(cfg, str(paths.root))  # noqa: E731
    first = sample_rows(rows, cfg, get)
    again = sample_rows(rows, cfg, get)
    assert first.schema == SAMPLES
    assert first.column("image").to_pylist() == again.column("image").to_pylist()  # rerun: same bytes
    for r in first.to_pylist():
        assert r["status"] == "ok" and r["origin"] == "generated"
        assert r["seed"] == _seed_by_hand(11, r["item_id"])
        assert r["model_id"].endswith(LAYOUT[model])
        assert (r["width"], r["height"]) == (64, 64) == _png(r["image"]).size
    reseeded = sample_rows(rows, cfg.model_copy(update={"seed": 12}), get).column("image").to_pylist()
    assert all(a != b for a, b in zip(reseeded, first.column("image").to_pylist()))


def test_sample_settings_come_from_the_profile(paths, release_resident):
    cfg = SampleConfig(model="sdxl", scheduler="DDIMScheduler", device="cpu", dtype="float32")
    gen = load_generator(cfg, str(paths.root))
    assert type(gen.pipe.scheduler).__name__ == "DDIMScheduler"
    assert gen.device.type == "cpu" and gen.pipe.unet.dtype.is_floating_point and str(gen.pipe.unet.dtype) == "torch.float32"
    assert resident.get(("generator", str(paths.sdxl), "DDIMScheduler", "cpu", "float32"), lambda: None) is gen


def test_one_image_model_resident_at_a_time(paths, release_resident):
    import gc
    import weakref

    gen = load_generator(SampleConfig(model="sd15", device="cpu"), str(paths.root))
    unet = weakref.ref(gen.pipe.unet)
    del gen
    editor = load_editor(EditConfig(model="sdxl", controlnet="controlnet-sdxl", device="cpu"), str(paths.root))
    gc.collect()
    assert unet() is None  # loading the editor released the generator's weights
    assert load_editor(EditConfig(model="sdxl", controlnet="controlnet-sdxl", device="cpu"), str(paths.root)) is editor


# --- edit stage --------------------------------------------------------------------------------


def test_guard_rejects_blank_and_unchanged_edits():
    original = _scene(fg=(240, 200, 40))
    assert guard_reason(original, original.copy(), 0.01).startswith("no_visible_change:")
    assert guard_reason(original, Image.new("RGB", (64, 64), (30, 60, 90)), 0.01).startswith("blank_edit:")
    # Every channel of every pixel 10 levels brighter: mean |Δ| / 255 = 10 / 255 = 0.0392.
    brighter = Image.fromarray((np.asarray(original, dtype=np.int16) + 10).clip(0, 255).astype(np.uint8))
    assert (np.asarray(original) <= 245).all()  # so no channel clips and the change is exactly 10
    assert guard_reason(original, brighter, 0.039) is None
    assert guard_reason(original, brighter, 0.040) == "no_visible_change: mean change 0.0392 < edit.min_pixel_change=0.04"
    # One grey level of noise is "flat" only below a standard deviation of 1.
    speckle = np.full((64, 64, 3), 128, np.uint8)
    speckle[::2] = 131  # half the rows 3 levels up: std = 1.5
    assert guard_reason(original, Image.fromarray(speckle), 0.01) is None


def test_edit_prompt_join_and_instruction_only():
    cfg = EditConfig()
    assert edit_prompt("a cat", ["make it red", "add a hat"], cfg) == "a cat, make it red, add a hat"
    assert edit_prompt("a cat", ["make it red", "  "], cfg.model_copy(update={"joiner": "; "})) == "a cat; make it red"
    assert edit_prompt("a cat", ["make it red", "add a hat"], cfg.model_copy(update={"prompt_mode": "instructions_only"})) \
        == "make it red, add a hat"


def _edit_inputs(n: int = 3):
    rows = rows_to_table(
        [{"item_id": f"e{i}", "status": "ok", "reason": None, "prompt": "a ball", "instructions": ["make it blue"]}
         for i in range(n)] + [{"item_id": "bad", "status": "ok", "reason": None, "prompt": "a ball",
                                "instructions": ["make it blue"]},
                               {"item_id": "none", "status": "ok", "reason": None, "prompt": "a ball", "instructions": []}],
        INSTRUCTIONS,
    ).select(["item_id", "prompt", "instructions"])
    originals = [encode_png(_scene(bg=(30 + 40 * i, 60, 90))) for i in range(n)] + [b"not an image", encode_png(_scene())]
    return rows, originals


@pytest.mark.parametrize("model,controlnet", [("sd15", "controlnet-canny"), ("sdxl", "controlnet-sdxl")])
def test_edit_rows_on_tiny_models(model, controlnet, paths, release_resident):
    cfg = EditConfig(model=model, controlnet=controlnet, steps=4, seed=5, batch_size=2, device="cpu", dtype="float32")
    rows, originals = _edit_inputs()
    get = lambda: load_editor(cfg, str(paths.root))  # noqa: E731
    out = edit_rows(rows, originals, cfg, get)
    assert out.schema == EDITS
    by_id = {r["item_id"]: r for r in out.to_pylist()}
    assert by_id["bad"]["status"] == "rejected" and by_id["bad"]["reason"].startswith("bad_image:")
    assert by_id["none"]["reason"] == "no_instructions: nothing to edit with"
    for i in range(3):
        r = by_id[f"e{i}"]
        assert r["status"] == "ok", r["reason"]
        assert r["edit_prompt"] == "a ball, make it blue" and r["control"] == "canny"
        assert r["seed"] == _seed_by_hand(5, f"e{i}")
        assert (r["width"], r["height"]) == (64, 64) == _png(r["image"]).size
        assert r["pixel_change"] == pytest.approx(
            np.abs(_arr(_png(r["image"]).convert("RGB")) - _arr(_png(originals[i]).convert("RGB"))).mean() / 255, abs=1e-6)
        assert controlnet in r["model_id"]
    again = edit_rows(rows, originals, cfg, get)
    assert again.column("image").to_pylist() == out.column("image").to_pylist()
    if model != "sd15":
        return  # the guard's wiring below is model-independent: checked once
    # The guard's threshold reaches the rows: nothing changes by more than 100%.
    strict = edit_rows(rows, originals, cfg.model_copy(update={"min_pixel_change": 1.0}), get).to_pylist()
    assert {r["reason"].split(":")[0] for r in strict if r["item_id"].startswith("e")} == {"no_visible_change"}


def test_several_edit_candidates_per_item_with_distinct_seeds(paths, release_resident):
    cfg = EditConfig(model="sd15", controlnet="controlnet-canny", steps=4, seed=5, batch_size=2, device="cpu",
                     dtype="float32", num_edits=3)
    rows, originals = _edit_inputs(n=2)
    get = lambda: load_editor(cfg, str(paths.root))  # noqa: E731
    out = edit_rows(rows, originals, cfg, get).to_pylist()
    # three rows per input row, in input order, whatever happened to the item
    assert [(r["item_id"], r["candidate"]) for r in out] == [(i, c) for i in ("e0", "e1", "bad", "none") for c in range(3)]
    assert {r["reason"] for r in out if r["item_id"] == "none"} == {"no_instructions: nothing to edit with"}
    assert all(r["reason"].startswith("bad_image:") for r in out if r["item_id"] == "bad")
    for item in ("e0", "e1"):
        cands = [r for r in out if r["item_id"] == item]
        assert [r["seed"] for r in cands] == [_seed_by_hand(5, item), _seed_by_hand(5, f"{item}#edit1"),
                                              _seed_by_hand(5, f"{item}#edit2")]
        images = [_arr(_png(r["image"]).convert("RGB")) for r in cands]
        for a in range(3):
            for b in range(a + 1, 3):
                assert np.abs(images[a] - images[b]).mean() > 1.0, (item, a, b)
    # candidate 0 is the one-edit run's image: same seed, same batch composition per candidate index
    one = edit_rows(rows, originals, cfg.model_copy(update={"num_edits": 1, "batch_size": 1}), get).to_pylist()
    alone = edit_rows(rows, originals, cfg.model_copy(update={"batch_size": 1}), get).to_pylist()
    assert [r["image"] for r in alone if r["candidate"] == 0] == [r["image"] for r in one]


# --- cutout ------------------------------------------------------------------------------------


SESSIONS = ("u2net", "isnet-general-use", "birefnet-general", "bria-rmbg")


@pytest.fixture(scope="module")
def rembg_home(paths, tmp_path_factory):
    """A rembg home with the tiny net installed under each named session's own file name."""
    home = tmp_path_factory.mktemp("rembg_home")
    for name in SESSIONS:
        install_as_rembg_model(paths.rembg_home / MODEL_FILENAME, home, name)
    return home


@pytest.mark.parametrize("name", SESSIONS)
def test_rembg_sessions_by_name(name, rembg_home, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(rembg_home))  # restored after the test; load() sets it
    remover = BackgroundRemover.load(name, home=str(rembg_home))
    assert remover.model_id == name
    [(fg, mask)] = remover.remove([_scene((64, 48))])
    assert fg.size == mask.size == (64, 48) and mask.mode == "L"
    assert 0.0 < foreground_ratio(mask) < 1.0


def test_cutout_rows_store_masks_and_ratios(paths, monkeypatch, release_resident):
    monkeypatch.setenv("U2NET_HOME", str(paths.rembg_home))
    cfg = CutoutConfig(model="u2net_custom", home="rembg", model_path=f"rembg/{MODEL_FILENAME}")
    get = lambda: load_remover(cfg, str(paths.root))  # noqa: E731
    ids = ["ok", "flat_edit", "undecodable"]
    rows = rows_to_table([{"item_id": i, "status": "ok", "reason": None, "candidate": 0} for i in ids], EDITS)
    originals = [encode_png(_scene()), encode_png(_scene()), encode_png(_scene())]
    edits = [encode_png(_scene(bg=(90, 30, 60))), encode_png(Image.new("RGB", (64, 64), (200, 200, 200))), b"\x89PNG"]
    out = cutout_rows(rows, originals, edits, cfg, get)
    assert out.schema == CUTOUTS
    by_id = {r["item_id"]: r for r in out.to_pylist()}
    ok = by_id["ok"]
    assert ok["status"] == "ok"
    for side, image in (("original", originals[0]), ("edited", edits[0])):
        mask = _png(ok[f"{side}_mask"])
        assert mask.mode == "L" and mask.size == (64, 64)
        assert ok[f"{side}_fg_ratio"] == pytest.approx((np.asarray(mask) >= 128).mean())
        assert 0.0 < ok[f"{side}_fg_ratio"] < 1.0
        # Background pixels (mask 0) of the cut-out are white.
        cut, m = _arr(_png(ok[f"{side}_cutout"]).convert("RGB")), np.asarray(mask)
        assert (cut[m == 0] == 255).all()
    flat = by_id["flat_edit"]  # a flat image has no foreground: a reason, not a crash
    assert flat["status"] == "rejected" and flat["edited_fg_ratio"] == 0.0
    assert flat["reason"] == "empty_foreground: edited foreground ratio 0.000 <= cutout.min_fg_ratio=0.0"
    assert by_id["undecodable"]["reason"].startswith("bad_image:")
    strict = cutout_rows(rows.slice(0, 1), originals[:1], edits[:1], cfg.model_copy(update={"min_fg_ratio": 0.99}), get)
    assert strict.column("reason").to_pylist()[0].startswith("empty_foreground: original foreground ratio")


def test_cutout_cuts_an_items_original_once_for_all_its_edits(paths, monkeypatch, release_resident):
    monkeypatch.setenv("U2NET_HOME", str(paths.rembg_home))
    cfg = CutoutConfig(model="u2net_custom", home="rembg", model_path=f"rembg/{MODEL_FILENAME}")
    remover = load_remover(cfg, str(paths.root))
    seen = []

    class Counting:
        model_id = remover.model_id

        def remove(self, images):
            seen.append(len(images))
            return remover.remove(images)

    rows = rows_to_table([{"item_id": "x", "status": "ok", "reason": None, "candidate": c} for c in (0, 2)], EDITS)
    original = encode_png(_scene())
    edits = [encode_png(_scene(bg=(90, 30, 60))), encode_png(_scene(bg=(20, 130, 60)))]
    out = cutout_rows(rows, [original, original], edits, cfg, lambda: Counting()).to_pylist()
    assert seen == [3]  # one original + two edits
    assert [r["candidate"] for r in out] == [0, 2] and all(r["status"] == "ok" for r in out)
    assert out[0]["original_cutout"] == out[1]["original_cutout"] and out[0]["edited_cutout"] != out[1]["edited_cutout"]


def test_cutout_stage_missing_model_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailable, match=r"'bria-rmbg' is not available.*bria-rmbg\.onnx"):
        load_remover(CutoutConfig(model="bria-rmbg", home=str(tmp_path / "home")), None)
    assert time.monotonic() - start < 2.0


# --- the tiny SDXL profile end to end ----------------------------------------------------------


def test_tiny_sdxl_profile_is_the_tiny_profile_with_sdxl_models():
    import yaml

    from richpref.schemas.config import find_profile

    tiny = yaml.safe_load(find_profile("tiny").read_text())
    sdxl = yaml.safe_load(find_profile("tiny-sdxl").read_text())
    assert (sdxl["sample"]["model"], sdxl["edit"]["model"], sdxl["edit"]["controlnet"]) == ("sdxl", "sdxl", "controlnet-sdxl")
    # Everything else follows the tiny profile: when tiny.yaml changes, change tiny-sdxl.yaml alike.
    sdxl["name"], sdxl["sample"]["model"] = tiny["name"], tiny["sample"]["model"]
    sdxl["edit"]["model"], sdxl["edit"]["controlnet"] = tiny["edit"]["model"], tiny["edit"]["controlnet"]
    assert sdxl == tiny


def test_sdxl_paper_profile_is_sd15_paper_on_sdxl():
    import yaml

    from richpref.schemas.config import find_profile, load_profile

    profile = load_profile("sdxl-paper")
    assert profile.sample.model == profile.edit.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (profile.sample.height, profile.sample.width) == (1024, 1024)
    assert profile.edit.controlnet == "diffusers/controlnet-canny-sdxl-1.0"
    sd15 = yaml.safe_load(find_profile("sd15-paper").read_text())
    sdxl = yaml.safe_load(find_profile("sdxl-paper").read_text())
    for section in ("name", "sample", "edit"):
        sd15.pop(section), sdxl.pop(section)
    assert sdxl == sd15  # every other stage is the paper's: change both files alike


def test_tiny_sdxl_profile_curates_end_to_end(tiny_models, prefect_harness, tmp_path):
    from richpref.entrypoints import CURATE, load_flow
    from richpref.storage import RunStore

    curate = load_flow(CURATE)

    summary = curate(profile="tiny-sdxl", run="sdxl", data_dir=str(tmp_path),
                     overrides=["source.limit=8", "source.shard_size=8"], models_root=str(tiny_models))
    store = RunStore(str(tmp_path), "sdxl")

    def stage_table(stage: str) -> pa.Table:
        return pa.concat_tables([store.read_shard(stage, k) for k in store.shards(stage)])

    samples = stage_table("sample").to_pylist()
    assert len(samples) == 8 and all(r["model_id"].endswith("/sdxl") for r in samples)
    edits = [r for r in stage_table("edit").to_pylist() if r["status"] == "ok"]
    assert edits and all(r["model_id"].endswith("/controlnet-sdxl") for r in edits)
    assert summary["stages"]["edit"]["kept"] == len(edits)
    cutouts = stage_table("cutout").to_pylist()
    assert all(_png(r["original_mask"]).mode == "L" for r in cutouts if r["status"] == "ok")
    relabelled = [r for r in stage_table("relabel").to_pylist() if r["status"] == "ok"]
    pairs = stage_table("pairs")
    assert pairs.num_rows == len(relabelled)
    assert set(pairs.column("label_0").to_pylist()) <= {0, 1}
