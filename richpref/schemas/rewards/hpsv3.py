"""HPSv3, a Qwen2-VL judge with a head (richpref/models/rewards/hpsv3.py)."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("hpsv3", "hpsv3:HPSv3", ("backbone", "file", "template"),
                    defaults={"file": "HPSv3.safetensors", "template": "hpsv3_v1"},
                    tiny=TinyTwin("hpsv3", build="head_judges:build_tiny_judge", seed=80, args=("qwen2_vl",))),)
