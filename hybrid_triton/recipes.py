"""Training recipes for the GPT-2 runs (issue 8): a model, its optimizer and a step, by name.

- ``baseline_fp32``: fp32 weights and compute, ``torch.optim.AdamW`` (``fused=True`` on CUDA).
- ``baseline_bf16``: fp32 weights, bf16 autocast for the forward and backward, fused AdamW.
- ``toolkit_memory`` (issue 8, configuration 3): bf16 shadow weights in flat arenas with fp32
  master weights kept by :class:`hybrid_triton.optim.FusedAdamW` (``state_bits=8`` by
  default), gradients folded into an fp32 flat accumulator by post-accumulate-grad hooks
  (:class:`hybrid_triton.accumulation.GradAccumulator`; no full-size bf16 gradient buffer),
  clipping from the accumulator's device-side norm, the loss from the chunked fused linear +
  cross-entropy (``GPT2Config.fused_loss``: no ``[B, T, V]`` logits), no autocast (the
  parameters are bf16 already), and activation checkpointing chosen by the planner for each
  micro-batch shape: the fewest checkpointed blocks (the first ones) whose estimated peak stays
  within ``memory_budget_gib`` less the planner's 5% accuracy margin (fewer recomputed
  blocks is faster; :func:`plan_checkpoint_blocks`).
  Options (``build_recipe(..., state_bits=4, checkpointing=False)`` or ``run_training(...,
  recipe_options={...})``): ``state_bits`` 32/16/8/4; ``checkpointing`` "auto" (default),
  True (every block), False (none) or an int K (the first K blocks); ``memory_budget_gib``
  (default 4.0, used by "auto"); ``fused_loss`` True/False; ``loss_chunk_tokens`` (1024);
  ``grad_dtype`` "auto" (default: "bf16" for a step of one micro-batch, "fp32" for several),
  "fp32" (the hook-folded fp32 accumulator) or "bf16" (one micro-batch per step: autograd
  writes straight into a flat bf16 gradient buffer, 2 bytes per parameter less, and no
  per-parameter hook runs; for one micro-batch its numbers are those of the fp32 fold, which
  holds a single bf16 gradient exactly, except the tied embedding, whose two gradient terms
  autograd sums in bf16; the GPT-2 1B run under 16 GiB uses it). The hooks
  cost host time: on the H100, GPT-2 small 8x1024, 148 hook launches per step made the fp32
  path host-bound (about 42 ms per step against 27 ms for the bf16 buffer).
  The resolved choice lands in ``RecipeParts.options`` (``checkpoint_blocks``,
  ``planned_peak_gib``) and so in ``TrainingResult.config["recipe_options"]``.

Every built-in builder also takes ``init_device`` (``build_recipe(..., init_device=...)``,
``run_training(..., init_device=...)``; not a recipe option): where the fp32 initialization
runs. The default, the CPU, gives the same model on every machine; the training device is
much faster for big models (GPT-2 1B: seconds instead of a minute) and draws the same model
from that device's generator.

More recipes plug in with ``register_recipe``; a builder takes ``(GPT2Config, torch.device,
OptimConfig, **options)``.

``run_training`` trains a recipe for a token budget on the standard-library corpus
(``hybrid_triton.data``) and records, per optimizer step, the loss, the time and the tokens/s;
the validation loss and perplexity every ``eval_every`` steps (and at the end) on a fixed set of
validation batches; and on CUDA ``torch.cuda.max_memory_allocated``. The step itself never
waits for the device: losses stay on the device until the end of the run, and step times come
from CUDA events read once at the end (on CPU, from the wall clock).

Defaults follow nanoGPT's GPT-2 runs: AdamW(lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on
matrices and embeddings only), linear warm-up then cosine decay to a tenth, gradient norm
clipped to 1.0.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from hybrid_triton import arena as _arena
from hybrid_triton.data import Corpus, TokenStream, batches_for_tokens, load_corpus
from hybrid_triton.models.gpt2 import GPT2, GPT2Config

Batch = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[[Sequence[Batch], float], torch.Tensor]


@dataclass
class OptimConfig:
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 turns clipping off
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1

    def lr_at(self, step: int, total_steps: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        low = self.min_lr_ratio * self.lr
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * progress))


@dataclass
class RecipeParts:
    """What a recipe builds. ``step(micro_batches, lr)`` runs forward and backward on each
    ``(x, y)`` micro-batch, then one optimizer step, and returns the mean loss as a detached
    device scalar (no host sync)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: StepFn
    autocast_dtype: torch.dtype | None
    # Every optimizer of the recipe (``optimizer`` first): the toolkit recipe keeps one per
    # weight-decay group. Empty means ``(optimizer,)``.
    optimizers: tuple[torch.optim.Optimizer, ...] = ()
    options: dict = field(default_factory=dict)  # the recipe options it was built with

    def __post_init__(self) -> None:
        if not self.optimizers:
            self.optimizers = (self.optimizer,)


