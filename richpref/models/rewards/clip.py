"""CLIP-based scorers: CLIP similarity, PickScore, ICT, HP and the LAION aesthetic predictor.

| kind | score | reference |
|---|---|---|
| clip | cos(text, image) | CLIPScore without the 100× / clamp |
| pickscore | `logit_scale.exp()` · cos(text, image) | yuvalkirstain/PickScore_v1, processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K |
| ict | cos(text, image), text ids from open_clip's tokenizer, no attention mask | ICT/HP evaluator (8y/ICT) |
| hp | sigmoid(MLP(image_embeds)), embeds **not** normalised | ICT/HP evaluator (8y/HP) |
| aesthetic | MLP(image_embeds / ‖image_embeds‖) | LAION improved-aesthetic-predictor v2 on OpenAI CLIP ViT-L/14 |

CLIP/PickScore/ICT/HP preprocess with the Hugging Face CLIP processor on its PIL backend, as their
references do; the aesthetic predictor uses OpenAI CLIP's torchvision transform (`preprocess.clip_pixels`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..runtime import resolve_device, resolve_dtype
from .base import (LinearHead, RewardLoadError, batches, check_lengths, checkpoint_file, load_state_dict, log)
from .preprocess import clip_pixels


def load_clip_processor(path: str):
    from transformers import CLIPProcessor

    # The reference scorers preprocess with PIL; keep that backend so scores match theirs.
    return CLIPProcessor.from_pretrained(path, backend="pil")


def _state_dict_file(ref: str, file: str | None, candidates: tuple[str, ...]) -> str:
    if file is not None or not Path(ref).is_dir():
        return checkpoint_file(ref, file or candidates[-1])
    for name in candidates:
        if (Path(ref) / name).is_file():
            return str(Path(ref) / name)
    raise RewardLoadError(f"{ref}: none of {list(candidates)} found; set the reward's `file:`")


def load_clip_model(model: str, *, backbone: str | None, file: str | None, dtype: torch.dtype, what: str):
    """A `CLIPModel` from a transformers directory, or a bare state dict laid over `backbone`.

    The ICT/HP releases are state dicts of a fine-tuned laion ViT-H-14 that their code loads with
    `strict=False` over the base model; the same here, except that a key the base model does not have
    is an error (a wrong checkpoint), and keys the file lacks are logged."""
    from transformers import CLIPModel

    if Path(model, "config.json").is_file():
        return CLIPModel.from_pretrained(model, dtype=dtype)
    if backbone is None:
        raise RewardLoadError(f"{what}: {model} is a bare state dict; set the reward's `backbone:` to the base CLIP model")
    sd = load_state_dict(_state_dict_file(model, file, ("model.safetensors", "pytorch_model.bin")))
    clip = CLIPModel.from_pretrained(backbone, dtype=torch.float32)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    missing, unexpected = clip.load_state_dict(sd, strict=False)
    if unexpected:
        raise RewardLoadError(f"{what}: {len(unexpected)} keys the CLIP backbone {backbone} does not have "
                              f"(e.g. {unexpected[:5]}); is it the right checkpoint?")
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        log.warning("%s: %d weights not in the checkpoint keep the backbone's values (e.g. %s)", what, len(missing), missing[:3])
    return clip.to(dtype)


class _CLIPBase:
    def __init__(self, model_id: str, device: str, dtype: str) -> None:
        self.model_id = model_id
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

    def _pixels(self, images) -> torch.Tensor:
        pix = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return pix.to(self.device, self.model.dtype)

    def _image_embeds(self, images) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=self._pixels(images)).pooler_output

    def close(self) -> None:
        self.model = None


class CLIPSimilarity(_CLIPBase):
    """Cosine similarity of CLIP image and text embeddings; `scaled=True` multiplies by the model's
    learned `logit_scale.exp()`, which is PickScore's definition (yuvalkirstain/PickScore_v1)."""

    def __init__(self, path: str, *, scaled: bool, processor: str | None = None, device: str = "auto",
                 dtype: str = "auto") -> None:
        from transformers import CLIPModel

        super().__init__(path, device, dtype)
        self.scaled = scaled
        # PickScore_v1 ships no processor files: its reference loads the laion ViT-H-14 processor.
        self.processor = load_clip_processor(processor or path)
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()

    @torch.inference_mode()
    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        check_lengths(images, prompts)
        out = []
        for sl in batches(len(images), batch_size):
            img_emb = self._image_embeds(images[sl])
            tok = self.processor(text=list(prompts[sl]), padding="max_length", truncation=True, max_length=77,
                                 return_tensors="pt")
            txt_emb = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                   attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            img_emb = img_emb / img_emb.norm(dim=-1, keepdim=True)
            txt_emb = txt_emb / txt_emb.norm(dim=-1, keepdim=True)
            cos = (img_emb * txt_emb).sum(-1).float()
            if self.scaled:
                cos = self.model.logit_scale.exp().float() * cos
            out.append(cos.cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


class ICTScore(_CLIPBase):
    """ICT (image-contained-text): cosine of the fine-tuned CLIP's text and image embeddings. Text ids
    come from open_clip's tokenizer (zero-padded to 77, no attention mask), as in the reference."""

    def __init__(self, path: str, *, backbone: str | None = None, processor: str | None = None, file: str | None = None,
                 device: str = "auto", dtype: str = "auto") -> None:
        from open_clip.tokenizer import SimpleTokenizer

        super().__init__(path, device, dtype)
        self.model = load_clip_model(path, backbone=backbone, file=file, dtype=self.dtype, what=f"ICT {path}")
        self.model = self.model.to(self.device).eval()
        self.processor = load_clip_processor(processor or backbone or path)
        self.tokenizer = SimpleTokenizer(context_length=self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        check_lengths(images, prompts)
        out = []
        for sl in batches(len(images), batch_size):
            img = self._image_embeds(images[sl])
            ids = self.tokenizer(list(prompts[sl])).to(self.device)
            txt = self.model.get_text_features(input_ids=ids).pooler_output
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((img * txt).sum(-1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


class HPScore(_CLIPBase):
    """HP (high preference): sigmoid of an activation-free MLP over the fine-tuned CLIP's raw image
    embedding. Layout of the release: `hp_backbone/` (CLIP) and `hp_scorer/mlp_pytorch_model.bin`."""

    def __init__(self, path: str, *, backbone: str | None = None, processor: str | None = None, file: str | None = None,
                 device: str = "auto", dtype: str = "auto") -> None:
        super().__init__(path, device, dtype)
        if Path(path).is_dir():
            backbone_ref, backbone_file = str(Path(path, "hp_backbone")), file
        else:  # a Hub repo: fetch the backbone's state dict by its path in the repo
            backbone_ref, backbone_file = path, file or "hp_backbone/pytorch_model.bin"
        self.model = load_clip_model(backbone_ref, backbone=backbone, file=backbone_file, dtype=self.dtype,
                                     what=f"HP backbone {path}").to(self.device).eval()
        head = load_state_dict(checkpoint_file(path, "hp_scorer/mlp_pytorch_model.bin"))
        self.head = LinearHead({k[k.index("layers."):]: v for k, v in head.items() if "layers." in k},
                               f"HP scorer {path}").to(self.device, self.dtype).eval()
        self.processor = load_clip_processor(processor or backbone or path)

    @torch.inference_mode()
    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        check_lengths(images, prompts)
        out = []
        for sl in batches(len(images), batch_size):
            emb = self._image_embeds(images[sl])
            out.append(torch.sigmoid(self.head(emb)).squeeze(-1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


class AestheticScore(_CLIPBase):
    """LAION improved-aesthetic-predictor v2: the linear head (`sac+logos+ava1-l14-linearMSE.pth`) over
    the L2-normalised OpenAI CLIP ViT-L/14 image embedding. `path` is the head file (or a directory/repo
    holding `file`); `backbone` the CLIP model. The prompt is not used."""

    HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"

    def __init__(self, path: str, *, backbone: str | None = None, file: str | None = None, device: str = "auto",
                 dtype: str = "auto") -> None:
        from transformers import CLIPModel

        super().__init__(path, device, dtype)
        if backbone is None:
            raise RewardLoadError(f"aesthetic {path}: set the reward's `backbone:` (OpenAI CLIP ViT-L/14)")
        sd = load_state_dict(checkpoint_file(path, file or self.HEAD_FILE))
        self.head = LinearHead(sd, f"aesthetic head {path}").to(self.device).eval()  # float32, as the reference
        self.model = CLIPModel.from_pretrained(backbone, dtype=self.dtype).to(self.device).eval()
        self.size = self.model.config.vision_config.image_size
        if self.head.in_features != self.model.config.projection_dim:
            raise RewardLoadError(f"aesthetic head {path} takes {self.head.in_features}-d embeddings but {backbone} "
                                  f"gives {self.model.config.projection_dim}-d; use the CLIP the head was trained on")

    @torch.inference_mode()
    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        out = []
        for sl in batches(len(images), batch_size):
            pix = clip_pixels(images[sl], self.size).to(self.device, self.model.dtype)
            emb = self.model.get_image_features(pixel_values=pix).pooler_output.float()
            norm = emb.norm(dim=-1, keepdim=True)
            emb = emb / torch.where(norm == 0, torch.ones_like(norm), norm)
            out.append(self.head(emb).squeeze(-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
