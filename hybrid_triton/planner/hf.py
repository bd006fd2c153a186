"""Hugging Face causal LMs in the planner's traced mode: the real module, built from its config.

:func:`trace_hf` builds the model that ``AutoModelForCausalLM.from_config`` builds (on the meta
device: no weights, no memory, nothing downloaded), and measures one training step of it
under fake tensors with :func:`~hybrid_triton.planner.traced.trace_step`: a forward with
``labels=input_ids`` (transformers' own loss, which upcasts the logits to fp32), backward and
the optimizer step, with attention, dropout and the cuBLAS workspace as CUDA has them. Any
family transformers knows works, including those the formulas do not model.

Needs ``transformers`` (``pip install 'hybrid-triton[hf]'``); importing this module does not
import it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from typing import Any

import torch
import torch.nn as nn

from hybrid_triton.planner.setup import TrainSetup
from hybrid_triton.planner.specs import PlannerError
from hybrid_triton.planner.traced import TraceResult, segment_rounding, trace_step

INSTALL_HINT = "pip install 'hybrid-triton[hf]' (or pip install transformers)"


def transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise PlannerError(
            f"traced mode for Hugging Face configs needs transformers: {INSTALL_HINT}"
        ) from exc
    return transformers


def read_config_dict(path: str | os.PathLike) -> dict:
    """A ``config.json`` (the file or its folder) as a dict, with clear errors."""
    where = os.fspath(path)
    if os.path.isdir(where):
        where = os.path.join(where, "config.json")
    if not os.path.isfile(where):
        raise PlannerError(f"no Hugging Face config.json at {where!r}")
    try:
        with open(where, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except UnicodeDecodeError as exc:
        raise PlannerError(f"{where}: not a UTF-8 text file ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{where}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise PlannerError(f"{where}: cannot read it ({exc.strerror})") from exc
    if not isinstance(cfg, dict):
        raise PlannerError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def hf_config(source: str | os.PathLike | dict | Any):
    """A transformers ``PretrainedConfig`` from a config.json path, a dict or a config."""
    transformers = _transformers()
    if isinstance(source, transformers.PretrainedConfig):
        return source
    cfg = read_config_dict(source) if not isinstance(source, dict) else dict(source)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise PlannerError("the Hugging Face config has no model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise PlannerError(
            f"transformers {transformers.__version__} does not know model_type {model_type!r}"
        )
    try:
        return transformers.AutoConfig.for_model(model_type, **cfg)
    except Exception as exc:  # transformers validates configs with several error types
        raise PlannerError(f"transformers refuses this {model_type} config: {exc}") from exc


def meta_model(config, attn_implementation: str | None = None) -> nn.Module:
    """The causal LM ``AutoModelForCausalLM.from_config`` builds, on the meta device.

    ``attn_implementation``: what the model runs ("sdpa", "eager"); default: the config's
    own choice if it sets one, else "sdpa" (transformers' default where it is supported)."""
    transformers = _transformers()
    attn = attn_implementation or getattr(config, "_attn_implementation_internal", None) or "sdpa"
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except ValueError as exc:
        raise PlannerError(f"cannot build a causal LM from this config: {exc}") from exc


def is_hf_model(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (without importing it)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
        for cls in type(module).__mro__
    )


def hf_batch(model: nn.Module, setup: TrainSetup) -> tuple[torch.Tensor]:
    """Token ids ``[micro_batch, seq_len]`` (the labels are the same tensor)."""
    vocab = model.config.vocab_size
    return (torch.randint(0, vocab, (setup.micro_batch, setup.seq_len), dtype=torch.int64),)


def hf_loss(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, object]:
    """What a user's loop runs: ``out = model(input_ids=x, labels=x)``; ``out.loss``, and
    the output (it holds the logits) for ``setup.logits_lifetime``."""
    (ids,) = batch
    out = model(input_ids=ids, labels=ids)
    return out.loss, out


def hf_chunked_loss(chunk_tokens: int):
    """The loss of a model ``prepare`` gave the chunked linear cross-entropy (no logits)."""
    from hybrid_triton.models.hf_loss import causal_lm_loss

    def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
        (ids,) = batch
        return causal_lm_loss(model, ids, ids, chunk_tokens=chunk_tokens)

    return loss


class _LigerAllocations(torch.autograd.Function):
    """Liger-Kernel's fused linear cross-entropy as it allocates (its
    ``fused_linear_cross_entropy_forward``), for tracing under fake tensors only: zeroed
    gradients of the input (its dtype) and of the weight (the weight's dtype), an fp32
    per-row loss, and per chunk of ``next_pow2(ceil(BT / ceil(V / H)))`` rows the chunk's
    logits, turned into their gradient in place and folded into both gradients, which
    backward returns. No number here is meaningful: fake tensors have no values."""

    @staticmethod
    def forward(ctx, hidden, weight):
        rows, width = hidden.shape
        vocab = weight.shape[0]
        inc = -(-vocab // width)
        chunk = min(rows, 1 << max(0, (-(-rows // inc) - 1).bit_length()))
        grad_input = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        loss_1d = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h = hidden[start : start + chunk]
            logits = h @ weight.t()
            grad_input[start : start + chunk] = logits @ weight
            grad_weight.addmm_(logits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
            del logits
        ctx.save_for_backward(grad_input, grad_weight)
        return loss_1d.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_input, grad_weight = ctx.saved_tensors
        return grad_input, grad_weight


def hf_liger_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    """The step Liger-Kernel's patched causal-LM forward runs (the decoder, then its fused
    linear cross-entropy on the hidden states), for tracing."""
    (ids,) = batch
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    weight = model.get_output_embeddings().weight
    return _LigerAllocations.apply(hidden.reshape(-1, hidden.shape[-1]), weight)


def trace_hf(
    source,
    setup: TrainSetup,
    kernels: str = "cuda",
    attn_implementation: str | None = None,
    drop_grads: bool = False,
) -> TraceResult:
    """One training step of a Hugging Face causal LM under fake tensors.

    ``source``: a ``config.json`` path or dict, a ``PretrainedConfig``, or a live
    ``PreTrainedModel`` (its structure is copied; it is not changed). With
    ``setup.checkpointing`` the model's own ``gradient_checkpointing_enable`` (non-reentrant)
    is switched on in the copy, on every layer (transformers has no per-layer switch). With
    ``setup.fused_loss`` the loss is the toolkit's chunked linear cross-entropy over the
    decoder's hidden states (:func:`hybrid_triton.models.hf_loss.causal_lm_loss`, chunks of
    ``setup.loss_chunk_tokens``) instead of transformers' full-logits loss."""
    if setup.checkpointing and setup.checkpoint_blocks is not None:
        raise PlannerError(
            "Hugging Face models checkpoint every layer (gradient_checkpointing_enable); "
            f"checkpoint_blocks={setup.checkpoint_blocks} is not supported in traced mode"
        )
    if isinstance(source, nn.Module):
        if not is_hf_model(source):
            raise PlannerError(f"trace_hf expects a PreTrainedModel, got {type(source).__name__}")
        model = source
    else:
        model = meta_model(hf_config(source), attn_implementation)

    def prepare(copy: nn.Module) -> None:
        if setup.checkpointing:
            copy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    one_step = setup.logits_lifetime == "loss_only" and setup.optimizer != "none"
    with _unpacked_batches():
        try:
            loss = hf_loss
            if setup.fused_loss:
                loss = (
                    hf_liger_loss
                    if setup.fused_loss_impl == "liger"
                    else hf_chunked_loss(setup.loss_chunk_tokens)
                )
            result = trace_step(
                model,
                setup,
                hf_batch,
                loss,
                steps=1 if one_step else 2,
                kernels=kernels,
                prepare=prepare,
                drop_grads=drop_grads,
            )
        except RuntimeError as exc:  # an op the model runs refuses these dtypes or shapes
            raise PlannerError(
                f"{type(model).__name__}'s training step failed under fake tensors with "
                f"{setup.describe()}: {exc}"
            ) from exc
    return _as_steady_step(result) if one_step else result


def _as_steady_step(first: TraceResult) -> TraceResult:
    """The second step from a trace of the first: a step after the first holds what the
    first held at the same point plus the optimizer state, which the first step's optimizer
    creates (nothing else outlives a step when the loss is all the loop keeps). Checked
    against two traced steps in tests/test_planner_hf.py; half the tracing time."""
    state = sum(first.optimizer_state_blocks)
    slack = sum(segment_rounding(b) for b in first.optimizer_state_blocks)
    stages = {
        k: v + (state if k in ("forward", "backward") else 0) for k, v in first.stage_peaks.items()
    }
    peak_stage = max(stages, key=stages.get)
    shifted = peak_stage != "optimizer"
    stage_slack, transient = first.stage_allocator[peak_stage]
    return dataclasses.replace(
        first,
        peak_bytes=stages[peak_stage],
        stage_peaks=stages,
        end_of_forward_bytes=first.end_of_forward_bytes + state,
        peak_stage=peak_stage,
        segment_slack_bytes=stage_slack + (slack if shifted else 0),
        largest_transient_bytes=transient,
    )


@contextlib.contextmanager
def _unpacked_batches():
    """transformers looks for packed sequences in ``position_ids`` when the model runs
    without a cache (as under gradient checkpointing) and, unable to read fake tensors' values,
    assumes they are packed: it then builds an explicit ``[B, 1, T, T]`` mask, which keeps SDPA
    off the flash kernel. The traced batch is one sequence per row, as a real unpacked batch
    is, so the trace says so."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


# --------------------------------------------------------------------------- estimates

# Depth extrapolation must reproduce the shallowest trace to this fraction of its bytes
# (measured: exact to the byte without checkpointing).
COLLINEAR_RTOL = 1e-3


def traceable(setup: TrainSetup) -> str | None:
    """None if ``setup`` is a plain PyTorch step that traced mode runs as a user's loop does;
    else what it cannot run as such."""
    torch_bits = 32 if setup.param_dtype == "fp32" else 16
    if setup.master_weights or setup.grad_mode != "full" or setup.trainer:
        return "the toolkit's master weights, gradient paths or trainer"
    if setup.optimizer != "none" and setup.state_bits != torch_bits:
        return f"{setup.state_bits}-bit optimizer state (torch keeps the parameters' dtype)"
    return composable(setup)


def composable(setup: TrainSetup) -> str | None:
    """None if the step of ``setup`` is the module's own (traced with its gradients dropped
    as produced) plus flat buffers that live through the whole step: the toolkit's master
    weights, gradient buffer and optimizer state (``FusedAdamW``'s fused step has no
    temporaries). Else what it has beyond that."""
    if setup.trainer:
        return "HybridTrainer's own tensors (its dynamics model, Predict direction, residuals)"
    if setup.offload != "none" or setup.checkpoint_blocks is not None:
        return "offloaded state or partial checkpointing"
    if "predict" in setup.phases or "correct" in setup.phases:
        return "the trainer's Predict/Correct phases"
    return None


def toolkit_state_bytes(num_params: int, setup: TrainSetup) -> dict[str, int]:
    """The flat buffers of the toolkit's step for ``num_params`` parameters, by component:
    fp32 master weights, the gradient buffer (flat: the parameters' dtype; hook: the fp32
    accumulator), AdamW's two moments (or SGD's one) at ``setup.state_bits``."""
    from hybrid_triton.planner.estimate import _round, _state_tensor_bytes

    param_bytes = 4 if setup.param_dtype == "fp32" else 2
    out = {"master_weights": 0, "gradients": 0, "optimizer_state": 0}
    if setup.master_weights:
        out["master_weights"] = _round(4 * num_params)
    if setup.grad_mode != "full":
        width = 4 if setup.grad_mode == "hook" else param_bytes
        out["gradients"] = _round(width * num_params)
    moments = {"adamw": 2, "sgd": 1, "none": 0}[setup.optimizer]
    per_moment = sum(_round(b) for b in _state_tensor_bytes(num_params, setup.state_bits))
    out["optimizer_state"] = moments * per_moment + (_round(4) if moments else 0)
    return out


def _layer_period(config) -> int:
    """Layers repeat with this period (e.g. Gemma 2 alternates sliding and global attention)."""
    types = list(getattr(config, "layer_types", None) or [])
    for period in range(1, len(types) + 1):
        if all(types[i] == types[i % period] for i in range(len(types))):
            return period
    return 1


def _with_depth(config, layers: int):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:layers]
    return cfg


def trace_hf_fast(source, setup: TrainSetup, drop_grads: bool = False) -> TraceResult:
    """:func:`trace_hf` of the whole model, computed from traces of ``p``, ``2p`` and ``3p``
    layers (``p``: the layer pattern's period) when the three are exactly linear in depth
    (each stage's peak, the model state and the allocator figures); otherwise the whole
    model is traced. Tracing cost grows with depth, not with width or tokens."""
    config = source if not isinstance(source, (dict, str, os.PathLike)) else hf_config(source)
    if isinstance(config, nn.Module):
        config = config.config
    depth, p = config.num_hidden_layers, _layer_period(config)
    # Checkpointed steps peak where the kept block inputs or the gradients so far are largest,
    # which moves with depth: they are never collinear, so trace them whole at once.
    if depth <= 3 * p or setup.checkpointing:
        return trace_hf(config, setup, drop_grads=drop_grads)
    r1, r2, r3 = (
        trace_hf(_with_depth(config, k * p), setup, drop_grads=drop_grads) for k in (1, 2, 3)
    )
    steps = (depth - 3 * p) / p

    def extend(a: int, b: int, c: int) -> int | None:
        if abs((2 * b - c) - a) > COLLINEAR_RTOL * max(a, 1):
            return None
        return round(c + (c - b) * steps)

    stages = {
        s: extend(r1.stage_peaks[s], r2.stage_peaks[s], r3.stage_peaks[s]) for s in r3.stage_peaks
    }
    fields = {
        f: extend(getattr(r1, f), getattr(r2, f), getattr(r3, f))
        for f in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "end_of_forward_bytes")
    }
    if None in stages.values() or None in fields.values() or r3.peak_stage != r2.peak_stage:
        return trace_hf(config, setup, drop_grads=drop_grads)
    peak_stage = max(stages, key=stages.get)
    slack = extend(r1.segment_slack_bytes, r2.segment_slack_bytes, r3.segment_slack_bytes)
    return TraceResult(
        stages[peak_stage],
        stages,
        attention={k: v * depth // (3 * p) for k, v in r3.attention.items()},
        peak_stage=peak_stage,
        segment_slack_bytes=max(0, slack if slack is not None else r3.segment_slack_bytes),
        largest_transient_bytes=r3.largest_transient_bytes,
        **fields,
    )


def estimate_hf(spec, setup: TrainSetup):
    """The planner's :class:`~hybrid_triton.planner.estimate.Estimate` of a Hugging Face
    model's training step, measured by tracing the real module (:func:`trace_hf_fast`)
    rather than by the formulas. ``spec`` must carry its config (``spec.hf_config``).

    A plain PyTorch setup is traced whole (torch's fused AdamW included). A toolkit setup
    (bf16 parameters with fp32 master weights, a flat or hook-folded gradient buffer,
    32/16/8/4-bit moments in ``FusedAdamW``) is the module's step traced with each gradient
    dropped as autograd produces it, plus those flat buffers, which live through the whole
    step (:func:`toolkit_state_bytes`)."""
    from hybrid_triton.planner.estimate import (
        COMPONENTS,
        CUBLAS_WORKSPACE,
        CUDA_CONTEXT,
        Estimate,
        PhaseEstimate,
    )

    if spec.hf_config is None:
        raise PlannerError(f"{spec.name}: no Hugging Face config to trace")
    plain = traceable(setup) is None
    reason = None if plain else composable(setup)
    if reason is not None:
        raise PlannerError(f"traced mode cannot model this setup: it has {reason}")
    if plain:
        result = trace_hf_fast(dict(spec.hf_config), setup)
        state = {"optimizer_state": result.optimizer_state_bytes}
    else:
        module_only = setup.replace(optimizer="none", grad_mode="full", master_weights=False)
        result = trace_hf_fast(dict(spec.hf_config), module_only, drop_grads=True)
        state = toolkit_state_bytes(
            result.param_bytes // (2 if setup.param_dtype != "fp32" else 4), setup
        )
    extra = 0 if plain else sum(state.values())
    peak = result.peak_bytes + extra
    known = dict(
        weights=result.param_bytes,
        **state,
        workspace=CUBLAS_WORKSPACE,
        inputs=8 * setup.tokens_per_micro_batch,
    )
    components = dict.fromkeys(COMPONENTS, 0)  # every component named, as the formulas do
    components.update(known, activations=max(0, peak - sum(known.values())))
    phase = PhaseEstimate(
        "",
        peak,
        f"{result.peak_stage} (traced)",
        components,
        {k: v + extra for k, v in result.stage_peaks.items()},
        result.segment_slack_bytes + (0 if plain else _segments(state)),
        largest_transient_bytes=result.largest_transient_bytes,
        largest_transient_component="activations",
        allocator=setup.allocator,
    )
    phases = {name: dataclasses.replace(phase, phase=name) for name in dict.fromkeys(setup.phases)}
    attention = ", ".join(f"{k} x{v}" for k, v in sorted(result.attention.items()))
    how = "" if plain else "; the toolkit's flat buffers added to the module's own step"
    notes = [
        "traced: the Hugging Face module as it runs (fake tensors, CUDA's attention "
        f"kernels: {attention or 'none'}){how}; 'activations' holds everything made during "
        "the step that is alive at the peak, gradients included"
    ]
    if setup.attention != "flash":
        notes.append(
            f"attention={setup.attention!r} is the formulas' switch: the trace runs the kernel "
            "CUDA picks for these shapes and dtypes (listed above)"
        )
    return Estimate(spec, setup, phases, CUDA_CONTEXT, notes)


def _segments(state: dict[str, int]) -> int:
    """The 2 MiB segment rounding of the toolkit's flat buffers."""
    return sum(segment_rounding(b) for b in state.values())
