"""Image backends on tiny random models: text-to-image, ControlNet editing, control maps, cut-outs
(rembg sessions by name), and one image model resident at a time.

Everything runs offline on CPU at 64×64 with 2-4 steps; the tiny checkpoints are built once per session.
"""
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from richpref.models.cutout import BackgroundRemover, composite_on_white, foreground_ratio
from richpref.models.editor import ANNOTATOR_FILES, CONTROL_KINDS, ControlNetEditor, make_control_image
from richpref.models.generator import TextToImage
from richpref.models.runtime import ModelNotAvailable
from richpref.models.tiny.diffusion import build_tiny_controlnet, build_tiny_sd15
from richpref.models.tiny.rembg import MODEL_FILENAME, build_tiny_u2net_onnx, install_as_rembg_model
from richpref.schemas.config import EditConfig, SampleConfig
from richpref.tasks.edit import load_editor
from richpref.tasks.sample import load_generator

from image_helpers import EDIT, GEN, _arr, _scene

@pytest.fixture(scope="session")
def tiny(paths):
    """The session's tiny build (tests/conftest.py), under the names these tests use."""
    home = paths.rembg_home
    return SimpleNamespace(sd=paths.sd15, controlnet=paths.controlnet, onnx=home / MODEL_FILENAME, u2net_home=home)


