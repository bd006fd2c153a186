"""Training setups: everything besides the model that decides how much memory a step takes.

A :class:`TrainSetup` is immutable and validated on construction (nonsense such as batch 0,
an unknown dtype or 5-bit state raises :class:`~hybrid_triton.planner.specs.PlannerError`
with what was expected). ``SETUP_PRESETS`` names the configurations the memory suite runs:

| name | parameters | compute | master | gradients | optimizer state |
| --- | --- | --- | --- | --- | --- |
| fp32 | fp32 | fp32 | - | fp32 in ``.grad`` | AdamW, 2 fp32 moments |
| bf16-autocast | fp32 | bf16 autocast | - | fp32 in ``.grad`` | AdamW, 2 fp32 moments |
| bf16-master | bf16 | bf16 | fp32 | hook-folded into an fp32 accumulator | AdamW |
| hybrid | bf16 | bf16 | fp32 | hook-folded into fp32 | AdamW 8-bit, checkpointing |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from hybrid_triton.planner.specs import PlannerError, unknown_name_error

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}
# HybridTrainer's phases, in run order; a plain training loop (anything but the trainer) has
# one phase, "train", whose steps hold what the trainer's Warmup steps hold.
TRAINER_PHASES = ("warmup", "full", "predict", "correct")
PLAIN_PHASES = ("train",)
PHASES = (*PLAIN_PHASES, *TRAINER_PHASES)
GRAD_MODES = ("full", "hook", "flat")
OPTIMIZERS = ("adamw", "sgd", "none")
STATE_BITS = (32, 16, 8, 4)
OFFLOAD = ("none", "cpu")
PREDICT_MOMENTS = ("keep", "offload", "compress", "drop")
ATTENTION = ("flash", "math")
LOGITS_LIFETIME = ("loss_only", "step", "next_forward")
# Whose fused linear cross-entropy a ``fused_loss`` setup runs: the toolkit's chunked one
# (hybrid_triton.models.fused_loss) or Liger-Kernel's (Hugging Face models in traced mode).
FUSED_LOSS_IMPLS = ("toolkit", "liger")
# PyTorch's CUDA caching allocator: "native" (the default) or "expandable"
# (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True). See estimate.py, "Allocator".
ALLOCATORS = ("native", "expandable")


def _dtype(value: str | None, what: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    key = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
    if key not in DTYPE_BYTES:
        raise unknown_name_error(what, value, DTYPE_BYTES)
    return key


def _choice(value, allowed, what: str):
    if value not in allowed:
        raise unknown_name_error(what, value, [str(a) for a in allowed])
    return value


def default_phases(trainer: bool) -> tuple[str, ...]:
    """The phase plan of a setup that names none: the trainer's four phases, or one."""
    return TRAINER_PHASES if trainer else PLAIN_PHASES


