"""The generative judges `unified_reward` and `edit_score`: answer parsing against hand-worked
answers, the questions they ask, in-process scoring on the tiny Qwen2.5-VL (and its tiny LoRA), the
score stage's handling of answers that give no score, config and missing-weight errors; then the
same judges through an OpenAI-compatible server (`transformers serve` on the tiny Qwen2.5-VL with
EditScore's tiny LoRA merged in) against the in-process judges: the same answers, so the same scores
(NaN where the answer gives none, with the same raw text). One server for the module, launched by the
edit_score judge itself (engine.launch: the LoRA is merged once and the merged model served);
unified_reward and a second edit_score client use it as an endpoint. The server is stopped by pid and
checked gone."""
from __future__ import annotations

import math

import numpy as np
import pytest

from richpref.common.images import encode_png
from richpref.models.rewards import load_reward, load_reward_spec
from richpref.models.rewards.judge_chat import ask, qwen_resize
from richpref.models.rewards.judge_parse import edit_score, final_score, score_list
from richpref.schemas.config import Profile, RelabelConfig, RewardModel, RewardSpec, ScoreConfig
from richpref.schemas.serving import EngineConfig
from process_helpers import gone
from vlm_helpers import PROMPTS, image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def merged_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RICHPREF_CACHE", str(tmp_path_factory.getbasetemp() / "richpref-cache"))


# ---------------------------------------------------------------- parsing


def test_final_score_reads_the_first_final_score_in_range():
    assert final_score("cat (object): 1\ndog (object): 0\nFinal Score: 4") == 4.0
    assert final_score("Final Score: 3.5 then Final Score: 2") == 3.5
    assert final_score("Final Score:\n 5.") == 5.0
    for bad in ("Final Score: 7", "final score: 3", "Score: 4", "", None, "Final Score: 0"):
        assert final_score(bad) is None, bad


def test_score_list_reads_json_python_literals_bad_quotes_and_bare_numbers():
    assert score_list('{"reasoning": "ok", "score": [20, 15]}') == [20.0, 15.0]
    assert score_list("Here: {'reasoning': 'fine', 'score': [7, 8.5]} done") == [7.0, 8.5]
    assert score_list('{"reasoning": "the "hat" is there", "score": [9, 3]}') == [9.0, 3.0]  # unescaped quotes
    assert score_list('{reasoning: "x", score: [1, 2]}') == [1.0, 2.0]  # bare keys
    assert score_list('reasoning: weird, "score": 12 and 4') == [12.0, 4.0]  # no object: numbers after score
    assert score_list('{"reasoning": "no numbers here"}') == []
    assert score_list("") == [] and score_list(None) == []


@pytest.mark.parametrize("answer,scores", [
    # the object's scores, not the numbers around it or in its reasoning (which the last-resort reading would take)
    ("Answer 1: {'score': [7, 8], 'reasoning': 'the 2 cats'} (out of 10)", [7, 8]),
    ("{'score': [3, 4], 'valid': True, 'off': False, 'note': None, 'reasoning': 'step 2'}", [3, 4]),
    ('{"score": [9, 3], "reasoning": "the "hat" is 1 of 2"}', [9, 3]),
    ('{score: [1, 2], reasoning: "x 5"}', [1, 2]),
    ('{\n "reasoning": "a",\n "score": [4, 5]\n}\nof 10', [4, 5]),
    ('{"score": 7, "reasoning": "a 1"}', [7]),  # one number
    ('{"score": ["7", null, 8.5, true], "reasoning": "3 of them"}', [7, 8.5]),  # numbers as text; no null or bool
    ('{"score": true, "reasoning": "r 4"}', []),  # a bool is no score
    ('{"rationale": "looks like 3 cats"}', []),  # a reason without a score gives none
    ('{"reason": "looks like 3 cats"}', []),
    ('step 1: "Score": 6', [6]),  # no object: the numbers after the key, in any case
])
def test_score_list_reads_the_objects_scores_not_the_numbers_around_it(answer, scores):
    assert score_list(answer) == scores


