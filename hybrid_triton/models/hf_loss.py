"""The chunked linear cross-entropy for Hugging Face causal LMs: the loss without the logits.

transformers' causal-LM forward computes ``logits = lm_head(hidden)`` for every position and
then its loss upcasts them to fp32 (``ForCausalLMLoss``): ``[B*T, V]`` tensors in bf16 and fp32
live through backward (for a Llama-3.2-1B shape at 8 x 1024 tokens, 4 GiB of fp32 logits
alone). :func:`causal_lm_loss` takes the decoder's last hidden states instead and runs
:func:`~hybrid_triton.models.fused_loss.linear_cross_entropy` over them in chunks, with the
labels shifted as transformers shifts them (the last position of each row predicts nothing),
``ignore_index=-100``, and ``num_items_in_batch`` (the Hugging Face ``Trainer``'s token count
over accumulated micro-batches) honoured.

:func:`supports_chunked_loss` says whether a model's head is a plain linear map (no bias, no
logit soft-capping or scaling), which is what the chunked loss computes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_triton.models.fused_loss import linear_cross_entropy

IGNORE_INDEX = -100


def chunked_loss_blocker(model: nn.Module) -> str | None:
    """None if :func:`causal_lm_loss` computes ``model``'s own loss; else why not."""
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "get_decoder"):
        return f"{type(model).__name__} is not a Hugging Face causal LM (no decoder and head)"
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"its output head is {type(head).__name__}, not a linear layer"
    if head.bias is not None:
        return "its output head has a bias"
    cfg = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            return f"its config sets {name}={value} (the chunked loss is a plain linear head)"
    return None


def supports_chunked_loss(model: nn.Module) -> bool:
    return chunked_loss_blocker(model) is None


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 1024,
    num_items_in_batch: torch.Tensor | int | None = None,
    **decoder_kwargs,
) -> torch.Tensor:
    """transformers' causal-LM loss of ``model`` on ``input_ids`` with ``labels`` (the same
    shifting and ignore index), computed without the logits. ``decoder_kwargs`` go to the
    decoder (``attention_mask``, ``position_ids``, ...). Returns the mean over counted tokens,
    or their sum divided by ``num_items_in_batch`` when given."""
    reason = chunked_loss_blocker(model)
    if reason is not None:
        raise ValueError(f"causal_lm_loss: {reason}")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"causal_lm_loss: labels {tuple(labels.shape)} must have input_ids' shape "
            f"{tuple(input_ids.shape)}"
        )
    decoder_kwargs.setdefault("use_cache", False)
    hidden = model.get_decoder()(input_ids=input_ids, **decoder_kwargs).last_hidden_state
    # As ForCausalLMLoss: pad the labels, then shift them; the hidden states stay in place.
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    weight = model.get_output_embeddings().weight
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets,
        ignore_index=IGNORE_INDEX,
        chunk_tokens=chunk_tokens,
    )
    if num_items_in_batch is None:
        return loss
    counted = (targets != IGNORE_INDEX).sum()
    return loss * counted / num_items_in_batch
