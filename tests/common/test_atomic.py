"""One atomic write for every file richpref writes whole: a reader sees the old bytes or the new, never part."""
from __future__ import annotations

import fsspec
import pytest

from richpref.common.atomic import link_or_copy, write_atomic


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


def test_link_or_copy_links_copies_where_links_fail_and_says_when_the_source_is_gone(tmp_path, monkeypatch):
    import errno
    import os

    src = tmp_path / "a"
    src.write_bytes(b"bytes")
    link_or_copy(src, tmp_path / "linked")
    assert os.path.samefile(src, tmp_path / "linked")

    def no_links(a, b):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", no_links)
    link_or_copy(src, tmp_path / "copied")
    assert (tmp_path / "copied").read_bytes() == b"bytes" and not os.path.samefile(src, tmp_path / "copied")
    with pytest.raises(FileNotFoundError):
        link_or_copy(tmp_path / "gone", tmp_path / "x")
