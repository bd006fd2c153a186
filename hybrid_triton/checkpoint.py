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
import secrets
import time
from typing import Any

import torch

MAGIC = b"HYBRID_TRITON_CHECKPOINT\n"
CHECKPOINT_VERSION = 1
TMP_PREFIX = ".ckpt-"
TMP_SUFFIX = ".tmp"
STALE_SECONDS = 3600.0


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint file is missing, corrupted, truncated, of another version, or does not
    match the trainer it is loaded into. A ``ValueError`` too: the file's contents are bad."""


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
    _remove_stale_temporaries(directory)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{TMP_SUFFIX}")
    try:
        # open() with O_EXCL rather than mkstemp: the file gets the usual umask-respecting
        # mode (mkstemp makes it 0600, which hides checkpoints from the owner's group).
        with open(tmp, "xb") as fh:
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


def _remove_stale_temporaries(directory: str) -> None:
    """Remove temporary files a killed save left behind (only our own name pattern; one
    that another process is writing right now is younger than ``STALE_SECONDS``)."""
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)):
            continue
        full = os.path.join(directory, name)
        try:
            if now - os.stat(full).st_mtime >= STALE_SECONDS or _writer_is_gone(name):
                os.unlink(full)
        except OSError:
            pass


def _writer_is_gone(name: str) -> bool:
    """Whether the process that named this temporary file (its pid is in the name) is dead;
    names without a pid (older saves) count as gone."""
    pid = name[len(TMP_PREFIX) :].split("-", 1)[0]
    if not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


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
        expected = header["payload_bytes"]
        available = os.fstat(fh.fileno()).st_size - fh.tell()
        # Bounded by the file's size before anything is read: a corrupted header must not
        # ask for a negative or a huge read.
        if type(expected) is not int or not 0 <= expected <= available:
            raise CheckpointError(
                f"{path}: the checkpoint header's payload_bytes is {expected!r}; expected a "
                f"whole number from 0 to the {available} bytes left in the file (the file is "
                "truncated or the header corrupted)"
            )
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
