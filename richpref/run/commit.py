"""Committing a computed shard exactly once, also when its holder lost its lease while computing.

A holder that was presumed dead (its lease expired and another process took the next generation)
may still be alive. Two rules keep it from committing over the new holder's work:

1. Right before committing, the holder asks the store whether its lease is still the newest
   generation (`Lease.still_held`); if not, it drops its output (`LeaseLost`).
2. The commit itself is conditional, so a takeover between that check and the write still cannot
   produce two commits: the holder first writes its Parquet bytes to a name of its own
   (`part-00003.parquet.tmp-<uuid>`), then creates the shard's commit claim for the content key,
   `part-00003.commit-<key[:16]>`, with an exclusive create (`O_EXCL` locally, a conditional put
   `If-None-Match: *` on S3). Of all holders of any generation, one creates it; the others drop
   their output. The claim records the manifest, the temporary name and the lease's fencing token.
   The winner then copies the temporary file into place, writes the manifest, and only then removes
   the temporary file.

Recovery: a claim whose temporary file is still there is a commit that was interrupted (or is still
going on in a paused process): whoever holds the shard's lease next finishes it from the claim
(the same bytes and manifest, so finishing it twice writes the same thing). A claim whose temporary
file is gone was completed; when its key is wanted again later (a config changed and changed back)
the next holder removes it before computing. Claims stay beside the shard (a few hundred bytes).

Where a filesystem has no exclusive create, the claim is a check-then-write guarded by the lease's
fencing token (the claim is read back and must carry this holder's token): advisory, see
docs/operations.md.
"""
from __future__ import annotations

import json
import logging
import os
import re
import uuid

from fsspec.implementations.local import LocalFileSystem

from richpref.common.atomic import link_or_copy
from richpref.run.leases import Lease, create_exclusive
from richpref.common.objstore import cat_small, ensure_folder, list_names

log = logging.getLogger("richpref")


_TEMPORARY = re.compile(r"part-\d+\.(?:parquet|manifest\.json)\.tmp-\w+")


def commit_temporary(name: str) -> bool:
    """Whether a stage folder's file `name` is a commit's temporary file: a shard's Parquet bytes or its
    manifest before their rename (a holder killed there leaves it). On an object store only the
    Parquet's: a manifest goes straight to its name there."""
    return _TEMPORARY.fullmatch(name) is not None


class LeaseLost(RuntimeError):
    """This process's lease on the shard was taken over: it must not commit (another holder does)."""


def claim_path(shard_path: str, key: str) -> str:
    return shard_path[: -len(".parquet")] + f".commit-{key[:16]}"


def _read_claim(fs, path: str) -> dict | None:
    try:
        return json.loads(cat_small(fs, path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # being written right now (stores without atomic puts): treat as taken


def _rm(fs, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def _place(fs, tmp: str, path: str) -> bool:
    """Put the bytes of `tmp` at `path` and keep `tmp` (it marks the commit as not finished). False
    when `tmp` is gone: another process finished this commit."""
    try:
        if isinstance(fs, LocalFileSystem):
            link = f"{path}.tmp-{uuid.uuid4().hex}"
            link_or_copy(tmp, link)  # a second name for the same bytes, renamed into place atomically
            os.replace(link, path)
            try:  # rename(2) leaves both names when they are one file already (a re-finished commit)
                os.unlink(link)
            except FileNotFoundError:
                pass
        else:
            fs.cp_file(tmp, path)  # server-side copy, atomic for readers (not copy(): it lists both names first)
    except FileNotFoundError:
        return False
    return True


def _finish(store, manifest_file: str, claim: dict) -> None:
    """Carry out a claimed commit: bytes into place, manifest, then remove the temporary file."""
    fs = store.fs
    if not _place(fs, claim["tmp"], claim["path"]):
        return
    try:
        store.write_bytes(manifest_file, json.dumps(claim["manifest"], indent=1).encode())
    except FileNotFoundError:
        # Our manifest's temporary file was removed as an orphan: the shard's next holder (this one was
        # presumed dead) finished this commit, manifest first. Anything else is an error.
        if _read_claim(fs, manifest_file) != claim["manifest"]:
            raise
        return
    _rm(fs, claim["tmp"])


def commit_once(store, shard_path: str, manifest_file: str, data: bytes, manifest: dict, lease: Lease | None,
                before_commit=None) -> bool:
    """Write `data` at `shard_path` and `manifest` at `manifest_file` unless another holder commits this
    key. True when this call committed; False when another holder has (or is finishing) the commit.
    Raises LeaseLost when the lease was taken over before the commit."""
    fs = store.fs
    ensure_folder(fs, shard_path.rsplit("/", 1)[0])
    tmp = f"{shard_path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    if before_commit is not None:
        before_commit()
    if lease is not None and not lease.still_held():
        _rm(fs, tmp)
        raise LeaseLost(f"{shard_path}: the lease was taken over by another process; not committing")
    claim = {"path": shard_path, "tmp": tmp, "manifest": manifest,
             "fence": lease.fencing_token if lease is not None else None}
    claim_file = claim_path(shard_path, manifest["key"])
    payload = json.dumps(claim).encode()
    if not create_exclusive(fs, claim_file, payload):
        _rm(fs, tmp)
        log.info("%s: another holder commits content key %s; dropping this copy", shard_path, manifest["key"][:12])
        return False
    _finish(store, manifest_file, claim)
    return True


def recover(store, shard_path: str, manifest_file: str, key: str) -> bool:
    """Under the shard's lease, before computing it for `key`: finish an interrupted commit of `key`
    (its temporary file is still there), or remove a completed claim whose manifest was replaced since;
    then remove the shard's temporary files that no claim of `key` holds (a holder killed before its
    claim left them, and nobody else would). All from one listing of the shard's names, so a shard
    never started costs no reads. Returns whether the shard's manifest is there to be read (listed,
    or written now): False means it is not committed."""
    fs = store.fs
    folder, name = shard_path.rsplit("/", 1)
    try:  # "part-00003.": its Parquet, manifest, claims, leases; on S3 one listing of just these keys
        names = set(list_names(fs, folder, name[: -len("parquet")]))
    except FileNotFoundError:
        names = set()
    path = claim_path(shard_path, key)
    claim = _read_claim(fs, path) if path.rsplit("/", 1)[-1] in names else None
    finished = False
    if claim and claim["tmp"].rsplit("/", 1)[-1] in names:
        log.warning("%s: finishing a commit its holder (%s) did not finish", shard_path, claim.get("fence"))
        _finish(store, manifest_file, claim)
        finished = True
    elif claim is not None:
        _rm(fs, path)
    keep = claim.get("tmp") if claim else None
    for orphan in sorted(names):
        if commit_temporary(orphan) and f"{folder}/{orphan}" != keep:
            log.info("%s: removing %s, left by a holder that did not commit", shard_path, orphan)
            _rm(fs, f"{folder}/{orphan}")
    return finished or manifest_file.rsplit("/", 1)[-1] in names
