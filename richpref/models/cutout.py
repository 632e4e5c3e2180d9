"""Background removal with rembg: foreground masks and white-background composites.

rembg is imported inside `BackgroundRemover.load` (models/rembg_import.py: without compiling the
pymatting functions it imports, 27 s of CPU in a fresh environment), and only there: code paths
without cut-outs do not pay its import.

Missing model files are found before rembg is imported: offline, a missing model raises
`ModelNotAvailable` at once with the expected path, instead of a download attempt.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .runtime import ModelNotAvailable

# rembg sessions whose weights are one file `<name>.onnx`, looked up (in rembg 2.x) at
# `<home>/models/<name>/<name>.onnx`, then at the legacy flat `<legacy home>/<name>.onnx`.
SINGLE_FILE_MODELS = (
    "u2net",
    "u2netp",
    "u2net_human_seg",
    "u2net_cloth_seg",
    "silueta",
    "isnet-general-use",
    "isnet-anime",
    "bria-rmbg",
    "birefnet-general",
    "birefnet-general-lite",
    "birefnet-general-fp16",
    "birefnet-portrait",
    "birefnet-dis",
    "birefnet-hrsod",
    "birefnet-cod",
    "birefnet-massive",
)
# Sessions that take the caller's own ONNX file (`model_path`), which rembg requires under its home.
CUSTOM_MODELS = ("u2net_custom", "dis_custom", "ben_custom")

_TRUE = {"1", "true", "yes", "on"}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def rembg_homes() -> tuple[Path, Path]:
    """(home, legacy home) exactly as rembg's BaseSession computes them from the environment.

    Replicated here so model files can be checked without importing rembg.
    """
    u2net_home = os.getenv("U2NET_HOME")
    legacy = Path(os.path.expanduser(u2net_home or os.path.join(os.getenv("XDG_DATA_HOME", "~"), ".u2net")))
    if u2net_home:
        return legacy, legacy
    xdg = os.getenv("XDG_DATA_HOME")
    default = os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")
    return Path(os.path.expanduser(os.getenv("REMBG_HOME", default))), legacy


def expected_model_path(model: str) -> Path | None:
    """Where rembg will look for `model`'s weights: the first existing candidate, else the path a
    download would create. None for sessions whose files this module does not know (e.g. "sam")."""
    if model not in SINGLE_FILE_MODELS:
        return None
    home, legacy = rembg_homes()
    fname = f"{model}.onnx"
    candidates = [home / "models" / model / fname, legacy / fname]
    return next((c for c in candidates if c.exists()), candidates[0])


def _missing_model_message(model: str, path: Path) -> str:
    return (
        f"rembg model {model!r} is not available: expected its weights at {path} and "
        + ("we are offline (HF_HUB_OFFLINE=1), so it will not be downloaded. " if _offline() else "the download failed. ")
        + f"Provide it by running `rembg d {model}` on a connected machine and copying "
        f"models/{model}/{model}.onnx into the rembg home ({rembg_homes()[0]}; set with home=... or "
        "U2NET_HOME), or use model='u2net_custom' with model_path=<your .onnx under that home>."
    )


def session_options() -> Any:
    """onnxruntime's options for a cut-out session: its CPU pool takes the process's torch thread count
    (a Dask worker's share of the cores), not one thread per core. On cores that other work shares, a
    pool of one thread per core waits at every per-op barrier for its own descheduled threads (in the
    test suite a cut-out test that takes ~1 s alone took 54-76 s beside busy neighbours)."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1  # the default sequential executor runs one node at a time
    return opts


def onnx_providers(device: str = "auto", providers: Sequence[str] | None = None) -> list[str]:
    """The onnxruntime execution providers for a cut-out session.

    `providers` given: those, checked against this onnxruntime build. Else by `device`: "cpu" → CPU;
    "auto" → CUDA first when this build has it (the `gpu` extra installs onnxruntime-gpu), else CPU;
    "cuda" → CUDA, or an error saying how to get it.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers:
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(f"cutout.providers {missing} are not in this onnxruntime build (it has {available}); "
                             "for CUDA install onnxruntime-gpu (pip install 'richpref[gpu]') in place of onnxruntime")
        return list(providers)
    cuda = "CUDAExecutionProvider" in available
    if device.startswith("cuda") and not cuda:
        raise ValueError("cutout.device is cuda but this onnxruntime build has no CUDAExecutionProvider: install "
                         "onnxruntime-gpu (pip install 'richpref[gpu]') in place of onnxruntime, or set cutout.device=cpu")
    if cuda and device != "cpu":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# Sessions whose predict() is rembg's U2-Net recipe (normalise to 320x320, min-max the first output,
# resize back with Lanczos): `masks` runs these several images per onnxruntime call when the model's
# batch axis is dynamic, with the very same pre- and post-processing per image.
BATCHABLE_SESSIONS = ("U2netSession", "U2netCustomSession")
_U2NET_MEAN, _U2NET_STD, _U2NET_SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (320, 320)


def _resolve_custom_path(model: str, model_path: str | None, home: str | None) -> Path:
    if not model_path:
        raise ValueError(f"rembg model {model!r} needs model_path=<path to an .onnx file>")
    p = Path(model_path).expanduser()
    if not p.is_absolute():
        # A relative path is read against the given home, where rembg wants custom files anyway.
        p = (Path(home).expanduser() / p) if home else (Path.cwd() / p)
    p = p.resolve()
    if not p.is_file():
        raise ModelNotAvailable(
            f"custom rembg model file for {model!r} not found at {p}. Build the tiny test model with "
            "richpref.models.tiny.rembg.build_tiny_u2net_onnx(<home>) or copy your .onnx there."
        )
    roots = [r.resolve() for r in rembg_homes()]
    if not any(p == r or r in p.parents for r in roots):
        raise ModelNotAvailable(
            f"rembg only loads custom models from inside its home ({roots[0]}), but {p} is elsewhere: "
            f"pass home={str(p.parent)!r} (or set U2NET_HOME) or move the file under the home."
        )
    return p


class BackgroundRemover:
    """A rembg session that turns images into (white-background composite, mask) pairs."""

    def __init__(self, session: Any, model_id: str, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.session = session
        self.model_id = model_id
        self.providers = list(providers)

    @classmethod
    def load(
        cls, model: str = "u2net", *, model_path: str | None = None, home: str | None = None,
        device: str = "auto", providers: Sequence[str] | None = None,
    ) -> "BackgroundRemover":
        """Open a rembg session by name ("u2net", "isnet-general-use", "birefnet-general", "bria-rmbg",
        ...) or a custom one ("u2net_custom" with `model_path`).

        `home` becomes U2NET_HOME (process-wide: rembg reads it from the environment), the directory
        rembg looks for model files in and the only place it accepts custom model files from.
        """
        if home is not None:
            os.environ["U2NET_HOME"] = str(Path(home).expanduser().resolve())

        kwargs: dict[str, Any] = {}
        expected: Path | None = None
        if model in CUSTOM_MODELS:
            path = _resolve_custom_path(model, model_path, home)
            kwargs["model_path"] = str(path)
            model_id = f"{model}:{path.name}"
        else:
            expected = expected_model_path(model)
            if expected is not None and not expected.exists() and _offline():
                # Checked before importing rembg, so the error comes in milliseconds, not after retries.
                raise ModelNotAvailable(_missing_model_message(model, expected))
            model_id = model

        from .rembg_import import new_session  # lazy: see module docstring

        chosen = onnx_providers(device, providers)
        try:
            session = new_session(model, providers=chosen, sess_opts=session_options(), **kwargs)
        except OSError as exc:  # requests/pooch network errors are OSErrors
            if model in CUSTOM_MODELS:
                raise
            raise ModelNotAvailable(
                _missing_model_message(model, expected or rembg_homes()[0] / "models" / model)
            ) from exc
        return cls(session, model_id, chosen)

    def remove(self, images: Sequence[Image.Image], batch_size: int = 1) -> list[tuple[Image.Image, Image.Image]]:
        """For each image: (foreground composited on white, RGB; soft mask, mode "L"), both its size."""
        return [(composite_on_white(im.convert("RGB"), m), m) for im, m in zip(images, self.masks(images, batch_size))]

    def batchable(self) -> bool:
        """Whether several images can share one onnxruntime call (U2-Net recipe, dynamic batch axis)."""
        if type(self.session).__name__ not in BATCHABLE_SESSIONS:
            return False
        return not isinstance(self.session.inner_session.get_inputs()[0].shape[0], int)

    def masks(self, images: Sequence[Image.Image], batch_size: int = 1) -> list[Image.Image]:
        """Each image's soft foreground mask (mode "L", its size); `batch_size` images per model call
        where the session allows it (see `batchable`), else one at a time."""
        if self.session is None:
            raise RuntimeError("BackgroundRemover is closed")
        rgbs = [image.convert("RGB") for image in images]
        # A flat image has no foreground. rembg would min-max normalise a constant prediction (0/0) and
        # cast NaNs to bytes, a platform-dependent mask; say "empty" instead.
        out: list[Image.Image | None] = [Image.new("L", rgb.size, 0) if all(lo == hi for lo, hi in rgb.getextrema())
                                         else None for rgb in rgbs]
        todo = [i for i, m in enumerate(out) if m is None]
        if batch_size > 1 and len(todo) > 1 and self.batchable():
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                for i, mask in zip(idx, self._u2net_batch([rgbs[i] for i in idx])):
                    out[i] = mask
        else:
            for i in todo:
                masks = self.session.predict(rgbs[i])
                # Multi-class sessions (u2net_cloth_seg) return one mask per class: the foreground is their union.
                arr = np.max(np.stack([np.asarray(m.convert("L").resize(rgbs[i].size)) for m in masks]), axis=0)
                out[i] = Image.fromarray(arr.astype(np.uint8))  # 2-D uint8 -> mode "L"
        return out  # type: ignore[return-value]

    def _u2net_batch(self, rgbs: list[Image.Image]) -> list[Image.Image]:
        """rembg's U2-Net predict() for several images in one model call (same steps per image)."""
        name = self.session.inner_session.get_inputs()[0].name
        x = np.concatenate([self.session.normalize(im, _U2NET_MEAN, _U2NET_STD, _U2NET_SIZE)[name] for im in rgbs])
        pred_all = self.session.inner_session.run(None, {name: x})[0][:, 0, :, :]
        masks = []
        for j, im in enumerate(rgbs):
            pred = pred_all[j : j + 1]
            ma, mi = np.max(pred), np.min(pred)
            pred = np.squeeze((pred - mi) / (ma - mi))
            mask = Image.fromarray((pred.clip(0, 1) * 255).astype(np.uint8))  # 2-D uint8 -> mode "L"
            masks.append(mask.resize(im.size, Image.Resampling.LANCZOS))
        return masks

    def close(self) -> None:
        """Drop the ONNX session."""
        self.session = None


def composite_on_white(image: Image.Image, mask: Image.Image) -> Image.Image:
    """fg·α + 255·(1−α) per channel, α = mask/255: soft edges blend into white, no halo of black."""
    fg = np.asarray(image.convert("RGB"), dtype=np.float32)
    alpha = np.asarray(mask.convert("L").resize(image.size), dtype=np.float32)[..., None] / 255.0
    out = fg * alpha + 255.0 * (1.0 - alpha)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))  # HxWx3 uint8 -> "RGB"


def foreground_ratio(mask: Image.Image, threshold: int = 128) -> float:
    """Fraction of pixels whose mask value is >= `threshold` (0..255)."""
    arr = np.asarray(mask.convert("L"))
    if arr.size == 0:
        return 0.0
    return float((arr >= threshold).mean())
