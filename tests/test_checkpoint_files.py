"""Checkpoint file handling: header bounds, stale temporary files, the file mode."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from hybrid_triton.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint


def _with_payload_bytes(path, value):
    raw = path.read_bytes()
    body = raw[len(MAGIC) :]
    line, rest = body.split(b"\n", 1)
    header = json.loads(line)
    header["payload_bytes"] = value
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + rest)


@pytest.mark.parametrize("value", [-5, 10**18, "12", 1.5, None, True])
def test_bad_payload_bytes_is_a_checkpoint_error(tmp_path, value):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, {"x": torch.ones(3)})
    _with_payload_bytes(path, value)
    with pytest.raises(CheckpointError, match="payload_bytes"):
        load_checkpoint(path)


def test_stale_temporary_files_are_removed_by_the_next_save(tmp_path):
    stale = tmp_path / ".ckpt-abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.tmp"  # not ours: left alone
    other.write_bytes(b"x")
    save_checkpoint(tmp_path / "a.ckpt", {"n": 1})
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "notes.tmp"]


def test_checkpoint_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "a.ckpt", {"n": 1})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.ckpt").st_mode & 0o777) == 0o644


def test_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, {"n": 1})
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"n": 2})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]