def test_edit_score_is_sqrt_of_the_minima_on_ten_and_nan_without_a_usable_score():
    got = edit_score('{"reasoning": "a", "score": [20, 15]}', '{"reasoning": "b", "score": [25, 10]}', 25)
    assert got["semantics"] == pytest.approx(6.0) and got["quality"] == pytest.approx(4.0)
    assert got["overall"] == pytest.approx(math.sqrt(24.0))
    assert math.isnan(edit_score('{"reasoning": "a"}', '{"score": [5, 5]}', 25)["overall"])  # no SC score
    assert math.isnan(edit_score('{"score": [30, 27]}', '{"score": [5, 5]}', 25)["overall"])  # min 27/2.5 > 10
    assert math.isnan(edit_score('{"score": [-1, 20]}', '{"score": [5, 5]}', 25)["overall"])
    assert edit_score('{"score": [0, 9]}', '{"score": [5]}', 10)["overall"] == 0.0
    assert edit_score('{"score": [25]}', '{"score": [10]}', 25)["semantics"] == 10.0  # the top of the scale counts


# ---------------------------------------------------------------- questions and preprocessing


def test_qwen_resize_rounds_sides_to_multiples_of_28_within_the_pixel_bounds():
    assert qwen_resize(image(0, (100, 60))).size == (112, 56)
    assert qwen_resize(image(0, (10, 10))).size == (56, 56)  # below 4*28*28 pixels: scaled up
    big = qwen_resize(image(0, (5000, 4000)), max_pixels=1000 * 28 * 28)
    assert big.size[0] % 28 == 0 and big.size[1] % 28 == 0 and big.size[0] * big.size[1] <= 1000 * 28 * 28


def test_edit_score_asks_the_labelled_two_image_question_the_reference_renders(tiny_models):
    judge = load_reward("edit_score", str(tiny_models / "qwen2.5-vl"), adapter=str(tiny_models / "editscore-lora"),
                        device="cpu", dtype="float32", max_new_tokens=4)
    try:
        sem, qual = judge.questions(image(1), image(2), "Make the apple red")
        content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in sem]
        text = judge.vlm.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                       tokenize=False)
        assert "user\n<img1>: <|vision_start|><|image_pad|><|vision_end|><img2>: <|vision_start|>" in text
        assert text.rstrip().endswith("Editing instruction: Make the apple red<|im_end|>\n<|im_start|>assistant")
        assert "0 to 25" in sem[-1] and "{" in sem[-1] and "0 to 25" in qual[-1]
        assert [p.size for p in sem if not isinstance(p, str)] == [(56, 56), (56, 56)] and len(qual) == 3
    finally:
        judge.close()


# ---------------------------------------------------------------- in-process on tiny twins


@pytest.mark.parametrize("folder", ["qwen2.5-vl", "llava-critic"])  # UnifiedReward-qwen-* / UnifiedReward-7b
def test_unified_reward_scores_are_the_parsed_greedy_answers(tiny_models, folder):
    reward = load_reward("unified_reward", str(tiny_models / folder), device="cpu", dtype="float32",
                         max_new_tokens=12)
    try:
        assert reward.qwen == (folder == "qwen2.5-vl")  # the qwen_vl_utils resize is Qwen's reference's alone
        imgs = [image(k) for k in range(3)]
        got = reward.score(imgs, PROMPTS)
        answers = reward.answers(imgs, PROMPTS, batch_size=1)  # batch composition does not change the answer
        want = [final_score(a.text) for a in answers]
        assert [None if math.isnan(g) else g for g in got] == want
        assert reward.unparsed == {k: a.text for k, a in enumerate(answers) if want[k] is None}
        assert "Text Caption: [a red apple on a wooden table]" in reward.question(imgs[0], PROMPTS[0])[1]
    finally:
        reward.close()


