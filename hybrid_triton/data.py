"""Real text on any machine, with nothing downloaded: the Python standard library's own files.

The corpus is every ``.py``, ``.txt`` and ``.rst`` file under ``sysconfig.get_paths()["stdlib"]``
(``site-packages`` left out) that decodes as UTF-8, in sorted order of its path relative to
that root. A file goes to validation when the SHA-1 of that relative path is 0 modulo
``val_every`` (default 50, so about 1 file in 50), else to training: the split depends on the
path only, so it is the same on every machine with the same Python version, and no file is in
both.

Tokenizer (``tokenizer=``):

- ``"bpe"``: a byte-level BPE (GPT-2's pre-tokenizer) trained with the ``tokenizers`` package
  on the training files only, ``vocab_size`` at most (default 32768; the GPT-2 model's vocab
  is 50304, so every id fits). Id 0 is ``<|endoftext|>``.
- ``"byte"``: UTF-8 bytes, ids 0-255, plus ``<|endoftext|>`` = 256 (vocab 257). Needs nothing.
- ``"auto"`` (default): ``"bpe"`` when ``tokenizers`` can be imported, else ``"byte"`` (with a
  warning).

Each file's tokens are followed by ``<|endoftext|>`` and the files are concatenated into one
``np.uint16`` array per split, written once to
``~/.cache/hybrid_triton/corpus/<key>/{train,val}.bin`` (``HYBRID_TRITON_CACHE`` moves the
root) with the tokenizer and a ``meta.json``; ``<key>`` hashes the relative file list and
sizes, the split rule and the tokenizer settings. Later runs memory-map the files.

``TokenStream(split, batch_size, seq_len, seed)`` cuts a split into non-overlapping windows of
``seq_len + 1`` tokens, visits them in a seeded random order (a new order each epoch) and yields
``(x, y)``: ``[batch_size, seq_len]`` int64 tensors, ``y`` shifted by one token. Batch ``i`` is
a function of ``(seed, i)`` alone.

``python -m hybrid_triton.data`` builds the corpus and prints its size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

CORPUS_FORMAT = 1  # bump when the cached files change meaning
SUFFIXES = (".py", ".txt", ".rst")
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
EOT = "<|endoftext|>"
SPLITS = ("train", "val")


def cache_root() -> Path:
    """Where built corpora live: ``$HYBRID_TRITON_CACHE`` or ``~/.cache/hybrid_triton``."""
    return Path(os.environ.get("HYBRID_TRITON_CACHE", Path.home() / ".cache" / "hybrid_triton"))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None, max_files: int | None = None) -> list[str]:
    """Relative POSIX paths of the corpus files under ``root``, sorted.

    ``max_files`` keeps an evenly spaced subset of that many (for fast tests), so the subset
    still spans the whole library rather than its first packages."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} is not a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        files.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(SUFFIXES))
    files.sort()
    if max_files is not None and len(files) > max_files:
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        files = [files[i * len(files) // max_files] for i in range(max_files)]
    return files


def split_of(rel_path: str, val_every: int = 50) -> str:
    """``"val"`` for about one path in ``val_every`` (by SHA-1 of the path), else ``"train"``."""
    digest = int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big")
    return "val" if digest % val_every == 0 else "train"


def split_files(files: Sequence[str], val_every: int = 50) -> dict[str, list[str]]:
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2, got {val_every}")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for f in files:
        out[split_of(f, val_every)].append(f)
    return out


def read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None when it is not (a few test data files are not)."""
    try:
        return path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# --- tokenizers ----------------------------------------------------------------------------


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, ``<|endoftext|>`` as 256. Needs no training and no package."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        pass

    @classmethod
    def load(cls, path: Path) -> ByteTokenizer:
        return cls()


class BPETokenizer:
    """Byte-level BPE (``tokenizers`` package): GPT-2's pre-tokenizer, lossless round trip."""

    kind = "bpe"

    def __init__(self, tok) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: Path) -> None:
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))


