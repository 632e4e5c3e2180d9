"""A tiny random-weight segmentation net exported to ONNX for rembg's `u2net_custom` session.

It honours the contract rembg's sessions rely on: input (N, 3, S, S) normalised by the session,
output (N, 1, S, S) in [0, 1] (sigmoid), and rembg reads `outputs[0][:, 0]`. S is 320 for U²-Net
sessions and 1024 for IS-Net, BiRefNet and BRIA RMBG: the exported graph takes any multiple of 4, so
one file serves every session (`install_as_rembg_model`). The weights are random, but the mask follows
image content (brighter/structured regions differ from flat ones) instead of being constant, so the
cut-out code path is exercised for real in tests and demos.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

MODEL_FILENAME = "tiny-u2net.onnx"
INPUT_SIZE = 320  # rembg's u2net sessions always resize to 320×320


class _TinySegNet(nn.Module):
    """Fully convolutional: local features, a coarse context branch, per-image normalisation, sigmoid."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.local = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()
        )
        # Coarse branch at 1/4 resolution widens the receptive field so masks come out as blobs, not speckle.
        self.context = nn.Sequential(
            nn.AvgPool2d(4),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False),
        )
        # Normalising per image keeps the logits centred whatever the random weights, so the sigmoid
        # neither saturates to all-0/all-1 nor sits flat at 0.5.
        self.norm = nn.InstanceNorm2d(2 * width, affine=False)
        self.smooth = nn.AvgPool2d(5, stride=1, padding=2, count_include_pad=False)
        self.head = nn.Conv2d(2 * width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.local(x)
        feats = torch.cat([feats, self.context(feats)], dim=1)
        logits = self.head(self.smooth(self.norm(feats)))
        return torch.sigmoid(logits)


def _init_weights(net: _TinySegNet) -> None:
    with torch.no_grad():
        # Head weights scaled so logits have a spread of a few units: a soft but clearly two-sided mask.
        nn.init.normal_(net.head.weight, std=3.0 / (net.head.in_channels ** 0.5))
        nn.init.zeros_(net.head.bias)


def build_tiny_seg_net(seed: int = 0) -> nn.Module:
    """The torch module behind `build_tiny_u2net_onnx` (seeded, eval mode)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _TinySegNet()
        _init_weights(net)
    return net.eval()


def _drop_unordered_metadata(path: Path) -> None:
    """torch.export writes its symbolic shape ranges as a printed dict whose order follows Python's hash
    seed, so two builds in two processes differ in that string alone: drop it (diagnostic only) so the
    same seed gives the same bytes."""
    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.graph.metadata_props if not p.key.endswith(".range_constraints")]
    if len(keep) != len(model.graph.metadata_props):
        del model.graph.metadata_props[:]
        model.graph.metadata_props.extend(keep)
        onnx.save(model, str(path))


def _export(net: nn.Module, dummy: torch.Tensor, path: Path) -> None:
    """Export with dynamic batch and spatial axes (sides: multiples of 4, for the ×4 context branch)
    to one self-contained file.

    The torch.export-based exporter (torch's default since 2.9) needs onnxscript; without it, fall back
    to the legacy TorchScript exporter, whose deprecation and tracer notices are expected here.
    """
    if importlib.util.find_spec("onnxscript") is not None:

        def side(name: str):
            return torch.export.Dim(name, min=2, max=1024)  # times 4: 8 to 4096 px

        torch.onnx.export(
            net,
            (dummy,),
            str(path),
            dynamo=True,
            external_data=False,  # else the weights go to a side "*.onnx.data" file
            input_names=["input"],
            output_names=["mask"],
            dynamic_shapes=({0: torch.export.Dim("batch"), 2: 4 * side("h4"), 3: 4 * side("w4")},),
            verbose=False,
        )
        _drop_unordered_metadata(path)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["mask"],
            dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 2: "height", 3: "width"}},
            opset_version=17,
        )


def build_tiny_u2net_onnx(u2net_home: str | os.PathLike, seed: int = 0) -> Path:
    """Export the tiny net to `u2net_home/tiny-u2net.onnx` (one self-contained file) and return its path.

    rembg only accepts custom model files under its home directory (`U2NET_HOME`), hence the location.
    Use it with `BackgroundRemover.load("u2net_custom", model_path=..., home=u2net_home)`.
    """
    home = Path(u2net_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / MODEL_FILENAME
    net = build_tiny_seg_net(seed)
    dummy = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    # Write next to the target and rename, so a reader never sees a half-written model.
    tmp = path.with_suffix(".onnx.tmp")
    _export(net, dummy, tmp)
    os.replace(tmp, path)
    return path


def install_as_rembg_model(onnx_path: str | os.PathLike, u2net_home: str | os.PathLike, name: str) -> Path:
    """Copy an ONNX file to where rembg's named session `name` ("u2net", "isnet-general-use",
    "birefnet-general", "bria-rmbg", ...) finds its weights: `<home>/models/<name>/<name>.onnx`.

    rembg uses a file found there without downloading or checking it, so the named sessions (with
    their own resizing and normalisation) run offline on the tiny net.
    """
    target = Path(u2net_home) / "models" / name / f"{name}.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".onnx.tmp")
    shutil.copyfile(onnx_path, tmp)
    os.replace(tmp, target)
    return target