def _phase_plan(phases, trainer: bool) -> tuple[str, ...]:
    if phases is None:
        return default_phases(trainer)
    if isinstance(phases, str):
        raise PlannerError(f"phases must be a sequence of phase names, got the string {phases!r}")
    phases = tuple(phases)
    if not phases:
        raise PlannerError("phases must name at least one phase")
    for phase in phases:
        _choice(phase, PHASES, "phase")
    if "train" in phases and (trainer or len(phases) > 1):
        raise PlannerError(
            "phase 'train' is a plain training loop's only phase; HybridTrainer setups "
            f"(trainer=True) plan {', '.join(TRAINER_PHASES)}, got phases={phases!r}"
        )
    return phases


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlannerError(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainSetup:
    """One training configuration.

    - ``param_dtype``: dtype of the model's parameters ("fp32", "bf16", "fp16").
    - ``autocast``: None, or the autocast dtype ("bf16"/"fp16") the forward runs under.
    - ``master_weights``: an fp32 master copy kept by the optimizer (for low-precision params).
    - ``grad_mode``: "full" (a ``.grad`` per parameter, in the parameter dtype), "hook"
      (post-accumulate-grad hooks fold each gradient into one fp32 accumulator and drop it) or
      "flat" (every ``.grad`` a view of one flat buffer in the parameter dtype, allocated once:
      ``FusedAdamW.attach_flat_grads``, HybridTrainer's ``grad_path="flat"`` and the
      toolkit_memory recipe's bf16 gradients; one micro-batch per step).
    - ``optimizer``: "adamw" (2 moments), "sgd" (1 momentum buffer) or "none"; ``state_bits``
      32 / 16 / 8 / 4 (8 and 4: blockwise with an fp32 scale per 256 / 128 elements).
    - ``micro_batch``, ``seq_len``, ``accum_steps``: sequences per micro-batch, tokens per
      sequence, micro-batches per optimizer step.
    - ``checkpointing``: activation checkpointing per transformer block.
    - ``checkpoint_blocks``: with ``checkpointing``, how many blocks are checkpointed (the
      first ones, as ``GPT2Config.checkpoint_blocks``); None: every block.
    - ``offload``: "none", or "cpu" (optimizer moments live in host memory in every phase).
    - ``predict_moments``: what the Predict phase does with the moments ("keep", "offload",
      "compress" to 8-bit, "drop").
    - ``phases``: the phase plan. Default (None): ``("train",)``, one phase, for a plain
      training loop; ``TRAINER_PHASES`` (warmup, full, predict, correct) for
      ``trainer=True``. A subset of the trainer's phases may be named for any setup (the
      memory suite plans a plain loop as "full"); "train" is a plain loop's only phase.
    - ``attention``: "flash" (fused SDPA: saves q, k, v, out, logsumexp) or "math" (the T x T
      scores and probabilities are materialized).
    - ``logits_lifetime``: how long the caller holds the returned logits: "loss_only" (the
      loss function drops them as the forward returns, as HybridTrainer's ``loss_fn`` does
      with ``model(x, y)[1]``; the default), "step" (held through backward and the optimizer
      step: ``_, loss = model(x, y)`` inside a step function keeps them bound to ``_`` until it
      returns, as the project's baseline recipes do), or "next_forward" (``logits, loss =
      model(x, y)`` in a loop: the old logits live until the next forward returns, as in
      nanoGPT).
    - ``loss_chunk_tokens``: the model computes a ``no_grad`` loss (Predict) over chunks of
      this many positions without materializing the ``[N, V]`` logits, as the project's
      ``GPT2`` does (``GPT2Config.loss_chunk_tokens``, default 1024); 0: the full logits, as
      any other model. Only GPT-2 specs use it (Llama specs model Hugging Face modules).
    - ``fused_loss``: the training forward computes the loss with the chunked fused linear +
      cross-entropy (``GPT2Config.fused_loss``, chunks of ``loss_chunk_tokens`` positions,
      gradients made during forward): no ``[N, V]`` logits. GPT-2 specs, and Hugging Face
      specs in traced mode (``hybrid_triton.models.hf_loss.causal_lm_loss``).
    - ``fused_loss_impl``: with ``fused_loss``, "toolkit" (the toolkit's chunked loss) or
      "liger" (Liger-Kernel's ``LigerFusedLinearCrossEntropy``, as its Hugging Face patches
      run it: traced mode allocates what it allocates; Hugging Face specs only).
    - ``trainer``: count ``HybridTrainer``'s own tensors: at Predict entry the fp32
      temporaries that build the update direction (the moments are still on the GPU), the
      moments prefetched back before Predict ends, the direction kept through Correct and
      Correct's copy of the master weights during its optimizer step. Default: on exactly
      when gradients are hook-folded (the trainer's way with several micro-batches; pass
      ``trainer=True`` with ``grad_mode="flat"`` for its one-micro-batch path).
    - ``allocator``: the CUDA caching allocator the run uses, which decides how much memory
      it reserves beyond the allocated peak (what a memory cap or the card limits): "native"
      (PyTorch's default: one segment per large allocation; freed segments reused by smaller
      tensors leave pieces too small for the next vocabulary-sized buffer) or "expandable"
      (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: one segment per stream that grows
      by mapping 20 MiB pages; free pages are unmapped under pressure). Default "native":
      what plain PyTorch runs. It changes no allocated figure, only the reserved one.
    """

    param_dtype: str = "fp32"
    autocast: str | None = None
    master_weights: bool = False
    grad_mode: str = "full"
    optimizer: str = "adamw"
    state_bits: int = 32
    micro_batch: int = 1
    seq_len: int = 1024
    accum_steps: int = 1
    checkpointing: bool = False
    offload: str = "none"
    predict_moments: str = "offload"
    phases: tuple[str, ...] | None = None
    attention: str = "flash"
    logits_lifetime: str = "loss_only"
    trainer: bool | None = None
    loss_chunk_tokens: int = 1024
    checkpoint_blocks: int | None = None
    fused_loss: bool = False
    allocator: str = "native"
    fused_loss_impl: str = "toolkit"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize in place once
        set_(self, "param_dtype", _dtype(self.param_dtype, "param dtype"))
        set_(self, "autocast", _dtype(self.autocast, "autocast dtype", allow_none=True))
        if self.autocast == "fp32":
            set_(self, "autocast", None)
        _choice(self.grad_mode, GRAD_MODES, "gradient mode")
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.state_bits, STATE_BITS, "optimizer state bits")
        _choice(self.offload, OFFLOAD, "offload strategy")
        _choice(self.predict_moments, PREDICT_MOMENTS, "Predict moments policy")
        _choice(self.attention, ATTENTION, "attention implementation")
        _choice(self.logits_lifetime, LOGITS_LIFETIME, "logits lifetime")
        _choice(self.allocator, ALLOCATORS, "allocator")
        _choice(self.fused_loss_impl, FUSED_LOSS_IMPLS, "fused loss implementation")
        _count(self.micro_batch, "micro_batch")
        _count(self.seq_len, "seq_len")
        _count(self.accum_steps, "accum_steps")
        chunk = self.loss_chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise PlannerError(f"loss_chunk_tokens must be an int >= 0, got {chunk!r}")
        blocks = self.checkpoint_blocks
        if blocks is not None and (
            isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0
        ):
            raise PlannerError(f"checkpoint_blocks must be None or an int >= 0, got {blocks!r}")
        if not isinstance(self.fused_loss, bool):
            raise PlannerError(f"fused_loss must be True or False, got {self.fused_loss!r}")
        if self.fused_loss and chunk == 0:
            raise PlannerError("fused_loss needs loss_chunk_tokens > 0 (the chunk of positions)")
        if self.grad_mode == "flat" and self.accum_steps != 1:
            raise PlannerError(
                "grad_mode 'flat' takes one micro-batch per step (a flat buffer in the "
                f"parameter dtype would round every sum), got accum_steps={self.accum_steps}; "
                "use 'hook'"
            )
        if self.trainer is None:
            set_(self, "trainer", self.grad_mode == "hook")
        elif not isinstance(self.trainer, bool):
            raise PlannerError(f"trainer must be True, False or None, got {self.trainer!r}")
        set_(self, "phases", _phase_plan(self.phases, self.trainer))
        if self.master_weights and self.param_dtype == "fp32":
            raise PlannerError(
                "master_weights needs low-precision parameters (bf16/fp16): "
                "fp32 parameters are their own master copy"
            )
        if self.autocast is not None and DTYPE_BYTES[self.param_dtype] <= 2:
            raise PlannerError(
                f"autocast to {self.autocast} with {self.param_dtype} parameters "
                "changes nothing; use autocast with fp32 parameters"
            )

    @property
    def compute_dtype(self) -> str:
        return self.autocast or self.param_dtype

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    def replace(self, **changes) -> TrainSetup:
        """A copy with ``changes``; a default phase plan follows a change of ``trainer`` (a
        plain setup made a trainer one gets the trainer's phases, and back)."""
        if "phases" not in changes and self.phases == default_phases(self.trainer):
            changes["phases"] = None
        return replace(self, **changes)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["phases"] = list(self.phases)
        return out

    def describe(self) -> str:
        parts = [f"{self.param_dtype} params"]
        if self.autocast:
            parts.append(f"{self.autocast} autocast")
        if self.master_weights:
            parts.append("fp32 master")
        parts.append(
            {"hook": "hook-folded fp32 grads", "flat": f"flat {self.param_dtype} grads"}.get(
                self.grad_mode, "full grads"
            )
        )
        if self.optimizer != "none":
            parts.append(f"{self.optimizer} {self.state_bits}-bit state")
        if self.offload != "none":
            parts.append(f"state offloaded to {self.offload}")
        if self.checkpointing:
            blocks = self.checkpoint_blocks
            parts.append("checkpointing" + (f" ({blocks} blocks)" if blocks is not None else ""))
        if self.fused_loss:
            parts.append(
                "fused chunked loss" if self.fused_loss_impl == "toolkit" else "Liger fused loss"
            )
        parts.append(f"batch {self.micro_batch}x{self.seq_len}")
        if self.accum_steps > 1:
            parts.append(f"accum {self.accum_steps}")
        if self.allocator == "expandable":
            parts.append("expandable segments")
        return ", ".join(parts)


