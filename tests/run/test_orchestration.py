"""The curate flow's side of Prefect: a stage's progress artifact costs one API round trip every few
seconds at most, and shows the stage's last count at its end."""
from __future__ import annotations

import richpref.run.orchestration as orchestration
from richpref.run.orchestration import StageProgress


def test_progress_is_updated_at_most_every_interval_and_always_at_the_end(monkeypatch):
    sent = []
    monkeypatch.setattr(orchestration, "create_progress_artifact", lambda pct, description: sent.append(("new", pct)) or "id")
    monkeypatch.setattr(orchestration, "update_progress_artifact", lambda artifact, pct: sent.append((artifact, pct)))
    now = [100.0]
    progress = StageProgress("r: critique shards", total=10, done=2, every_s=2.0, clock=lambda: now[0])
    for done in (3, 4, 5):  # shards ending within two seconds of the last update
        now[0] += 0.5
        progress.report(done)
    assert sent == [("new", 20.0)]
    now[0] += 0.6  # 2.1 s after it
    progress.report(6)
    progress.report(7)
    assert sent == [("new", 20.0), ("id", 60.0)]
    progress.report(9, final=True)  # the end of the stage (a failed shard: not 100%)
    progress.report(9, final=True)  # nothing new to show
    assert sent == [("new", 20.0), ("id", 60.0), ("id", 90.0)]
