"""A shard commit made once per content key (richpref/run/commit.py), on a local run folder: an
interrupted commit is finished from its claim by the next holder, and a completed claim does not
block the same key from being committed again after the manifest moved on."""
from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa

from richpref.common.atomic import write_atomic
from richpref.run import commit
from richpref.run.leases import Lease, try_lease
from richpref.run.runner import manifest_path, stage_manifests, tidy_done, write_shard
from richpref.run.storage import RunStore


def _table(value: str) -> pa.Table:
    return pa.table({"item_id": ["a"], "status": ["ok"], "reason": pa.array([None], pa.string()), "prompt": [value]})


def test_a_commit_interrupted_after_its_claim_is_finished_by_the_next_holder(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path), "r")
    path = store.shard_path("sample", 0)
    os.makedirs(store.stage_dir("sample"))
    lease = try_lease(store.fs, path, seconds=30)
    assert isinstance(lease, Lease)
    monkeypatch.setattr(commit, "_finish", lambda *a: None)  # the holder dies right after its claim
    m = write_shard(store, "sample", 0, _table("x"), "k1", lease=lease)
    monkeypatch.undo()
    lease.release()
    assert not os.path.exists(path) and stage_manifests(store, "sample") == {}
    [tmp] = [n for n in os.listdir(store.stage_dir("sample")) if ".tmp-" in n]
    # the next holder, before computing: it finishes that commit from the claim
    assert commit.recover(store, path, manifest_path(store, "sample", 0), "k1") is True  # committed: not computed again
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == m.sha256
    assert stage_manifests(store, "sample")[0].key == "k1"
    assert not os.path.exists(os.path.join(store.stage_dir("sample"), tmp))
    # a second holder computing the same key now cannot commit over it
    other = try_lease(store.fs, path, seconds=30)
    assert write_shard(store, "sample", 0, _table("y"), "k1", lease=other) is None
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == m.sha256
    other.release()


def test_a_key_committed_then_replaced_can_be_committed_again(tmp_path):
    store = RunStore(str(tmp_path), "r")
    path = store.shard_path("sample", 0)
    os.makedirs(store.stage_dir("sample"))
    for key, value in (("k1", "x"), ("k2", "y"), ("k1", "z")):
        lease = try_lease(store.fs, path, seconds=30)
        commit.recover(store, path, manifest_path(store, "sample", 0), key)  # as run_shard does
        m = write_shard(store, "sample", 0, _table(value), key, lease=lease)
        lease.release()
        assert m is not None, key
        assert json.loads(open(manifest_path(store, "sample", 0)).read())["key"] == key
    assert store.read_shard("sample", 0).column("prompt").to_pylist() == ["z"]
    # the next holder of a committed shard finds its manifest (nothing to compute)
    assert commit.recover(store, path, manifest_path(store, "sample", 0), "k1") is True


def test_a_holder_killed_before_its_claim_leaves_a_temporary_file_the_next_holder_removes(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path), "r")
    path = store.shard_path("sample", 0)
    os.makedirs(store.stage_dir("sample"))

    def killed():
        raise KeyboardInterrupt  # the holder dies between writing its bytes and claiming the commit

    lease = try_lease(store.fs, path, seconds=30)
    try:
        write_shard(store, "sample", 0, _table("x"), "k1", lease=lease, before_commit=killed)
    except KeyboardInterrupt:
        pass
    lease.release()
    [orphan] = [n for n in os.listdir(store.stage_dir("sample")) if ".tmp-" in n]
    other = try_lease(store.fs, path, seconds=30)
    commit.recover(store, path, manifest_path(store, "sample", 0), "k1")  # as run_shard does
    assert write_shard(store, "sample", 0, _table("y"), "k1", lease=other) is not None
    other.release()
    assert [n for n in os.listdir(store.stage_dir("sample")) if ".tmp-" in n] == [], orphan
    assert store.read_shard("sample", 0).column("prompt").to_pylist() == ["y"]