RecipeBuilder = Callable[..., RecipeParts]  # (GPT2Config, torch.device, OptimConfig, **options)
RECIPES: dict[str, RecipeBuilder] = {}


def register_recipe(name: str) -> Callable[[RecipeBuilder], RecipeBuilder]:
    def wrap(builder: RecipeBuilder) -> RecipeBuilder:
        RECIPES[name] = builder
        return builder

    return wrap


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices and embeddings; leave biases and LayerNorm gains alone (GPT-2 practice).
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _init_device(init_device: str | torch.device | None, device: torch.device) -> torch.device:
    """Where the fp32 initialization runs: the CPU (default) or the training device."""
    where = torch.device("cpu" if init_device is None else init_device)
    if where.type not in ("cpu", device.type):
        raise ValueError(
            f"init_device must be 'cpu' or the training device ({device}), got {init_device!r}"
        )
    return device if where.type == device.type else where


def _fp32_model(cfg: GPT2Config, where: torch.device) -> GPT2:
    """GPT2 initialized in fp32 on ``where`` (the seed set by the caller decides its values)."""
    with torch.device(where):
        return GPT2(cfg)


def _plain_recipe(
    cfg: GPT2Config,
    device: torch.device,
    optim: OptimConfig,
    autocast_dtype: torch.dtype | None,
    init_device: str | torch.device | None = None,
) -> RecipeParts:
    model = _fp32_model(cfg, _init_device(init_device, device)).to(device)
    optimizer = torch.optim.AdamW(
        _param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=optim.betas,
        fused=device.type == "cuda",
    )

    def step(micro_batches: Sequence[Batch], lr: float) -> torch.Tensor:
        model.train()
        total = torch.zeros((), device=device)
        for x, y in micro_batches:
            with _autocast(device, autocast_dtype):
                _, loss = model(x, y)
            (loss / len(micro_batches)).backward()
            total += loss.detach().float()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip, foreach=True)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    return RecipeParts(model, optimizer, step, autocast_dtype)


# ``init_device`` is positional-or-keyword, not keyword-only: it is a build argument
# (``build_recipe(..., init_device=...)``), not a recipe option.
@register_recipe("baseline_fp32")
def baseline_fp32(
    cfg: GPT2Config, device: torch.device, optim: OptimConfig, init_device=None
) -> RecipeParts:
    return _plain_recipe(cfg, device, optim, None, init_device)


@register_recipe("baseline_bf16")
def baseline_bf16(
    cfg: GPT2Config, device: torch.device, optim: OptimConfig, init_device=None
) -> RecipeParts:
    return _plain_recipe(cfg, device, optim, torch.bfloat16, init_device)


# ---------------------------------------------------------------------------------------------
# toolkit_memory: bf16 shadows + fp32 master + hook accumulation + low-bit fused AdamW
# ---------------------------------------------------------------------------------------------


def _shadow_group(
    named: list[tuple[str, torch.nn.Parameter]], device: torch.device
) -> _arena.ArenaGroup:
    # One flat bf16 buffer for these parameters; each becomes a view into it (the shadow).
    return _arena.ArenaGroup.from_params(
        [p for _, p in named], [[name] for name, _ in named], dtype=torch.bfloat16
    )


# The planner's accuracy target (issue 8: estimates within 5% of the measured peak): "auto"
# checkpointing keeps the estimate this far below the budget.
PLANNER_MARGIN = 0.05


def toolkit_setup(
    cfg: GPT2Config,
    micro_batch: int,
    seq_len: int,
    accum: int = 1,
    *,
    state_bits: int = 8,
    checkpoint_blocks: int | None = None,
    fused_loss: bool = True,
    loss_chunk_tokens: int = 1024,
    grad_mode: str = "hook",
):
    """The planner's ``(ModelSpec, TrainSetup)`` for the toolkit_memory recipe: bf16
    parameters without autocast, fp32 master, hook-folded fp32 gradients (``grad_mode``
    "hook"; "flat": the flat bf16 buffer), fused AdamW with ``state_bits`` moments, one phase
    (Full), ``checkpoint_blocks`` first blocks checkpointed (None: every block, 0: none)."""
    from hybrid_triton.planner.setup import setup_preset
    from hybrid_triton.planner.specs import gpt2_spec

    spec = gpt2_spec(
        "gpt2", cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.block_size, bias=cfg.bias
    )
    setup = setup_preset(
        "hybrid",
        micro_batch=micro_batch,
        seq_len=seq_len,
        accum_steps=accum,
        state_bits=state_bits,
        checkpointing=checkpoint_blocks != 0,
        checkpoint_blocks=checkpoint_blocks,
        fused_loss=fused_loss,
        loss_chunk_tokens=loss_chunk_tokens,
        grad_mode=grad_mode,
        trainer=False,
        phases=("full",),
    )
    return spec, setup


