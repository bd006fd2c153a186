"""Optimizer-state strategies for the Predict phase: keep, offload (pageable or pinned host
memory), compress in place, or drop and re-initialize, with an asynchronous restore.

During Predict no optimizer step runs, so its moments need not occupy device memory. The
offloader frees them **without changing tensor identity**: each tensor's storage is resized
to zero bytes (the optimizer keeps its references; nothing else needs re-wiring), and on
restore it is resized back and refilled. This is the approach of FSDP's and torchao's
offloading.

Strategies (``OFFLOAD_STRATEGIES``):

- ``keep``: nothing moves.
- ``cpu``: copied to pageable host memory, then freed on the device.
- ``pinned``: copied to page-locked host memory (allocated once and reused), with
  ``non_blocking`` copies; the restore runs on a side CUDA stream.
- ``compress``: float tensors are quantized on the device and freed: the second moment
  (``exp_avg_sq``) with the log-domain 8-bit code of :mod:`hybrid_triton.moment_code` (every
  nonzero entry stays nonzero, ``sqrt(v)`` keeps a bounded relative error; the cubic
  ``int8_dynamic`` code zeroes entries below about 5e-7 of their block's maximum, and a zeroed
  ``v`` makes the first update after the restore hundreds of times the learning rate), the
  others with ``quantize_blockwise`` (``int8_dynamic`` by default); the codes and scales stay
  on the device; the restore dequantizes them. Tensors
  that are not floating point (already-quantized 8/4-bit states) and the per-block scales of
  such states (names ending in ``scale``) stay as they are.
- ``drop``: freed without a copy; the restore refills them with zeros (the optimizer forgets
  its moments; this changes the training, and the trainer says so).

Asynchronous restore (CUDA): :meth:`StateOffloader.start_restore` re-allocates the storages on
the current stream, then copies (or dequantizes) on a side stream and records an event;
:meth:`StateOffloader.wait` makes the current stream wait for that event, so the host never
blocks. The trainer starts the restore ``lookahead`` steps before the Predict phase is planned
to end, so Correct does not wait. On CPU the same calls run synchronous copies (there is no
stream to overlap with) and the hidden fraction is reported as 0.

Statistics: offload and restore times (CUDA events, read lazily when :meth:`stats` is called,
never inside a step), bytes freed as measured by the device allocator
(``torch.cuda.memory_allocated`` before and after; on CPU the storage bytes released), and how
much of the restore was hidden behind compute (1 - exposed / restore time, where exposed is how
long the restore still ran after the compute stream first needed it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from hybrid_triton import moment_code

OFFLOAD_STRATEGIES = ("keep", "cpu", "pinned", "compress", "drop")
COMPRESS_FORMAT = "int8_dynamic"


class OffloadError(RuntimeError):
    """An offloader was used out of order (restore without offload, offload twice, ...)."""


@dataclass
class OffloadStats:
    offloads: int = 0
    restores: int = 0
    offload_s: float = 0.0  # total seconds spent offloading
    restore_s: float = 0.0  # total seconds the restores took (copy / dequantize)
    exposed_s: float = 0.0  # total seconds the compute stream could have waited on restores
    bytes_freed: int = 0  # last offload: measured by the device allocator (CPU: storage bytes)
    bytes_moved: int = 0  # last offload: bytes copied to the host or kept compressed
    compressed_bytes: int = 0  # last offload: bytes of codes + scales kept on the device

    @property
    def hidden_fraction(self) -> float:
        """Share of the restore time overlapped with compute (0 on CPU, or with no restore)."""
        if self.restore_s <= 0:
            return 0.0
        return max(0.0, min(1.0, 1.0 - self.exposed_s / self.restore_s))

    def to_dict(self) -> dict[str, float]:
        d = dict(self.__dict__)
        d["hidden_fraction"] = self.hidden_fraction
        return d


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _owns_storage(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


class StateOffloader:
    """Frees a named set of device tensors during Predict and brings them back.

    ``tensors`` (given to :meth:`offload`): name -> tensor; each must own its storage (a flat
    state buffer, as ``FusedAdamW.state_tensors()`` returns). Tensor objects are kept, so the
    optimizer holding them needs no change.
    """

    def __init__(
        self,
        strategy: str = "keep",
        *,
        async_restore: bool = True,
        quant_block: int = 256,
        compress_format: str = COMPRESS_FORMAT,
    ) -> None:
        if strategy not in OFFLOAD_STRATEGIES:
            raise ValueError(
                f"StateOffloader: strategy must be one of {', '.join(OFFLOAD_STRATEGIES)}, got "
                f"{strategy!r}"
            )
        self.strategy = strategy
        self.async_restore = bool(async_restore)
        self.quant_block = int(quant_block)
        self.compress_format = compress_format
        self.stats = OffloadStats()
        self._tensors: dict[str, torch.Tensor] = {}
        self._payload: dict[str, Any] = {}  # name -> host tensor / QuantizedTensor / None
        self._host_cache: dict[str, torch.Tensor] = {}  # pinned buffers, reused across phases
        self._offloaded = False
        self._restoring = False
        self._stream = None
        self._events: list[tuple[str, Any, Any, Any]] = []  # (kind, start, end, needed)

    # ----------------------------------------------------------------- state
    @property
    def offloaded(self) -> bool:
        """True from :meth:`offload` until :meth:`wait` (or :meth:`restore`) completes."""
        return self._offloaded

    @property
    def restoring(self) -> bool:
        return self._restoring

    @staticmethod
    def _cuda(t: torch.Tensor) -> bool:
        return t.device.type == "cuda"

    def _check(self, tensors: dict[str, torch.Tensor]) -> None:
        seen: set[int] = set()
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise OffloadError(f"offload: {name} is a {type(t).__name__}, not a tensor")
            if not _owns_storage(t):
                raise OffloadError(
                    f"offload: {name} (shape {tuple(t.shape)}) does not own its storage; pass "
                    "whole flat state buffers, not views"
                )
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen and t.numel() > 0:
                raise OffloadError(f"offload: {name} shares its storage with another tensor")
            seen.add(ptr)

    @staticmethod
    def compressible(name: str, t: torch.Tensor) -> bool:
        """Float moments are compressed; codes of 8/4-bit moments are already compact, and
        their per-block scales (``*_scale``, 1/128-1/256 of the elements) must stay exact."""
        return t.is_floating_point() and not name.endswith("scale")

    @staticmethod
    def second_moment(name: str) -> bool:
        """Adam's second moment: compressed with the log code of :mod:`moment_code`, which
        keeps every nonzero entry nonzero (the 8-bit codes zero its small values)."""
        return name == "exp_avg_sq" or name.endswith(".exp_avg_sq")

    # ----------------------------------------------------------------- offload
    def offload(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        host_copies: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Free ``tensors`` on the device according to the strategy (no host sync).

        ``host_copies`` (``cpu``/``pinned`` only): name -> a host tensor that already holds (or
        has a copy queued on the current stream into it) that tensor's value, e.g. the
        trainer's rollback snapshot of the master weights: the offloader frees the device
        tensor without a second copy and restores from it. The caller must not change it
        before the restore."""
        if self._offloaded:
            raise OffloadError("offload: the state is already offloaded; restore it first")
        self._check(tensors)
        host_copies = dict(host_copies or {})
        if host_copies and self.strategy not in ("cpu", "pinned"):
            raise OffloadError(
                f"offload: host_copies need the cpu or pinned strategy, not {self.strategy!r}"
            )
        for name, host in host_copies.items():
            t = tensors.get(name)
            if t is None or not isinstance(host, torch.Tensor):
                raise OffloadError(f"offload: host copy {name!r} has no tensor of that name")
            if host.device.type != "cpu" or host.shape != t.shape or host.dtype != t.dtype:
                raise OffloadError(
                    f"offload: host copy {name!r} is {tuple(host.shape)} {host.dtype} on "
                    f"{host.device}; expected {tuple(t.shape)} {t.dtype} on the cpu"
                )
        self._tensors = dict(tensors)
        self._payload = {}
        if self.strategy == "keep" or not tensors:
            self._offloaded = True  # nothing moved; restore is a no-op
            return
        device = next(iter(tensors.values())).device
        on_cuda = device.type == "cuda"
        before = torch.cuda.memory_allocated(device) if on_cuda else 0
        start = self._timer_start(device)
        moved = compressed = released = 0
        for name, t in self._tensors.items():
            if t.numel() == 0:
                continue
            if self.strategy == "compress" and not self.compressible(name, t):
                continue  # stays on the device as it is
            if name in host_copies:
                host = host_copies[name]
                self._payload[name] = host
                moved += _nbytes(t)
            elif self.strategy in ("cpu", "pinned"):
                host = self._host_buffer(name, t)
                host.copy_(t, non_blocking=host.is_pinned())
                self._payload[name] = host
                moved += _nbytes(t)
            elif self.strategy == "compress" and self.second_moment(name):
                q = moment_code.encode(t, self.quant_block)
                self._payload[name] = q
                compressed += q.nbytes
            elif self.strategy == "compress":
                from hybrid_triton.kernels import quantize_blockwise

                q = quantize_blockwise(t.view(-1), self.compress_format, self.quant_block)
                self._payload[name] = q
                compressed += q.nbytes
            else:  # drop
                self._payload[name] = None
            released += _nbytes(t)
            # The caching allocator orders the freed block on this stream, after the copy.
            t.untyped_storage().resize_(0)
        self._timer_stop("offload", start, device)
        self._offloaded = True
        after = torch.cuda.memory_allocated(device) if on_cuda else 0
        self.stats.offloads += 1
        self.stats.bytes_freed = (before - after) if on_cuda else released
        self.stats.bytes_moved = moved
        self.stats.compressed_bytes = compressed

    def _host_buffer(self, name: str, t: torch.Tensor) -> torch.Tensor:
        pin = self.strategy == "pinned" and self._cuda(t)
        buf = self._host_cache.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            if pin:
                self._host_cache[name] = buf
        return buf

    # ----------------------------------------------------------------- restore
    def start_restore(self, then: Callable[[], None] | None = None) -> None:
        """Begin bringing the state back; on CUDA asynchronously on a side stream.

        ``then``: work queued right after the refill on the same stream (and timed with it),
        e.g. the trainer's fix-up of the restored master weights; it runs only when something
        was restored."""
        if not self._offloaded or self._restoring:
            return
        self._restoring = True
        if self.strategy == "keep" or not self._payload:
            return
        device = next(iter(self._tensors.values())).device
        # Re-allocate on the current stream, which is where the optimizer will use the memory.
        for name in self._payload:
            t = self._tensors[name]
            t.untyped_storage().resize_(t.numel() * t.element_size())
        use_side = self._cuda_async(device)
        if use_side:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=device)
            self._stream.wait_stream(torch.cuda.current_stream(device))
            ctx = torch.cuda.stream(self._stream)
        else:
            ctx = _null()
        with ctx:
            start = self._timer_start(device)
            self._refill()
            if then is not None:
                then()
            self._timer_stop("restore", start, device)

    def _cuda_async(self, device: torch.device) -> bool:
        return self.async_restore and device.type == "cuda"

    def _refill(self) -> None:
        for name, payload in self._payload.items():
            t = self._tensors[name]
            if payload is None:
                t.zero_()
            elif isinstance(payload, torch.Tensor):
                t.copy_(payload, non_blocking=payload.is_pinned())
            elif isinstance(payload, moment_code.LogCoded):
                moment_code.decode(payload, t)
            else:
                from hybrid_triton.kernels import dequantize_blockwise

                dequantize_blockwise(payload, out=t.view(-1))

    def wait(self) -> None:
        """Make the current stream wait for the restore (starting it if needed); no host sync."""
        if not self._offloaded:
            return
        if not self._restoring:
            self.start_restore()
        if self._events and self._events[-1][0] == "restore" and self._events[-1][3] is None:
            kind, start, end, _ = self._events[-1]
            device = next(iter(self._tensors.values())).device
            needed = torch.cuda.Event(enable_timing=True)
            needed.record(torch.cuda.current_stream(device))
            # The storages were allocated on this stream and the side stream's writes are
            # ordered before any later use or free here, so no record_stream is needed.
            torch.cuda.current_stream(device).wait_event(end)
            self._events[-1] = (kind, start, end, needed)
        self._payload = {}
        self._offloaded = False
        self._restoring = False

    def restore(self, then: Callable[[], None] | None = None) -> None:
        """Start and wait in one call (the synchronous path)."""
        self.start_restore(then)
        self.wait()

    # ----------------------------------------------------------------- timing
    def _timer_start(self, device: torch.device):
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _timer_stop(self, kind: str, start, device: torch.device) -> None:
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((kind, start, end, None))
        else:
            elapsed = time.perf_counter() - start
            if kind == "offload":
                self.stats.offload_s += elapsed
            else:
                self.stats.restores += 1
                self.stats.restore_s += elapsed
                # Synchronous on CPU: the whole restore was exposed.
                self.stats.exposed_s += elapsed

    def resolve_stats(self) -> OffloadStats:
        """Fold finished CUDA event timings into :attr:`stats` (waits for those events: call
        it at a phase boundary or at the end, not inside a step)."""
        pending = []
        for kind, start, end, needed in self._events:
            if kind == "restore" and needed is None:
                pending.append((kind, start, end, needed))  # not yet waited on
                continue
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
            if kind == "offload":
                self.stats.offload_s += elapsed
            else:
                self.stats.restores += 1
                self.stats.restore_s += elapsed
                needed.synchronize()
                self.stats.exposed_s += max(0.0, needed.elapsed_time(end) / 1e3)
        self._events = pending
        return self.stats

    # ----------------------------------------------------------------- checkpoints
    @contextmanager
    def materialized(self) -> Iterator[None]:
        """While offloaded: give the tensors their restored values for the duration of the
        block (so an optimizer ``state_dict`` can be taken), then free them again."""
        if not self._offloaded or self.strategy == "keep":
            yield
            return
        if self._restoring:
            # The restore has begun: the tensors have their storage back and are being
            # refilled; freeing them after the block would lose the restored state.
            if self._stream is not None:
                torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            yield
            return
        for name in self._payload:
            t = self._tensors[name]
            t.untyped_storage().resize_(t.numel() * t.element_size())
        self._refill()
        try:
            yield
        finally:
            for name in self._payload:
                self._tensors[name].untyped_storage().resize_(0)

    def state_dict(self) -> dict[str, Any]:
        """The offloaded payload (on the host), so a resumed run restores the same values."""
        payload: dict[str, Any] = {}
        if self._offloaded:
            for name, p in self._payload.items():
                if p is None:
                    payload[name] = None
                elif isinstance(p, torch.Tensor):
                    payload[name] = {"host": p.detach().to("cpu", copy=True)}
                elif isinstance(p, moment_code.LogCoded):
                    payload[name] = {
                        "log_codes": p.codes.cpu(),
                        "lo": p.lo.cpu(),
                        "step": p.step.cpu(),
                        "block": p.block,
                        "shape": list(p.shape),
                        "dtype": str(p.dtype).replace("torch.", ""),
                    }
                else:
                    payload[name] = {
                        "data": p.data.cpu(),
                        "scales": p.scales.cpu(),
                        "fmt": p.fmt,
                        "block": p.block,
                        "shape": list(p.shape),
                        "dtype": str(p.dtype).replace("torch.", ""),
                    }
        return {
            "strategy": self.strategy,
            "offloaded": self._offloaded,
            "payload": payload,
            "stats": {k: v for k, v in self.stats.__dict__.items()},
        }

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore the offloader's state; when it was offloaded, free ``tensors`` again and
        keep the saved payload for the coming restore. Everything is checked first: a bad
        state raises :class:`OffloadError` and changes nothing."""
        stats, payload = self.check_state(state, tensors)
        if state["offloaded"]:
            self._check(tensors)  # whole, distinct buffers (they are about to be freed)
        self.stats = stats
        self._offloaded = self._restoring = False
        self._payload = {}
        self._events = []
        if not state["offloaded"]:
            return
        self._tensors = dict(tensors)
        for name, p in payload.items():
            t = self._tensors[name]
            if isinstance(p, torch.Tensor):  # a host copy
                host = self._host_buffer(name, t)
                host.copy_(p)
                p = host
            self._payload[name] = p
            t.untyped_storage().resize_(0)
        self._offloaded = True

    def check_state(
        self, state: Any, tensors: dict[str, torch.Tensor]
    ) -> tuple[OffloadStats, dict[str, Any]]:
        """The stats and the payloads (on the tensors' device) of a valid ``state``; raises
        :class:`OffloadError` for one that :meth:`load_state_dict` could not apply whole."""
        if not isinstance(state, dict) or not {"strategy", "offloaded", "payload", "stats"} <= set(
            state
        ):
            raise OffloadError(
                "offload state: expected a dict with strategy, offloaded, payload and stats, "
                f"got {sorted(state) if isinstance(state, dict) else type(state).__name__}"
            )
        if state["strategy"] != self.strategy:
            raise OffloadError(
                f"checkpoint offload strategy {state['strategy']!r} differs from this trainer's "
                f"{self.strategy!r}"
            )
        try:
            stats = OffloadStats(**state["stats"])
        except TypeError as exc:
            raise OffloadError(f"offload state: bad stats ({exc})") from None
        if not isinstance(state["offloaded"], bool) or not isinstance(state["payload"], dict):
            raise OffloadError("offload state: offloaded must be a bool and payload a dict")
        if not state["offloaded"]:
            return stats, {}
        payload = {}
        for name, p in state["payload"].items():
            t = tensors.get(name)
            if t is None:
                raise OffloadError(f"offload state: payload {name!r} has no tensor of that name")
            try:
                payload[name] = _payload_from_state(p, t)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                msg = f"offload state: payload {name!r} is malformed ({exc})"
                raise OffloadError(msg) from None
        return stats, payload


def _payload_from_state(p: Any, t: torch.Tensor) -> Any:
    """A saved payload of ``t`` as the offloader holds it, or an error if it does not fit."""
    if p is None:
        return None

    def tensor(x: Any, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} is {type(x).__name__}, expected a tensor")
        return x

    def like(shape: Any, dtype: Any) -> tuple[tuple[int, ...], torch.dtype]:
        shape = tuple(int(d) for d in shape)
        dt = getattr(torch, str(dtype), None)
        if shape != tuple(t.shape) or dt != t.dtype:
            raise ValueError(f"saved as {shape} {dtype}, the tensor is {tuple(t.shape)} {t.dtype}")
        return shape, dt

    if "host" in p:
        host = tensor(p["host"], "host")
        like(host.shape, str(host.dtype).replace("torch.", ""))
        return host
    block = int(p["block"])
    if block < 1:
        raise ValueError(f"block {block}")
    shape, dtype = like(p["shape"], p["dtype"])
    blocks = max(1, -(-t.numel() // block))
    if "log_codes" in p:
        codes, lo, step = (tensor(p[k], k) for k in ("log_codes", "lo", "step"))
        if codes.dtype != torch.uint8 or codes.numel() != blocks * block:
            raise ValueError(f"log_codes are {codes.numel()} {codes.dtype}")
        if lo.numel() != blocks or step.numel() != blocks:
            raise ValueError(f"lo/step have {lo.numel()}/{step.numel()} blocks, expected {blocks}")
        return moment_code.LogCoded(
            codes.to(t.device), lo.to(t.device, torch.float32), step.to(t.device, torch.float32),
            block, shape, dtype,
        )  # fmt: skip
    from hybrid_triton.kernels.quantize import QuantizedTensor

    data, scales = tensor(p["data"], "data"), tensor(p["scales"], "scales")
    return QuantizedTensor(
        data.to(t.device), scales.to(t.device), str(p["fmt"]), block, shape, dtype
    )


@contextmanager
def _null() -> Iterator[None]:
    yield