def test_a_holder_killed_after_committing_leaves_nothing_once_its_stage_is_done(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path), "r")
    path = store.shard_path("sample", 0)
    os.makedirs(store.stage_dir("sample"))
    lease = try_lease(store.fs, path, seconds=30)
    monkeypatch.setattr(commit, "_rm", lambda fs, p: None)  # killed after its manifest, before cleaning up
    assert write_shard(store, "sample", 0, _table("x"), "k1", lease=lease) is not None
    monkeypatch.undo()
    left = sorted(n for n in os.listdir(store.stage_dir("sample")) if ".tmp-" in n or ".lease-" in n)
    assert len(left) == 2  # its temporary file and its lease record (never released)
    tidy_done(store, "sample", {0})  # its holder is this live process: all stays
    assert sorted(n for n in os.listdir(store.stage_dir("sample")) if n in left) == left
    lease_file = [n for n in left if ".lease-" in n][0]
    record = json.loads(open(os.path.join(store.stage_dir("sample"), lease_file)).read())
    record["pid"] = 2 ** 22 + 12345  # no such process
    open(os.path.join(store.stage_dir("sample"), lease_file), "w").write(json.dumps(record))
    tidy_done(store, "sample", {0})
    assert [n for n in os.listdir(store.stage_dir("sample")) if ".tmp-" in n or ".lease-" in n] == []
    assert store.read_shard("sample", 0).column("prompt").to_pylist() == ["x"]


def test_a_holder_killed_inside_its_manifest_write_leaves_no_temporary_file_once_the_shard_is_done(
        tmp_path, monkeypatch):
    """The manifest goes to a temporary name first; a holder killed before its rename (on S3: after the
    copy, before the delete that make the rename) leaves that file, which the next holder's recovery
    or the stage's tidy-up removes; so is a lease record's, from a renewal killed the same way."""
    store = RunStore(str(tmp_path), "r")
    path = store.shard_path("sample", 0)
    folder = store.stage_dir("sample")
    os.makedirs(folder)

    def killed():
        raise KeyboardInterrupt

    lease = try_lease(store.fs, path, seconds=30)
    monkeypatch.setattr(store, "write_bytes", lambda p, data: write_atomic(p, data, fs=store.fs, before_commit=killed))
    try:  # killed between the manifest's bytes and its rename: the commit is not finished
        write_shard(store, "sample", 0, _table("x"), "k1", lease=lease)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    lease.release()
    assert stage_manifests(store, "sample") == {}
    commit.recover(store, path, manifest_path(store, "sample", 0), "k1")  # the next holder finishes it
    assert stage_manifests(store, "sample")[0].key == "k1"
    assert [n for n in os.listdir(folder) if ".tmp-" in n] == []

    # killed after the manifest is in place, before its temporary name is removed (S3's rename is a copy
    # and a delete), by a holder that is gone: the shard is done, and the stage's tidy-up removes it
    lease = try_lease(store.fs, path, seconds=30)
    commit.recover(store, path, manifest_path(store, "sample", 0), "k2")
    monkeypatch.setattr(os, "replace", lambda *a: killed())  # and one inside a renewal of its lease
    try:
        lease.renew()
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert any(".lease-0000.tmp-" in n for n in os.listdir(folder))
    monkeypatch.setattr(store.fs, "mv", lambda a, b, **kw: store.fs.copy(a, b))
    monkeypatch.setattr(commit, "_rm", lambda fs, p: None)
    assert write_shard(store, "sample", 0, _table("y"), "k2", lease=lease) is not None
    monkeypatch.undo()
    lease_file = os.path.join(folder, lease.path.rsplit("/", 1)[-1])
    record = json.loads(open(lease_file).read())
    record["pid"] = 2 ** 22 + 12345  # no such process
    open(lease_file, "w").write(json.dumps(record))
    assert any(".manifest.json.tmp-" in n for n in os.listdir(folder))
    tidy_done(store, "sample", {0})
    assert [n for n in os.listdir(folder) if ".tmp-" in n or ".lease-" in n] == []
    assert stage_manifests(store, "sample")[0].key == "k2"