GRAD_DTYPES = ("auto", "fp32", "bf16")


def resolve_grad_dtype(grad_dtype: str, accum: int) -> str:
    """toolkit_memory's gradient path for steps of ``accum`` micro-batches: "auto" is the
    flat bf16 buffer for one micro-batch (nothing to accumulate; exact) and the hook-folded
    fp32 accumulator for several (a bf16 sum would round at every add)."""
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype must be one of {GRAD_DTYPES}, got {grad_dtype!r}")
    if grad_dtype != "auto":
        return grad_dtype
    return "bf16" if accum == 1 else "fp32"


def toolkit_peak_bytes(
    cfg: GPT2Config,
    micro_batch: int,
    seq_len: int,
    accum: int = 1,
    *,
    grad_dtype: str = "auto",
    **setup_options,
) -> int:
    """The planner's estimated peak (bytes allocated) of one toolkit_memory step:
    ``grad_dtype`` "bf16" is the planner's gradient mode "flat" (the flat bf16 buffer), "fp32"
    its "hook" (the hook-folded fp32 accumulator).
    ``setup_options``: :func:`toolkit_setup`'s keyword options."""
    from hybrid_triton.planner.estimate import estimate

    grad_dtype = resolve_grad_dtype(grad_dtype, accum)
    mode = "flat" if grad_dtype == "bf16" else "hook"
    spec, setup = toolkit_setup(cfg, micro_batch, seq_len, accum, grad_mode=mode, **setup_options)
    return estimate(spec, setup).peak_bytes


def plan_checkpoint_blocks(
    cfg: GPT2Config,
    micro_batch: int,
    seq_len: int,
    accum: int = 1,
    *,
    memory_budget_gib: float = 4.0,
    margin: float = PLANNER_MARGIN,
    **setup_options,
) -> tuple[int, dict[int, int]]:
    """The fewest checkpointed blocks K (the first K) whose planner estimate of the
    toolkit_memory step is at most ``memory_budget_gib * (1 - margin)``, and the estimated
    peak (bytes) of every K tried. Fewer checkpointed blocks recompute less, so the smallest K
    that fits is the fastest option; when none fits, every block (``cfg.n_layer``).
    ``setup_options``: :func:`toolkit_peak_bytes`'s keyword options (``grad_dtype`` and
    :func:`toolkit_setup`'s)."""
    limit = memory_budget_gib * (1.0 - margin) * 2**30
    peaks: dict[int, int] = {}
    for k in range(cfg.n_layer + 1):
        peaks[k] = toolkit_peak_bytes(
            cfg, micro_batch, seq_len, accum, checkpoint_blocks=k, **setup_options
        )
        if peaks[k] <= limit:
            return k, peaks
    return cfg.n_layer, peaks


def planned_peak_bytes(
    recipe: str,
    cfg: GPT2Config,
    micro_batch: int,
    seq_len: int,
    accum: int = 1,
    options: dict | None = None,
) -> int:
    """The planner's estimated peak (bytes allocated) of one step of ``recipe``: the fp32
    and bf16-autocast setups for the baselines, :func:`toolkit_peak_bytes` for
    toolkit_memory with ``options`` as resolved by the recipe (``RecipeParts.options``:
    ``checkpoint_blocks`` set; before the first step of "auto", the planner's own choice for
    this shape). Host-side, from shapes only; for comparing with a measured peak."""
    from hybrid_triton.planner.estimate import estimate
    from hybrid_triton.planner.setup import setup_preset
    from hybrid_triton.planner.specs import gpt2_spec

    if recipe in ("baseline_fp32", "baseline_bf16"):
        spec = gpt2_spec("gpt2", cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size,
                         cfg.block_size, bias=cfg.bias)  # fmt: skip
        preset = "fp32" if recipe == "baseline_fp32" else "bf16-autocast"
        setup = setup_preset(preset, micro_batch=micro_batch, seq_len=seq_len,
                             accum_steps=accum, phases=("full",))  # fmt: skip
        return estimate(spec, setup).peak_bytes
    if recipe != "toolkit_memory":
        raise ValueError(f"no planner setup for recipe {recipe!r}")
    opts = {**recipe_option_defaults("toolkit_memory"), **(options or {})}
    common = dict(
        state_bits=opts["state_bits"],
        fused_loss=opts["fused_loss"],
        loss_chunk_tokens=opts["loss_chunk_tokens"],
        grad_dtype=opts["grad_dtype"],
    )
    blocks = opts.get("checkpoint_blocks")
    if blocks is None:
        ckpt = opts["checkpointing"]
        if ckpt == "auto":
            blocks, peaks = plan_checkpoint_blocks(
                cfg, micro_batch, seq_len, accum,
                memory_budget_gib=opts["memory_budget_gib"], **common,
            )  # fmt: skip
            return peaks[blocks]
        blocks = cfg.n_layer if ckpt is True else int(ckpt)
    return toolkit_peak_bytes(cfg, micro_batch, seq_len, accum, checkpoint_blocks=blocks, **common)


