"""A VLM's expected score over its digit answers (richpref/models/rewards/vlm_score.py)."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("vlm_score", "vlm_score:VLMExpectedScore", ("template", "engine"),
                    defaults={"template": "reward_score_v1"}, tiny=TinyTwin("vlm")),)
