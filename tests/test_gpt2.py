"""GPT-2 model: shapes, causality, preset sizes (built on the meta device), tied weights, GPT-2
init, activation checkpointing (same loss and grads, blocks really recomputed), overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from hybrid_triton.models.gpt2 import GPT2, PADDED_VOCAB, PRESETS, GPT2Config, build_gpt2

# Small enough for the CPU, big enough that every code path runs (3 blocks, 4 heads).
SMALL = dict(n_layer=3, n_head=4, n_embd=32, block_size=64, vocab_size=97)


def _tokens(b: int, t: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), dtype=torch.int64)


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 64)], ids=["b1t1", "b2t7", "b3t64_full"])
def test_forward_shapes_and_loss(shape):
    model = build_gpt2("gpt2-tiny", **SMALL)
    idx, targets = _tokens(*shape, 97), _tokens(*shape, 97)
    logits, loss = model(idx, targets)
    assert logits.shape == (*shape, 97) and logits.dtype == torch.float32
    expected = F.cross_entropy(logits.double().view(-1, 97), targets.view(-1))
    assert_close("loss", loss, expected, rtol=1e-6)
    logits2, no_loss = model(idx)
    assert no_loss is None
    assert_close("logits without targets", logits2, logits)


def test_ignore_index():
    model = build_gpt2("gpt2-tiny", **SMALL)
    idx, targets = _tokens(2, 9, 97), _tokens(2, 9, 97)
    targets[0, :4] = -1
    logits, loss = model(idx, targets)
    keep = targets.view(-1) != -1
    expected = F.cross_entropy(logits.double().view(-1, 97)[keep], targets.view(-1)[keep])
    assert_close("loss with ignored positions", loss, expected, rtol=1e-6)


def test_causal():
    model = build_gpt2("gpt2-tiny", **SMALL).eval()
    idx = _tokens(2, 20, 97)
    changed = idx.clone()
    changed[:, 11:] = (changed[:, 11:] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert_close("logits before the change", b[:, :11], a[:, :11], atol=1e-6)
    assert (a[:, 11:] - b[:, 11:]).abs().amax() > 1e-3, "later positions must see the change"


PRESET_RANGES = {
    "gpt2-small": (123e6, 126e6),
    "gpt2-medium": (350e6, 360e6),
    "gpt2-1b": (1.25e9, 1.40e9),
}


@pytest.mark.parametrize("name", sorted(PRESET_RANGES))
def test_preset_sizes_on_meta(name):
    model = build_gpt2(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    cfg = GPT2Config.from_name(name)
    n = model.num_params()
    lo, hi = PRESET_RANGES[name]
    assert lo <= n <= hi, f"{name}: {n / 1e6:.1f}M parameters, expected {lo / 1e6}-{hi / 1e6}M"
    assert n == cfg.num_params(), "the formula must match the built module"
    assert model.num_params(non_embedding=True) == n - cfg.block_size * cfg.n_embd
    assert cfg.vocab_size == PADDED_VOCAB == 50304


def test_preset_shapes():
    expect = {
        "gpt2-tiny": (2, 2, 64),
        "gpt2-small": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-1b": (24, 16, 2048),
    }
    assert set(PRESETS) == set(expect)
    for name, (layers, heads, width) in expect.items():
        cfg = GPT2Config.from_name(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (layers, heads, width), name
        assert cfg.dropout == 0.0 and not cfg.activation_checkpointing
    # GPT-2 small has 148 parameter tensors (the tied embedding counted once).
    assert len(list(build_gpt2("gpt2-small", device="meta").parameters())) == 148


def test_tied_weights():
    model = build_gpt2("gpt2-tiny", **SMALL)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # stored once
    _, loss = model(_tokens(2, 8, 97), _tokens(2, 8, 97))
    loss.backward()
    # The shared gradient gets both the embedding lookup's and the output projection's parts:
    # rows of tokens never seen as input still get an output-side gradient.
    g = model.transformer.wte.weight.grad
    assert g is not None and (g.abs().sum(dim=1) > 0).all()


def test_gpt2_init():
    cfg = GPT2Config(n_layer=8, n_head=4, n_embd=128, block_size=128, vocab_size=1000)
    model = GPT2(cfg)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert (p == 0).all(), name
        elif ".ln_" in name or "ln_f" in name:
            assert (p == 1).all(), name
        else:
            std = resid if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() - std) < 0.1 * std, f"{name}: std {p.std().item()}, {std}"


def _loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_same_loss_and_grads():
    model = build_gpt2("gpt2-tiny", **SMALL)
    idx, targets = _tokens(2, 33, 97), _tokens(2, 33, 97)
    calls = []
    for block in model.transformer.h:
        # A pre-hook: recomputation stops early once the saved tensors are rebuilt, so the
        # block's forward hook would not fire in backward.
        block.register_forward_pre_hook(lambda *_: calls.append(1))

    loss_plain, grads_plain = _loss_and_grads(model, idx, targets)
    plain_calls = len(calls)
    calls.clear()
    model.activation_checkpointing = True
    loss_ckpt, grads_ckpt = _loss_and_grads(model, idx, targets)

    assert plain_calls == SMALL["n_layer"]
    assert len(calls) == 2 * SMALL["n_layer"], "each block must run again in backward"
    assert_close("loss", loss_ckpt, loss_plain)
    for name, g in grads_plain.items():
        assert_close(f"grad {name}", grads_ckpt[name], g, atol=1e-7, rtol=1e-6)

    calls.clear()
    with torch.no_grad():
        model(idx, targets)
    assert len(calls) == SMALL["n_layer"], "no recomputation without autograd"


def test_checkpointing_from_config():
    model = build_gpt2("gpt2-tiny", activation_checkpointing=True, **SMALL)
    assert model.activation_checkpointing


def test_tiny_overfits_one_batch():
    model = build_gpt2("gpt2-tiny", vocab_size=97, block_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    idx, targets = _tokens(4, 32, 97), _tokens(4, 32, 97)
    first = None
    for _ in range(150):
        _, loss = model(idx, targets)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert abs(first - math.log(97)) < 0.5, f"initial loss {first} should be near ln(V)"
    assert loss.item() < 0.2, f"a tiny model must memorize one batch, loss {loss.item()}"


@pytest.mark.parametrize(
    "idx, targets, message",
    [
        (torch.zeros(2, 4), None, "int64"),
        (torch.zeros(8, dtype=torch.int64), None, r"\[B, T\]"),
        (torch.zeros(1, 65, dtype=torch.int64), None, "block_size"),
        (torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64), "targets"),
        (torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int32), "targets"),
    ],
    ids=["float_idx", "1d_idx", "too_long", "targets_shape", "targets_dtype"],
)
def test_bad_input(idx, targets, message):
    model = build_gpt2("gpt2-tiny", **SMALL)
    with pytest.raises(ValueError, match=message):
        model(idx, targets)


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPT2Config.from_name("gpt2-huge")
    with pytest.raises(ValueError, match="n_layer"):
        GPT2Config(n_layer=0)


@pytest.mark.gpu
def test_gpt2_small_bf16_autocast_on_gpu():
    model = build_gpt2("gpt2-small", device="cuda")
    idx = torch.randint(0, 50257, (2, 1024), device="cuda")
    targets = torch.randint(0, 50257, (2, 1024), device="cuda")
    with torch.no_grad():
        _, loss32 = model(idx, targets)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss16 = model(idx, targets)
    assert abs(loss32.item() - math.log(50304)) < 0.5
    assert abs(loss16.item() - loss32.item()) < 0.05


# ----------------------------------------------------------------------------- chunked loss


@pytest.mark.parametrize(
    "shape, chunk",
    [((1, 1), 1), ((2, 7), 1), ((2, 7), 5), ((3, 13), 4), ((3, 64), 1024), ((2, 61), 64)],
    ids=["b1t1_c1", "b2t7_c1", "b2t7_c5", "b3t13_c4_prime", "b3t64_one_chunk", "b2t61_c64"],
)
def test_no_grad_loss_is_chunked_and_equals_full_cross_entropy(shape, chunk):
    torch.manual_seed(1)
    model = build_gpt2("gpt2-tiny", **SMALL, loss_chunk_tokens=chunk).double()
    idx, targets = _tokens(*shape, 97), _tokens(*shape, 97)
    targets.view(-1)[1::3] = -1  # ignored positions, in most chunks
    with torch.no_grad():
        full_logits, _ = model(idx)  # no targets: the logits, whole
        logits, loss = model(idx, targets)
    assert logits is None  # documented: the full logits are never built
    expected = F.cross_entropy(full_logits.view(-1, 97), targets.view(-1), ignore_index=-1)
    assert loss.dtype == torch.float64
    assert_close("chunked loss", loss, expected, rtol=1e-12, atol=0.0)
    # With autograd on, the loss is the ordinary one (and logits come back).
    grad_logits, grad_loss = model(idx, targets)
    assert grad_logits.shape == (*shape, 97)
    assert_close("loss with grad", grad_loss.detach(), expected, rtol=1e-12, atol=0.0)


def test_chunked_loss_every_target_ignored_is_nan_like_cross_entropy():
    model = build_gpt2("gpt2-tiny", **SMALL, loss_chunk_tokens=3)
    idx = _tokens(2, 7, 97)
    targets = torch.full_like(idx, -1)
    with torch.no_grad():
        _, loss = model(idx, targets)
        reference = F.cross_entropy(model(idx)[0].view(-1, 97), targets.view(-1), ignore_index=-1)
    assert torch.isnan(reference) and torch.isnan(loss)


def test_chunked_loss_off_returns_logits():
    model = build_gpt2("gpt2-tiny", **SMALL, loss_chunk_tokens=0)
    idx, targets = _tokens(2, 7, 97), _tokens(2, 7, 97)
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert logits.shape == (2, 7, 97)
    expected = F.cross_entropy(logits.double().view(-1, 97), targets.view(-1))
    assert_close("loss", loss, expected, rtol=1e-6)


def test_chunked_loss_never_allocates_full_logits():
    """Under no_grad, no tensor as large as the [B, T, V] logits is ever allocated; with the
    chunking off (or autograd on) one is (so the check can fail)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    b, t, chunk, vocab = 2, 40, 8, 509
    full_logits = b * t * vocab  # 40720; a chunk's logits: 4072; the MLP's [B, T, 4C]: 10240
    idx, targets = _tokens(b, t, vocab), _tokens(b, t, vocab)
    largest = {}
    for name, chunk_tokens in (("chunked", chunk), ("off", 0)):
        cfg = {**SMALL, "vocab_size": vocab, "loss_chunk_tokens": chunk_tokens}
        model = build_gpt2("gpt2-tiny", **cfg)
        with torch.no_grad(), LargestAllocation() as mode:
            model(idx, targets)
        largest[name] = mode.largest
    assert largest["chunked"] < full_logits // 2, largest
    assert largest["off"] >= full_logits, largest


