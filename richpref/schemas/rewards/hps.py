"""HPSv2 (richpref/models/rewards/hps.py)."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("hpsv2", "hps:HPSv2", ("file", "version"),
                    tiny=TinyTwin("hpsv2", build="rewards:build_tiny_hps", seed=21)),)