def test_the_tiny_lora_changes_the_judge_and_is_merged_once(tiny_models, tmp_path):
    from richpref.models.rewards.judge_chat import merged_dir

    base, lora = str(tiny_models / "qwen2.5-vl"), str(tiny_models / "editscore-lora")
    first = merged_dir(base, lora)
    assert merged_dir(base, lora) == first and (first / "config.json").is_file()
    judge = load_reward("edit_score", base, adapter=lora, device="cpu", dtype="float32", max_new_tokens=10)
    plain = load_reward("unified_reward", base, device="cpu", dtype="float32")
    try:
        q = [judge.questions(image(1), image(2), "Add a hat")[0]]
        assert ask(judge.vlm, q, max_new_tokens=10)[0].text != ask(plain.vlm, q, max_new_tokens=10)[0].text
        s = judge.score_edits([image(1), image(3)], [image(2), image(4)], ["Add a hat", "Turn the car blue"])
        assert s.shape == (2,) and len(judge.details) == 2
        assert all(math.isnan(v) == (k in judge.unparsed) for k, v in enumerate(s))
        with pytest.raises(TypeError, match="score_edits"):
            judge.score([image(1)], ["x"])
    finally:
        judge.close()
        plain.close()



def test_merging_a_judges_lora_shows_no_deprecation_notice_of_peft(tiny_models, tmp_path, monkeypatch):
    """peft reads transformers' deprecated `is_gradient_checkpointing`: the FutureWarning names peft's
    code, not the user's, and showed at every merge (and in `make demo`'s tiny build)."""
    import warnings

    from richpref.models.rewards.judge_chat import merged_dir

    monkeypatch.setenv("RICHPREF_CACHE", str(tmp_path))  # a fresh cache: the merge runs here
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        merged_dir(str(tiny_models / "qwen2.5-vl"), str(tiny_models / "editscore-lora"))
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]

# ---------------------------------------------------------------- the score stage


def test_an_unparsed_judge_answer_is_recorded_and_rejects_its_pair_keeping_the_raw_text(tiny_models):
    from richpref.tasks.relabel import decide_rows
    from richpref.tasks.score import score_rows

    cfg = ScoreConfig(device="cpu", rewards={"es": {"kind": "edit_score", "model": str(tiny_models / "qwen2.5-vl"),
                                                      "adapter": str(tiny_models / "editscore-lora"),
                                                      "max_new_tokens": 6}})
    judge = load_reward_spec(cfg.rewards["es"], device="cpu", dtype="float32")
    try:
        images = {"original": [encode_png(image(1)), encode_png(image(1))],
                  "edited": [encode_png(image(2)), encode_png(image(3))]}
        instr = ["Add a hat", "Add a scarf"]
        scores = score_rows(["a", "a"], [PROMPTS[0]] * 2, images, cfg, lambda name: judge, candidates=[0, 1],
                            instructions=instr)
        assert scores.column("status").to_pylist() == ["ok", "ok"]  # the score stage records, relabel decides
        table = decide_rows(scores, cfg, RelabelConfig()).to_pylist()
        # what the judge answers when asked directly: the original as the edit that changes nothing
        direct = judge.score_edits([image(1), image(1), image(1)], [image(1), image(2), image(3)],
                                   ["Add a hat", "Add a hat", "Add a scarf"])
        for k, row in enumerate(table):
            if math.isnan(direct[0]) or math.isnan(direct[k + 1]):
                raw = judge.unparsed[0] if math.isnan(direct[0]) else judge.unparsed[k + 1]
                assert row["status"] == "rejected" and row["reason"].startswith("unparsed_answer: es answered ")
                assert row["reason"].endswith(repr(raw[:400]))
            else:
                assert row["status"] == "ok" and row["es_1"] == pytest.approx(direct[k + 1])
        with pytest.raises(ValueError, match="instructions"):
            score_rows(["a"], [PROMPTS[0]], {k: v[:1] for k, v in images.items()}, cfg, lambda name: judge)
    finally:
        judge.close()


# ---------------------------------------------------------------- configs and missing weights


def test_judge_options_fit_their_kind_and_stay_out_of_other_rewards_keys():
    with pytest.raises(ValueError, match="takes no adapter"):
        RewardSpec(kind="unified_reward", model="CodeGoat24/UnifiedReward-qwen-7b", adapter="x/y")
    with pytest.raises(ValueError, match="takes no max_new_tokens"):
        RewardSpec(kind="clip", model="openai/clip", max_new_tokens=3)
    from richpref.tasks.score import scoring_view

    view = scoring_view(ScoreConfig())["rewards"]["imagereward"]
    judged = ScoreConfig(rewards={**ScoreConfig().rewards, "es": RewardModel(kind="edit_score", model="m", adapter="a")})
    assert scoring_view(judged)["rewards"]["imagereward"] == view and view["adapter"] is None


