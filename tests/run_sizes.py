"""Overrides that make a tiny curate run cheaper where a test looks at none of what they drop.

Most of a tiny run's time is fixed cost (imports, model loads, Prefect calls), not per-item compute:
the score stage of the tiny profile loads eight rewards, seven of them report-only. Tests of the
runner (crash/resume, leases, workers, deployments, rounds) keep ImageReward, the one reward that
votes, and the DINOv2 subject gate, so the pairs are still decided by the real relabel path.
Tests of the rewards themselves use the full tiny profile (tests/models/test_rewards.py, tests/tasks/).
"""
from __future__ import annotations

ONE_REWARD = [
    "score.rewards={imagereward: {kind: imagereward, model: imagereward, processor: imagereward/tokenizer}}",
    "relabel.weights={imagereward: 1.0}",
]


def as_set_args(overrides: list[str]) -> list[str]:
    """`--set` arguments of the CLI for a list of overrides."""
    return [x for o in overrides for x in ("--set", o)]


# The runner tests' small run: 4 prompts in 2 shards, one voting reward. The crash/resume, lease and
# multi-node tests compare their pairs with one uninterrupted run of it (tests/conftest.py small_reference).
SMALL_ARGS = as_set_args(["source.limit=4", "source.shard_size=2", *ONE_REWARD])