# Elements per launch of the fp32 sum of squares of a bf16 buffer: bounds any fp32 temporary
# the reduction may make to 128 MiB (the 1B model's buffer has 1.3e9 elements).
SUMSQ_CHUNK = 2**25


def _sumsq_fp32(flat: torch.Tensor) -> torch.Tensor:
    """Sum of squares of ``flat`` as a float32 [1] device tensor (no host sync)."""
    total = torch.zeros(1, dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), SUMSQ_CHUNK):
        chunk = flat[start : start + SUMSQ_CHUNK]
        total += torch.linalg.vector_norm(chunk, 2, dtype=torch.float32).square()
    return total


@register_recipe("toolkit_memory")
def toolkit_memory(
    cfg: GPT2Config,
    device: torch.device,
    optim: OptimConfig,
    *,
    state_bits: int = 8,
    checkpointing: bool | int | str = "auto",
    memory_budget_gib: float = 4.0,
    fused_loss: bool = True,
    loss_chunk_tokens: int = 1024,
    grad_dtype: str = "auto",
    init_device=None,
) -> RecipeParts:
    """bf16 shadow weights, fp32 master weights, hook-accumulated fp32 gradients, fused AdamW
    with ``state_bits`` moments, the fused chunked loss, activation checkpointing per
    ``checkpointing`` ("auto": the planner's choice for ``memory_budget_gib`` at each new
    micro-batch shape, made on the host from shapes only; True: every block; False: none;
    an int K: the first K blocks).

    ``grad_dtype="bf16"``: no accumulator and no hooks; each group's parameters get ``.grad``
    views into one flat bf16 buffer (``FusedAdamW.attach_flat_grads``), which autograd adds
    into in place and the optimizer reads directly: 2 bytes per parameter instead of the
    accumulator's 4, with the same numbers for one micro-batch (the fp32 accumulator would
    hold the bf16 gradient exactly). A step then takes exactly one micro-batch: summing
    several in bf16 would round at every add.

    Building: the fp32 model is initialized on ``init_device`` (CPU by default), its
    parameters go to ``device`` as bf16 and the fp32 values only reach the device as the
    master weights, so the build never holds an fp32 model on the device beside them.

    The parameters are split like the baselines' AdamW groups (matrices and embeddings decay,
    biases and LayerNorm gains do not) into two flat bf16 arenas, each with its own
    ``GradAccumulator`` and ``FusedAdamW``; the clipping norm is the global one, the sum of the
    two accumulators' device-side sums of squares. The master weights start from the fp32
    initialization (not from its bf16 rounding), so both recipes start from the same model.
    """
    from hybrid_triton.accumulation import GradAccumulator
    from hybrid_triton.optim import FusedAdamW

    if state_bits not in (32, 16, 8, 4):
        raise ValueError(f"toolkit_memory: state_bits must be 32, 16, 8 or 4, got {state_bits!r}")
    if not (
        checkpointing == "auto"
        or isinstance(checkpointing, bool)
        or (isinstance(checkpointing, int) and 0 <= checkpointing <= cfg.n_layer)
    ):
        raise ValueError(
            "toolkit_memory: checkpointing must be 'auto', True, False or a block count in "
            f"[0, {cfg.n_layer}], got {checkpointing!r}"
        )
    if isinstance(memory_budget_gib, bool) or not (
        isinstance(memory_budget_gib, (int, float)) and memory_budget_gib > 0
    ):
        raise ValueError(
            f"toolkit_memory: memory_budget_gib must be a number > 0, got {memory_budget_gib!r}"
        )
    if not isinstance(fused_loss, bool):
        raise ValueError(f"toolkit_memory: fused_loss must be True or False, got {fused_loss!r}")
    if isinstance(loss_chunk_tokens, bool) or not (
        isinstance(loss_chunk_tokens, int) and loss_chunk_tokens >= 1
    ):
        raise ValueError(
            f"toolkit_memory: loss_chunk_tokens must be an int >= 1, got {loss_chunk_tokens!r}"
        )
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(
            f"toolkit_memory: grad_dtype must be one of {GRAD_DTYPES}, got {grad_dtype!r}"
        )
    model = _fp32_model(cfg, _init_device(init_device, device))
    # The fp32 initialization, on the CPU until it is copied into the master weights.
    fp32_init = {id(p): p.data.to("cpu") for p in model.parameters()}
    model.to(device=device, dtype=torch.bfloat16)  # the same Parameter objects, bf16 data
    model.fused_loss = fused_loss
    model.loss_chunk_tokens = loss_chunk_tokens
    options = {
        "state_bits": state_bits,
        "checkpointing": checkpointing,
        "memory_budget_gib": memory_budget_gib,
        "fused_loss": fused_loss,
        "loss_chunk_tokens": loss_chunk_tokens,
        "grad_dtype": grad_dtype,
    }

    def set_checkpoint_blocks(blocks: int) -> None:
        model.activation_checkpointing = blocks > 0
        model.checkpoint_blocks = blocks
        options["checkpoint_blocks"] = blocks

    if checkpointing != "auto":
        set_checkpoint_blocks(
            cfg.n_layer if checkpointing is True else int(checkpointing)  # False -> 0
        )
    planned_shape: tuple[int, ...] | None = None

    def plan_for(shape: tuple[int, ...]) -> None:
        # "auto": host-side planner estimates from shapes (a few ms), once per new shape.
        nonlocal planned_shape
        if checkpointing != "auto" or shape == planned_shape:
            return
        micro_batch, seq_len, accum = shape
        blocks, peaks = plan_checkpoint_blocks(
            cfg,
            micro_batch,
            seq_len,
            accum,
            memory_budget_gib=memory_budget_gib,
            state_bits=state_bits,
            fused_loss=fused_loss,
            loss_chunk_tokens=loss_chunk_tokens,
            grad_dtype=grad_dtype,
        )
        set_checkpoint_blocks(blocks)
        options["planned_peak_gib"] = round(peaks[blocks] / 2**30, 4)
        options["planned_for"] = f"{micro_batch}x{seq_len}x{accum}"
        planned_shape = shape

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied: once
    decay_named = [(n, p) for n, p in named if p.dim() >= 2]
    plain_named = [(n, p) for n, p in named if p.dim() < 2]
    groups = [_shadow_group(decay_named, device), _shadow_group(plain_named, device)]
    decays = [optim.weight_decay, 0.0]
    optimizers = []
    for group, weight_decay in zip(groups, decays):
        opt = FusedAdamW(
            group,
            lr=optim.lr,
            betas=optim.betas,
            weight_decay=weight_decay,
            state_bits=state_bits,
            master_weights=True,
            max_grad_norm=optim.grad_clip if optim.grad_clip > 0 else None,
            # The finite check reads the norm the accumulators already computed: no extra pass.
            check_finite=True,
        )
        with torch.no_grad():
            for view, p in zip(group.views(opt.master), group.params):
                view.copy_(fp32_init[id(p)])
        optimizers.append(opt)
    del fp32_init
    flat_grads: list[torch.Tensor] = []
    accumulators: list[GradAccumulator] = []

    def use_gradient_path(path: str) -> None:
        # "bf16": autograd adds into flat bf16 buffers (views as .grad), no hooks; "fp32":
        # hooks fold into fp32 accumulators. "auto" switches when a step's micro-batch count
        # calls for the other path (rare): the old path's buffers are released first.
        nonlocal flat_grads, accumulators
        if path == options.get("grad_path"):
            return
        if path == "bf16":
            for a in accumulators:
                a.remove()
            accumulators = []
            flat_grads = [opt.attach_flat_grads() for opt in optimizers]
        else:
            for opt in optimizers:
                opt.detach_flat_grads()
            flat_grads = []
        options["grad_path"] = path

    if grad_dtype == "bf16":
        use_gradient_path("bf16")

    def accumulators_for(num_micro_batches: int) -> list[GradAccumulator]:
        # Built for a window of N micro-batches (alpha = 1/N); rebuilt, on the same fp32
        # buffers, only if a step gets a different N.
        nonlocal accumulators
        if accumulators and accumulators[0].num_micro_batches == num_micro_batches:
            return accumulators
        buffers = [[a.accumulators[0]] for a in accumulators] or [None] * len(groups)
        for a in accumulators:
            a.remove()
        accumulators = [
            GradAccumulator(g, num_micro_batches, accumulators=buf)
            for g, buf in zip(groups, buffers)
        ]
        return accumulators

    def bf16_step(micro_batches: Sequence[Batch], lr: float) -> torch.Tensor:
        if len(micro_batches) != 1:
            raise ValueError(
                "toolkit_memory step: grad_dtype='bf16' takes exactly one micro-batch per step "
                f"(a bf16 buffer would round every sum), got {len(micro_batches)}; use "
                "grad_dtype='fp32' to accumulate"
            )
        model.train()
        plan_for((*micro_batches[0][0].shape, 1))
        for opt in optimizers:
            opt.zero_grad()  # zeroes the flat buffer in place; re-attaches detached views
        x, y = micro_batches[0]
        loss = model(x, y)[1]  # no autocast, only the loss kept (see the fp32 path)
        loss.backward()
        for opt, flat in zip(optimizers, flat_grads):
            # Host-side pointer check, no sync: a framework that replaced a .grad view would
            # otherwise leave the flat buffer stale and the step would read zeros.
            base, size = flat.data_ptr(), flat.element_size()
            group = opt.arena_group
            for p, seg in zip(group.params, group.table):
                if p.grad is None or p.grad.data_ptr() != base + seg.offset * size:
                    raise RuntimeError(
                        "toolkit_memory step: a parameter's .grad is no longer a view of the "
                        "flat bf16 gradient buffer (was model.zero_grad() called?)"
                    )
        # Global squared norm (clip and finite check) on the device, in fp32.
        grad_sumsq = sum(_sumsq_fp32(flat) for flat in flat_grads)
        for opt, flat in zip(optimizers, flat_grads):
            opt.param_groups[0]["lr"] = lr
            opt.step(grad=flat, grad_sumsq=grad_sumsq)
        return loss.detach().float()

    def step(micro_batches: Sequence[Batch], lr: float) -> torch.Tensor:
        if not micro_batches:
            raise ValueError("toolkit_memory step: got no micro-batches")
        if grad_dtype == "bf16":
            return bf16_step(micro_batches, lr)
        path = resolve_grad_dtype(grad_dtype, len(micro_batches))
        use_gradient_path(path)
        if path == "bf16":
            return bf16_step(micro_batches, lr)
        model.train()
        plan_for((*micro_batches[0][0].shape, len(micro_batches)))
        accs = accumulators_for(len(micro_batches))
        total = torch.zeros((), device=device)
        for x, y in micro_batches:
            # No autocast: the parameters are bf16, so the matmuls already run in bf16, and
            # autocast would run the LayerNorms in fp32 (fp32 copies of their inputs saved for
            # backward, which the planner's bf16 setup does not hold). Keep only the loss:
            # with fused_loss off, a name bound to the logits would hold [B, T, V] through the
            # backward pass.
            loss = model(x, y)[1]
            # Not divided by N: each hook folds grad * (1/N) into the fp32 accumulator.
            loss.backward()
            total += loss.detach().float()
        if not all(a.ready for a in accs):  # host-side counters, no sync
            raise RuntimeError("toolkit_memory step: the accumulators missed a backward pass")
        # Global squared norm of the mean gradient, on the device (clip and finite check).
        grad_sumsq = accs[0].total_sumsq + accs[1].total_sumsq
        for opt, acc in zip(optimizers, accs):
            opt.param_groups[0]["lr"] = lr
            opt.step(grad=acc.accumulators[0], grad_sumsq=grad_sumsq)
        return total / len(micro_batches)

    return RecipeParts(
        model,
        optimizers[0],
        step,
        None,  # bf16 parameters: no autocast, in training and in evaluation
        optimizers=tuple(optimizers),
        options=options,
    )


