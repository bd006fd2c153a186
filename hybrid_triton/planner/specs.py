"""Model specs for the planner: what a model is made of, without building it.

A :class:`ModelSpec` is the architecture (family, layers, width, heads, MLP width, vocabulary)
plus the list of its parameter tensors (``ParamTensor``: name, element count, kind). The
tensor list is what the estimate needs for the model state (the caching allocator rounds each
tensor separately; autocast caches a low-precision copy of linear weights only; the largest
tensor bounds a hook-accumulated gradient), and the architecture is what it needs for the
activations.

Three sources:

- :func:`preset` by name (``PRESET_NAMES``): GPT-2 small/medium/large/XL (and the project's
  gpt2-tiny / gpt2-1b), Llama-style 1B, 3B, 7B, 13B.
- :func:`spec_from_hf_config`: a local Hugging Face ``config.json`` (GPT-2, Llama, Mistral,
  Qwen2/Qwen3 families), read from disk only.
- :func:`spec_from_module`: a live ``nn.Module``. The project's GPT-2 is recognized exactly;
  any other module gets its real parameter list and family ``"generic"`` (the formulas do not
  know its activations: use :mod:`hybrid_triton.planner.traced` for those).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field

import torch.nn as nn

FAMILIES = ("gpt2", "llama", "generic")

# GPT-2's 50257 tokens padded to a multiple of 128, as hybrid_triton.models.gpt2 does.
GPT2_PADDED_VOCAB = 50304


class PlannerError(ValueError):
    """A bad name, file or number given to the planner; the message says what was expected."""


def unknown_name_error(kind: str, name: str, known) -> PlannerError:
    """A clear error for an unknown name, with the closest known names as suggestions."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name).lower(), known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return PlannerError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor. ``kind``: "linear" (a matmul weight or bias: autocast casts it),
    "embedding" (looked up, not cast), "norm" (LayerNorm/RMSNorm: autocast keeps fp32)."""

    name: str
    numel: int
    kind: str


@dataclass(frozen=True)
class ModelSpec:
    """Architecture plus parameter tensors. ``params`` lists each tensor once (tied weights
    once). For ``family == "generic"`` the architecture fields are 0 (unknown)."""

    name: str
    family: str
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
    tied_embeddings: bool
    bias: bool
    params: tuple[ParamTensor, ...] = field(repr=False)

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head if self.n_head else 0

    @property
    def largest_param_numel(self) -> int:
        return max((p.numel for p in self.params), default=0)

    @property
    def has_activation_model(self) -> bool:
        """Whether the formulas know this family's activations (else use traced mode)."""
        return self.family in ("gpt2", "llama")

    def summary(self) -> str:
        if self.family == "generic":
            return f"{self.name}: {self.num_params / 1e6:.1f}M parameters (generic module)"
        return (
            f"{self.name}: {self.family}, {self.n_layer} layers, width {self.d_model}, "
            f"{self.n_head} heads ({self.n_kv_head} kv), MLP {self.d_ff}, vocab "
            f"{self.vocab_size}, {self.num_params / 1e6:.1f}M parameters"
        )


def _positive(name: str, value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlannerError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def gpt2_spec(
    name: str,
    n_layer: int,
    n_embd: int,
    n_head: int,
    vocab_size: int = GPT2_PADDED_VOCAB,
    block_size: int = 1024,
    d_ff: int | None = None,
    bias: bool = True,
) -> ModelSpec:
    """GPT-2 as hybrid_triton.models.gpt2 builds it: fused qkv, GELU MLP, tied lm_head."""
    where = f"GPT-2 spec {name!r}"
    for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head)):
        _positive(key, value, where)
    _positive("vocab_size", vocab_size, where)
    _positive("block_size", block_size, where)
    d, f = n_embd, d_ff if d_ff is not None else 4 * n_embd
    _positive("d_ff", f, where)
    if d % n_head:
        raise PlannerError(f"{where}: n_embd ({d}) must be a multiple of n_head ({n_head})")
    params = [
        ParamTensor("wte", vocab_size * d, "linear"),  # tied: also the lm_head matmul
        ParamTensor("wpe", block_size * d, "embedding"),
    ]

    def linear(prefix: str, n_in: int, n_out: int) -> list[ParamTensor]:
        out = [ParamTensor(f"{prefix}.weight", n_in * n_out, "linear")]
        return out + ([ParamTensor(f"{prefix}.bias", n_out, "linear")] if bias else [])

    def norm(prefix: str) -> list[ParamTensor]:
        out = [ParamTensor(f"{prefix}.weight", d, "norm")]
        return out + ([ParamTensor(f"{prefix}.bias", d, "norm")] if bias else [])

    for i in range(n_layer):
        p = f"h.{i}"
        params += norm(f"{p}.ln_1") + linear(f"{p}.attn.c_attn", d, 3 * d)
        params += linear(f"{p}.attn.c_proj", d, d) + norm(f"{p}.ln_2")
        params += linear(f"{p}.mlp.c_fc", d, f) + linear(f"{p}.mlp.c_proj", f, d)
    params += norm("ln_f")
    return ModelSpec(
        name,
        "gpt2",
        n_layer,
        d,
        n_head,
        n_head,
        f,
        vocab_size,
        block_size,
        True,
        bias,
        tuple(params),
    )


