"""One atomic write for every file richpref writes whole: a reader sees the old bytes or the new, never part."""
from __future__ import annotations

import fsspec
import pytest

from richpref.common.atomic import write_atomic


@pytest.mark.parametrize("remote", [False, True])
def test_a_write_interrupted_before_its_rename_leaves_the_old_file_whole(tmp_path, remote):
    fs = fsspec.filesystem("memory") if remote else None
    path = f"/atomic-{tmp_path.name}/a/b.json" if remote else str(tmp_path / "a" / "b.json")
    write_atomic(path, b"old", fs=fs)

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, b"new and longer", fs=fs, before_commit=crash)
    read = fs.cat_file(path) if remote else open(path, "rb").read()
    assert read == b"old"
    write_atomic(path, b"new", fs=fs)
    assert (fs.cat_file(path) if remote else open(path, "rb").read()) == b"new"
