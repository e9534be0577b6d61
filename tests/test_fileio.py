"""Atomic writes leave files and folders with the permissions a plain write would give (not the
owner-only modes of the temp files they go through), and nothing half-written."""

from __future__ import annotations

import os
import stat

import pytest

from vldistill.fileio import atomic_directory, write_text_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_file_gets_the_umask_mode(tmp_path, umask_022) -> None:
    path = write_text_atomic(tmp_path / "a" / "summary.json", "{}")
    assert path.read_text() == "{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temp file left


def test_atomic_directory_gets_the_umask_mode_and_replaces_the_old_one(tmp_path, umask_022) -> None:
    out = tmp_path / "student"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