def test_a_missing_adapter_fails_naming_it(tiny_models, tmp_path):
    from richpref.models.runtime import ModelNotAvailable

    spec = RewardSpec(kind="edit_score", model=str(tiny_models / "qwen2.5-vl"), adapter=str(tmp_path / "no-lora"))
    with pytest.raises(ModelNotAvailable, match="no-lora"):
        load_reward_spec(spec, device="cpu")


def test_tiny_judges_profile_resolves_its_judges_and_keys_their_questions(tiny_models, tmp_path):
    from richpref.doctor.checks import ModelProblem, preflight
    from richpref.schemas.config import load_profile
    from richpref.tasks.score import templates_key

    profile = load_profile("tiny-judges", models_root=str(tiny_models))
    assert profile.score.scored() == ["imagereward", "unified_reward", "edit_score", "hpsv3", "edit_reward"]
    refs, _ = preflight(profile)
    assert {r.field for r in refs} >= {"score.rewards.edit_score.adapter", "score.rewards.unified_reward.model",
                                       "score.rewards.hpsv3.backbone", "score.rewards.edit_reward.model"}
    key = templates_key(profile)
    assert all(f"{t}_v1=" in key for t in ("edit_score", "unified_reward", "hpsv3", "edit_reward_following",
                                           "edit_reward_quality"))
    # doctor's preflight names a judge whose adapter is missing, and the fix
    root = tmp_path / "models"
    root.mkdir()
    for sub in tiny_models.iterdir():
        if not (root / sub.name).exists() and sub.name != "editscore-lora":
            (root / sub.name).symlink_to(sub)
    with pytest.raises(ModelProblem) as exc:
        preflight(load_profile("tiny-judges", models_root=str(root)))
    assert "editscore-lora" in str(exc.value) and "build-tiny" in str(exc.value)


def test_a_launched_vllm_takes_the_edit_judges_two_images_per_request():
    from richpref.models.rewards.judge_chat import judge_engine
    from richpref.models.vlm_server import launch_command
    from richpref.schemas.serving import EngineConfig

    vllm = EngineConfig(backend="server", launch="vllm")
    cmd = launch_command("vllm", "m", "m", 8000, extra_args=judge_engine(vllm, 2).extra_args)
    flags = [k for k, a in enumerate(cmd) if a == "--limit-mm-per-prompt"]
    assert cmd[flags[-1] + 1] == '{"image": 2}'  # the last one given is the one vLLM keeps
    assert judge_engine(vllm, 1) is vllm and judge_engine(None, 2) is None
    mine = EngineConfig(backend="server", launch="vllm", extra_args=["--limit-mm-per-prompt", '{"image": 4}'])
    assert judge_engine(mine, 2) is mine


class RedEditJudge:
    """A deterministic edit_score stand-in on its 0..10 scale: the judged edit's red mean / 25.5; no
    score (NaN, raw answer kept) for an edit with any blue."""

    model_id, edit_judge = "red-edit-judge", True

    def score_edits(self, originals, edits, instructions, *, batch_size=8):
        import numpy as np

        px = [np.asarray(e, dtype=np.float64) for e in edits]
        self.unparsed = {k: "I cannot tell." for k, p in enumerate(px) if p[..., 2].mean() > 0}
        return np.array([math.nan if k in self.unparsed else p[..., 0].mean() / 25.5 for k, p in enumerate(px)])