def test_bad_loss_chunk_tokens():
    with pytest.raises(ValueError, match="loss_chunk_tokens must be an int >= 0"):
        GPT2Config(loss_chunk_tokens=-1)


@pytest.mark.gpu
def test_gpt2_small_chunked_loss_on_gpu_equal_loss_and_lower_peak():
    """bf16 GPT-2 small, 8 x 1024: the chunked no_grad loss equals cross entropy on the full
    logits (both from the same bf16 logits, the reference upcast to fp32 as the chunks are),
    and the forward's peak is below that of the unchunked no_grad forward by at least the
    [B, T, V] bf16 logits (what the chunking removes, with cross entropy's temporaries)."""
    torch.manual_seed(0)
    model = build_gpt2("gpt2-small", device="cuda").to(torch.bfloat16)
    b, t, vocab = 8, 1024, model.config.vocab_size
    idx = torch.randint(0, 50257, (b, t), device="cuda")
    targets = torch.randint(0, 50257, (b, t), device="cuda")
    peaks, losses = {}, {}
    for name, chunk in (("chunked", 1024), ("full", 0)):
        model.loss_chunk_tokens = chunk
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.no_grad():
            logits, loss = model(idx, targets)
            if chunk == 0:
                loss = F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))
            del logits
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - start
        losses[name] = loss.double()
    # cuBLAS may round a [1024, V] product's bf16 outputs differently from the [8192, V] one
    # (another kernel): a one-ulp logit difference moves one token's loss by at most about
    # 4e-3, and the mean over 8192 tokens far less; 1e-4 of a loss near ln(50304) allows it.
    assert_close("chunked loss", losses["chunked"], losses["full"], rtol=1e-4, atol=0.0)
    logits_bytes = b * t * vocab * 2
    assert peaks["full"] - peaks["chunked"] >= logits_bytes, peaks


