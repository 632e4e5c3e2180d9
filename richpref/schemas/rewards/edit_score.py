"""EditScore, a generative judge of (original, instruction, edited) (richpref/models/rewards/edit_score.py)."""
from . import RewardKind, TinyTwin

KINDS = (RewardKind("edit_score", "edit_score:EditScore", ("adapter", "template", "engine", "max_new_tokens"),
                    defaults={"template": "edit_score_v1", "max_new_tokens": 512}, on_cutout=False,
                    reads_instruction=True, edit_gate=True, gate_scale=(0.0, 10.0), tiny=TinyTwin("edit_score_lora")),)