def test_edit_score_gates_edits_on_its_0_to_10_scale():
    from relabel_helpers import ChannelValue, solid
    from richpref.tasks import relabel as relabel_stage

    score = ScoreConfig(rewards={"red": RewardModel(kind="clip", model="-"), "es": RewardModel(kind="edit_score", model="-")})
    cfg = RelabelConfig(weights={"red": 1.0}, edit_gate={"reward": "es", "min_score": 5})
    images = {"original": [solid(10, 0), solid(50, 0), solid(40, 0)], "edited": [solid(204, 0), solid(102, 0), solid(200, 0, 9)],
              "instruction": ["x", "y", "z"]}
    out = relabel_stage.relabel_rows(["a", "b", "c"], ["p"] * 3, images, score, cfg,
                                     {"red": ChannelValue(0), "es": RedEditJudge()}.__getitem__).to_pylist()
    assert out[0]["status"] == "ok" and out[0]["es_1"] == pytest.approx(8.0)  # 204 / 25.5
    assert out[1]["reason"] == "edit_judged_poor: es 4 < relabel.edit_gate.min_score 5"
    assert out[2]["reason"] == "unparsed_answer: es answered 'I cannot tell.'"  # no score: never let through
    with pytest.raises(ValueError, match="min_score 20 is outside edit_score's scale 0..10"):
        Profile(name="p", score=score, relabel=RelabelConfig(weights={"red": 1.0}, edit_gate={"reward": "es", "min_score": 20}))


# The generative judges through an OpenAI-compatible server against the in-process judges

LAUNCH = EngineConfig(backend="server", launch="transformers", startup_timeout_s=240, retries=1)
TOKENS = 12


@pytest.fixture(scope="module")
def launched(tiny_models, tmp_path_factory):
    import os

    os.environ["RICHPREF_CACHE"] = str(tmp_path_factory.getbasetemp() / "richpref-cache")
    base, lora = str(tiny_models / "qwen2.5-vl"), str(tiny_models / "editscore-lora")
    judge = load_reward("edit_score", base, adapter=lora, engine=LAUNCH, device="cpu", dtype="float32",
                        max_new_tokens=TOKENS)
    pid = judge.vlm.server.pid
    try:
        yield judge, base, lora
    finally:
        judge.close()
        assert gone(pid), "a launched judge server outlived its judge"


def endpoint(judge) -> EngineConfig:
    return EngineConfig(backend="server", endpoint=judge.vlm.base_url, served_model=judge.vlm.served_name, retries=1)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


def test_edit_score_served_equals_in_process(launched):
    served, base, lora = launched
    local = load_reward("edit_score", base, adapter=lora, device="cpu", dtype="float32", max_new_tokens=TOKENS)
    try:
        originals, edits = [image(k) for k in range(3)], [image(10 + k) for k in range(3)]
        instructions = ["Make the apple red", "Add a second dog", "Turn the car blue"]
        got = served.score_edits(originals, edits, instructions)
        want = local.score_edits(originals, edits, instructions, batch_size=3)
        assert same(got, want), (got, want)
        assert served.unparsed == local.unparsed and str(served.details) == str(local.details)
        assert len(local.unparsed) + int(np.isfinite(want).sum()) == 3
    finally:
        local.close()


def test_unified_reward_served_equals_in_process(launched):
    served_judge, _, _ = launched
    merged = served_judge.vlm.model_id  # the merged model the server serves
    spec = RewardSpec(kind="unified_reward", model=merged, max_new_tokens=TOKENS, engine=endpoint(served_judge))
    served = load_reward_spec(spec, device="cpu")
    local = load_reward("unified_reward", merged, device="cpu", dtype="float32", max_new_tokens=TOKENS)
    try:
        imgs = [image(k) for k in range(3)]
        got, want = served.score(imgs, PROMPTS), local.score(imgs, PROMPTS, batch_size=2)
        assert same(got, want) and served.unparsed == local.unparsed, (served.unparsed, local.unparsed)
    finally:
        served.close()
        local.close()
    assert served_judge.vlm.server.alive()  # a client of an endpoint never stops the server


def test_an_endpoint_judge_reports_a_failed_request_as_its_raw_reason(launched):
    served_judge, base, lora = launched
    engine = EngineConfig(backend="server", endpoint=served_judge.vlm.base_url, served_model="no-such-model", retries=0)
    judge = load_reward("edit_score", base, adapter=lora, engine=engine, device="cpu", max_new_tokens=TOKENS)
    try:
        s = judge.score_edits([image(1)], [image(2)], ["Add a hat"])
        assert math.isnan(s[0]) and "vlm_request_failed" in judge.unparsed[0]
    finally:
        judge.close()
