"""The check stage (the filter's VLM questions) with the served backend's behaviour: a pair whose
request failed is rejected with that failure, `p_source` says where each P(yes) came from, and the
filter carries both into its verdicts; the stage's key follows what changes the answers."""
from __future__ import annotations

import pytest

from richpref.models.vlm import YesNo
from richpref.schemas.config import FilterConfig
from richpref.schemas.serving import EngineConfig
from richpref.schemas.tables import CHECKS, VERDICTS
from richpref.tasks import filter as filter_stage
from richpref.tasks import filter_check
from test_vlm_stages import filter_input, vlms  # noqa: F401 - the tiny VLMs fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FailingOnePair:
    """The tiny Qwen, except that every question naming `marker` gets a failed request (as the
    served client reports one after its retries)."""

    def __init__(self, vlm, marker: str) -> None:
        self.vlm, self.marker, self.model_id = vlm, marker, vlm.model_id

    def generate_detailed(self, images, texts, **kw):
        return self.vlm.generate_detailed(images, texts, **kw)

    def yes_no(self, images, texts, **kw):
        answers = self.vlm.yes_no(images, texts, **kw)
        return [YesNo(None, "answer", "vlm_request_failed: HTTP 500 after 2 attempt(s)") if self.marker in t else a
                for a, t in zip(answers, texts)]


def test_a_failed_request_rejects_its_pair_in_check_and_filter(vlms):  # noqa: F811
    rows, prompts, instructions, images = filter_input()
    cfg = FilterConfig(max_new_tokens=8, min_executed=0, min_no_stray=0, min_subject_kept=0, min_attributes_kept=0.01)
    vlm = FailingOnePair(vlms["qwen"], "second dog")  # pair f1's instruction
    checks = filter_check.check_rows(rows, prompts, instructions, images, cfg, lambda: vlm)
    assert checks.schema == CHECKS
    a, b, c = checks.to_pylist()
    assert b["status"] == "rejected" and b["reason"] == "vlm_request_failed: HTTP 500 after 2 attempt(s)"
    assert (a["status"], c["status"]) == ("ok", "ok") and a["p_source"] == c["p_source"] == "logits"
    # the other pairs' answers are those of a run without the failure
    clean = filter_check.check_rows(rows, prompts, instructions, images, cfg, lambda: vlms["qwen"]).to_pylist()
    for got, want in ((a, clean[0]), (c, clean[2])):
        assert got["p_executed_each"] == pytest.approx(want["p_executed_each"], abs=1e-6)
        assert got["p_attr_edited"] == pytest.approx(want["p_attr_edited"], abs=1e-6)
    verdicts = filter_stage.decide_rows(checks, instructions, cfg)
    assert verdicts.schema == VERDICTS
    va, vb, vc = verdicts.to_pylist()
    assert (vb["status"], vb["verdict"], vb["reason"]) == ("rejected", "drop", b["reason"])
    assert vb["model_id"] == vlm.model_id
    assert va["p_source"] == vc["p_source"] == "logits" and va["verdict"] == "keep"


def test_the_check_key_leaves_out_thresholds_transport_and_prefix_sharing():
    view = filter_check.checking_view
    base = view(FilterConfig())
    assert view(FilterConfig(min_executed=0.9, min_subject_kept=0.1)) == base
    assert view(FilterConfig(share_image_prefix=False, batch_size=2)) == base
    endpoint = EngineConfig(backend="server", endpoint="http://127.0.0.1:8000/v1")
    other = EngineConfig(backend="server", endpoint="http://10.0.0.5:8000/v1", concurrency=4)
    assert view(FilterConfig(engine=endpoint)) == view(FilterConfig(engine=other)) != base  # the backend counts
    assert view(FilterConfig(max_attributes=3)) != base
