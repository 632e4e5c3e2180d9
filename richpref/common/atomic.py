"""Files a reader never sees half-written: the bytes go to `<name>.tmp-<unique>` beside the target,
then one rename puts them in place. On an object store an upload is already all-or-nothing, so the
bytes go straight to the target in one PUT (a rename there would be a copy and a delete)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from richpref.common.objstore import ensure_folder, is_object_store


def temp_name(path: str | os.PathLike) -> str:
    return f"{os.fspath(path)}.tmp-{uuid.uuid4().hex}"


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A second name `dst` for the local file `src` (a hard link), or a copy on a filesystem without
    hard links. FileNotFoundError when `src` is gone."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, dst)


def write_atomic(path: str | os.PathLike, data: bytes, fs=None, before_commit: Callable[[], None] | None = None) -> None:
    """Write `data` to `path` through a temporary name. `fs`: an fsspec filesystem (None: the local
    one). `before_commit` runs between the write and the rename (fault injection in tests); on an object
    store, before the one PUT."""
    tmp = temp_name(path)
    if fs is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(tmp).write_bytes(data)
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
        return
    if is_object_store(fs):
        if before_commit is not None:
            before_commit()
        fs.pipe_file(os.fspath(path), data)
        return
    ensure_folder(fs, os.fspath(path).rsplit("/", 1)[0])
    fs.pipe_file(tmp, data)
    if before_commit is not None:
        before_commit()
    fs.mv(tmp, os.fspath(path))
