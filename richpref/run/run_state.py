"""A run's state as its last curate flow recorded it (run.json's "state"), and which stages it covers.

No heavy import here: `richpref curate` asks it before spawning its Prefect server, ahead of torch.
"""
from __future__ import annotations

import json

COMPLETED = "completed"
STOPPED_AFTER = "stopped after "  # + the last stage of a flow run with `until`


def ended(ran: list[str], pipeline: list[str]) -> str:
    """The state of a flow that computed the stages `ran` (a prefix of the `pipeline`'s stage names)
    without a failure: completed, or stopped after its last stage (a `--until` run)."""
    return COMPLETED if len(ran) == len(pipeline) else STOPPED_AFTER + ran[-1]


def covers(state: str | None, until: str | None, stages: list[str] | None = None) -> bool:
    """Whether a last flow that ended in `state` recorded every stage up to `until` (None: all):
    "completed" does; "stopped after S" does for an `until` at or before S in `stages` (the pipeline's
    stage names; without them, only S itself)."""
    if state == COMPLETED:
        return True
    if until is None or not state or not state.startswith(STOPPED_AFTER):
        return False
    last = state[len(STOPPED_AFTER):]
    if stages is None or last not in stages or until not in stages:
        return last == until
    return stages.index(last) >= stages.index(until)


def check_same_pipeline(store, profile) -> None:
    """A run folder holds one pipeline's stages: the edit, rebuild and relabel-dataset pipelines share
    stage folders (source, relabel, pairs), so a run of another pipeline would replace the shards the
    first one computed, and with them the keys of all its later stages. ProfileError naming the run."""
    from richpref.schemas.config import ProfileError

    path = f"{store.root}/profile.json"
    if not store.fs.exists(path):
        return  # a new run
    try:
        saved = json.loads(store.fs.cat_file(path))
    except ValueError:
        return  # unreadable: the status command says why; this one rewrites it
    pipeline = saved.get("pipeline", "edit")  # saved before the field existed: the edit pipeline
    if pipeline != profile.pipeline:
        raise ProfileError(f"run {store.run!r} at {store.uri(store.root)} holds the {pipeline} pipeline's shards "
                           f"(profile {saved.get('name', '?')!r}); a {profile.pipeline} profile would replace them: "
                           "give another --run")
