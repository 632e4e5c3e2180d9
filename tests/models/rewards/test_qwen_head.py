"""HPSv3 and EditReward (Qwen-VL reward-head judges) against transcriptions of their reference code.

References (read, not imported: `hpsv3` pins transformers==4.45.2 and EditReward has no package):
- HPSv3: PyPI `hpsv3` 1.0.0: hpsv3/inference.py:97-147 (prepare_batch, reward), hpsv3/train.py:52-90
  (processor with padding_side="right", `<|Reward|>` added, embeddings resized, rm_head in float32),
  hpsv3/model/qwen2vl_trainer.py:99-106 (ranknet head), :148-241 (forward: embed, visual, masked_scatter,
  text model with no position ids, head, special-token pooling), hpsv3/dataset/utils.py:55-176
  (smart_resize, fetch_image), hpsv3/dataset/data_collator_qwen.py:11-41 (prompt text).
- EditReward: github.com/TIGER-AI-Lab/EditReward @ edb027e: EditReward/inference_vl_edit.py:111-194,
  EditReward/model/qwen2_5_vl_trainer.py:147-154 (heads), :207-276 (one head's pass), :387 (mean of heads),
  EditReward/train_qwen_vl_edit.py:101-143, EditReward/dataset/prompts.py:1-53,
  EditReward/dataset/data_collator_qwen_edit.py:22-26, EditReward/config/EditReward-Qwen2.5-7B-VL.yaml.

Position ids: HPSv3 (transformers 4.45) passes none to the text model, which then uses
`arange(seq_len)` on all three M-RoPE axes; EditReward (4.57) passes none to `Qwen2_5_VLModel` with no
input ids, whose `get_rope_index` then uses `attention_mask.cumsum(-1) - 1`: the same on every
non-padding token under right padding. The transcription below calls today's text model with none
(it uses `arange`, modeling_qwen2_5_vl.py / modeling_qwen2_vl.py `if position_ids is None`).
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from richpref.models.rewards import RewardLoadError, load_reward
from richpref.models.rewards.qwen_head import modern_keys

PROMPTS = ["a red bicycle leaning against a yellow brick wall", "three green apples"]
INSTRUCTIONS = ["make the wall blue", "add a small boat"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(11)
    shapes = [(64, 64), (48, 90)]  # square and landscape: smart_resize's rounding both ways
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


# --- the reference, transcribed ----------------------------------------------------------------------

def ref_smart_resize(height, width, factor=28, min_pixels=256 * 28 * 28, max_pixels=256 * 28 * 28):
    """hpsv3/dataset/utils.py:55-81 (EditReward/dataset/utils.py:55 is the same)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def ref_fetch_image(image: Image.Image) -> Image.Image:
    """hpsv3/dataset/utils.py:84-176, PIL branch: RGB, smart_resize with min = max = 256*28*28, PIL bicubic."""
    image = image.convert("RGB")
    width, height = image.size
    h, w = ref_smart_resize(height, width)
    return image.resize((w, h), Image.BICUBIC)


def ref_processor(base):
    """train.py: AutoProcessor(padding_side='right') + `<|Reward|>`; the image processor of 4.45 (PIL/numpy)."""
    from transformers import AutoImageProcessor, AutoProcessor

    proc = AutoProcessor.from_pretrained(base, padding_side="right")
    proc.image_processor = AutoImageProcessor.from_pretrained(base, backend="pil")
    proc.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    return proc, proc.tokenizer.convert_tokens_to_ids(["<|Reward|>"])


