"""The stdlib corpus, its split, the tokenizers and TokenStream.

The corpora here are small evenly spaced subsets of the real standard library (``max_files``),
built into a temporary cache, so the tests stay fast on a CPU."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from hybrid_triton import data
from hybrid_triton.data import (
    ByteTokenizer,
    TokenStream,
    batches_for_tokens,
    corpus_files,
    load_corpus,
    split_files,
    stdlib_root,
)

SUBSET = dict(max_files=60, val_every=5)  # val_every=5 so a small subset has a val split


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


@pytest.fixture(scope="module")
def byte_corpus(cache):
    return load_corpus(tokenizer="byte", cache_dir=cache, **SUBSET)


@pytest.fixture(scope="module")
def bpe_corpus(cache):
    pytest.importorskip("tokenizers")
    return load_corpus(tokenizer="bpe", vocab_size=2000, cache_dir=cache, **SUBSET)


def test_files_sorted_relative_and_without_site_packages():
    files = corpus_files()
    assert files == sorted(files) and len(files) == len(set(files))
    assert len(files) > 100, "the standard library should have hundreds of text files"
    assert all(f.endswith((".py", ".txt", ".rst")) and not f.startswith("/") for f in files)
    assert not any("site-packages" in f.split("/") for f in files)
    assert "os.py" in files


def test_subset_is_evenly_spaced():
    files = corpus_files()
    subset = corpus_files(max_files=60)
    assert len(subset) == 60 and set(subset) <= set(files)
    assert subset[0] == files[0]
    # Spread across the library, not its first package only.
    assert files.index(subset[-1]) > 0.9 * len(files)


def test_split_deterministic_disjoint_and_about_one_in_fifty():
    files = corpus_files()
    split = split_files(files)
    reordered = split_files(list(reversed(files)))
    assert split == {k: sorted(v) for k, v in reordered.items()}
    assert not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == files
    frac = len(split["val"]) / len(files)
    assert 0.005 < frac < 0.05, f"{len(split['val'])} of {len(files)} files in val"
    # The split of a file depends on its path only, not on which other files are present.
    sub = split_files(files[::7])
    assert set(sub["val"]) == set(split["val"]) & set(files[::7])


def test_corpus_split_matches_files(byte_corpus):
    assert byte_corpus.files == split_files(corpus_files(max_files=60), val_every=5)
    assert byte_corpus.meta["files"] == {s: len(v) for s, v in byte_corpus.files.items()}


def test_byte_tokens_are_the_file_bytes(byte_corpus):
    # Reference: the files read directly, each followed by <|endoftext|> (256).
    for split in ("train", "val"):
        expected = []
        for f in byte_corpus.files[split]:
            raw = (stdlib_root() / f).read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if raw:
                expected.extend([*raw, 256])
        tokens = byte_corpus.tokens(split)
        assert tokens.dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected, dtype=np.uint16))
        assert byte_corpus.num_tokens[split] == len(expected)


def test_cache_is_reused_and_keyed_by_files(byte_corpus, cache):
    meta = byte_corpus.directory / "meta.json"
    mtime = os.stat(meta).st_mtime_ns
    again = load_corpus(tokenizer="byte", cache_dir=cache, **SUBSET)
    assert again.directory == byte_corpus.directory
    assert os.stat(meta).st_mtime_ns == mtime, "a built corpus must not be rebuilt"
    other = load_corpus(tokenizer="byte", cache_dir=cache, max_files=61, val_every=5)
    assert other.directory != byte_corpus.directory


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ 🐍\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode([*ids, tok.eot_id]) == text


def test_bpe_round_trip_and_vocab(bpe_corpus):
    tok = bpe_corpus.tokenizer
    assert tok.kind == "bpe" and 256 < tok.vocab_size <= 2000
    assert tok.eot_id == 0
    # Held-out text (validation files) and text the BPE never saw round-trip exactly.
    for f in bpe_corpus.files["val"]:
        text = data.read_text(stdlib_root() / f)
        if text:
            assert tok.decode(tok.encode(text)) == text, f
    odd = "\t\tx = '日本語'  \r\n\x00 ✓🐍 \n\n\n"
    assert tok.decode(tok.encode(odd)) == odd
    train = bpe_corpus.tokens("train")
    assert int(np.asarray(train).max()) < tok.vocab_size
    # BPE merges compress: fewer tokens than bytes.
    assert bpe_corpus.num_tokens["train"] < 0.6 * bpe_corpus.meta["bytes"]["train"]


def test_bpe_training_deterministic(bpe_corpus):
    texts = [data.read_text(stdlib_root() / f) for f in bpe_corpus.files["train"][:20]]
    texts = [t for t in texts if t]
    a = data.BPETokenizer.train(iter(texts), 800)
    b = data.BPETokenizer.train(iter(texts), 800)
    assert a._tok.get_vocab() == b._tok.get_vocab()
    sample = data.read_text(stdlib_root() / bpe_corpus.files["val"][0])
    assert a.encode(sample) == b.encode(sample)


def test_auto_falls_back_to_bytes(monkeypatch, cache):
    monkeypatch.setattr(data, "bpe_available", lambda: False)
    with pytest.warns(UserWarning, match="tokenizers"):
        corpus = load_corpus(tokenizer="auto", cache_dir=cache, **SUBSET)
    assert corpus.tokenizer.kind == "byte" and corpus.tokenizer.vocab_size == 257
    with pytest.raises(ImportError, match="tokenizers"):
        load_corpus(tokenizer="bpe", cache_dir=cache, **SUBSET)


@pytest.mark.parametrize("batch_size, seq_len", [(1, 1), (3, 17), (4, 128)], ids=str)
def test_stream_shapes_and_shift(byte_corpus, batch_size, seq_len):
    stream = TokenStream("train", batch_size, seq_len, seed=0, corpus=byte_corpus)
    for x, y in stream.take(3):
        assert x.shape == y.shape == (batch_size, seq_len)
        assert x.dtype == y.dtype == torch.int64
        assert x.min() >= 0 and y.max() < byte_corpus.tokenizer.vocab_size
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_stream_deterministic(byte_corpus):
    a = TokenStream("train", 4, 32, seed=7, corpus=byte_corpus)
    b = TokenStream("train", 4, 32, seed=7, corpus=byte_corpus)
    c = TokenStream("train", 4, 32, seed=8, corpus=byte_corpus)
    for i, ((xa, ya), (xb, yb)) in enumerate(zip(a.take(5), b.take(5))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        xi, _ = a.batch(i)  # random access gives the same batch
        assert torch.equal(xi, xa)
    assert not torch.equal(next(iter(a))[0], next(iter(c))[0])


def test_stream_epoch_visits_every_window_once(byte_corpus):
    seq_len = 256
    stream = TokenStream("val", 1, seq_len, seed=3, corpus=byte_corpus)
    tokens = torch.from_numpy(np.asarray(byte_corpus.tokens("val")).astype(np.int64))
    windows = sorted(
        tuple(tokens[i * seq_len : i * seq_len + seq_len].tolist())
        for i in range(stream.num_windows)
    )
    seen = sorted(tuple(x[0].tolist()) for x, _ in stream.take(stream.num_windows))
    assert seen == windows
    # The next epoch is a different order of the same windows.
    first = [stream.batch(i)[0] for i in range(stream.num_windows)]
    second = [stream.batch(stream.num_windows + i)[0] for i in range(stream.num_windows)]
    assert sorted(tuple(x[0].tolist()) for x in second) == windows
    assert any(not torch.equal(a, b) for a, b in zip(first, second))


def test_stream_unshuffled_is_corpus_order(byte_corpus):
    stream = TokenStream("val", 2, 50, corpus=byte_corpus, shuffle=False)
    tokens = np.asarray(byte_corpus.tokens("val")).astype(np.int64)
    x, y = stream.batch(0)
    assert x.tolist() == [tokens[0:50].tolist(), tokens[50:100].tolist()]
    assert y.tolist() == [tokens[1:51].tolist(), tokens[51:101].tolist()]


def test_batches_for_tokens():
    assert batches_for_tokens(0, 4, 8) == 0
    assert batches_for_tokens(32, 4, 8) == 1
    assert batches_for_tokens(33, 4, 8) == 2
    assert batches_for_tokens(10_000, 8, 1024) == 2
    with pytest.raises(ValueError, match="batch_size"):
        batches_for_tokens(10, 0, 8)


def test_stream_batches_for_tokens(byte_corpus):
    stream = TokenStream("train", 3, 16, corpus=byte_corpus)
    assert stream.tokens_per_batch == 48
    assert stream.batches_for_tokens(480) == 10


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(split="test", batch_size=2, seq_len=8), ValueError, "split"),
        (dict(split="train", batch_size=0, seq_len=8), ValueError, "batch_size"),
        (dict(split="train", batch_size=2, seq_len=0), ValueError, "seq_len"),
        (dict(split="val", batch_size=1, seq_len=10**9), ValueError, "fewer than seq_len"),
    ],
    ids=["bad_split", "zero_batch", "zero_seq", "seq_longer_than_split"],
)
def test_stream_bad_input(byte_corpus, kwargs, error, message):
    with pytest.raises(error, match=message):
        TokenStream(corpus=byte_corpus, **kwargs)


def test_corpus_bad_input(cache, tmp_path):
    with pytest.raises(ValueError, match="tokenizer must be"):
        load_corpus(tokenizer="wordpiece", cache_dir=cache)
    with pytest.raises(ValueError, match="val_every"):
        load_corpus(tokenizer="byte", cache_dir=cache, max_files=10, val_every=1)
    with pytest.raises(ValueError, match="split is empty"):
        load_corpus(tokenizer="byte", cache_dir=cache, max_files=1)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_corpus(tokenizer="byte", cache_dir=cache, root=tmp_path / "missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if data.bpe_available():
            with pytest.raises(ValueError, match="vocab_size"):
                load_corpus(tokenizer="bpe", vocab_size=70000, cache_dir=cache, **SUBSET)
