"""Every reward scorer against a value computed independently in the test.

Each tiny model is written in its release's checkpoint layout (richpref/models/tiny/rewards.py) and
loaded through the real loader; the expected values come from direct transcriptions of the reference
code below (plain torch / numpy on the raw state dicts, PIL preprocessing written out by hand).
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from richpref.models.rewards import RewardLoadError, load_reward, load_reward_spec

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
PROMPTS = ["a red bicycle leaning against a yellow brick wall", "three green apples", "a cat in a box"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    # Square, landscape and portrait sizes exercise the resize / crop / pad arithmetic.
    shapes = [(64, 64), (48, 80), (90, 50)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def clip_transform_by_hand(im: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize, written out."""
    w, h = im.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    im = im.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    im = im.crop((left, top, left + size, top + size)).convert("RGB")
    x = (np.asarray(im, dtype=np.float64) / 255.0 - mean) / std
    return torch.tensor(x.transpose(2, 0, 1), dtype=torch.float32)


def head_by_hand(sd: dict, x: np.ndarray, prefix: str = "") -> np.ndarray:
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"{prefix}layers.{i}.weight"].double().numpy().T + sd[f"{prefix}layers.{i}.bias"].double().numpy()
    return x[..., 0]


# ------------------------------------------------------------------ ImageReward

