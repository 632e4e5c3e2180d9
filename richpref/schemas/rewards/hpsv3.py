"""HPSv3, a Qwen2-VL judge with a head (richpref/models/rewards/hpsv3.py)."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("hpsv3", "hpsv3:load", ("backbone", "file", "template", "engine"),
                    defaults={"file": "HPSv3.safetensors", "template": "hpsv3_v1"}, judge_server=True,
                    tiny=TinyTwin("hpsv3", build="head_judges:build_tiny_judge", seed=80, args=("qwen2_vl",))),)
