"""``StreamingAdamW``: AdamW whose fp32 master weights and moments live in host memory.

For models whose fp32 master weights and moments do not fit the GPU beside the bf16 weights.
Only the bf16/fp16 weights (one flat arena buffer) stay on the device; the fp32 master weights,
the moments (32/16/8/4 bits, the layouts of :mod:`hybrid_triton.kernels.adamw`) and an fp32
gradient accumulator live in host memory (pinned when the weights are on CUDA).

Data flow of one optimizer step of ``N`` micro-batches:

1. **Gradients leave as backward produces them.** A post-accumulate-grad hook per parameter
   copies the gradient into its slice of a host staging buffer (bf16, on the ``d2h`` side
   stream, after an event recorded on the compute stream) and drops ``p.grad``; no
   full-size gradient buffer exists on the GPU, at most the gradients autograd holds.
   A host worker thread waits for that copy's event and folds it into the fp32 accumulator
   with :func:`hybrid_triton.kernels.accumulate.accumulate_grads` (``alpha = 1/N``; the first
   micro-batch overwrites), the same op ``GradAccumulator`` runs on the GPU.
2. **The norm is taken as gradients leave.** On the last micro-batch the worker adds each
   segment's sum of squares, in float64, to the total: a squared float32 is below 2^256 and
   float64 reaches 2^1024, so the sum cannot overflow however large the gradients are (float64
   is the scaling), and the global norm is exact to float32 rounding.
3. **The update** (``step``), after the worker has drained (a host wait; the GPU queue is not
   stalled): the clip coefficient and the skip decision come from that host-side norm, so a
   non-finite step moves no data at all. Then, per chunk of ``chunk_numel`` elements:

   - ``update="device"`` (default): the chunk's master weights, accumulated gradient and
     moments go to one of two device buffer sets (double buffering) on the ``h2d`` stream,
     :func:`hybrid_triton.kernels.adamw.adamw_step` runs on the ``update`` stream and writes
     the new bf16 weights straight into the arena, and the master weights and moments go back
     on the ``d2h`` stream. This is the in-GPU ``FusedAdamW``'s kernel, so the math is the
     same bit for bit.
   - ``update="host"``: ``adamw_step`` runs on the host buffers (its torch reference on a CPU
     tensor, or the Triton interpreter under ``TRITON_INTERPRET=1``) and only the bf16 weights
     are copied to the device. Fewer bytes over PCIe, more host compute; which is faster is
     for a GPU measurement to decide (not yet measured).

Stream schedule (CUDA; on a CPU-only machine every copy is synchronous and the logic is the
same):

======================  =====================================================================
stream                  waits on
======================  =====================================================================
``d2h`` (grad copy)     the compute stream's event recorded in the hook (the grad is ready)
host worker (thread)    that copy's event (``Event.synchronize`` in the worker, not the
                        main thread); the previous step's last ``h2d`` event before the first
                        fold of a window (the accumulator it overwrites was being read)
``h2d`` chunk i         the ``d2h`` event of chunk i-2 (its buffer set is free again)
``update`` chunk i      the compute stream at ``step`` (backward has finished reading the
                        weights it overwrites) and the ``h2d`` event of chunk i
``d2h`` chunk i         the ``update`` event of chunk i
compute stream          the last ``update`` (or host-path ``h2d``) event, before the next
                        forward reads the weights; with ``overlap_next_forward``, each
                        module's forward pre-hook waits only for the chunk holding its
                        last parameter
``d2h`` (host path)     the last host-path ``h2d`` event (the staging it read is reused)
======================  =====================================================================

``pause()`` / ``resume()``: Predict phases need neither gradients nor moments. While paused,
the hooks pass gradients through untouched, ``step`` refuses, and the two device buffer sets
(``2 * chunk_numel`` elements of fp32 master, fp32 gradient and moments) are released: no
PCIe traffic, no host work, less device memory.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from hybrid_triton.arena import ArenaGroup, FlatArena

STATE_FORMAT = "hybrid_triton.StreamingAdamW/1"
# FusedAdamW's state dicts have the same flat buffers and layout: they load here (and ours load
# there after changing the format tag), so a run can move between in-GPU and streamed state.
_FUSED_FORMAT = "hybrid_triton.FusedAdamW/1"
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_UPDATES = ("device", "host")
_NORM_SLICE = 1 << 22  # float64 temporaries of the norm stay <= 32 MiB


def _adamw():
    # Imported on first use: importing hybrid_triton must not import Triton.
    from hybrid_triton.kernels import adamw

    return adamw


def _accumulate_grads(*args, **kwargs):
    from hybrid_triton.kernels.accumulate import accumulate_grads

    return accumulate_grads(*args, **kwargs)


class _Streams:
    """The side streams and events on CUDA; no-ops on the CPU (copies are then synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.d2h = torch.cuda.Stream(device)
            self.h2d = torch.cuda.Stream(device)
            self.update = torch.cuda.Stream(device)
        else:
            self.d2h = self.h2d = self.update = None

    def compute(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def record(self, stream) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        if self.cuda and event is not None:
            stream.wait_event(event)

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()


def _host_buffer(n: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, pin_memory=pin)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class StreamingAdamW(torch.optim.Optimizer):
    """AdamW with bf16/fp16 weights on the device and everything else in host memory.

    Args:
        params: a :class:`FlatArena` with one group, an :class:`ArenaGroup`, or an iterable of
            bf16/fp16 parameters (packed into a new flat buffer, becoming views into it).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        num_micro_batches: backward passes per optimizer step; gradients are averaged
            (``alpha = 1/N``), as ``GradAccumulator`` does.
        state_bits: 32, 16, 8 or 4 (the formats of ``hybrid_triton.kernels.adamw``).
        max_grad_norm: clip the global norm of the accumulated gradient to this.
        update: ``"device"`` (chunks streamed to the GPU, the Triton kernel) or ``"host"``.
        chunk_numel: elements per streamed chunk (rounded up to a multiple of 1024 and of
            ``qblock``); the device holds two chunks' worth of fp32 master, gradient, moments.
        qblock: quantization block for 8/4 bits (default 256 / 128).
        block, num_warps: kernel tuning, passed to ``adamw_step``.
    """

    def __init__(
        self,
        params: FlatArena | ArenaGroup | Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        num_micro_batches: int = 1,
        state_bits: int = 32,
        max_grad_norm: float | None = None,
        update: str = "device",
        chunk_numel: int = 1 << 24,
        qblock: int | None = None,
        block: int | None = None,
        num_warps: int | None = None,
    ) -> None:
        adamw = _adamw()
        _check_options(
            adamw, lr, betas, eps, weight_decay, num_micro_batches, state_bits, max_grad_norm,
            update, chunk_numel, qblock,
        )  # fmt: skip
        group = _to_group(params)
        _check_no_grads(group, "__init__")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm,
        }
        super().__init__(group.params, defaults)
        self.arena_group = group
        self.device = group.device
        self.num_micro_batches = int(num_micro_batches)
        self.state_bits = state_bits
        self.update = update
        self.qblock = (qblock or adamw.DEFAULT_QBLOCK[state_bits]) if state_bits <= 8 else None
        self.chunk_numel = _round_up(int(chunk_numel), max(1024, self.qblock or 1))
        self._tuning = {"block": block, "num_warps": num_warps}
        self._streams = _Streams(group.device)
        self._host = _HostState(group, state_bits, self.qblock, pin=self._streams.cuda)
        self._steps = 0
        self._paused = False
        self._dev_sets: list[dict[str, Any]] | None = None
        self._window = _Window(self.num_micro_batches, len(group.table))
        # One thread: folds run in submission order, so waiting for each segment's latest
        # fold (``_drain``) waits for all of them.
        self._worker = ThreadPoolExecutor(1) if self._streams.cuda else None
        self._folds: list[Future | None] = [None] * len(group.table)
        self._acc_free: torch.cuda.Event | None = None
        self._host_ready: torch.cuda.Event | None = None
        self._sumsq_lock = threading.Lock()
        self._chunk_events: list = []  # per chunk: its new weights are written
        self._generation = 0  # updates published so far
        self._module_hooks: list = []
        self.last_grad_norm: float | None = None
        self.last_step_skipped = False
        owner = weakref.ref(self)
        self._handles = [
            p.register_post_accumulate_grad_hook(_make_hook(owner, si))
            for si, p in enumerate(group.params)
        ]

    # ------------------------------------------------------------------------------------------
    # gradients leaving the device
    # ------------------------------------------------------------------------------------------

    def _on_grad(self, si: int, param: torch.Tensor) -> None:
        if self._paused or param.grad is None:
            return  # paused: gradients pass through, as if the engine were not there
        grad = param.grad
        if grad.layout != torch.strided:
            raise TypeError(f"StreamingAdamW: sparse gradients are not supported ({grad.layout})")
        if not self._window.in_backward:
            self._window.begin(si)
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        seg = self.arena_group.table[si]
        pending = self._folds[si]
        if pending is not None:
            pending.result()  # the staging slice is still being folded (a previous micro-batch)
        st = self._streams
        staged = self._host.staging[seg.offset : seg.end]
        ready = st.record(st.compute())
        st.wait(st.d2h, ready)
        with st.on(st.d2h):
            staged.copy_(grad.reshape(-1), non_blocking=True)
            if st.cuda:
                grad.record_stream(st.d2h)  # the allocator keeps it until the copy is done
        copied = st.record(st.d2h)
        param.grad = None
        self._window.touched[si] = True
        self._submit(si, copied, grad_present=True)

    def _submit(self, si: int, copied, grad_present: bool) -> None:
        first, last = self._window.first, self._window.last
        task = (si, copied, first, last, grad_present, self._acc_free if first else None)
        if self._worker is None:
            self._fold(*task)
            self._folds[si] = None
        else:
            self._folds[si] = self._worker.submit(self._fold, *task)

    def _fold(self, si, copied, first, last, grad_present, acc_free) -> None:
        """Host worker: fold one segment's staged gradient into the fp32 accumulator."""
        if acc_free is not None:
            acc_free.synchronize()
        if copied is not None:
            copied.synchronize()
        seg = self.arena_group.table[si]
        acc = self._host.acc[seg.offset : seg.end]
        if grad_present:
            staged = self._host.staging[seg.offset : seg.end]
            _accumulate_grads(acc, staged, alpha=1.0 / self.num_micro_batches, first=first)
        elif first:
            acc.zero_()  # no gradient in this window's first micro-batch: an unused parameter
        if last:
            sq = _sumsq64(acc)
            with self._sumsq_lock:
                self._host.sumsq += sq

    def _end_backward(self) -> None:
        for si, touched in enumerate(self._window.touched):
            if not touched:
                self._submit(si, None, grad_present=False)
        self._window.end()

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Clip, skip if non-finite, and stream the update (closures are refused: gradients
        leave during backward, so backward must have run before ``step``).

        Raises RuntimeError when paused or before ``num_micro_batches`` backward passes."""
        if closure is not None:
            raise ValueError(
                "StreamingAdamW.step: closures are not supported (gradients leave the device "
                "during backward; run backward before step)"
            )
        if self._paused:
            raise RuntimeError("StreamingAdamW.step: the stream is paused; call resume() first")
        if not self._window.ready:
            raise RuntimeError(
                f"StreamingAdamW.step: {self._window.completed} of {self.num_micro_batches} "
                "micro-batches have run backward; step after the last one"
            )
        self._drain()
        if self.update == "device":
            self._device_sets()  # allocated before the window is consumed: an OOM loses nothing
        sumsq = self._host.sumsq
        self._host.sumsq = 0.0
        self._window.reset()
        # The root in float64, then rounded: a norm above 2^64 (whose float32 square would be
        # inf) stays finite, and the norm is correctly rounded.
        norm = torch.tensor([math.sqrt(sumsq)], dtype=torch.float32)
        self.last_grad_norm = float(norm)
        self.last_step_skipped = not math.isfinite(self.last_grad_norm)
        if self.last_step_skipped:
            return None  # known on the host already: skip without moving a byte
        hp = self.param_groups[0]
        clip = None
        if hp.get("max_grad_norm") is not None:
            # FusedAdamW's formula, in float32: the same norm gives the same coefficient.
            clip = float((float(hp["max_grad_norm"]) / (norm + 1e-6)).clamp_(max=1.0))
        if self.update == "device":
            self._update_on_device(hp, clip)
        else:
            self._update_on_host(hp, clip)
        self._steps += 1
        return None

    def _drain(self) -> None:
        for i, fut in enumerate(self._folds):
            if fut is not None:
                fut.result()
                self._folds[i] = None

    def _kernel_args(self, hp: dict, device: torch.device, clip: float | None) -> dict:
        scalars = {"lr": torch.full((1,), float(hp["lr"]), dtype=torch.float32, device=device)}
        if clip is not None:
            scalars["clip_coef"] = torch.full((1,), clip, dtype=torch.float32, device=device)
        beta1, beta2 = hp["betas"]
        return {
            **scalars,
            "beta1": beta1,
            "beta2": beta2,
            "eps": hp["eps"],
            "weight_decay": hp["weight_decay"],
            "state_bits": self.state_bits,
            "qblock": self.qblock,
            **self._tuning,
        }

    def _chunks(self) -> list[tuple[int, int]]:
        n, c = self.arena_group.numel, self.chunk_numel
        return [(a, min(a + c, n)) for a in range(0, n, c)]

    def _update_on_device(self, hp: dict, clip: float | None) -> None:
        st, host, dev = self._streams, self._host, self.device
        sets = self._device_sets()
        started = st.record(st.compute())
        st.wait(st.update, started)
        with st.on(st.update):
            kw = self._kernel_args(hp, dev, clip)
            step = torch.zeros(1, dtype=torch.float32, device=dev)
        flat = self.arena_group.flat
        updated = loaded = None
        done = []
        for i, (a, b) in enumerate(self._chunks()):
            buf = sets[i % 2]
            st.wait(st.h2d, buf["freed"])
            with st.on(st.h2d):
                views = buf_views(buf, host, a, b, self.state_bits, self.qblock)
                for dst, src in views:
                    dst.copy_(src, non_blocking=True)
            loaded = st.record(st.h2d)
            st.wait(st.update, loaded)
            with st.on(st.update):
                step.fill_(float(self._steps))  # adamw_step advances it: reset per chunk
                d = {k: dst for k, (dst, _) in zip(_VIEW_KEYS, views)}
                _adamw().adamw_step(
                    d["master"], d["acc"], d["exp_avg"], d["exp_avg_sq"], step=step,
                    shadow=flat[a:b], exp_avg_scale=d.get("exp_avg_scale"),
                    exp_avg_sq_scale=d.get("exp_avg_sq_scale"), **kw,
                )  # fmt: skip
            updated = st.record(st.update)
            done.append(updated)
            st.wait(st.d2h, updated)
            with st.on(st.d2h):
                for dst, src in views:
                    if dst is not views[1][0]:  # the gradient does not go back
                        src.copy_(dst, non_blocking=True)
            buf["freed"] = st.record(st.d2h)
        self._publish(done)
        self._acc_free = loaded  # the next window's first fold overwrites what h2d read
        self._host_ready = buf["freed"] if st.cuda else None

    def _update_on_host(self, hp: dict, clip: float | None) -> None:
        st, host = self._streams, self._host
        self.synchronize()
        kw = self._kernel_args(hp, torch.device("cpu"), clip)
        step = torch.zeros(1, dtype=torch.float32)
        flat = self.arena_group.flat
        st.wait(st.h2d, st.record(st.compute()))  # backward has finished reading the weights
        copied = None
        for a, b in self._chunks():
            views = dict(host.chunk(a, b, self.state_bits, self.qblock))
            shadow = flat[a:b] if not st.cuda else host.staging[a:b]
            step.fill_(float(self._steps))
            _adamw().adamw_step(
                views["master"], views["acc"], views["exp_avg"], views["exp_avg_sq"], step=step,
                shadow=shadow, exp_avg_scale=views.get("exp_avg_scale"),
                exp_avg_sq_scale=views.get("exp_avg_sq_scale"), **kw,
            )  # fmt: skip
            if st.cuda:
                with st.on(st.h2d):
                    flat[a:b].copy_(shadow, non_blocking=True)
        if st.cuda:
            copied = st.record(st.h2d)
            self._publish([copied] * self.num_chunks)
            st.wait(st.d2h, copied)  # the next gradients land in the staging we just read
        self._acc_free = None

    def _device_sets(self) -> list[dict[str, Any]]:
        if self._dev_sets is None:
            adamw, c, dev = _adamw(), self.chunk_numel, self.device
            self._dev_sets = []
            for _ in range(2):
                state = adamw.new_state(c, self.state_bits, dev, self.qblock)
                buf = {
                    "master": torch.empty(c, dtype=torch.float32, device=dev),
                    "acc": torch.empty(c, dtype=torch.float32, device=dev),
                    **{k: v for k, v in state.items() if v is not None},
                    "freed": None,
                }
                self._dev_sets.append(buf)
        return self._dev_sets

    # ------------------------------------------------------------------------------------------
    # the next forward: wait for the whole update, or per module as its chunks land
    # ------------------------------------------------------------------------------------------

    def _publish(self, chunk_events: list) -> None:
        """Make the new weights visible to the compute stream: at once (default), or per
        module when :meth:`overlap_next_forward` is installed."""
        self._chunk_events = chunk_events
        self._generation += 1
        if not self._module_hooks and chunk_events:
            self._streams.wait(self._streams.compute(), chunk_events[-1])

    def wait_for_update(self) -> None:
        """Make the current stream wait (on the device, no host sync) for the whole last
        update. Only needed with :meth:`overlap_next_forward`, before reading the weights
        outside a module's forward."""
        if self._chunk_events:
            self._streams.wait(self._streams.compute(), self._chunk_events[-1])

    def overlap_next_forward(self, module: nn.Module) -> None:
        """Let the next forward start while the update still streams: each submodule that
        owns arena parameters waits, in a forward pre-hook, only for the chunks that hold
        them (the ``update`` stream is in order, so the last of them). The arena is in
        registration order, which is forward order for the usual stacks of blocks, so the
        first blocks compute while the last chunks are still in flight. Code that reads the
        weights outside a forward must call :meth:`wait_for_update` first."""
        starts = {id(p): seg for p, seg in zip(self.arena_group.params, self.arena_group.table)}
        for sub in module.modules():
            last = [
                (starts[id(p)].end - 1) // self.chunk_numel
                for p in sub.parameters(recurse=False)
                if id(p) in starts and starts[id(p)].numel > 0
            ]
            if last:
                hook = _make_forward_wait(weakref.ref(self), max(last))
                self._module_hooks.append(sub.register_forward_pre_hook(hook))
        if not self._module_hooks:
            raise ValueError(
                "StreamingAdamW.overlap_next_forward: the module owns none of this optimizer's "
                "parameters"
            )

    def _forward_wait(self, chunk: int, waited: dict) -> None:
        if waited.get("generation") == self._generation or not self._chunk_events:
            return
        waited["generation"] = self._generation
        self._streams.wait(self._streams.compute(), self._chunk_events[chunk])

    # ------------------------------------------------------------------------------------------
    # pause / resume, synchronization
    # ------------------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop the stream (Predict phases): hooks pass gradients through, ``step`` refuses,
        the device chunk buffers are released. Raises mid-window (half-accumulated gradients)."""
        if self._window.completed or self._window.in_backward:
            raise RuntimeError(
                f"StreamingAdamW.pause: {self._window.completed} of {self.num_micro_batches} "
                "micro-batches are accumulated; step (or discard_gradients) first"
            )
        self.synchronize()
        self._paused = True
        self._dev_sets = None

    def resume(self) -> None:
        """Restart the stream; the next backward is the first micro-batch of a window.

        Raises if a parameter still holds a ``.grad`` from the paused phase: autograd would add
        the next gradient to it and the stale part would be streamed as new."""
        _check_no_grads(self.arena_group, "resume")
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def discard_gradients(self) -> None:
        """Drop the gradients accumulated in the current window (the next backward starts a
        new one)."""
        if self._window.in_backward:
            raise RuntimeError("StreamingAdamW.discard_gradients: called during backward")
        self._drain()
        self._host.sumsq = 0.0
        self._window.reset()

    def synchronize(self) -> None:
        """Wait (host) until every queued copy and fold is done and the host state is current."""
        self._drain()
        if self._host_ready is not None:
            self._host_ready.synchronize()
            self._host_ready = None
        if self._acc_free is not None:
            self._acc_free.synchronize()

    def remove(self) -> None:
        """Remove the hooks and stop the worker (the parameters get ordinary ``.grad`` again)."""
        self.synchronize()
        self.wait_for_update()
        for h in self._handles + self._module_hooks:
            h.remove()
        self._handles, self._module_hooks = [], []
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    @property
    def master(self) -> torch.Tensor:
        """The fp32 master weights (host memory, the arena layout). Call :meth:`synchronize`
        before reading them on CUDA."""
        return self._host.master

    @property
    def step_count(self) -> int:
        return self._steps

    def host_buffers(self) -> dict[str, torch.Tensor]:
        """The host buffers by name: ``master``, ``acc`` (the fp32 gradient accumulator),
        ``staging`` (gradients as they leave the device), the moments and their scales. Call
        :meth:`synchronize` before reading them on CUDA."""
        return self._host.buffers()

    def host_bytes(self) -> dict[str, int]:
        """Bytes of host memory per buffer (see :meth:`host_buffers`)."""
        return {k: t.numel() * t.element_size() for k, t in self._host.buffers().items()}

    @property
    def num_chunks(self) -> int:
        """Chunks one update streams through the device."""
        return len(self._chunks())

    def device_bytes(self) -> int:
        """Bytes of the two device chunk buffer sets while allocated (0 when paused)."""
        if self._dev_sets is None:
            return 0
        return sum(
            t.numel() * t.element_size()
            for s in self._dev_sets
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )

    def _layout(self) -> dict[str, Any]:
        g = self.arena_group
        return {
            "format": STATE_FORMAT,
            "state_bits": self.state_bits,
            "qblock": self.qblock,
            "numel": g.numel,
            "master_weights": True,
            "segments": [(s.name, s.offset, s.numel) for s in g.table],
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"state", "param_groups", "layout"}`` with FusedAdamW's keys (flat host buffers,
        references: ``torch.save`` or deep-copy to snapshot). Waits for queued copies."""
        self.synchronize()
        state = {
            "step": torch.tensor([float(self._steps)], dtype=torch.float32),
            "master": self._host.master,
            **self._host.moments(),
        }
        groups = [
            {
                **{k: v for k, v in hp.items() if k != "params"},
                "params": list(range(len(hp["params"]))),
            }
            for hp in self.param_groups
        ]
        return {"state": state, "param_groups": groups, "layout": self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a StreamingAdamW or FusedAdamW (``master_weights=True``) state dict with the same
        layout and ``state_bits``. Everything is checked before anything changes; the bf16
        weights come from the module's state dict (or :meth:`sync_shadows`)."""
        if self._window.completed or self._window.in_backward:
            raise RuntimeError("StreamingAdamW.load_state_dict: gradients are mid-window")
        state, groups = _validate_state_dict(state_dict, self._layout(), self._targets(), self)
        self.synchronize()
        for name, dst in self._targets().items():
            if name != "step":
                dst.copy_(state[name])
        self._steps = int(float(state["step"].reshape(-1)[0]))
        for hp, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    hp[k] = tuple(v) if k == "betas" else v

    def _targets(self) -> dict[str, torch.Tensor]:
        return {
            "master": self._host.master,
            "step": torch.zeros(1, dtype=torch.float32),
            **self._host.moments(),
        }

    @torch.no_grad()
    def sync_shadows(self) -> None:
        """Write the fp32 master weights, rounded, into the device's bf16/fp16 weights."""
        self.synchronize()
        flat = self.arena_group.flat
        for a, b in self._chunks():
            flat[a:b].copy_(self._host.master[a:b].to(flat.dtype))


_VIEW_KEYS = ("master", "acc", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")


def buf_views(buf: dict, host: _HostState, a: int, b: int, bits: int, qblock: int | None):
    """(device view, host view) pairs of chunk [a, b), in ``_VIEW_KEYS`` order."""
    out = []
    for key, src in host.chunk(a, b, bits, qblock):
        out.append((buf[key][: src.numel()], src))
    return out


class _HostState:
    """The host buffers: fp32 master, fp32 accumulator, bf16 staging, moments (arena layout)."""

    def __init__(self, group: ArenaGroup, bits: int, qblock: int | None, pin: bool) -> None:
        n = group.numel
        self.master = _host_buffer(n, torch.float32, pin)
        self.acc = _host_buffer(n, torch.float32, pin)
        self.staging = _host_buffer(n, group.dtype, pin)
        self.sumsq = 0.0
        self._state = {
            k: (v.pin_memory() if pin else v)
            for k, v in _adamw().new_state(n, bits, "cpu", qblock).items()
            if v is not None
        }
        for a in range(0, n, 1 << 24):  # bounded device temporaries
            b = min(a + (1 << 24), n)
            self.master[a:b].copy_(group.flat[a:b])

    def moments(self) -> dict[str, torch.Tensor]:
        return dict(self._state)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"master": self.master, "acc": self.acc, "staging": self.staging, **self._state}

    def chunk(self, a: int, b: int, bits: int, qblock: int | None):
        """(key, host view) of chunk [a, b); ``a`` is a multiple of ``qblock``."""
        codes, _, _, scales = _adamw().state_shapes(b - a, bits, qblock)
        out = [("master", self.master[a:b]), ("acc", self.acc[a:b])]
        c0 = a // 2 if bits == 4 else a  # 4 bits: two codes a byte
        out += [("exp_avg", self._state["exp_avg"][c0 : c0 + codes])]
        out += [("exp_avg_sq", self._state["exp_avg_sq"][c0 : c0 + codes])]
        if scales:
            s0 = a // qblock
            out += [("exp_avg_scale", self._state["exp_avg_scale"][s0 : s0 + scales])]
            out += [("exp_avg_sq_scale", self._state["exp_avg_sq_scale"][s0 : s0 + scales])]
        return out


class _Window:
    """Micro-batch bookkeeping of one accumulation window."""

    def __init__(self, num_micro_batches: int, num_segments: int) -> None:
        self.n = num_micro_batches
        self.completed = 0
        self.in_backward = False
        self.touched = [False] * num_segments

    @property
    def first(self) -> bool:
        return self.completed == 0

    @property
    def last(self) -> bool:
        return self.completed == self.n - 1

    @property
    def ready(self) -> bool:
        return self.completed == self.n and not self.in_backward

    def begin(self, si: int) -> None:
        if self.completed >= self.n:
            raise RuntimeError(
                f"StreamingAdamW: a backward pass beyond the {self.n} micro-batches of this "
                "step; call step() (or discard_gradients()) between optimizer steps"
            )
        self.in_backward = True

    def end(self) -> None:
        self.touched = [False] * len(self.touched)
        self.completed += 1
        self.in_backward = False

    def reset(self) -> None:
        self.completed = 0


def _make_hook(owner: weakref.ref, si: int):
    # Weak: hooks live in the parameters' C++ autograd data, invisible to Python's collector,
    # so a strong reference would keep a dropped engine (and its host buffers) alive.
    def hook(param: torch.Tensor) -> None:
        engine = owner()
        if engine is not None:
            engine._on_grad(si, param)

    return hook


def _check_no_grads(group: ArenaGroup, where: str) -> None:
    held = [seg.name for p, seg in zip(group.params, group.table) if p.grad is not None]
    if held:
        raise RuntimeError(
            f"StreamingAdamW.{where}: {len(held)} parameter(s) hold a .grad (first: {held[0]!r}); "
            "the next backward would add to it. Call model.zero_grad(set_to_none=True) first"
        )


def _make_forward_wait(owner: weakref.ref, chunk: int):
    waited: dict = {}  # per module: the update it already waited for

    def hook(module, args) -> None:
        engine = owner()
        if engine is not None:
            engine._forward_wait(chunk, waited)

    return hook


def _sumsq64(x: torch.Tensor) -> float:
    total = 0.0
    for a in range(0, x.numel(), _NORM_SLICE):
        part = x[a : a + _NORM_SLICE].to(torch.float64)
        total += float(torch.dot(part, part))
    return total


def _check_options(
    adamw, lr, betas, eps, weight_decay, num_micro_batches, state_bits, max_grad_norm, update,
    chunk_numel, qblock,
) -> None:  # fmt: skip
    name = "StreamingAdamW"
    if state_bits not in adamw.STATE_BITS:
        raise ValueError(f"{name}: state_bits must be one of {adamw.STATE_BITS}, got {state_bits}")
    if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"{name}: betas must be in [0, 1), got {betas}")
    if not lr >= 0.0 or not eps > 0.0 or not weight_decay >= 0.0:
        raise ValueError(
            f"{name}: need lr >= 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, {weight_decay})"
        )
    if max_grad_norm is not None and not max_grad_norm > 0.0:
        raise ValueError(f"{name}: max_grad_norm must be > 0, got {max_grad_norm}")
    if isinstance(num_micro_batches, bool) or int(num_micro_batches) < 1:
        raise ValueError(f"{name}: num_micro_batches must be >= 1, got {num_micro_batches}")
    if update not in _UPDATES:
        raise ValueError(f"{name}: update must be one of {_UPDATES}, got {update!r}")
    if isinstance(chunk_numel, bool) or int(chunk_numel) < 1:
        raise ValueError(f"{name}: chunk_numel must be >= 1, got {chunk_numel}")
    if qblock is not None:
        if state_bits not in (8, 4):
            raise ValueError(f"{name}: qblock applies to 8/4-bit state, not {state_bits}-bit")
        if qblock < 16 or qblock & (qblock - 1):
            raise ValueError(f"{name}: qblock must be a power of two >= 16, got {qblock}")


def _to_group(params) -> ArenaGroup:
    if isinstance(params, FlatArena):
        group = params.group
    elif isinstance(params, ArenaGroup):
        group = params
    else:
        unique: dict[int, nn.Parameter] = {}
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"StreamingAdamW: expected parameters, got {type(p).__name__}")
            if p.requires_grad:
                unique.setdefault(id(p), p)
        if not unique:
            raise ValueError("StreamingAdamW: got no trainable parameters")
        group = ArenaGroup.from_params(list(unique.values()))
    if group.dtype not in _LOW_PRECISION:
        raise ValueError(
            f"StreamingAdamW: the device weights must be bf16 or fp16 (fp32 master weights are "
            f"kept in host memory), got {group.dtype}"
        )
    return group


