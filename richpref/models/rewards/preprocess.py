"""Image preprocessing exactly as each reference scorer does it (torchvision on PIL images).

- `clip_pixels`: OpenAI CLIP's / ImageReward's / the LAION aesthetic predictor's transform: PIL resize of
  the short side to `size` (bicubic), center crop, RGB, to [0, 1], normalise.
- `hps_pixels`: HPSv2's validation transform: RGB, to a [0, 1] tensor, then resize the *tensor* so its
  longest side is `size` (bicubic) and zero-pad to `size`×`size` (pad//2 left/top), normalise.
  Tensor resizing antialiases by default since torchvision 0.17; HPSv2 was trained and published with
  torchvision < 0.17, i.e. without antialiasing, so `antialias=False` is the default here.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def clip_pixels(images: Sequence[Image.Image], size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    from torchvision import transforms as T

    tf = T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    return torch.stack([tf(im) for im in images])


def hps_pixels(images: Sequence[Image.Image], size: int, *, antialias: bool = False,
               mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    import torchvision.transforms.functional as F

    out = []
    for im in images:
        x = F.to_tensor(im.convert("RGB"))
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        new_h, new_w = round(h * scale), round(w * scale)
        if (new_h, new_w) != (h, w):
            x = F.resize(x, [new_h, new_w], interpolation=F.InterpolationMode.BICUBIC, antialias=antialias)
        # The reference pads only when it resized; padding here too keeps an already-224-long
        # non-square image usable (the reference would fail on it) and changes nothing otherwise.
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        out.append(F.normalize(x, mean, std))
    return torch.stack(out)