# ----------------------------------------------------------------------------- selective


@pytest.mark.parametrize("blocks", [0, 1, 2, 3, None], ids=["k0", "k1", "k2", "k3_all", "all"])
def test_checkpoint_blocks_recomputes_the_first_k(blocks):
    """``checkpoint_blocks=K`` recomputes exactly the first K blocks in backward (None: all),
    with the same loss and gradients as no checkpointing."""
    model = build_gpt2("gpt2-tiny", **SMALL)
    idx, targets = _tokens(2, 17, 97), _tokens(2, 17, 97)
    calls: list[int] = []
    for i, block in enumerate(model.transformer.h):
        block.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    loss_plain, grads_plain = _loss_and_grads(model, idx, targets)
    calls.clear()
    model.activation_checkpointing = True
    model.checkpoint_blocks = blocks
    loss_ckpt, grads_ckpt = _loss_and_grads(model, idx, targets)
    k = SMALL["n_layer"] if blocks is None else blocks
    recomputed = sorted(calls[SMALL["n_layer"] :])
    assert recomputed == list(range(k)), f"recomputed blocks {recomputed}, expected the first {k}"
    assert_close("loss", loss_ckpt, loss_plain)
    for name, g in grads_plain.items():
        assert_close(f"grad {name}", grads_ckpt[name], g, atol=1e-7, rtol=1e-6)


