"""Pluggable editors (`edit.kind`): per-kind config validation, each tiny editor editing a shard,
and switching the editor of a finished run recomputing edit and the stages after it only; then the
control detectors with annotator networks: random weights in the lllyasviel/Annotators layout load from
its directory or file, the HED map follows the content, errors name the problem, and a ControlNet edit
steered by a network control."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow as pa
import pytest

from richpref.tasks import ALL_STAGES
from PIL import Image

from richpref.schemas.config import EditConfig, ProfileError, load_profile
from richpref.run.storage import RunStore
from richpref.tasks.edit import edit_prompt, edit_rows, load_editor
from richpref.models.editor import ANNOTATOR_FILES, ControlDetector, ControlNetEditor, annotator_network
from richpref.models.runtime import ModelNotAvailable
from richpref.models.tiny.diffusion import build_random_annotator
from image_helpers import EDIT, _arr, encoded
from image_helpers import _scene as ellipse_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny profile of each editor (configs/); controlnet_img2img is the tiny profile itself.
PROFILES = {
    "controlnet_img2img": "tiny",
    "instruct_pix2pix": "tiny-instruct-pix2pix",
    "instruct_pix2pix_sdxl": "tiny-sdxl-instruct-pix2pix",
    "flux_kontext": "tiny-flux-kontext",
    "qwen_image_edit": "tiny-qwen-image-edit",
}
PIPELINES = {
    "controlnet_img2img": "StableDiffusionControlNetImg2ImgPipeline",
    "instruct_pix2pix": "StableDiffusionInstructPix2PixPipeline",
    "instruct_pix2pix_sdxl": "StableDiffusionXLInstructPix2PixPipeline",
    "flux_kontext": "FluxKontextPipeline",
    "qwen_image_edit": "QwenImageEditPipeline",
}


def _scene(shift: int) -> Image.Image:
    """A 64 px picture with structure (a disc on a gradient) so edits have something to change."""
    y, x = np.mgrid[0:64, 0:64]
    arr = np.stack([x * 4, y * 4, np.full_like(x, 90 + shift)], -1).astype(np.uint8)
    arr[(x - 32 - shift) ** 2 + (y - 30) ** 2 < 144] = (230, 40, 40)
    return Image.fromarray(arr)


def _shard(n: int = 3):
    rows = pa.table({"item_id": [f"it{i}" for i in range(n)], "prompt": [f"a red ball {i}" for i in range(n)],
                     "instructions": [["make the ball blue", "add a hat"]] * n})
    return rows, [encoded(_scene(4 * i)) for i in range(n)]


# --- config --------------------------------------------------------------------------------------


def test_each_kind_takes_its_own_defaults():
    assert EditConfig().kind == "controlnet_img2img" and EditConfig().strength == 0.75
    ip2p = EditConfig(kind="instruct_pix2pix")
    assert (ip2p.model, ip2p.image_guidance_scale, ip2p.strength, ip2p.controlnet) == \
        ("timbrooks/instruct-pix2pix", 1.5, None, None)
    kontext = EditConfig(kind="flux_kontext")
    assert (kontext.model, kontext.guidance_scale, kontext.max_area) == \
        ("black-forest-labs/FLUX.1-Kontext-dev", 2.5, 1024 * 1024)
    qwen = EditConfig(kind="qwen_image_edit", steps=8)
    assert (qwen.model, qwen.guidance_scale, qwen.steps, qwen.negative_prompt) == ("Qwen/Qwen-Image-Edit", 4.0, 8, " ")


@pytest.mark.parametrize("kind, stray", [
    ("flux_kontext", {"strength": 0.6}),
    ("qwen_image_edit", {"image_guidance_scale": 1.5}),
    ("instruct_pix2pix", {"controlnet": "x", "max_area": 4096}),
    ("controlnet_img2img", {"negative_prompt": "blurry"}),
])
def test_a_setting_of_another_kind_is_a_config_error(kind, stray):
    with pytest.raises(ValueError, match=f"edit.kind '{kind}' takes no {', '.join(stray)}"):
        EditConfig(kind=kind, **stray)


def test_switching_kind_over_a_profile_that_pins_controlnet_settings_fails_before_loading():
    with pytest.raises(ProfileError, match="takes no controlnet, control, strength"):
        load_profile("tiny", ["edit.kind=flux_kontext"])


def test_prompt_mode_new_names_and_old_spellings():
    assert EditConfig(prompt_mode="prompt+instructions").prompt_mode == "prompt_plus_instructions"
    only = EditConfig(prompt_mode="instructions")
    assert only.prompt_mode == "instructions_only"
    assert edit_prompt("a cat", ["make it red"], only) == "make it red"
    assert edit_prompt("a cat", ["make it red"], EditConfig()) == "a cat, make it red"
    with pytest.raises(ValueError):
        EditConfig(prompt_mode="prompt")


def test_editor_profiles_extend_tiny_and_replace_only_the_edit_section():
    base, kontext = load_profile("tiny"), load_profile("tiny-flux-kontext")
    assert kontext.name == "tiny-flux-kontext" and kontext.edit.kind == "flux_kontext"
    for section in ("source", "sample", "critique", "instruct", "cutout", "check", "filter", "relabel"):
        assert getattr(kontext, section) == getattr(base, section), section
    for name in PROFILES.values():
        load_profile(name)
    for paper in ("sd15-paper-instruct-pix2pix", "sdxl-paper-instruct-pix2pix", "sd15-paper-flux-kontext",
                  "sd15-paper-qwen-image-edit"):
        assert "/" in load_profile(paper).edit.model  # a Hub id


def test_extends_cycle_is_a_profile_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\nname: a\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\nname: b\n")
    with pytest.raises(ProfileError, match="makes a cycle"):
        load_profile(str(tmp_path / "a.yaml"))


# --- each editor edits a shard -------------------------------------------------------------------


@pytest.mark.parametrize("editor", list(PROFILES))
def test_each_editor_edits_a_shard_reproducibly(editor, tiny_models):
    cfg = load_profile(PROFILES[editor], ["edit.batch_size=2", "edit.device=cpu", "edit.dtype=float32"]).edit
    rows, originals = _shard()
    get = lambda: load_editor(cfg, str(tiny_models))  # noqa: E731
    out = edit_rows(rows, originals, cfg, get)
    assert type(get().pipe).__name__ == PIPELINES[editor]
    assert out.num_rows == 3
    for r, original in zip(out.to_pylist(), originals):
        assert r["editor"] == cfg.kind
        assert r["edit_prompt"] == "a red ball " + r["item_id"][-1] + ", make the ball blue, add a hat"
        if r["status"] != "ok":  # a random model may blank an image: then a reason says so
            assert r["reason"].split(":")[0] in ("blank_edit", "no_visible_change"), r["reason"]
            continue
        edited = Image.open(io.BytesIO(r["image"])).convert("RGB")
        assert edited.size == (64, 64)
        assert np.abs(np.asarray(edited, float) - np.asarray(Image.open(io.BytesIO(original)), float)).mean() > 1
    assert sum(r["status"] == "ok" for r in out.to_pylist()) >= 2
    again = edit_rows(rows, originals, cfg, get)
    assert again.column("image").to_pylist() == out.column("image").to_pylist()
    other = edit_rows(rows, originals, cfg.model_copy(update={"seed": 7}), get)
    assert other.column("image").to_pylist() != out.column("image").to_pylist()


def test_flux_kontext_works_at_max_area_and_returns_the_input_size(tiny_models):
    cfg = load_profile("tiny-flux-kontext", ["edit.device=cpu", "edit.max_area=1024"]).edit
    editor = load_editor(cfg, str(tiny_models))
    assert editor.working_size((96, 64), max_area=1024) == (32, 16)  # 16 px multiples, aspect kept
    wide = Image.new("RGB", (96, 64), (10, 120, 200))
    out = editor.edit([wide], ["make it red"], [1], guidance_scale=2.5, steps=2, max_area=1024)
    assert out[0].size == (96, 64)


def test_qwen_conditioning_area_is_restored_after_a_call(tiny_models):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    from richpref.models.editors.qwen_image_edit import conditioning_area

    before = module.calculate_dimensions
    with conditioning_area(64 * 64):
        assert module.calculate_dimensions(1024 * 1024, 1.0)[:2] == (64, 64)
    assert module.calculate_dimensions is before
    with pytest.raises(RuntimeError), conditioning_area(64 * 64):
        raise RuntimeError("boom")
    assert module.calculate_dimensions is before


# --- switching the editor of a finished run ------------------------------------------------------


@pytest.mark.parametrize("editor", ["instruct_pix2pix", "flux_kontext", "qwen_image_edit"])
def test_switching_the_editor_recomputes_edit_and_later_stages_only(editor, finished_run, runs_dir, tiny_models):
    """The curate flow with another editor over the reference run: source .. instruct come from the
    cache, edit .. export are recomputed, every row is accounted for, the pairs and card name the editor."""
    from run_sizes import ONE_REWARD
    from test_curate_flow import OVERRIDES, assert_every_row_accounted, work

    from richpref.ops.entrypoints import CURATE, load_flow

    curate = load_flow(CURATE)

    profile = load_profile(PROFILES[editor])
    ref, run = RunStore(str(runs_dir), "ref"), RunStore(str(runs_dir), editor)
    shutil.copytree(ref.root, run.root)
    run.fs.rm(run.root + "/_log", recursive=True)
    curate(profile=PROFILES[editor], run=editor, data_dir=str(runs_dir), overrides=[*OVERRIDES, *ONE_REWARD],
           models_root=str(tiny_models))  # score recomputes anyway: one voting reward (tests/run_sizes.py)
    stages = {name for name, _ in work(runs_dir, editor)}
    names = [s.name for s in ALL_STAGES]
    assert stages == set(names[names.index("edit"):])
    assert_every_row_accounted(runs_dir, editor)
    edits = run.read_stage("edit")
    assert set(edits.column("editor").to_pylist()) == {editor}
    assert edits.column("image").to_pylist() != ref.read_stage("edit").column("image").to_pylist()
    pairs = run.read_stage("pairs")
    assert pairs.num_rows > 0 and set(pairs.column("editor").to_pylist()) == {editor}
    card = (run.fs.cat_file(run.root + "/pairs/README.md")).decode()
    assert f"Editor: `{editor}` (`{profile.edit.model}`)" in card
    from richpref.views.report import build_report

    assert build_report(str(runs_dir), editor).count('alt="edited"') == edits.num_rows


# Control detectors with annotator networks (richpref/models/editor.py)

@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    """Random annotator weights in the lllyasviel/Annotators layout, one directory for all kinds."""
    root = tmp_path_factory.mktemp("annotators")
    for kind in ANNOTATOR_FILES:
        build_random_annotator(kind, root, seed=0)
    return root


@pytest.mark.parametrize("kind", sorted(ANNOTATOR_FILES))
def test_annotator_loads_from_the_annotators_layout(kind, annotators):
    img = ellipse_scene((70, 50))
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
    scene = _arr(hed(ellipse_scene()))
    shifted = _arr(hed(ellipse_scene(fg=(20, 220, 120))))
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
        img = ellipse_scene()
        hed = editor.edit([img], ["a ball"], [5], **EDIT)[0]
        canny = editor.edit([img], ["a ball"], [5], control="canny", **EDIT)[0]
        assert hed.size == img.size
        assert np.abs(_arr(hed) - _arr(canny)).mean() > 0.5
    finally:
        editor.close()