@pytest.fixture(scope="session")
def t2i(tiny):
    gen = TextToImage.load(str(tiny.sd), device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def editor(tiny):
    ed = ControlNetEditor.load(str(tiny.sd), str(tiny.controlnet), device="cpu")
    yield ed
    ed.close()


@pytest.fixture(scope="session")
def remover(tiny):
    # load() sets U2NET_HOME for the process; restore it when the session ends.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("U2NET_HOME", os.environ.get("U2NET_HOME", str(tiny.u2net_home)))
        rm = BackgroundRemover.load("u2net_custom", model_path=str(tiny.onnx), home=str(tiny.u2net_home))
        yield rm
        rm.close()


# --- text to image -----------------------------------------------------------------------------


def test_generate_deterministic_and_sized(t2i):
    a = t2i.generate(["a red cube on a table"], [7], **GEN)
    b = t2i.generate(["a red cube on a table"], [7], **GEN)
    assert len(a) == 1 and a[0].size == (64, 64) and a[0].mode == "RGB"
    assert np.array_equal(_arr(a[0]), _arr(b[0]))
    wide = t2i.generate(["a red cube"], [7], steps=2, guidance_scale=5.0, height=64, width=96, negative_prompt="blurry")
    assert wide[0].size == (96, 64)


def test_generate_independent_of_batch(t2i):
    alone = t2i.generate(["a red cube on a table"], [7], **GEN)[0]
    batch = t2i.generate(["a dog", "a red cube on a table", "a city at night"], [1, 7, 3], batch_size=3, **GEN)
    assert len(batch) == 3
    # Same noise (per-item CPU generator); batched CPU kernels may round differently by one level.
    diff = np.abs(_arr(alone) - _arr(batch[1]))
    assert diff.max() <= 2 and diff.mean() < 0.01
    # A batch split into chunks gives the same images as one batch.
    chunked = t2i.generate(["a dog", "a red cube on a table", "a city at night"], [1, 7, 3], batch_size=2, **GEN)
    for x, y in zip(batch, chunked):
        assert np.abs(_arr(x) - _arr(y)).max() <= 2


def test_generate_seeds_differ(t2i):
    a, b = t2i.generate(["a red cube", "a red cube"], [1, 2], **GEN)
    assert np.abs(_arr(a) - _arr(b)).mean() > 1.0


def test_generate_scheduler_override(tiny):
    gen = TextToImage.load(str(tiny.sd), device="cpu", scheduler="EulerDiscreteScheduler")
    try:
        assert type(gen.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert gen.model_id == str(tiny.sd)
        assert gen.generate(["x"], [0], **GEN)[0].size == (64, 64)
    finally:
        gen.close()
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        TextToImage.load(str(tiny.sd), device="cpu", scheduler="NoSuchScheduler")


# --- control images and editing ----------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in CONTROL_KINDS if k not in ANNOTATOR_FILES])
def test_control_image_kinds(kind):
    for size in [(64, 64), (70, 50)]:
        img = _scene(size)
        ctrl = make_control_image(img, kind)
        assert ctrl.size == size and ctrl.mode == "RGB"
    if kind == "tile":
        assert np.array_equal(_arr(make_control_image(img, "tile")), _arr(img))


def test_control_maps_follow_content():
    flat = Image.new("RGB", (64, 64), (120, 120, 120))
    assert _arr(make_control_image(_scene(), "canny")).max() == 255  # the ellipse's outline
    assert _arr(make_control_image(flat, "canny")).max() == 0
    strokes = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(strokes).line((8, 8, 56, 56), fill="black", width=2)
    assert _arr(make_control_image(strokes, "lineart_standard")).max() > 0
    with pytest.raises(ValueError, match="unknown control kind"):
        make_control_image(flat, "depth-from-nowhere")


def test_edit_sizes_determinism_and_change(editor):
    images = [_scene((64, 64)), _scene((70, 50), bg=(200, 60, 90))]  # 70×50: not a multiple of 8
    prompts = ["a blue ball", "a green ball"]
    out = editor.edit(images, prompts, [3, 4], **EDIT)
    again = editor.edit(images, prompts, [3, 4], **EDIT)
    assert [o.size for o in out] == [(64, 64), (70, 50)]
    assert all(o.mode == "RGB" for o in out)
    for o, a, src in zip(out, again, images):
        assert np.array_equal(_arr(o), _arr(a))
        assert np.abs(_arr(o) - _arr(src)).mean() > 1.0
    # Alone vs in a batch with another image of the same size.
    alone = editor.edit([images[0]], [prompts[0]], [3], **EDIT)[0]
    batched = editor.edit([_scene(bg=(0, 0, 0)), images[0]], ["x", prompts[0]], [9, 3], batch_size=2, **EDIT)[1]
    assert np.abs(_arr(alone) - _arr(batched)).max() <= 2


def test_edit_control_kind_matters(editor):
    img = _scene()
    canny = editor.edit([img], ["a ball"], [5], control="canny", **EDIT)[0]
    tile = editor.edit([img], ["a ball"], [5], control="tile", **EDIT)[0]
    assert np.abs(_arr(canny) - _arr(tile)).mean() > 0.5


# --- cut-outs ----------------------------------------------------------------------------------


def test_cutout_composite_on_white(remover):
    img = _scene((64, 48))
    [(fg, mask)] = remover.remove([img])
    assert fg.size == mask.size == img.size
    assert fg.mode == "RGB" and mask.mode == "L"
    assert remover.model_id == "u2net_custom:tiny-u2net.onnx"
    assert 0.0 < foreground_ratio(mask) < 1.0  # the random net's mask is not trivial
    # fg = img·α + 255·(1−α), pixel by pixel.
    alpha = _arr(mask)[..., None] / 255.0
    expected = _arr(img) * alpha + 255.0 * (1.0 - alpha)
    assert np.abs(_arr(fg) - expected).max() <= 1.0
    m = _arr(mask)
    assert (m == 0).any()
    assert (_arr(fg)[m == 0] == 255).all()  # background is white


def test_composite_on_white_hand_made_mask():
    img = Image.new("RGB", (4, 2), (10, 100, 200))
    mask = Image.fromarray(np.array([[0, 255, 128, 0], [255, 0, 64, 255]], dtype=np.uint8))
    out = _arr(composite_on_white(img, mask))
    assert (out[0, 0] == 255).all() and (out[0, 1] == [10, 100, 200]).all()
    a = 128 / 255
    assert np.allclose(out[0, 2], np.rint(np.array([10, 100, 200]) * a + 255 * (1 - a)), atol=1)


def test_foreground_ratio():
    mask = Image.new("L", (100, 100), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 49, 49), fill=255)
    assert foreground_ratio(mask) == pytest.approx(0.25)
    assert foreground_ratio(Image.new("L", (8, 8), 127)) == 0.0
    assert foreground_ratio(Image.new("L", (8, 8), 127), threshold=100) == 1.0


def test_missing_rembg_model_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))  # restored after the test; load() overwrites it
    start = time.monotonic()
    with pytest.raises(ModelNotAvailable) as info:
        BackgroundRemover.load("isnet-general-use", home=str(tmp_path / "empty"))
    assert time.monotonic() - start < 2.0
    msg = str(info.value)
    assert "isnet-general-use" in msg
    assert str(tmp_path / "empty" / "models" / "isnet-general-use" / "isnet-general-use.onnx") in msg
    assert "rembg d isnet-general-use" in msg
    # A custom model whose file is missing, or that lies outside the rembg home.
    with pytest.raises(ModelNotAvailable, match="not found"):
        BackgroundRemover.load("u2net_custom", model_path=str(tmp_path / "nope.onnx"), home=str(tmp_path))


def test_custom_model_outside_home_is_explained(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="inside its home"):
        BackgroundRemover.load("u2net_custom", model_path=str(tiny.onnx))


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


# --- builders ----------------------------------------------------------------------------------


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.safetensors"))}