def bpe_available() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_kind(tokenizer: str) -> str:
    if tokenizer not in ("auto", "bpe", "byte"):
        raise ValueError(f"tokenizer must be 'auto', 'bpe' or 'byte', got {tokenizer!r}")
    if tokenizer == "auto":
        if bpe_available():
            return "bpe"
        warnings.warn(
            "the 'tokenizers' package is not installed: using the byte-level tokenizer "
            "(vocab 257) instead of a trained BPE",
            stacklevel=3,
        )
        return "byte"
    if tokenizer == "bpe" and not bpe_available():
        raise ImportError("tokenizer='bpe' needs the 'tokenizers' package (pip install tokenizers)")
    return tokenizer


# --- the corpus ----------------------------------------------------------------------------


@dataclass
class Corpus:
    """A built corpus: the split file lists, the tokenizer and the cached token arrays."""

    root: Path
    directory: Path
    files: dict[str, list[str]]
    tokenizer: Tokenizer
    meta: dict

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only ``np.uint16`` memory map."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return np.memmap(self.directory / f"{split}.bin", dtype=np.uint16, mode="r")

    @property
    def num_tokens(self) -> dict[str, int]:
        return dict(self.meta["tokens"])


def _corpus_key(root: Path, files: list[str], val_every: int, kind: str, vocab_size: int) -> str:
    h = hashlib.sha256()
    spec = {"format": CORPUS_FORMAT, "val_every": val_every, "kind": kind, "vocab": vocab_size}
    h.update(json.dumps(spec, sort_keys=True).encode())
    for f in files:
        h.update(f"{f}\0{(root / f).stat().st_size}\n".encode())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive lock on ``directory`` so parallel processes build a corpus once."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, writes are still atomic renames
        yield
        return
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def load_corpus(
    *,
    tokenizer: str = "auto",
    vocab_size: int = 32768,
    val_every: int = 50,
    max_files: int | None = None,
    root: Path | str | None = None,
    cache_dir: Path | str | None = None,
) -> Corpus:
    """Build (once, then cached) and return the standard-library corpus.

    ``tokenizer``: "auto", "bpe" or "byte" (see the module docstring). ``vocab_size``: the
    BPE's maximum vocabulary (<= 50304, the model's; ids must fit in uint16). ``val_every``:
    about one file in this many goes to validation. ``max_files``: an evenly spaced subset,
    for tests. ``root``: another directory of text files instead of the stdlib.
    ``cache_dir``: instead of ``cache_root()``."""
    kind = _resolve_kind(tokenizer)
    if kind == "bpe" and not 256 < vocab_size <= 50304:
        raise ValueError(f"vocab_size must be in (256, 50304] for the BPE, got {vocab_size}")
    root = Path(root) if root is not None else stdlib_root()
    files = corpus_files(root, max_files)
    split = split_files(files, val_every)
    for s in SPLITS:
        if not split[s]:
            raise ValueError(
                f"the {s} split is empty ({len(files)} files under {root}, val_every="
                f"{val_every}): use more files or a smaller val_every"
            )
    key = _corpus_key(root, files, val_every, kind, vocab_size if kind == "bpe" else 257)
    directory = Path(cache_dir if cache_dir is not None else cache_root()) / "corpus" / key
    tok_cls = BPETokenizer if kind == "bpe" else ByteTokenizer
    meta_path = directory / "meta.json"
    with _locked(directory):
        if not meta_path.exists():
            _build(root, split, kind, vocab_size, directory)
        meta = json.loads(meta_path.read_text())
    tok = tok_cls.load(directory / "tokenizer.json")
    return Corpus(root=root, directory=directory, files=split, tokenizer=tok, meta=meta)


