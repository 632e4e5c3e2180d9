"""EditReward, a Qwen2.5-VL judge of (original, instruction, edit) (richpref/models/rewards/edit_reward.py)."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("edit_reward", "edit_reward:load", ("backbone", "file", "template", "quality_template", "engine"),
                    defaults={"file": "model.safetensors", "template": "edit_reward_following_v1",
                              "quality_template": "edit_reward_quality_v1"},
                    pairwise=True, reads_instruction=True, edit_gate=True, judge_server=True,
                    tiny=TinyTwin("edit_reward", folder="edit-reward", build="head_judges:build_tiny_judge", seed=85,
                                  args=("qwen2_5_vl",))),)