def ref_model(base, ckpt, heads):
    """create_model_and_processor + `model.load_state_dict(state_dict, strict=True)`; the head(s) as
    qwen2vl_trainer.py:99-106 / qwen2_5_vl_trainer.py:147-154 build them (no rm_head_kwargs)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    sd = load_file(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 1)
    # The file's key names are those of the transformers it was saved with; map them to today's by hand.
    body = {}
    for k, v in sd.items():
        if k.startswith(heads):
            continue
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
            k = "model.language_model." + k[6:]
        body[k] = v
    missing, unexpected = model.load_state_dict(body, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    out = []
    for prefix in heads:
        head = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                                   torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        head.load_state_dict({k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}, strict=True)
        out.append(head.float().eval())
    return model.eval(), out


@torch.no_grad()
def ref_forward(model, head, batch, special_ids):
    """qwen2vl_trainer.py:148-241 / qwen2_5_vl_trainer.py:207-276 on today's module names."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    inputs_embeds = model.get_input_embeddings()(input_ids)
    image_embeds = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    image_mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
    inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds.to(inputs_embeds.dtype))
    hidden_states = model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                               position_ids=None, use_cache=False)[0]
    logits = head(hidden_states.float())
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in special_ids:
        mask |= input_ids == i
    return logits[mask, ...].view(input_ids.shape[0], -1)


def ref_batch(proc, conversations, images):
    return proc(text=proc.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True),
                images=images, padding=True, return_tensors="pt")


# --- tests -------------------------------------------------------------------------------------------

def test_smart_size_matches_the_reference():
    from richpref.models.rewards.qwen_head import smart_size

    for h, w in [(64, 64), (48, 90), (512, 512), (1024, 768), (30, 2000), (448, 448), (1, 1), (3000, 2000)]:
        assert smart_size(h, w) == ref_smart_resize(h, w), (h, w)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_size(10, 2100)


OWN = "Score this picture for the caption <{prompt}>.\nScore: <|Reward|>"  # a user's template file


def own_template(tmp_path, name: str, text: str = OWN) -> str:
    (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path / name)


def spy(reward) -> list:
    """What the model sees: every (texts, head) its `run` is given."""
    seen, run = [], reward.run
    reward.run = lambda texts, ims, head: seen.append((texts, head)) or run(texts, ims, head)
    return seen


