"""Atomic writes: a file is replaced whole or not at all, and no temporary file is left behind."""

from __future__ import annotations

import os

import pytest

from dist_finetune import run_files
from dist_finetune.run_files import write_atomic


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_atomic(target, b"old contents")
    seen_while_writing = []

    def crash_before_the_rename(source, destination):
        seen_while_writing.append((target.read_bytes(), sorted(p.name for p in tmp_path.iterdir())))
        raise OSError("disk gone")

    monkeypatch.setattr(run_files.os, "replace", crash_before_the_rename)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(target, b"new contents")
    # while the new data was being written, the target still held the old data; the new data went elsewhere
    assert seen_while_writing == [(b"old contents", [f".report.json.{os.getpid()}.tmp", "report.json"])]
    assert target.read_bytes() == b"old contents" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    monkeypatch.undo()
    write_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