def test_bad_checkpoint_blocks_and_fused_loss_config():
    with pytest.raises(ValueError, match="checkpoint_blocks must be None or an int >= 0"):
        GPT2Config(checkpoint_blocks=-1)
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        GPT2Config(checkpoint_blocks=True)
    with pytest.raises(ValueError, match="fused_loss needs loss_chunk_tokens > 0"):
        GPT2Config(fused_loss=True, loss_chunk_tokens=0)


def test_fused_loss_only_with_autograd_and_targets():
    """``fused_loss``: no_grad keeps the chunked evaluation loss, no targets gives logits."""
    model = build_gpt2("gpt2-tiny", **SMALL, fused_loss=True, loss_chunk_tokens=5)
    idx, targets = _tokens(2, 9, 97), _tokens(2, 9, 97)
    logits, loss = model(idx)
    assert logits.shape == (2, 9, 97) and loss is None
    with torch.no_grad():
        none, eval_loss = model(idx, targets)
    assert none is None
    fused_none, fused = model(idx, targets)
    assert fused_none is None and fused.requires_grad
    expected = F.cross_entropy(logits.double().view(-1, 97), targets.view(-1))
    assert_close("fused loss", fused, expected, rtol=1e-5)
    assert_close("no_grad loss", eval_loss, expected, rtol=1e-5)
