"""ImageReward (richpref/models/rewards/imagereward.py)."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("imagereward", "imagereward:ImageReward", ("processor", "file"),
                    tiny=TinyTwin("imagereward", build="rewards:build_tiny_imagereward", seed=20)),)
