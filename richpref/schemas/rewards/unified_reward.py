"""UnifiedReward, a generative judge (richpref/models/rewards/unified_reward.py)."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("unified_reward", "unified_reward:UnifiedReward", ("template", "engine", "max_new_tokens"),
                    defaults={"template": "unified_reward_v1", "max_new_tokens": 512}, tiny=TinyTwin("vlm")),)