def imagereward_by_hand(sd, med, ids, mask, pix):
    """BLIP ViT (vit.py) -> BERT with cross-attention (med.py, mode='multimodal') -> MLP, as ImageReward.score."""
    v = lambda k: sd[f"blip.visual_encoder.{k}"]  # noqa: E731
    t = lambda k: sd[f"blip.text_encoder.{k}"]  # noqa: E731
    width, patch = v("cls_token").shape[-1], v("patch_embed.proj.weight").shape[-1]
    heads = width // 64
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("blip.visual_encoder.blocks."))
    b = pix.shape[0]
    x = F.conv2d(pix, v("patch_embed.proj.weight"), v("patch_embed.proj.bias"), stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([v("cls_token").expand(b, -1, -1), x], dim=1) + v("pos_embed")
    n = x.shape[1]
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (width,), v(p + "norm1.weight"), v(p + "norm1.bias"), eps=1e-6)
        qkv = F.linear(h, v(p + "attn.qkv.weight"), v(p + "attn.qkv.bias")).reshape(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1)) * (width // heads) ** -0.5
        h = (att.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, width)
        x = x + F.linear(h, v(p + "attn.proj.weight"), v(p + "attn.proj.bias"))
        h = F.layer_norm(x, (width,), v(p + "norm2.weight"), v(p + "norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, v(p + "mlp.fc1.weight"), v(p + "mlp.fc1.bias"))), v(p + "mlp.fc2.weight"), v(p + "mlp.fc2.bias"))
    image_embeds = F.layer_norm(x, (width,), v("norm.weight"), v("norm.bias"), eps=1e-6)

    hid, nh, eps = med["hidden_size"], med["num_attention_heads"], med["layer_norm_eps"]
    e = t("embeddings.word_embeddings.weight")[ids] + t("embeddings.position_embeddings.weight")[: ids.shape[1]]
    e = F.layer_norm(e, (hid,), t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"), eps=eps)
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0

    def attention(xq, xkv, p, add):
        split = lambda y: y.view(y.shape[0], y.shape[1], nh, hid // nh).permute(0, 2, 1, 3)  # noqa: E731
        q = split(F.linear(xq, t(p + "self.query.weight"), t(p + "self.query.bias")))
        k = split(F.linear(xkv, t(p + "self.key.weight"), t(p + "self.key.bias")))
        val = split(F.linear(xkv, t(p + "self.value.weight"), t(p + "self.value.bias")))
        ctx = ((q @ k.transpose(-1, -2) / math.sqrt(hid // nh) + add).softmax(-1) @ val).permute(0, 2, 1, 3).reshape(xq.shape)
        return F.layer_norm(F.linear(ctx, t(p + "output.dense.weight"), t(p + "output.dense.bias")) + xq, (hid,),
                            t(p + "output.LayerNorm.weight"), t(p + "output.LayerNorm.bias"), eps=eps)

    for i in range(med["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        h = attention(e, e, p + "attention.", extended)
        h = attention(h, image_embeds, p + "crossattention.", 0.0)  # all-ones image mask adds nothing
        inter = F.gelu(F.linear(h, t(p + "intermediate.dense.weight"), t(p + "intermediate.dense.bias")))
        e = F.layer_norm(F.linear(inter, t(p + "output.dense.weight"), t(p + "output.dense.bias")) + h, (hid,),
                         t(p + "output.LayerNorm.weight"), t(p + "output.LayerNorm.bias"), eps=eps)
    r = head_by_hand(sd, e[:, 0].double().numpy(), prefix="mlp.")
    return (r - 0.16717362830052426) / 1.0333394966054072


def test_tiny_imagereward_is_in_the_release_layout(tiny_models):
    sd = torch.load(tiny_models / "imagereward" / "ImageReward.pt", weights_only=True)
    for key in ("blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "blip.visual_encoder.patch_embed.proj.weight",
                "blip.visual_encoder.blocks.1.attn.qkv.weight", "blip.visual_encoder.blocks.0.mlp.fc2.bias",
                "blip.visual_encoder.norm.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
                "blip.text_encoder.embeddings.position_ids", "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
                "blip.text_encoder.encoder.layer.0.attention.output.LayerNorm.bias", "blip.vision_proj.weight",
                "blip.text_proj.bias", "mlp.layers.0.weight", "mlp.layers.6.weight", "mlp.layers.7.bias"):
        assert key in sd, key
    assert not any(k.startswith(("mlp.layers.1.", "mlp.layers.3.", "blip.text_encoder.pooler")) for k in sd)
    med = json.loads((tiny_models / "imagereward" / "med_config.json").read_text())
    assert med["add_cross_attention"] is True and med["encoder_width"] == 768  # the loader must use the ViT width instead
    assert sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape[1] == sd["blip.visual_encoder.cls_token"].shape[-1] != 768


def test_imagereward_matches_the_reference_computation(tiny_models, images):
    from transformers import BertTokenizer

    root = tiny_models / "imagereward"
    reward = load_reward("imagereward", str(root), processor=str(root / "tokenizer"), device="cpu", dtype="float32")
    got = reward.score(images, PROMPTS, batch_size=2)

    sd = {k: v.float() if v.is_floating_point() else v for k, v in torch.load(root / "ImageReward.pt", weights_only=True).items()}
    med = json.loads((root / "med_config.json").read_text())
    tok = BertTokenizer.from_pretrained(root / "tokenizer")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    size = int(math.isqrt(sd["blip.visual_encoder.pos_embed"].shape[1] - 1)) * sd["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    pix = torch.stack([clip_transform_by_hand(im, size) for im in images])
    with torch.no_grad():
        want = imagereward_by_hand(sd, med, enc["input_ids"], enc["attention_mask"], pix)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-6)
    assert np.ptp(want) > 1e-3, "the tiny model should tell these images apart"


def test_imagereward_rejects_a_checkpoint_in_another_layout(tiny_models, tmp_path):
    root = tiny_models / "imagereward"
    sd = torch.load(root / "ImageReward.pt", weights_only=True)
    sd["blip.visual_encoder.blocks.0.attn.qkv_fused.weight"] = sd.pop("blip.visual_encoder.blocks.0.attn.qkv.weight")
    torch.save(sd, tmp_path / "ImageReward.pt")
    shutil.copy(root / "med_config.json", tmp_path)
    with pytest.raises(RewardLoadError, match="qkv_fused"):
        load_reward("imagereward", str(tmp_path), processor=str(root / "tokenizer"), device="cpu")


# ------------------------------------------------------------------ HPSv2

def test_hps_matches_the_reference_computation(tiny_models, images):
    import open_clip

    root = tiny_models / "hpsv2"
    ckpt = torch.load(root / "HPS_v2.1_compressed.pt", weights_only=True)
    assert set(ckpt) == {"state_dict"}
    for key in ("visual.conv1.weight", "visual.class_embedding", "visual.transformer.resblocks.1.attn.in_proj_weight",
                "token_embedding.weight", "positional_embedding", "text_projection", "logit_scale", "ln_final.weight"):
        assert key in ckpt["state_dict"], key
    got = load_reward("hpsv2", str(root), version="v2.1", device="cpu", dtype="float32").score(images, PROMPTS, batch_size=2)

    cfg = json.loads((root / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.CLIP(**cfg).eval()
    model.load_state_dict(ckpt["state_dict"])
    size = cfg["vision_cfg"]["image_size"]
    pix = []
    for im in images:  # ToTensor, tensor resize (bicubic, no antialias) of the longest side, zero pad, normalise
        x = torch.tensor(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        h, w = x.shape[1:]
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False)[0]
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        pix.append((x - torch.tensor(OPENAI_MEAN, dtype=torch.float32)[:, None, None]) / torch.tensor(OPENAI_STD, dtype=torch.float32)[:, None, None])
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack(pix)), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.tokenize(PROMPTS)), dim=-1)
    want = torch.diagonal(img @ txt.T).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_hps_padding_puts_a_landscape_image_in_the_middle():
    from richpref.models.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, hps_pixels

    im = Image.new("RGB", (40, 24), (255, 255, 255))  # 40 wide -> 32 x 19 (round(24*0.8)), 13 rows of padding
    x = hps_pixels([im], 32)[0]
    black = (0 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0]
    white = (1 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0]
    rows = x[0, :, 16].numpy()
    assert np.allclose(rows[:6], black) and np.allclose(rows[6 + 19:], black)  # 6 rows on top, 7 below
    assert np.allclose(rows[6:6 + 19], white, atol=1e-4)


# ------------------------------------------------------------------ CLIP family

def _clip(path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(path).eval()


def _pixels(path, images):
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(path, backend="pil")(images=images, return_tensors="pt")["pixel_values"]


def test_pickscore_and_clip_match_the_model_forward(tiny_models, images, tmp_path):
    from transformers import CLIPProcessor

    path = tiny_models / "pickscore"
    proc = CLIPProcessor.from_pretrained(path, backend="pil")
    model = _clip(path)
    with torch.no_grad():
        out = model(**proc(text=PROMPTS, images=images, padding=True, return_tensors="pt"))
    pick = torch.diagonal(out.logits_per_image).numpy()  # logit_scale.exp() * cos
    cos = pick / model.logit_scale.exp().item()
    np.testing.assert_allclose(load_reward("pickscore", str(path), device="cpu").score(images, PROMPTS, batch_size=2), pick, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(load_reward("clip", str(path), device="cpu").score(images, PROMPTS, batch_size=2), cos, rtol=1e-5, atol=1e-5)

    # PickScore_v1 ships no processor: the reference takes the laion CLIP's; `processor:` says where from.
    bare = tmp_path / "pickscore_v1"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(path / f, bare / f)
    with pytest.raises(Exception):
        load_reward("pickscore", str(bare), device="cpu")
    scored = load_reward("pickscore", str(bare), processor=str(tiny_models / "clip"), device="cpu").score(images, PROMPTS)
    np.testing.assert_allclose(scored, pick, rtol=1e-5, atol=1e-5)


def test_aesthetic_matches_the_reference_computation(tiny_models, images):
    clip_dir = tiny_models / "clip"
    got = load_reward("aesthetic", str(tiny_models / "aesthetic"), backbone=str(clip_dir), device="cpu").score(images, PROMPTS)
    model = _clip(clip_dir)
    size = model.config.vision_config.image_size
    pix = torch.stack([clip_transform_by_hand(im, size) for im in images])
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output).double().numpy()
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    head = torch.load(tiny_models / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    np.testing.assert_allclose(got, head_by_hand(head, emb), rtol=1e-5, atol=1e-5)


def test_ict_and_hp_match_the_reference_computation(tiny_models, images):
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    clip_dir = tiny_models / "clip"
    pix = _pixels(clip_dir, images)

    ict = CLIPModel(CLIPConfig.from_pretrained(clip_dir)).eval()
    ict.load_state_dict(torch.load(tiny_models / "ict" / "pytorch_model.bin", weights_only=True))
    with torch.no_grad():
        img = ict.visual_projection(ict.vision_model(pixel_values=pix).pooler_output)
        # open_clip's tokenizer: zero-padded 77 ids, no attention mask; CLIP pools at the end-of-text token
        txt = ict.text_projection(ict.text_model(input_ids=open_clip.tokenize(PROMPTS)).pooler_output)
    want_ict = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1).numpy()
    got_ict = load_reward("ict", str(tiny_models / "ict"), backbone=str(clip_dir), device="cpu").score(images, PROMPTS, batch_size=2)
    np.testing.assert_allclose(got_ict, want_ict, rtol=1e-5, atol=1e-5)

    hp = CLIPModel(CLIPConfig.from_pretrained(clip_dir)).eval()
    hp.load_state_dict(torch.load(tiny_models / "hp" / "hp_backbone" / "pytorch_model.bin", weights_only=True))
    with torch.no_grad():
        emb = hp.visual_projection(hp.vision_model(pixel_values=pix).pooler_output).double().numpy()  # not normalised
    head = torch.load(tiny_models / "hp" / "hp_scorer" / "mlp_pytorch_model.bin", weights_only=True)
    want_hp = 1.0 / (1.0 + np.exp(-head_by_hand(head, emb)))
    got_hp = load_reward("hp", str(tiny_models / "hp"), backbone=str(clip_dir), device="cpu").score(images, PROMPTS, batch_size=2)
    np.testing.assert_allclose(got_hp, want_hp, rtol=1e-5, atol=1e-5)


def test_a_state_dict_with_foreign_keys_is_refused(tiny_models, tmp_path):
    sd = torch.load(tiny_models / "ict" / "pytorch_model.bin", weights_only=True)
    sd["vision_model.extra_adapter.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(RewardLoadError, match="extra_adapter"):
        load_reward("ict", str(tmp_path), backbone=str(tiny_models / "clip"), device="cpu")


def test_pickled_objects_are_never_unpickled(tmp_path, tiny_models):
    torch.save({"layers.0.weight": torch.zeros(2, 2), "callback": Image.new("RGB", (1, 1))}, tmp_path / "head.pth")
    with pytest.raises(RewardLoadError, match="weights_only"):
        load_reward("aesthetic", str(tmp_path / "head.pth"), backbone=str(tiny_models / "clip"), device="cpu")


# ------------------------------------------------------------------ DINOv2 patch consistency

def test_window_grid_covers_the_whole_image():
    from richpref.models.rewards.dino import window_starts

    assert window_starts(512, 224, 112) == [0, 112, 224, 288]  # the grid stops at 448: one more window flush with 512
    assert window_starts(64, 28, 14) == [0, 14, 28, 36]
    assert window_starts(56, 28, 14) == [0, 14, 28]  # the grid ends on the edge: nothing added
    assert window_starts(224, 224, 112) == [0]


def test_dino_patch_consistency_matches_a_window_by_window_computation(tiny_models, images):
    from transformers import Dinov2Model

    path = tiny_models / "dinov2"
    reward = load_reward("dino_patch", str(path), patch=28, stride=14, device="cpu")
    rng = np.random.default_rng(3)
    original = images[0]  # 64 x 64: windows at 0, 14, 28 and 36 (flush with the edge) in both directions
    edits = [Image.fromarray(np.clip(np.asarray(original, dtype=int) + rng.integers(-40, 40, (64, 64, 3)), 0, 255).astype(np.uint8)),
             images[1]]  # 80 x 48: resized to 64 x 64 before cutting
    got = reward.score_pairs([original, original], edits, ["x", "y"], batch_size=1)

    model = Dinov2Model.from_pretrained(path).eval()

    def embed(arr):
        x = (arr / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        with torch.no_grad():
            return model(pixel_values=torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32)).pooler_output[0].double().numpy()

    a = np.asarray(original, dtype=np.float64)
    for k, edit in enumerate(edits):
        b = np.asarray(edit.resize((64, 64), Image.BICUBIC), dtype=np.float64)
        cos = []
        for top in (0, 14, 28, 36):
            for left in (0, 14, 28, 36):
                ea, eb = embed(a[top:top + 28, left:left + 28]), embed(b[top:top + 28, left:left + 28])
                cos.append(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb))
        assert got[k, 0] == 1.0
        assert got[k, 1] == pytest.approx(np.mean(cos), abs=1e-5)
    assert got[0, 1] < 1.0
    same = reward.score_pairs([original], [original.copy()], ["x"])
    assert same[0, 1] == pytest.approx(1.0, abs=1e-6)
    small = Image.new("RGB", (20, 20), (10, 200, 30))  # smaller than one window: upscaled to 28 x 28
    assert reward.score_pairs([small], [small], ["x"])[0, 1] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------ VLM expected score

def test_vlm_score_is_the_expected_digit_over_the_rendered_question(tiny_models, images):
    from richpref.models.vlm import VisionLanguageModel
    from richpref.prompts import load_template

    reward = load_reward("vlm_score", str(tiny_models / "qwen2.5-vl"), device="cpu", dtype="float32")
    got = reward.score(images, PROMPTS, batch_size=2)
    questions = [load_template("reward_score_v1").replace("{prompt}", p).strip() for p in PROMPTS]
    vlm = VisionLanguageModel.load(str(tiny_models / "qwen2.5-vl"), device="cpu", dtype="float32")
    probs = vlm.option_probabilities(images, questions, [str(m) for m in range(1, 10)], batch_size=1)
    want = (probs / probs.sum(-1, keepdims=True) @ np.arange(1, 10) - 1) / 8
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert ((got >= 0) & (got <= 1)).all()


# ------------------------------------------------------------------ specs

def test_reward_specs_validate_options_per_kind():
    from pydantic import ValidationError

    from richpref.schemas.config import RewardSpec

    RewardSpec(kind="pickscore", model="m", processor="p")
    with pytest.raises(ValidationError, match="takes no backbone"):
        RewardSpec(kind="clip", model="m", backbone="b")
    with pytest.raises(ValidationError, match="needs `backbone:`"):
        RewardSpec(kind="aesthetic", model="m")
    with pytest.raises(ValidationError):
        RewardSpec(kind="mps", model="m")
    with pytest.raises(ValueError, match="unknown reward kind"):
        load_reward("mps", "m")


def test_every_tiny_profile_reward_loads_from_its_spec(tiny_models, images):
    from richpref.models.rewards import is_pairwise
    from richpref.schemas.config import load_profile

    profile = load_profile("tiny", models_root=str(tiny_models))
    for name, spec in profile.score.rewards.items():
        scorer = load_reward_spec(spec, profile.models_root, device="cpu", dtype="float32")
        if is_pairwise(scorer):
            s = scorer.score_pairs(images[:2], images[1:], PROMPTS[:2])
            assert s.shape == (2, 2), name
        else:
            s = scorer.score(images, PROMPTS)
            assert s.shape == (3,), name
        assert np.isfinite(s).all(), name