# Keyword arguments of builders that are build arguments, not recipe options.
BUILD_ARGS = ("init_device",)


def recipe_option_defaults(name: str) -> dict:
    """The options recipe ``name`` accepts, with their defaults."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    params = inspect.signature(RECIPES[name]).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in BUILD_ARGS
    }


def _check_options(name: str, options: dict) -> None:
    accepted = recipe_option_defaults(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"recipe {name!r} has no option(s) {unknown}; it accepts {sorted(accepted) or 'none'}"
        )


def build_recipe(
    name: str,
    model_cfg: GPT2Config | str,
    device: str | torch.device = "cpu",
    optim: OptimConfig | None = None,
    *,
    init_device: str | torch.device | None = None,
    **options,
) -> RecipeParts:
    """(model, optimizer, step) of recipe ``name`` for a GPT-2 config or preset name;
    ``options`` are the recipe's own (``recipe_option_defaults(name)``). ``init_device``:
    where the fp32 initialization runs, the CPU (None, the default) or ``device``; only
    builders that take it (the built-in ones) accept one."""
    _check_options(name, options)
    cfg = GPT2Config.from_name(model_cfg) if isinstance(model_cfg, str) else model_cfg
    device = torch.device(device)
    builder = RECIPES[name]
    if init_device is not None:
        if "init_device" not in inspect.signature(builder).parameters:
            raise ValueError(f"recipe {name!r} does not take init_device")
        _init_device(init_device, device)  # a clear error before anything is built
        options = {**options, "init_device": init_device}
    return builder(cfg, device, optim or OptimConfig(), **options)


@dataclass
class TrainingResult:
    recipe: str
    config: dict
    step_loss: list[float] = field(default_factory=list)
    step_time_s: list[float] = field(default_factory=list)
    step_tokens_per_s: list[float] = field(default_factory=list)
    step_lr: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "val_loss", "val_ppl"}
    tokens_trained: int = 0
    train_time_s: float = 0.0
    # CUDA only (bytes): the peak allocated over the whole run (build included), while the
    # recipe was built, and from the first training step on (what the planner's step
    # estimate is compared with); the peak reserved over the run (what a memory cap limits).
    peak_memory_allocated: int | None = None
    peak_memory_build: int | None = None
    peak_memory_train: int | None = None
    peak_memory_reserved: int | None = None
    stopped_early: bool = False  # max_train_s reached before the last planned step

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second over the whole run (evaluation time left out)."""
        return self.tokens_trained / self.train_time_s if self.train_time_s > 0 else float("nan")

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("step_")}
        out["tokens_per_s"] = self.tokens_per_s
        out["final_train_loss"] = self.step_loss[-1] if self.step_loss else float("nan")
        return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean loss over ``batches`` (one host sync, at the end)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), device=device, dtype=torch.float64)
    for x, y in batches:
        with _autocast(device, autocast_dtype):
            _, loss = model(x, y)
        total += loss.double()
    model.train(was_training)
    return (total / len(batches)).item()