def _onnx_weights(path: Path) -> dict[str, bytes]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t).tobytes() for t in onnx.load(str(path)).graph.initializer}


def test_the_onnx_build_is_byte_identical_under_another_hash_seed(tmp_path):
    """A build in a process with another PYTHONHASHSEED writes the same bytes (torch.export's printed
    shape ranges follow the hash seed; the builder drops them)."""
    import subprocess
    import sys

    code = ("import sys, hashlib; from richpref.models.tiny.rembg import build_tiny_u2net_onnx; "
            "print(hashlib.sha256(build_tiny_u2net_onnx(sys.argv[1], seed=6).read_bytes()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()[-1] for seed in ("1", "2")}
    assert len(digests) == 1


def test_builders_are_seed_deterministic(tiny, tmp_path):
    # The session's build seeds sd15 with 0, its controlnet with 1 and the U2-Net with 6.
    sd_same = build_tiny_sd15(tmp_path / "sd_same", seed=0)
    sd_other = build_tiny_sd15(tmp_path / "sd_other", seed=1)
    assert _files(sd_same) == _files(tiny.sd)
    assert _files(sd_other)["unet/diffusion_pytorch_model.safetensors"] != _files(tiny.sd)["unet/diffusion_pytorch_model.safetensors"]

    cn_same = build_tiny_controlnet(tiny.sd, tmp_path / "cn_same", seed=1)
    cn_other = build_tiny_controlnet(tiny.sd, tmp_path / "cn_other", seed=2)
    assert _files(cn_same) == _files(tiny.controlnet)
    assert _files(cn_other) != _files(tiny.controlnet)

    onnx_same = build_tiny_u2net_onnx(tmp_path / "h_same", seed=6)
    onnx_other = build_tiny_u2net_onnx(tmp_path / "h_other", seed=7)
    assert onnx_same.name == "tiny-u2net.onnx"
    assert _onnx_weights(onnx_same) == _onnx_weights(tiny.onnx)  # the session's build (maybe an older exporter's bytes)
    assert _onnx_weights(onnx_other) != _onnx_weights(tiny.onnx)
    assert not list(onnx_same.parent.glob("*.data"))  # one self-contained file


def test_tiny_sd_loads_with_diffusers(tiny):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny.sd))
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.vae_scale_factor == 8
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


# --- one image model resident at a time (the stages' loaders) ----------------------------------


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


def test_loading_the_background_remover_keeps_torchs_thread_count(tiny):
    # rembg imports numba, whose OpenMP layer sets the shared libgomp to one thread per core;
    # a Dask worker given one core then ran every later model on more threads than it has cores.
    code = (
        "import torch; torch.set_num_threads(1); assert torch.get_num_threads() == 1  # torch's state is set up\n"
        "from richpref.models.cutout import BackgroundRemover\n"
        f"BackgroundRemover.load('u2net_custom', model_path={str(tiny.onnx)!r}, home={str(tiny.u2net_home)!r})\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"


def test_rembg_is_imported_without_compiling_pymatting_by_the_workers_preload_and_by_the_loader(tiny):
    # rembg imports pymatting (alpha matting, unused here), whose functions numba compiled as they were
    # defined: 27 s of CPU in every fresh environment. The forkserver of a local cluster imports
    # WORKER_IMPORTS first, then a worker loads the remover; numba's switch is set back after.
    code = (
        "import importlib, numba\n"
        "from numba.core.dispatcher import Dispatcher\n"
        "from richpref.run.early_cluster import WORKER_IMPORTS\n"
        "for m in WORKER_IMPORTS: importlib.import_module(m)\n"
        "from richpref.models.cutout import BackgroundRemover\n"
        f"BackgroundRemover.load('u2net_custom', model_path={str(tiny.onnx)!r}, home={str(tiny.u2net_home)!r})\n"
        "from pymatting.util.boxfilter import boxfilter_rows_full\n"
        "compiled_later = numba.njit(lambda x: x + 1)\n"
        "print(isinstance(boxfilter_rows_full, Dispatcher), bool(numba.config.DISABLE_JIT), isinstance(compiled_later, Dispatcher))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["False", "False", "True"]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_onnx_session_takes_torchs_thread_count_not_one_thread_per_core(tiny, threads, monkeypatch):
    import torch

    monkeypatch.setenv("U2NET_HOME", os.environ.get("U2NET_HOME", str(tiny.u2net_home)))  # load() sets it
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        remover = BackgroundRemover.load("u2net_custom", model_path=str(tiny.onnx), home=str(tiny.u2net_home),
                                         device="cpu")
        opts = remover.session.inner_session.get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (threads, 1)
        remover.close()
    finally:
        torch.set_num_threads(before)