def test_a_presumed_dead_holder_whose_manifest_write_the_next_holder_cleans_up_ends_without_an_error(tmp_path,
                                                                                                     monkeypatch):
    """The next holder finishes the commit and removes the temporary manifest of the first, which was
    only paused: the first's rename then finds no file, and its commit is the one now in place."""
    store = RunStore(str(tmp_path), "r")
    path = store.shard_path("sample", 0)
    os.makedirs(store.stage_dir("sample"))
    lease = try_lease(store.fs, path, seconds=30)

    def next_holder_meanwhile():  # between the first holder's manifest bytes and their rename
        monkeypatch.undo()  # the next holder writes as usual
        commit.recover(store, path, manifest_path(store, "sample", 0), "k1")

    monkeypatch.setattr(store, "write_bytes",
                        lambda p, data: write_atomic(p, data, fs=store.fs, before_commit=next_holder_meanwhile))
    m = write_shard(store, "sample", 0, _table("x"), "k1", lease=lease)
    monkeypatch.undo()
    lease.release()
    assert m is not None and stage_manifests(store, "sample")[0].sha256 == m.sha256
    assert [n for n in os.listdir(store.stage_dir("sample")) if ".tmp-" in n] == []


def test_a_holder_whose_lease_was_taken_over_commits_nothing_and_the_new_holders_claim_names_its_lease(tmp_path):
    import time

    import pytest

    store = RunStore(str(tmp_path), "r")
    path = store.shard_path("sample", 0)
    os.makedirs(store.stage_dir("sample"))
    old = try_lease(store.fs, path, seconds=0.05)
    time.sleep(0.2)  # expired: the next process takes the shard over
    new = try_lease(store.fs, path, seconds=30)
    assert isinstance(old, Lease) and isinstance(new, Lease)
    before = set(os.listdir(store.stage_dir("sample")))
    with pytest.raises(commit.LeaseLost, match="taken over"):
        write_shard(store, "sample", 0, _table("x"), "k1", lease=old)
    assert set(os.listdir(store.stage_dir("sample"))) == before  # no bytes, claim or temporary file left
    write_shard(store, "sample", 0, _table("y"), "k1", lease=new)
    claim = json.loads(open(commit.claim_path(path, "k1")).read())
    assert claim["fence"] == new.fencing_token != old.fencing_token
    assert store.read_shard("sample", 0).column("prompt").to_pylist() == ["y"]
    new.release()


def test_recovering_a_shard_touches_no_other_shards_files_and_a_missing_stage_folder_is_not_committed(tmp_path):
    store = RunStore(str(tmp_path), "r")
    os.makedirs(store.stage_dir("sample"))
    others = [store.shard_path("sample", 5) + ".tmp-" + "a" * 32, store.shard_path("sample", 30) + ".tmp-" + "b" * 32,
              manifest_path(store, "sample", 30) + ".tmp-" + "c" * 32]
    for other in others:  # live holders of shards 5 and 30 writing their commits
        write_atomic(other, b"bytes")
    mine = store.shard_path("sample", 3) + ".tmp-" + "d" * 32  # left by a holder of shard 3 killed before its claim
    write_atomic(mine, b"bytes")
    assert commit.recover(store, store.shard_path("sample", 3), manifest_path(store, "sample", 3), "k") is False
    assert all(os.path.exists(o) for o in others) and not os.path.exists(mine)
    assert commit.recover(store, store.shard_path("edit", 0), manifest_path(store, "edit", 0), "k") is False
    assert not os.path.exists(store.stage_dir("edit"))


def test_a_paused_holder_whose_commit_another_finished_writes_nothing_when_it_wakes(tmp_path, monkeypatch):
    """Its claimed commit was finished by the next holder and the shard has moved on to another key
    since: its temporary file is gone, so it must not put its old manifest back over the new one."""
    store = RunStore(str(tmp_path), "r")
    path, manifest_file = store.shard_path("sample", 0), manifest_path(store, "sample", 0)
    os.makedirs(store.stage_dir("sample"))
    paused = []
    monkeypatch.setattr(commit, "_finish", lambda _store, _manifest, claim: paused.append(claim))
    lease = try_lease(store.fs, path, seconds=30)
    write_shard(store, "sample", 0, _table("old"), "k1", lease=lease)  # claimed, then paused
    lease.release()
    monkeypatch.undo()
    assert commit.recover(store, path, manifest_file, "k1")  # the next holder finishes it
    lease = try_lease(store.fs, path, seconds=30)
    new = write_shard(store, "sample", 0, _table("new"), "k2", lease=lease)
    lease.release()
    commit._finish(store, manifest_file, paused[0])  # the first holder wakes up
    assert stage_manifests(store, "sample")[0].key == "k2"
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == new.sha256