def llama_spec(
    name: str,
    n_layer: int,
    d_model: int,
    n_head: int,
    n_kv_head: int,
    d_ff: int,
    vocab_size: int,
    max_seq_len: int = 4096,
    tied_embeddings: bool = False,
    qkv_bias: bool = False,
    head_dim: int | None = None,
    qk_norm: bool = False,
) -> ModelSpec:
    """Llama-style decoder: RMSNorm, separate q/k/v/o, grouped kv heads, SwiGLU MLP, RoPE."""
    where = f"Llama spec {name!r}"
    for key, value in (
        ("n_layer", n_layer),
        ("d_model", d_model),
        ("n_head", n_head),
        ("n_kv_head", n_kv_head),
        ("d_ff", d_ff),
        ("vocab_size", vocab_size),
        ("max_seq_len", max_seq_len),
    ):
        _positive(key, value, where)
    if n_head % n_kv_head:
        raise PlannerError(f"{where}: n_head ({n_head}) must be a multiple of n_kv_head")
    hd = head_dim if head_dim is not None else d_model // n_head
    _positive("head_dim", hd, where)
    d, q_out, kv_out = d_model, n_head * hd, n_kv_head * hd
    params = [
        ParamTensor("embed_tokens", vocab_size * d, "linear" if tied_embeddings else "embedding")
    ]
    for i in range(n_layer):
        p = f"layers.{i}"
        params.append(ParamTensor(f"{p}.input_layernorm", d, "norm"))
        for proj, n_out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            params.append(ParamTensor(f"{p}.attn.{proj}.weight", d * n_out, "linear"))
            if qkv_bias:
                params.append(ParamTensor(f"{p}.attn.{proj}.bias", n_out, "linear"))
        if qk_norm:
            params += [
                ParamTensor(f"{p}.attn.q_norm", hd, "norm"),
                ParamTensor(f"{p}.attn.k_norm", hd, "norm"),
            ]
        params.append(ParamTensor(f"{p}.attn.o_proj.weight", q_out * d, "linear"))
        params.append(ParamTensor(f"{p}.post_attention_layernorm", d, "norm"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            params.append(ParamTensor(f"{p}.mlp.{proj}.weight", d * d_ff, "linear"))
    params.append(ParamTensor("norm", d, "norm"))
    if not tied_embeddings:
        params.append(ParamTensor("lm_head.weight", vocab_size * d, "linear"))
    return ModelSpec(
        name,
        "llama",
        n_layer,
        d,
        n_head,
        n_kv_head,
        d_ff,
        vocab_size,
        max_seq_len,
        tied_embeddings,
        qkv_bias,
        tuple(params),
    )


_PRESET_ARGS: dict[str, tuple] = {
    # GPT-2 family, vocabulary padded to 50304 as the project's model builds it.
    "gpt2-tiny": (gpt2_spec, dict(n_layer=2, n_embd=64, n_head=2)),
    "gpt2-small": (gpt2_spec, dict(n_layer=12, n_embd=768, n_head=12)),
    "gpt2-medium": (gpt2_spec, dict(n_layer=24, n_embd=1024, n_head=16)),
    "gpt2-large": (gpt2_spec, dict(n_layer=36, n_embd=1280, n_head=20)),
    "gpt2-xl": (gpt2_spec, dict(n_layer=48, n_embd=1600, n_head=25)),
    "gpt2-1b": (gpt2_spec, dict(n_layer=24, n_embd=2048, n_head=16)),
    # Llama-style shapes: 1B and 3B as Llama 3.2 (tied, GQA, 128256 vocab), 7B and 13B as
    # Llama 2 (untied, full attention, 32000 vocab).
    "llama-1b": (
        llama_spec,
        dict(
            n_layer=16,
            d_model=2048,
            n_head=32,
            n_kv_head=8,
            d_ff=8192,
            vocab_size=128256,
            max_seq_len=131072,
            tied_embeddings=True,
        ),
    ),
    "llama-3b": (
        llama_spec,
        dict(
            n_layer=28,
            d_model=3072,
            n_head=24,
            n_kv_head=8,
            d_ff=8192,
            vocab_size=128256,
            max_seq_len=131072,
            tied_embeddings=True,
        ),
    ),
    "llama-7b": (
        llama_spec,
        dict(
            n_layer=32,
            d_model=4096,
            n_head=32,
            n_kv_head=32,
            d_ff=11008,
            vocab_size=32000,
            max_seq_len=4096,
        ),
    ),
    "llama-13b": (
        llama_spec,
        dict(
            n_layer=40,
            d_model=5120,
            n_head=40,
            n_kv_head=40,
            d_ff=13824,
            vocab_size=32000,
            max_seq_len=4096,
        ),
    ),
}
_ALIASES = {"gpt2": "gpt2-small", "gpt2-base": "gpt2-small"}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESET_ARGS)


def preset(name: str) -> ModelSpec:
    """A model spec by preset name (``PRESET_NAMES``); unknown names suggest close ones."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _PRESET_ARGS:
        raise unknown_name_error("model preset", name, PRESET_NAMES)
    builder, kwargs = _PRESET_ARGS[key]
    return builder(key, **kwargs)


# --------------------------------------------------------------------------- HF config.json

_HF_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def spec_from_hf_config(path: str | os.PathLike | dict, name: str | None = None) -> ModelSpec:
    """A spec from a local Hugging Face ``config.json`` (a path to the file or to its folder,
    or the parsed dict). Families: gpt2, llama, mistral, qwen2, qwen3. Nothing is downloaded."""
    if isinstance(path, dict):
        cfg, where = path, "config dict"
    else:
        where = os.fspath(path)
        if os.path.isdir(where):
            where = os.path.join(where, "config.json")
        if not os.path.isfile(where):
            raise PlannerError(f"no Hugging Face config.json at {where!r}")
        try:
            with open(where, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except json.JSONDecodeError as exc:
            raise PlannerError(f"{where}: not valid JSON ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise PlannerError(f"{where}: not a UTF-8 text file ({exc.reason})") from exc
        except OSError as exc:
            raise PlannerError(f"{where}: cannot read it ({exc.strerror})") from exc
    if not isinstance(cfg, dict):
        raise PlannerError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    model_type = str(cfg.get("model_type", "")).lower()
    label = name or cfg.get("_name_or_path") or model_type or "hf-model"

    def need(*keys: str):
        for key in keys:
            if key in cfg and cfg[key] is not None:
                return cfg[key]
        raise PlannerError(f"{where}: {model_type} config lacks {' / '.join(keys)}")

    if model_type == "gpt2":
        return gpt2_spec(
            label,
            n_layer=need("n_layer", "num_hidden_layers"),
            n_embd=need("n_embd", "hidden_size"),
            n_head=need("n_head", "num_attention_heads"),
            vocab_size=need("vocab_size"),
            block_size=need("n_positions", "n_ctx", "max_position_embeddings"),
            d_ff=cfg.get("n_inner"),
        )
    if model_type in _HF_LLAMA_LIKE:
        n_head = need("num_attention_heads")
        return llama_spec(
            label,
            n_layer=need("num_hidden_layers"),
            d_model=need("hidden_size"),
            n_head=n_head,
            n_kv_head=cfg.get("num_key_value_heads") or n_head,
            d_ff=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            max_seq_len=need("max_position_embeddings"),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral only when attention_bias is set.
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            head_dim=cfg.get("head_dim"),
            qk_norm=model_type == "qwen3",
        )
    raise unknown_name_error(
        "Hugging Face model_type", model_type or "<missing>", ("gpt2", *_HF_LLAMA_LIKE)
    )


# --------------------------------------------------------------------------- live modules


def spec_from_module(module: nn.Module, name: str | None = None) -> ModelSpec:
    """A spec from a live module. The project's GPT-2 (``hybrid_triton.models.gpt2.GPT2``)
    and modules with a Hugging Face ``config`` of a known family are recognized exactly;
    anything else becomes a ``"generic"`` spec with its real parameter tensors."""
    if not isinstance(module, nn.Module):
        raise PlannerError(f"spec_from_module expects an nn.Module, got {type(module).__name__}")
    label = name or type(module).__name__
    cfg = getattr(module, "config", None)
    if type(module).__name__ == "GPT2" and hasattr(cfg, "n_embd") and hasattr(cfg, "bias"):
        return gpt2_spec(
            label,
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.vocab_size,
            cfg.block_size,
            bias=cfg.bias,
        )
    if cfg is not None and hasattr(cfg, "to_dict"):
        try:
            return spec_from_hf_config(cfg.to_dict(), name=label)
        except PlannerError:
            pass  # unknown family: fall through to the generic spec
    linear_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    linear_ids |= {
        id(m.bias) for m in module.modules() if isinstance(m, nn.Linear) and m.bias is not None
    }
    embed_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    params = []
    for pname, p in module.named_parameters():  # shared (tied) tensors are yielded once
        kind = "linear" if id(p) in linear_ids else "embedding" if id(p) in embed_ids else "norm"
        params.append(ParamTensor(pname, p.numel(), kind))
    return ModelSpec(label, "generic", 0, 0, 0, 0, 0, 0, 0, False, False, tuple(params))