@pytest.mark.parametrize("own", [False, True])  # richpref's default wording, or a user's template file
def test_hpsv3_matches_its_reference(tiny_models, images, tmp_path, own):
    from richpref.prompts import load_template, render

    from richpref.models.rewards import load_reward_spec
    from richpref.schemas.relabel import RewardSpec

    root = tiny_models / "hpsv3"  # through a profile's spec: `model` and `backbone` resolve under models_root
    spec = RewardSpec(kind="hpsv3", model="hpsv3", backbone="hpsv3/base", template=own_template(tmp_path, "h.txt") if own else None)
    reward = load_reward_spec(spec, str(tiny_models), device="cpu", dtype="float32")
    seen = spy(reward)
    got = reward.score(images, PROMPTS, batch_size=2)

    proc, special = ref_processor(root / "base")
    model, (head,) = ref_model(root / "base", str(root / "HPSv3.safetensors"), ("rm_head",))
    template = OWN if own else load_template("hpsv3_v1")  # the same prompt text on both sides
    assert [render(template, prompt=p) in t for t, p in zip(seen[0][0], PROMPTS)] == [True, True]
    conversations = [[{"role": "user", "content": [
        {"type": "image", "image": im, "min_pixels": 200704, "max_pixels": 200704},
        {"type": "text", "text": render(template, prompt=p)}]}] for im, p in zip(images, PROMPTS)]
    batch = ref_batch(proc, conversations, [ref_fetch_image(im) for im in images])
    want = ref_forward(model, head, batch, special)[:, 0].numpy()  # inference.py:165: rewards[i][0] (mu)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.ptp(want) > 1e-6  # the images are told apart
    # Batching does not change a score (right padding never reaches the reward token).
    np.testing.assert_allclose(reward.score(images[:1], PROMPTS[:1]), got[:1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("own", [False, True])  # richpref's default wording, or a user's two template files
def test_edit_reward_matches_its_reference(tiny_models, images, tmp_path, own):
    from richpref.models.rewards.edit_reward import TEMPLATES
    from richpref.prompts import load_template, render

    root = tiny_models / "edit-reward"
    texts = [OWN, "Is the edit clean? {prompt}\n<|Reward|>"] if own else [load_template(t) for t in TEMPLATES]
    files = {"template": own_template(tmp_path, "f.txt", texts[0]),
             "quality_template": own_template(tmp_path, "q.txt", texts[1])} if own else {}
    reward = load_reward("edit_reward", str(root), backbone=str(root / "base"), device="cpu", dtype="float32", **files)
    seen = spy(reward)
    edits = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
    got = reward.score_pairs(images, edits, INSTRUCTIONS, batch_size=2)
    assert [(head, render(texts[head], prompt=INSTRUCTIONS[0]) in t[0]) for t, head in seen[:2]] == [(0, True), (1, True)]

    proc, special = ref_processor(root / "base")
    model, heads = ref_model(root / "base", str(root / "model.safetensors"), ("rm_heads.head_0", "rm_heads.head_1"))

    def ref_reward(srcs, outs):  # inference_vl_edit.py:111-194: one batch per head (dim1, dim2), mean of heads
        per_head = []
        for head, text in zip(heads, texts):  # the same prompt texts as ours were given
            conversations = [[{"role": "user", "content": [
                {"type": "image", "image": a}, {"type": "image", "image": b},
                {"type": "text", "text": render(text, prompt=t)}]}] for a, b, t in zip(srcs, outs, INSTRUCTIONS)]
            fetched = [ref_fetch_image(im) for a, b in zip(srcs, outs) for im in (a, b)]
            per_head.append(ref_forward(model, head, ref_batch(proc, conversations, fetched), special))
        return torch.mean(torch.stack(per_head, dim=0), dim=0)[:, 0].numpy()  # pooling_strategy: mean; mu

    np.testing.assert_allclose(got[:, 1], ref_reward(images, edits), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[:, 0], ref_reward(images, images), rtol=0, atol=1e-5)  # original = no edit
    assert np.abs(got[:, 1] - got[:, 0]).max() > 1e-7


def test_a_reward_file_missing_from_its_folder_names_it_and_the_fix(tiny_models, tmp_path):
    root = tiny_models / "hpsv3"
    shutil.copytree(root / "base", tmp_path / "base")
    with pytest.raises(RewardLoadError, match=r"HPSv3\.safetensors not found.*set the reward's `file:`"):
        load_reward("hpsv3", str(tmp_path), backbone=str(tmp_path / "base"), device="cpu")


def test_a_hub_judge_not_downloaded_names_the_download(tiny_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tiny_models / "edit-reward"
    with pytest.raises(RewardLoadError, match=r"huggingface-cli download nobody/EditReward-missing model\.safetensors"):
        load_reward("edit_reward", "nobody/EditReward-missing", backbone=str(root / "base"), device="cpu")


def test_a_checkpoint_for_another_backbone_fails_naming_both(tiny_models, tmp_path):
    hps = tiny_models / "hpsv3"
    with pytest.raises(RewardLoadError, match=r"is a 'qwen2_5_vl'.*needs 'qwen2_vl'"):
        load_reward("hpsv3", str(hps), backbone=str(tiny_models / "edit-reward" / "base"), device="cpu")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(hps / "HPSv3.safetensors"))
    del sd["rm_head.3.weight"]
    save_file(sd, str(tmp_path / "HPSv3.safetensors"))
    with pytest.raises(RewardLoadError, match=r"rm_head.*3\.weight"):
        load_reward("hpsv3", str(tmp_path), backbone=str(hps / "base"), device="cpu")


def test_legacy_key_names_map_to_todays():
    sd = {"model.layers.0.mlp.up_proj.weight": 1, "visual.blocks.0.attn.qkv.weight": 2, "lm_head.weight": 3,
          "model.language_model.norm.weight": 4, "model.visual.merger.mlp.0.bias": 5}
    assert modern_keys(sd) == {"model.language_model.layers.0.mlp.up_proj.weight": 1,
                               "model.visual.blocks.0.attn.qkv.weight": 2, "lm_head.weight": 3,
                               "model.language_model.norm.weight": 4, "model.visual.merger.mlp.0.bias": 5}


class PairJudge:
    """A deterministic edit judge: red mean of the judged image plus the instruction's length; records calls."""

    model_id, pairwise = "pair-judge", True

    def __init__(self):
        self.calls = []

    def score_pairs(self, originals, edits, prompts, *, batch_size=8):
        self.calls.append(list(prompts))
        red = lambda im: float(np.asarray(im, dtype=np.float64)[..., 0].mean())  # noqa: E731
        return np.array([[red(a) + len(p), red(b) + len(p)] for a, b, p in zip(originals, edits, prompts)])


class EditsJudge(PairJudge):
    """The same judge with `score_edits` (as EditReward has): relabel then judges each original once."""

    def score_edits(self, originals, edits, instructions, *, batch_size=8):
        self.calls.append(list(instructions))
        return self.score_pairs(originals, edits, instructions)[:, 1]


@pytest.mark.parametrize("judge_cls,calls", [
    (PairJudge, [["make it red", "dim it", "x"]]),
    (EditsJudge, [["make it red", "dim it", "x"], ["make it red", "x"]] * 2),  # each score_edits call also records score_pairs'
])
def test_an_edit_judge_votes_in_relabel_on_the_edit_instructions(judge_cls, calls):
    from relabel_helpers import ChannelValue, solid
    from richpref.schemas.config import RelabelConfig, RewardModel, ScoreConfig
    from richpref.tasks import relabel as relabel_stage

    judge = judge_cls()
    score = ScoreConfig(rewards={"edits": RewardModel(kind="edit_reward", model="-"),
                                 "green": RewardModel(kind="clip", model="-")})
    cfg = RelabelConfig(weights={"edits": 1.0})
    # item a: two candidates; item b: one. The judge reads each row's instructions, not the prompt.
    images = {"original": [solid(10, 0), solid(10, 0), solid(50, 0)], "edited": [solid(30, 0), solid(5, 0), solid(20, 0)],
              "instruction": ["make it red", "dim it", "x"]}
    out = relabel_stage.relabel_rows(["a", "a", "b"], ["prompt a", "prompt a", "prompt b"], images, score, cfg,
                                     {"edits": judge, "green": ChannelValue(1)}.__getitem__, candidates=[0, 1, 0]).to_pylist()
    assert sorted(judge.calls) == sorted(calls)
    by = {(r["item_id"], r["candidate"]): r for r in out}
    # The original's side: the original judged under its item's first row's instructions.
    assert by["a", 0]["edits_0"] == by["a", 1]["edits_0"] == 10 + len("make it red")
    assert (by["a", 0]["edits_1"], by["a", 1]["edits_1"], by["b", 0]["edits_1"]) == (30 + 11, 5 + 6, 20 + 1)
    assert by["b", 0]["edits_0"] == 50 + 1
    assert by["a", 1]["status"] == "rejected" and by["a", 1]["reason"].startswith("not_selected")
    assert by["a", 0]["chosen"] == 1 and by["b", 0]["chosen"] == 0  # b's edit judged worse than no edit: flipped


def test_a_tiny_edit_reward_scores_through_relabel_as_it_does_alone(tiny_models, images):
    from richpref.common.images import encode_png
    from richpref.schemas.config import RewardModel, ScoreConfig
    from richpref.tasks.score import score_rows

    root = tiny_models / "edit-reward"
    judge = load_reward("edit_reward", str(root), backbone=str(root / "base"), device="cpu", dtype="float32")
    cfg = ScoreConfig(rewards={"edit_reward": RewardModel(kind="edit_reward", model=str(root), backbone=str(root / "base"))})
    edit = images[0].transpose(Image.FLIP_TOP_BOTTOM)
    row = score_rows(["a"], ["a prompt"], {"original": [encode_png(images[0])], "edited": [encode_png(edit)],
                                           "instruction": [INSTRUCTIONS[0]]}, cfg, lambda name: judge).to_pylist()[0]
    want = judge.score_pairs([images[0]], [edit], INSTRUCTIONS[:1])[0]
    assert (row["edit_reward_0"], row["edit_reward_1"]) == pytest.approx(tuple(want), abs=1e-6)


def test_an_edit_judge_gates_edits_it_scores_below_the_threshold():
    from pydantic import ValidationError

    from relabel_helpers import ChannelValue, solid
    from richpref.schemas.config import Profile, RelabelConfig, RewardModel, ScoreConfig, config_hash
    from richpref.tasks import relabel as relabel_stage

    score = ScoreConfig(rewards={"red": RewardModel(kind="clip", model="-"), "judge": RewardModel(kind="edit_reward", model="-")})
    cfg = RelabelConfig(weights={"red": 1.0}, edit_gate={"reward": "judge", "min_score": 20})
    images = {"original": [solid(10, 0), solid(50, 0)], "edited": [solid(30, 0), solid(12, 0)], "instruction": ["x", "y"]}
    out = relabel_stage.relabel_rows(["a", "b"], ["p", "p"], images, score, cfg,
                                     {"red": ChannelValue(0), "judge": PairJudge()}.__getitem__).to_pylist()
    assert out[0]["status"] == "ok" and out[0]["chosen"] == 1
    assert out[1]["status"] == "rejected"
    assert out[1]["reason"] == "edit_judged_poor: judge 13 < relabel.edit_gate.min_score 20"
    at = cfg.model_copy(update={"edit_gate": cfg.edit_gate.model_copy(update={"min_score": 13.0})})
    again = relabel_stage.relabel_rows(["a", "b"], ["p", "p"], images, score, at,
                                       {"red": ChannelValue(0), "judge": PairJudge()}.__getitem__).to_pylist()
    assert again[1]["status"] == "ok"  # a score at the threshold passes (untested before; a mutation sweep)
    # The gate is relabel's (its key), and must name an edit judge of score.rewards.
    assert config_hash(RelabelConfig(weights={"red": 1.0})) != config_hash(cfg)
    with pytest.raises(ValidationError, match="edit_gate.reward 'red' is not a scored edit judge.*in score.rewards: \\['judge'\\]"):
        Profile(name="p", score=score, relabel=RelabelConfig(weights={"red": 1.0}, edit_gate={"reward": "red", "min_score": 0}))


def _doctor_with(tmp_path, tiny_models, capsys, reward: dict) -> tuple[int, str]:
    from pathlib import Path

    import yaml

    from richpref.cli.commands import main

    repo = Path(__file__).resolve().parents[3]
    data = yaml.safe_load((repo / "configs" / "tiny.yaml").read_text())
    data.update(models_root=str(tiny_models))
    data["source"]["path"] = str(repo / data["source"]["path"])
    data["score"]["rewards"]["judge"] = reward
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(data))
    rc = main(["--data-dir", str(tmp_path / "data"), "doctor", "--profile", str(tmp_path / "profile.yaml"), "--items", "2"])
    return rc, capsys.readouterr().err


def test_doctor_fails_on_a_judge_not_downloaded_naming_it_and_the_download(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = _doctor_with(tmp_path, tiny_models, capsys, {"kind": "hpsv3", "model": "nobody/HPSv3-missing",
                                                           "backbone": "hpsv3/base"})
    assert rc == 3 and "score: model 'nobody/HPSv3-missing' cannot be loaded" in err
    assert "huggingface-cli download nobody/HPSv3-missing" in err and "doctor: sample:" not in err


def test_doctor_fails_on_a_judge_folder_without_its_checkpoint(tiny_models, tmp_path, capsys):
    judge = tmp_path / "edit-judge"
    shutil.copytree(tiny_models / "edit-reward" / "base", judge / "base")
    rc, err = _doctor_with(tmp_path, tiny_models, capsys, {"kind": "edit_reward", "model": str(judge),
                                                           "backbone": str(judge / "base")})
    assert rc == 3 and f"{judge} holds no reward checkpoint 'model.safetensors'" in err
    assert f"--local-dir {judge}" in err and "score.rewards.judge.file" in err


def test_relabel_dataset_refuses_an_edit_judge_on_independent_pairs():
    from richpref.recipes.relabel_dataset import DatasetError, dataset_relabel_config
    from richpref.schemas.config import RelabelConfig, RewardModel, ScoreConfig

    score = ScoreConfig(rewards={"red": RewardModel(kind="clip", model="-"), "judge": RewardModel(kind="edit_reward", model="-")})
    with pytest.raises(DatasetError, match=r"\['judge'\] judge an edit against its original"):
        dataset_relabel_config(score, RelabelConfig(), None)
    assert list(dataset_relabel_config(score, RelabelConfig(), "red")[0].rewards) == ["red"]
