"""CLIP-based rewards (richpref/models/rewards/clip.py): similarity, PickScore, and the heads on CLIP."""
from . import RewardKind, TinyTwin

KINDS = (
    RewardKind("clip", "clip:CLIPSimilarity", ("processor",), fixed={"scaled": False}, tiny=TinyTwin("clip")),
    RewardKind("pickscore", "clip:CLIPSimilarity", ("processor",), fixed={"scaled": True}, tiny=TinyTwin("pickscore")),
    RewardKind("aesthetic", "clip:AestheticScore", ("backbone", "file"),
               tiny=TinyTwin("aesthetic", build="rewards:build_tiny_aesthetic_head", seed=22)),
    RewardKind("ict", "clip:ICTScore", ("backbone", "processor", "file"),
               tiny=TinyTwin("ict", build="rewards:build_tiny_ict", seed=23, needs=("clip",))),
    RewardKind("hp", "clip:HPScore", ("backbone", "processor", "file"),
               tiny=TinyTwin("hp", build="rewards:build_tiny_hp", seed=24, needs=("clip",))),
)