def _build(root: Path, split: dict[str, list[str]], kind: str, vocab_size: int, out: Path):
    texts = {s: [(f, read_text(root / f)) for f in split[s]] for s in SPLITS}
    skipped = {s: [f for f, t in texts[s] if t is None] for s in SPLITS}
    texts = {s: [t for _, t in texts[s] if t] for s in SPLITS}
    if kind == "bpe":
        tok: Tokenizer = BPETokenizer.train(iter(texts["train"]), vocab_size)  # train split only
    else:
        tok = ByteTokenizer()
    counts = {}
    for s in SPLITS:
        arrays = []
        if kind == "byte":  # the bytes are the ids: skip a Python list per byte
            encoded = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts[s]]
        else:
            encoded = tok.encode_batch(texts[s])
        for ids in encoded:
            arrays.append(np.asarray(ids, dtype=np.uint16))
            arrays.append(np.asarray([tok.eot_id], dtype=np.uint16))
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)
        counts[s] = int(tokens.size)
        _write_atomic(out / f"{s}.bin", lambda p, t=tokens: t.tofile(p))
    if kind == "bpe":
        _write_atomic(out / "tokenizer.json", tok.save)
    meta = {
        "format": CORPUS_FORMAT,
        "root": str(root),
        "tokenizer": kind,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "files": {s: len(split[s]) for s in SPLITS},
        "skipped_not_utf8": skipped,
        "bytes": {s: sum(len(t.encode("utf-8")) for t in texts[s]) for s in SPLITS},
        "tokens": counts,
    }
    _write_atomic(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))


# --- the loader ----------------------------------------------------------------------------


def batches_for_tokens(n_tokens: int, batch_size: int, seq_len: int) -> int:
    """How many ``[batch_size, seq_len]`` batches cover ``n_tokens`` training tokens (rounded
    up), so runs with different batch shapes can be given the same token budget."""
    if n_tokens < 0 or batch_size < 1 or seq_len < 1:
        raise ValueError(
            f"need n_tokens >= 0, batch_size >= 1, seq_len >= 1; got {n_tokens}, {batch_size}, "
            f"{seq_len}"
        )
    return math.ceil(n_tokens / (batch_size * seq_len))


class TokenStream:
    """Seeded, endless ``(x, y)`` batches of one split: ``[batch_size, seq_len]`` int64.

    Windows of ``seq_len + 1`` tokens start at multiples of ``seq_len`` (no overlap of inputs);
    each epoch visits all of them once in an order drawn from ``(seed, epoch)``
    (``shuffle=False``: in corpus order). ``batch(i)`` gives batch ``i`` directly, so a run can
    resume at any step."""

    def __init__(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        *,
        corpus: Corpus | None = None,
        shuffle: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.corpus = corpus if corpus is not None else load_corpus()
        self.tokens = self.corpus.tokens(split)
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"the {split} split has {len(self.tokens)} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}"
            )
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.shuffle = seed, shuffle
        self.device = torch.device(device) if device is not None else None
        self._order_epoch, self._order = -1, np.arange(self.num_windows)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def batches_for_tokens(self, n_tokens: int) -> int:
        return batches_for_tokens(n_tokens, self.batch_size, self.seq_len)

    def _window(self, k: int) -> int:
        epoch, i = divmod(k, self.num_windows)
        if not self.shuffle:
            return i
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._order_epoch = rng.permutation(self.num_windows), epoch
        return int(self._order[i])

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``index`` (0-based) of this stream."""
        first = index * self.batch_size
        starts = [self._window(k) * self.seq_len for k in range(first, first + self.batch_size)]
        chunk = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        xy = torch.from_numpy(chunk)
        x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        if self.device is not None and self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device is not None:
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = 0
        while True:
            yield self.batch(index)
            index += 1

    def take(self, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n_batches`` batches."""
        return (self.batch(i) for i in range(n_batches))


def main() -> None:
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Build the stdlib corpus and print its size.")
    ap.add_argument("--tokenizer", default="auto", choices=("auto", "bpe", "byte"))
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--max-files", type=int, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    corpus = load_corpus(
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, max_files=args.max_files
    )
    meta = {k: v for k, v in corpus.meta.items() if k != "skipped_not_utf8"}
    meta["skipped_not_utf8"] = {s: len(v) for s, v in corpus.meta["skipped_not_utf8"].items()}
    print(json.dumps(meta, indent=1))
    print(f"cache: {corpus.directory} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
