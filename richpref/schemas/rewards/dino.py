"""DINOv2 patch consistency (richpref/models/rewards/dino.py): how much an edit kept of its original."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("dino_patch", "dino:DinoPatchConsistency", ("patch", "stride"), defaults={"patch": 224, "stride": 112},
                    pairwise=True, tiny=TinyTwin("dinov2", build="rewards:build_tiny_dinov2", seed=26)),)