def _validate_state_dict(state_dict, mine: dict, targets: dict, engine) -> tuple[dict, list]:
    name = "StreamingAdamW.load_state_dict"
    if not isinstance(state_dict, dict) or "layout" not in state_dict:
        raise ValueError(f"{name}: not a StreamingAdamW/FusedAdamW state dict (no 'layout')")
    saved = state_dict["layout"]
    if saved.get("format") not in (STATE_FORMAT, _FUSED_FORMAT):
        raise ValueError(f"{name}: unknown state format {saved.get('format')!r}")
    for key in ("state_bits", "qblock", "numel", "master_weights", "segments"):
        if key == "segments":
            same = [tuple(s) for s in saved.get(key, [])] == [tuple(s) for s in mine[key]]
        else:
            same = saved.get(key) == mine[key]
        if not same:
            shown = "differ" if key == "segments" else f"{saved.get(key)!r} != {mine[key]!r}"
            raise ValueError(
                f"{name}: {key} of the saved state ({shown}) does not match this optimizer; "
                "build it with the same model and options"
            )
    state = state_dict.get("state", {})
    for key, dst in targets.items():
        src = state.get(key)
        if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
            got = f"{tuple(src.shape)} {src.dtype}" if isinstance(src, torch.Tensor) else src
            raise ValueError(
                f"{name}: state {key!r} is {got}; expected {tuple(dst.shape)} {dst.dtype}"
            )
    step = float(state["step"].reshape(-1)[0])
    if not (step >= 0 and step == int(step)):
        raise ValueError(f"{name}: step must be a non-negative whole number, got {step}")
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(engine.param_groups):
        raise ValueError(f"{name}: expected {len(engine.param_groups)} param group(s)")
    return state, groups


__all__ = ["StreamingAdamW"]
