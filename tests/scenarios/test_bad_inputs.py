"""Bad and hostile input: every row gets a clear reason, counts add up, nothing is evaluated or escapes.
One stage's bad input is tested with that stage (tests/tasks/): the source's bad rows, prompts and
missing columns in test_source.py, the sample stage's bad dataset images in test_sample.py."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from richpref.common.images import BadImage, decode_image
from richpref.prompts import render
from richpref.run.storage import RunStore
from image_helpers import encoded


def _png(img: Image.Image, **kw) -> bytes:
    return encoded(img, kw.pop("format", "PNG"), **kw)


def _animated_gif() -> bytes:
    frames = [Image.new("P", (32, 32), i * 40) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


GOOD = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)))
IMAGES = {
    # name: (bytes, expected reason prefix or None when it must decode to RGB)
    "corrupt": (b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "bad_image: cannot decode"),
    "zero-byte": (b"", "bad_image: empty"),
    "truncated": (GOOD[: len(GOOD) // 2], "bad_image: cannot decode"),
    "1x1": (_png(Image.new("RGB", (1, 1))), "bad_image: 1x1 is too small"),
    "10000x10000": (_png(Image.new("1", (10000, 10000))), "bad_image: 10000x10000 is over"),
    "cmyk": (_png(Image.new("CMYK", (32, 32), (0, 255, 0, 0)), format="JPEG"), None),
    "16-bit": (_png(Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))), None),
    "palette": (_png(Image.new("P", (32, 32), 3)), None),
    "rgba": (_png(Image.new("RGBA", (32, 32), (255, 0, 0, 0))), None),
    "animated": (_animated_gif(), None),
}


@pytest.mark.parametrize("name", IMAGES)
def test_every_odd_image_decodes_to_rgb_or_gets_a_reason(name):
    data, expected = IMAGES[name]
    if expected is None:
        img = decode_image(data)
        assert img.mode == "RGB" and img.size == (32, 32)
    else:
        with pytest.raises(BadImage) as err:
            decode_image(data)
        assert str(err.value).startswith(expected), str(err.value)


def test_decoded_odd_images_keep_their_content():
    assert decode_image(IMAGES["rgba"][0]).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert decode_image(IMAGES["16-bit"][0]).getpixel((0, 0)) == (round(40000 / 257),) * 3
    assert decode_image(IMAGES["cmyk"][0]).getpixel((5, 5))[1] < 60  # magenta ink: little green


def test_a_model_missing_offline_fails_fast_naming_it(monkeypatch):
    from richpref.models.runtime import ModelNotAvailable, resolve_model_ref

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelNotAvailable, match=r"nobody/no-such-model.*(local directory|download)"):
        resolve_model_ref("nobody/no-such-model", "/nonexistent")
    assert time.monotonic() - t0 < 5


# hostile input ------------------------------------------------------------------------------------

HOSTILE = ["{critique}", "{__class__.__mro__}", "$(rm -rf /)", "`id`", "../../etc/passwd", "'; drop table x; --",
           "{{7*7}}", "__import__('os').system('id')"]


@pytest.mark.parametrize("text", HOSTILE)
def test_prompts_are_data_in_templates(text):
    out = render("Prompt: {prompt}. Critique: {critique}.", prompt=text, critique="C")
    assert out == f"Prompt: {text}. Critique: C."


@pytest.mark.parametrize("run", ["../escape", "/abs", "a/b", "", ".hidden", "x" * 200])
def test_run_names_cannot_escape_the_data_dir(run, tmp_path):
    with pytest.raises(ValueError, match="run name"):
        RunStore(str(tmp_path), run)


def test_trust_remote_code_is_off_unless_a_profile_opts_in():
    from richpref.schemas.config import load_profile

    for name in ("tiny", "sd15-paper", "sdxl-paper"):
        p = load_profile(name)
        for section in ("critique", "instruct", "check"):
            assert getattr(p, section).trust_remote_code is False, (name, section)


def test_serve_binds_to_loopback_by_default():
    from richpref.ops.serve import server_env

    env = server_env("/tmp/x", "127.0.0.1", 4200)
    assert env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    import inspect

    from richpref.cli.commands import build_parser
    from richpref.ops import serve

    assert inspect.signature(serve.start).parameters["host"].default == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_the_command_line_parser_imports_no_heavy_library():
    """`richpref --help` and a typo's usage message come back in a moment: the parser of every command
    imports no torch, Prefect, diffusers or transformers (the commands import them when they run)."""
    import subprocess
    import sys

    code = ("import sys; from richpref.cli.commands import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'prefect', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
