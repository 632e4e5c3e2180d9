"""How tables name a reward: the name, plus what makes two scores of one kind incomparable."""
from __future__ import annotations


def reward_titles(rewards: dict[str, dict]) -> dict[str, str]:
    """Reward name -> how the tables name it: `hpsv2 (HPSv2 v2.0)` (v2.0 and v2.1 scores are not comparable)."""
    return {n: f"{n} (HPSv2 {r.get('version') or 'v2.0'})" if r.get("kind") == "hpsv2" else n for n, r in rewards.items()}
