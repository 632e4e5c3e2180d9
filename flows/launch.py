"""Start the finetune deployment when a curate run is done, exactly once per set of pairs.

The idempotency key is a hash of the pairs shards' manifests (their URIs and content hashes): a
retried or repeated curate run that produced the same pairs gets the flow run that already exists,
new pairs get a new one, which trains into a folder of its own (the finetune flow's `pairs_key`).
"""
from __future__ import annotations

import hashlib
import json
import logging

log = logging.getLogger("richpref")


def pairs_key(summary: dict) -> str:
    """Content key of a curate run's pairs: sha256 over the pairs shards' (uri, sha256), in shard order."""
    shards = sorted(summary.get("manifests", {}).get("pairs", []), key=lambda m: m["shard"])
    if not shards:
        raise ValueError("the curate summary lists no pairs shards; nothing to fine-tune on")
    payload = json.dumps([[m["uri"], m["sha256"]] for m in shards])
    return hashlib.sha256(payload.encode()).hexdigest()


def launch_finetune(summary: dict, deployment: str, parameters: dict | None = None) -> str | None:
    """Run `deployment` (e.g. "finetune/sd15-dpo") on the run's pairs without waiting; return the flow
    run id, or None when the run kept no pairs."""
    from prefect.deployments import run_deployment

    kept = sum(m.get("kept", 0) for m in summary.get("manifests", {}).get("pairs", []))
    if kept == 0:
        log.warning("curate run %s kept no pairs: not starting %s", summary.get("run"), deployment)
        return None
    content = pairs_key(summary)
    key = f"finetune-{content[:32]}"
    # pairs_key: the flow trains these pairs into a folder of their own (data/finetune/<config>-<key>)
    flow_run = run_deployment(deployment, parameters={"pairs": summary["pairs"], "pairs_key": content,
                                                      **(parameters or {})},
                              timeout=0, idempotency_key=key)
    log.info("finetune deployment %s: flow run %s (idempotency key %s)", deployment, flow_run.id, key)
    return str(flow_run.id)
