"""Checkpoint files: versioned, checksummed, written atomically.

File layout::

    HYBRID_TRITON_CHECKPOINT\\n                   magic line
    {"version": 1, "sha256": "...", "payload_bytes": N, "format": "torch.save"}\\n
    <N bytes: torch.save of the state dict>

Writing: the bytes go to a temporary file in the target's directory, which is flushed and
fsync'ed, then ``os.replace``d over the target (atomic on POSIX), and the directory is
fsync'ed: a crash leaves either the old file or the new one, never a mix.

Reading: the magic, the version, the length (a truncated file), and the sha256 of the payload
are checked before anything is unpickled; the payload is loaded with ``weights_only=True``
(tensors, numbers, strings, lists and dicts only). Every failure raises
:class:`CheckpointError` with what was expected, and nothing of a running trainer is touched
(the trainer applies a checkpoint only after it has been read and checked in full).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Any

import torch

MAGIC = b"HYBRID_TRITON_CHECKPOINT\n"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupted, truncated, of another version, or does not
    match the trainer it is loaded into."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically; returns the payload's sha256 (hex)."""
    path = os.fspath(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    header = {
        "version": CHECKPOINT_VERSION,
        "sha256": digest,
        "payload_bytes": len(payload),
        "format": "torch.save",
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC)
            fh.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return digest


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a checkpoint file (checks the magic and the version)."""
    with open(os.fspath(path), "rb") as fh:
        return _read_header(fh, os.fspath(path))


def _read_header(fh, path: str) -> dict[str, Any]:
    magic = fh.read(len(MAGIC))
    if magic != MAGIC:
        raise CheckpointError(
            f"{path}: not a hybrid_triton checkpoint (the file does not start with "
            f"{MAGIC.strip().decode()!r})"
        )
    line = fh.readline(4096)
    try:
        header = json.loads(line)
        version = header["version"]
        header["sha256"], header["payload_bytes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: the checkpoint header is corrupted ({exc})") from None
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {version} is not supported; this hybrid_triton reads "
            f"version {CHECKPOINT_VERSION}"
        )
    return header


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint; returns the state dict (tensors on the CPU)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as fh:
        header = _read_header(fh, path)
        expected = int(header["payload_bytes"])
        payload = fh.read(expected + 1)
    if len(payload) != expected:
        raise CheckpointError(
            f"{path}: the checkpoint is truncated or has trailing bytes: payload is "
            f"{len(payload)} bytes, the header says {expected}"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header["sha256"]:
        raise CheckpointError(
            f"{path}: checksum mismatch (sha256 {digest[:16]}..., expected "
            f"{str(header['sha256'])[:16]}...): the file is corrupted"
        )
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # the checksum passed, so this is a writer/reader mismatch
        raise CheckpointError(f"{path}: cannot load the checkpoint payload: {exc}") from exc
