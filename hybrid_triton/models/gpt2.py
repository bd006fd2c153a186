"""GPT-2 in plain PyTorch (nanoGPT style): pre-norm blocks, causal SDPA, tied embeddings.

Shapes: ``idx`` and ``targets`` are ``[B, T]`` int64 token ids, ``logits`` is ``[B, T, V]``.

Vocabulary: every preset uses ``vocab_size = 50304``, GPT-2's 50257 tokens padded up to a
multiple of 128 (faster matmuls on tensor cores, as in nanoGPT). The padding rows are ordinary
embedding rows that no token id uses; the planner must count 50304. Any tokenizer whose ids
are below ``vocab_size`` (the corpus tokenizer in ``hybrid_triton.data`` is) works unchanged.

Presets (``GPT2Config.from_name``), all with ``block_size = 1024``, biases, GELU MLP 4x:

| name | layers | heads | width | parameters (tied, counted once) |
| --- | --- | --- | --- | --- |
| gpt2-tiny | 2 | 2 | 64 | about 3.4M (CPU tests) |
| gpt2-small | 12 | 12 | 768 | about 124M |
| gpt2-medium | 24 | 16 | 1024 | about 355M |
| gpt2-1b | 24 | 16 | 2048 | about 1.31B (GPT-3 XL-like width, GPT-2 layout) |

``GPT2Config.num_params()`` gives the count from the formula without building anything;
``GPT2.num_params()`` counts a built module (build big ones on the meta device).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

GPT2_VOCAB = 50257
PADDED_VOCAB = 50304  # GPT2_VOCAB rounded up to a multiple of 128


@dataclass
class GPT2Config:
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    activation_checkpointing: bool = False
    # With activation_checkpointing on: how many blocks are checkpointed, the first ones
    # (their recomputation comes last in backward, when the later blocks' saved activations
    # are already freed); None: every block. A memory knob between none and all.
    checkpoint_blocks: int | None = None
    # Without autograd and with targets, the loss is computed over this many tokens at a time
    # and the full [B, T, V] logits never exist (forward returns logits=None); 0 turns it off.
    loss_chunk_tokens: int = 1024
    # With autograd on and targets: the loss comes from the chunked fused linear +
    # cross-entropy (hybrid_triton.models.fused_loss, chunks of loss_chunk_tokens positions,
    # gradients made during forward) and forward returns logits=None: the [B, T, V] logits
    # and cross entropy's vocabulary-sized temporaries never exist.
    fused_loss: bool = False

    def __post_init__(self) -> None:
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT2Config.{field} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2Config: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 0:
            raise ValueError(
                f"GPT2Config.loss_chunk_tokens must be an int >= 0, got {self.loss_chunk_tokens!r}"
            )
        blocks = self.checkpoint_blocks
        if blocks is not None and (
            isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0
        ):
            raise ValueError(
                f"GPT2Config.checkpoint_blocks must be None or an int >= 0, got {blocks!r}"
            )
        if self.fused_loss and self.loss_chunk_tokens == 0:
            raise ValueError(
                "GPT2Config.fused_loss needs loss_chunk_tokens > 0 (the chunk of positions)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPT2Config:
        """A preset by name (``PRESETS``), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; expected one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count from the formula, tied embedding counted once.

        ``non_embedding=True`` leaves out the position embedding (the token embedding is the
        lm_head and stays), as GPT-2/nanoGPT report it."""
        d, L, b = self.n_embd, self.n_layer, int(self.bias)
        per_block = (
            2 * (d + b * d)  # ln_1, ln_2
            + (d * 3 * d + b * 3 * d)  # c_attn (fused qkv)
            + (d * d + b * d)  # attn c_proj
            + (d * 4 * d + b * 4 * d)  # mlp c_fc
            + (4 * d * d + b * d)  # mlp c_proj
        )
        total = self.vocab_size * d + self.block_size * d + L * per_block + (d + b * d)
        return total - (self.block_size * d if non_embedding else 0)


PRESETS: dict[str, GPT2Config] = {
    "gpt2-tiny": GPT2Config(n_layer=2, n_head=2, n_embd=64),
    "gpt2-small": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-1b": GPT2Config(n_layer=24, n_head=16, n_embd=2048),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, H, T, D]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 language model. ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.config = cfg
        # Read at each forward, so the trainer can switch it on or off after construction.
        self.activation_checkpointing = cfg.activation_checkpointing
        self.loss_chunk_tokens = cfg.loss_chunk_tokens  # read at each forward too
        self.checkpoint_blocks = cfg.checkpoint_blocks  # and these
        self.fused_loss = cfg.fused_loss
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, stored once
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), two per block.
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of the built module, the tied embedding counted once."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        return n - (self.transformer.wpe.weight.numel() if non_embedding else 0)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx``, ``targets``: ``[B, T]`` int64 (``targets`` may use -1 to ignore a position).
        Returns ``logits [B, T, vocab_size]`` and the mean cross entropy (None without
        targets).

        Under ``torch.no_grad()`` with targets (an evaluation, or a Predict step of the
        trainer) and ``loss_chunk_tokens > 0``, the loss is summed over chunks of
        ``loss_chunk_tokens`` positions and divided by the count of counted targets: the same
        mean cross entropy up to summation order (computed in at least fp32, so a bf16 model
        gets an fp32 loss), while at most one chunk's logits (and cross entropy's
        temporaries) exist at a time. ``logits`` is then None; call without targets to get
        them.

        With autograd on, targets and ``fused_loss`` (and ``loss_chunk_tokens > 0``), the loss
        is :func:`~hybrid_triton.models.fused_loss.linear_cross_entropy` over chunks of
        ``loss_chunk_tokens`` positions (fp32; the gradients of the final norm's output and of
        the tied weight are made chunk by chunk during forward); ``logits`` is None as well.

        ``activation_checkpointing`` recomputes the first ``checkpoint_blocks`` blocks (all
        when None) in backward."""
        if idx.dim() != 2 or idx.dtype != torch.int64:
            raise ValueError(
                f"GPT2: idx must be a [B, T] int64 tensor, got {idx.dtype} of shape "
                f"{tuple(idx.shape)}"
            )
        seq_len = idx.shape[1]
        if seq_len > self.config.block_size:
            raise ValueError(
                f"GPT2: sequence length {seq_len} exceeds block_size {self.config.block_size}"
            )
        if targets is not None and (targets.shape != idx.shape or targets.dtype != torch.int64):
            raise ValueError(
                f"GPT2: targets must be int64 of shape {tuple(idx.shape)} like idx, got "
                f"{targets.dtype} of shape {tuple(targets.shape)}"
            )
        pos = torch.arange(seq_len, dtype=torch.int64, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        blocks = self.transformer.h
        checkpointed = len(blocks) if self.checkpoint_blocks is None else self.checkpoint_blocks
        for i, block in enumerate(blocks):
            # Non-reentrant checkpointing keeps only each block's input; the block's
            # activations are recomputed in backward.
            if recompute and i < checkpointed:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss_chunk_tokens > 0:
            if not torch.is_grad_enabled():
                return None, self._chunked_loss(x, targets)
            if self.fused_loss:
                # Imported here: importing the model must not import Triton.
                from hybrid_triton.models.fused_loss import linear_cross_entropy

                loss = linear_cross_entropy(
                    x.reshape(-1, x.size(-1)),
                    self.lm_head.weight,
                    targets.reshape(-1),
                    ignore_index=-1,
                    chunk_tokens=self.loss_chunk_tokens,
                )
                return None, loss
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
        return logits, loss

    def _chunked_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy of ``lm_head(x)`` against ``targets`` (-1 ignored), one chunk of
        positions at a time (no autograd: nothing is kept for a backward). No host sync: the
        chunk bounds come from shapes only."""
        rows = x.reshape(-1, x.size(-1))
        flat_targets = targets.reshape(-1)
        total = None
        for start in range(0, rows.size(0), self.loss_chunk_tokens):
            end = start + self.loss_chunk_tokens
            logits = self.lm_head(rows[start:end])
            # At least fp32, as autocast runs cross_entropy: a bf16 sum over a chunk would
            # round to bf16's 8 bits.
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            part = F.cross_entropy(
                logits, flat_targets[start:end], ignore_index=-1, reduction="sum"
            )
            total = part if total is None else total + part
            del logits, part  # before the next chunk's logits are allocated
        if total is None:  # no positions (B = 0)
            total = rows.new_zeros((), dtype=torch.promote_types(rows.dtype, torch.float32))
        counted = (flat_targets != -1).sum()
        # 0 / 0 = nan when every target is ignored, as F.cross_entropy's mean gives.
        return total / counted


def build_gpt2(
    name_or_config: str | GPT2Config, device: str | torch.device | None = None, **overrides
) -> GPT2:
    """A GPT2 from a preset name or a config. ``device="meta"`` builds it without memory."""
    cfg = (
        GPT2Config.from_name(name_or_config, **overrides)
        if isinstance(name_or_config, str)
        else replace(name_or_config, **overrides)
    )
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return GPT2(cfg)