def run_training(
    recipe: str,
    model_cfg: GPT2Config | str,
    tokens: int,
    micro_batch: int,
    accum: int,
    seq_len: int,
    eval_every: int,
    seed: int = 0,
    *,
    corpus: Corpus | None = None,
    device: str | torch.device | None = None,
    optim: OptimConfig | None = None,
    eval_batches: int = 20,
    log: Callable[[str], None] | None = None,
    recipe_options: dict | None = None,
    init_device: str | torch.device | None = None,
    eval_at_start: bool = False,
    max_train_s: float | None = None,
) -> TrainingResult:
    """Train ``recipe`` on ``tokens`` training tokens (rounded up to whole optimizer steps of
    ``micro_batch * accum * seq_len`` tokens) and record the run.

    Validation: the first ``eval_batches`` batches of the validation split in corpus order
    (the same for every recipe and seed), every ``eval_every`` steps and after the last step,
    and before the first step with ``eval_at_start`` (recorded as step 0).
    ``recipe_options``: keyword options of the recipe (e.g. ``{"state_bits": 4}``).
    ``init_device``: where the fp32 initialization runs (``build_recipe``).
    ``max_train_s``: stop after the step during which the training time (evaluation left out,
    read on the host: no sync) passes this many seconds, then evaluate; the learning-rate
    schedule stays the one planned for every step. ``result.stopped_early`` says so.
    """
    if micro_batch < 1 or accum < 1 or seq_len < 1 or eval_every < 1 or eval_batches < 1:
        raise ValueError(
            "micro_batch, accum, seq_len, eval_every and eval_batches must be >= 1; got "
            f"{micro_batch}, {accum}, {seq_len}, {eval_every}, {eval_batches}"
        )
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if max_train_s is not None and not max_train_s > 0:
        raise ValueError(f"max_train_s must be > 0 or None, got {max_train_s!r}")
    _check_options(recipe, recipe_options or {})  # also rejects an unknown recipe
    cfg = GPT2Config.from_name(model_cfg) if isinstance(model_cfg, str) else model_cfg
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's block_size {cfg.block_size}")
    corpus = corpus if corpus is not None else load_corpus()
    if corpus.tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer's vocab ({corpus.tokenizer.vocab_size}) exceeds the model's "
            f"({cfg.vocab_size})"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    optim = optim or OptimConfig()

    torch.manual_seed(seed)
    if on_cuda:
        # A previous run's model can still be held by reference cycles (hooks, optimizer):
        # collect it so this run's peak counts only this run.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    parts = build_recipe(
        recipe, cfg, device, optim, init_device=init_device, **(recipe_options or {})
    )
    if on_cuda:
        torch.cuda.synchronize(device)
        result_build_peak = torch.cuda.max_memory_allocated(device)
        build_reserved = torch.cuda.max_memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)  # from here on: the training steps
    train = TokenStream("train", micro_batch, seq_len, seed, corpus=corpus, device=device)
    val = TokenStream("val", micro_batch, seq_len, corpus=corpus, shuffle=False, device=device)
    val_set = list(val.take(min(eval_batches, max(1, val.num_windows // micro_batch))))
    total_steps = batches_for_tokens(tokens, micro_batch * accum, seq_len)
    tokens_per_step = micro_batch * accum * seq_len

    result = TrainingResult(
        recipe=recipe,
        config=dict(
            model=asdict(cfg),
            tokens=tokens,
            steps=total_steps,
            micro_batch=micro_batch,
            accum=accum,
            seq_len=seq_len,
            eval_every=eval_every,
            eval_batches=len(val_set),
            seed=seed,
            device=str(device),
            init_device=str(init_device or "cpu"),
            tokenizer=corpus.tokenizer.kind,
            optim=asdict(optim),
            recipe_options=dict(parts.options),
        ),
    )
    losses: list[torch.Tensor] = []
    marks: list = []  # CUDA events (or perf_counter times) at each step boundary
    train_time = 0.0

    def mark():
        if on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def record_eval(step: int) -> None:
        val_loss = evaluate(parts.model, val_set, parts.autocast_dtype)
        result.evals.append(
            dict(
                step=step,
                tokens=step * tokens_per_step,
                val_loss=val_loss,
                val_ppl=math.exp(min(val_loss, 700.0)),
            )
        )
        if log:
            log(f"[{recipe}] step {step}/{total_steps} val loss {val_loss:.4f}")

    if eval_at_start:
        record_eval(0)
    if on_cuda:
        torch.cuda.synchronize(device)
    segment_start = time.perf_counter()
    marks.append(mark())
    steps_done = 0
    for step in range(total_steps):
        micro = [train.batch(step * accum + i) for i in range(accum)]
        lr = optim.lr_at(step, total_steps)
        losses.append(parts.step(micro, lr))
        result.step_lr.append(lr)
        marks.append(mark())
        steps_done = step + 1
        out_of_time = (
            max_train_s is not None
            and steps_done < total_steps
            and train_time + time.perf_counter() - segment_start > max_train_s
        )
        if steps_done % eval_every == 0 or steps_done == total_steps or out_of_time:
            if on_cuda:
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - segment_start
            record_eval(steps_done)
            marks.append(None)  # evaluation: not a training interval
            if on_cuda:
                torch.cuda.synchronize(device)
            segment_start = time.perf_counter()
            marks.append(mark())
        if out_of_time:
            result.stopped_early = True
            if log:
                log(f"[{recipe}] stopped after step {steps_done}: max_train_s={max_train_s}")
            break

    if on_cuda:
        torch.cuda.synchronize(device)
        result.peak_memory_build = result_build_peak
        result.peak_memory_train = torch.cuda.max_memory_allocated(device)
        result.peak_memory_allocated = max(result_build_peak, result.peak_memory_train)
        result.peak_memory_reserved = max(build_reserved, torch.cuda.max_memory_reserved(device))
    # Options a recipe resolves while it trains (toolkit_memory's planned checkpointing).
    result.config["recipe_options"] = dict(parts.options)
    result.config["steps_done"] = steps_done
    # Step intervals: consecutive marks with no evaluation between them.
    intervals = []
    for a, b in itertools.pairwise(marks):
        if a is None or b is None:
            continue
        intervals.append(a.elapsed_time(b) / 1e3 if on_cuda else b - a)
    result.step_time_s = intervals[:steps_done]
    result.step_tokens_per_s = [tokens_per_step / t if t > 0 else math.nan for t in intervals]
    result.step_tokens_per_s = result.step_tokens_per_s[:steps_done]
    result.step_loss = torch.stack(losses).tolist() if losses else []
    result.tokens_trained = steps_done * tokens_per_step
    result.train_time_s = train_time
    return result