# The baselines are the project's recipes (``hybrid_triton.recipes._plain_recipe``): their step
# binds the logits to ``_`` (``_, loss = model(x, y)``), which lives until the step returns.
SETUP_PRESETS: dict[str, dict] = {
    "fp32": dict(param_dtype="fp32", logits_lifetime="step"),
    "bf16-autocast": dict(param_dtype="fp32", autocast="bf16", logits_lifetime="step"),
    # HybridTrainer's setups: gradient mode "trainer" is its TrainerConfig.grad_path "auto":
    # a flat bf16 buffer for one micro-batch per step, the hook-folded fp32 accumulator for
    # several (setup_preset decides from accum_steps).
    "bf16-master": dict(param_dtype="bf16", master_weights=True, grad_mode="trainer"),
    "hybrid": dict(
        param_dtype="bf16",
        master_weights=True,
        grad_mode="trainer",
        state_bits=8,
        checkpointing=True,
    ),
}


def setup_preset(name: str, **overrides) -> TrainSetup:
    """A setup by preset name (``SETUP_PRESETS``) with fields overridden by keyword."""
    if name not in SETUP_PRESETS:
        raise unknown_name_error("setup preset", name, SETUP_PRESETS)
    fields = {**SETUP_PRESETS[name], **overrides}
    if SETUP_PRESETS[name].get("grad_mode") == "trainer":
        fields.setdefault("trainer", True)  # HybridTrainer's own tensors, whatever grad_mode
        if fields["grad_mode"] == "trainer":
            fields["grad_mode"] = "flat" if fields.get("accum_steps", 1) == 1 else "hook"
    return TrainSetup(**fields)
