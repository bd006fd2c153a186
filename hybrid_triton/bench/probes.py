"""Memory probes: peak memory per phase, usable around any training loop.

On CUDA, each phase starts with ``torch.cuda.reset_peak_memory_stats`` and ends by reading
the peak allocated and reserved bytes and the allocator's fragmentation figures (inactive
split bytes, allocation retries, OOMs), all from one read of the allocator's counters at each
edge; with ``device_level=True`` and NVML installed, also the device-level memory in use
(which includes the CUDA context and other processes). A phase never synchronizes.
``snapshot_dir`` records the allocator history and dumps a snapshot that
https://pytorch.org/memory_viz reads, for deep dives.

Why one read per edge: ``torch.cuda.memory_allocated``, ``max_memory_allocated`` and
``memory_stats`` each flatten and sort the allocator's ~250 counters in Python; six of them
per phase cost the host a large part of a millisecond, which is percent of a training step
when a probe wraps every step. ``memory_stats_as_nested_dict`` returns the same counters
straight from C++.

On CPU there is no allocator to ask. The probe then tracks tensor storages as ops create them
(a ``TorchDispatchMode``) and frees them through weak references, which gives the peak of
tensor bytes live during the phase, on top of the bytes already resident at its start
(``resident=`` modules, optimizers and tensors). What it cannot measure there (reserved
memory, fragmentation, device-level use) is reported as not measured, with the reason.

    probe = MemoryProbe()
    with probe.phase("Full", resident=[model, optimizer]):
        loss = model(x).sum(); loss.backward(); optimizer.step()
    probe.results["Full"].peak_allocated   # bytes
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_NOT_MEASURED = (
    "not measured on cpu: no caching allocator (reserved memory, fragmentation) and no NVML"
)


@dataclass
class PhaseMemory:
    """What one phase measured (bytes). ``None`` means not measurable on this device."""

    phase: str
    peak_allocated: int
    peak_reserved: int | None = None
    allocated_at_start: int = 0
    allocated_at_end: int = 0
    # Fragmentation: bytes in cached blocks that are split but not in use, at their peak.
    inactive_split_peak: int | None = None
    alloc_retries: int | None = None  # cudaMalloc retries after freeing the cache
    num_ooms: int | None = None
    device_used: int | None = None  # NVML: the whole device (context, other processes)
    method: str = ""  # "cuda caching allocator" or "cpu tensor-storage tracking"
    note: str = ""
    snapshot_path: str | None = None
    device_used_note: str = ""  # why device_used is missing, when it is

    def as_metrics(self) -> list[tuple[str, str, float | None, str]]:
        """``(metric, unit, value, note)`` rows for a ``Recorder``; values in GiB."""
        gib = 2**30

        def g(v: int | None) -> float | None:
            return None if v is None else v / gib

        not_measured = self.note if self.note else ""
        return [
            ("peak_allocated", "GiB", g(self.peak_allocated), self.method),
            ("peak_reserved", "GiB", g(self.peak_reserved), not_measured or self.method),
            ("allocated_at_start", "GiB", g(self.allocated_at_start), self.method),
            ("inactive_split_peak", "GiB", g(self.inactive_split_peak), not_measured),
            ("alloc_retries", "count", self.alloc_retries, not_measured),
            ("device_used", "GiB", g(self.device_used),
             not_measured or self.device_used_note or "nvml"),
        ]  # fmt: skip


@functools.cache
def _nvml_handle(index: int):
    """NVML is initialised once per process and the device handle kept: an init and shutdown
    around every read cost more than the probe's whole budget (1% of a training step)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


def _nvml_used(index: int = 0) -> int | None:
    found = _nvml_handle(index)
    if found is None:
        return None
    pynvml, handle = found
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


NVML_NOT_ASKED = "not measured: device_level=False (an NVML query per phase is opt-in)"
NVML_MISSING = "not measured: NVML (pynvml, nvidia-ml-py) not available"


def _allocator_counters(device: torch.device) -> dict:
    """The caching allocator's counters as a nested dict, read once (no Python flattening
    and sorting, unlike ``torch.cuda.memory_stats`` and the helpers built on it)."""
    return torch.cuda.memory.memory_stats_as_nested_dict(device)


def _counter(stats: dict, name: str, kind: str) -> int:
    """``stats[name]["all"][kind]`` (e.g. ``allocated_bytes``, ``peak``), 0 when absent."""
    return int(stats.get(name, {}).get("all", {}).get(kind, 0))


def _storages(objects: Iterable[object]) -> Iterator[torch.UntypedStorage]:
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.Tensor):
            yield obj.untyped_storage()
            if obj.grad is not None:
                yield obj.grad.untyped_storage()
        elif isinstance(obj, torch.nn.Module):
            yield from _storages(obj.parameters())
            yield from _storages(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from _storages(v for v in state.values() if isinstance(v, torch.Tensor))
        elif isinstance(obj, dict):
            yield from _storages(obj.values())
        elif isinstance(obj, (list, tuple, set)) or hasattr(obj, "__iter__"):
            yield from _storages(obj)


def live_tensor_bytes(device_type: str = "cpu") -> int:
    """Bytes of the distinct storages of every live Python tensor on ``device_type`` (a
    garbage-collector scan: what the process holds when no graph is alive)."""
    import gc

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        # type() rather than isinstance(): isinstance reads ``__class__``, which some
        # module-level proxies (deprecated torch aliases) answer with a warning.
        if issubclass(type(obj), torch.Tensor) and obj.device.type == device_type:
            try:
                storage = obj.untyped_storage()
                # fake tensors (kept by torch.compile's caches, or a planner trace) have a
                # storage but no data pointer
                seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse, fake or wrapper tensors
                continue
    return sum(seen.values())


def resident_bytes(objects: Iterable[object]) -> int:
    """Bytes of the distinct storages held by ``objects`` (tensors and their grads, modules'
    parameters and buffers, optimizers' state), each storage counted once."""
    seen: dict[tuple[str, int], int] = {}
    for s in _storages(objects):
        if s.device.type == "meta":
            continue
        seen[(str(s.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


class _StorageTracker:
    """Counts bytes of tensor storages created by ops while active (CPU probe)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live = 0
        self.peak = 0
        self._known: set[int] = set()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._observe(args, kwargs, out)
                return out

        self.mode = _Mode()

    def _free(self, key: int, nbytes: int) -> None:
        self._known.discard(key)
        self.live -= nbytes

    def _observe(self, args, kwargs, out) -> None:
        from torch.utils._pytree import tree_leaves

        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs or {}))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._known:
                continue  # a view or an in-place result: no new memory
            nbytes = storage.nbytes()
            self._known.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)


class MemoryProbe:
    """Per-phase peak memory. ``with probe.phase(name): ...`` measures one phase; the
    latest measurement of each phase is kept in ``results`` (and every one in ``history``).

    ``device_level``: on CUDA, also read the device's memory in use through NVML at the end
    of each phase (one driver query per phase; off by default so that a probe around every
    training step costs only two reads of the allocator's host-side counters).
    ``snapshot_dir``: on CUDA, record the allocator history during each phase and dump a
    ``<phase>.pickle`` snapshot there (costly: for deep dives, not for timing).

    Besides the per-phase figures, the probe keeps the run's peaks (``run_peaks()``): the
    highest allocated and reserved bytes since ``start_run()`` (or the probe's creation),
    inside phases and between them; phase resets do not lose them.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        snapshot_dir: str | None = None,
        *,
        device_level: bool = False,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"MemoryProbe measures cuda or cpu devices, not {self.device}")
        if self.device.type == "cuda":
            # The allocator must exist before its peaks can be reset (start_run may come
            # before the first CUDA tensor); idempotent.
            torch.cuda.init()
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.snapshot_dir = snapshot_dir
        self.device_level = bool(device_level)
        self.results: dict[str, PhaseMemory] = {}
        self.history: list[PhaseMemory] = []
        self._cpu_offset = 0
        self._run_allocated = 0
        self._run_reserved = 0

    def start_run(self) -> None:
        """Start the run-peak window now (CUDA: resets the allocator's peak statistics)."""
        self._run_allocated = 0
        self._run_reserved = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def run_peaks(self) -> tuple[int, int | None]:
        """(peak allocated, peak reserved) in bytes since ``start_run()``; reserved is
        ``None`` on CPU (no caching allocator). Call it outside a phase."""
        if self.device.type == "cuda":
            self._fold(_allocator_counters(self.device))
            return self._run_allocated, self._run_reserved
        return self._run_allocated, None

    def _fold(self, stats: dict) -> None:
        # The peaks since the last reset: read before each reset, so the run's peak survives.
        self._run_allocated = max(self._run_allocated, _counter(stats, "allocated_bytes", "peak"))
        self._run_reserved = max(self._run_reserved, _counter(stats, "reserved_bytes", "peak"))

    def exclude_current_tensors(self) -> None:
        """CPU: leave every tensor alive now out of later figures (whatever the process held
        before the model under test was built). Nothing to do on CUDA: phases measure peaks
        of the allocator, which this does not change."""
        if self.device.type == "cpu":
            self._cpu_offset = live_tensor_bytes("cpu")

    @property
    def measures_allocator(self) -> bool:
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def phase(self, name: str, resident: Iterable[object] | None = None) -> Iterator[None]:
        """Measure the code inside as phase ``name``.

        ``resident`` (CPU only): what is already allocated at the phase start, as modules,
        optimizers and tensors; ``None`` scans every live tensor (``live_tensor_bytes``).
        """
        if self.device.type == "cuda":
            with self._cuda_phase(name):
                yield
        else:
            with self._cpu_phase(name, None if resident is None else list(resident)):
                yield

    @contextlib.contextmanager
    def _cuda_phase(self, name: str) -> Iterator[None]:
        dev = self.device
        # No synchronize: the caching allocator keeps its statistics on the host, in the
        # order the host issues allocations, so resetting and reading them needs no wait for
        # the GPU (and a probe around every step costs no pipeline stall). One read of the
        # counters at each edge (see the module docstring for why).
        stats0 = _allocator_counters(dev)
        self._fold(stats0)
        torch.cuda.reset_peak_memory_stats(dev)
        snap_path = None
        if self.snapshot_dir:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        try:
            yield
        finally:
            stats = _allocator_counters(dev)
            self._fold(stats)
            if self.snapshot_dir:
                Path(self.snapshot_dir).mkdir(parents=True, exist_ok=True)
                safe = "".join(c if c.isalnum() else "_" for c in name)
                snap_path = os.path.join(self.snapshot_dir, f"{safe}.pickle")
                torch.cuda.memory._dump_snapshot(snap_path)
                torch.cuda.memory._record_memory_history(enabled=None)
            device_used, used_note = None, NVML_NOT_ASKED
            if self.device_level:
                device_used = _nvml_used(dev.index or 0)
                used_note = "" if device_used is not None else NVML_MISSING
            result = PhaseMemory(
                phase=name,
                peak_allocated=_counter(stats, "allocated_bytes", "peak"),
                peak_reserved=_counter(stats, "reserved_bytes", "peak"),
                allocated_at_start=_counter(stats0, "allocated_bytes", "current"),
                allocated_at_end=_counter(stats, "allocated_bytes", "current"),
                inactive_split_peak=_counter(stats, "inactive_split_bytes", "peak"),
                alloc_retries=int(stats.get("num_alloc_retries", 0))
                - int(stats0.get("num_alloc_retries", 0)),
                num_ooms=int(stats.get("num_ooms", 0)) - int(stats0.get("num_ooms", 0)),
                device_used=device_used,
                device_used_note=used_note,
                method="cuda caching allocator",
                snapshot_path=snap_path,
            )
            self._keep(result)

    @contextlib.contextmanager
    def _cpu_phase(self, name: str, resident: list[object] | None) -> Iterator[None]:
        if resident is None:
            start = max(0, live_tensor_bytes("cpu") - self._cpu_offset)
        else:
            start = resident_bytes(resident)
        tracker = _StorageTracker()
        try:
            with tracker.mode:
                yield
        finally:
            result = PhaseMemory(
                phase=name,
                peak_allocated=start + tracker.peak,
                allocated_at_start=start,
                allocated_at_end=start + tracker.live,
                method="cpu tensor-storage tracking",
                note=CPU_NOT_MEASURED,
            )
            self._keep(result)

    def _keep(self, result: PhaseMemory) -> None:
        self.history.append(result)
        self.results[result.phase] = result
        if self.device.type == "cpu":
            self._run_allocated = max(self._run_allocated, result.peak_allocated)


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error from any device (CUDA, or a CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in text or isinstance(err, MemoryError)
    )


def free_device_memory() -> None:
    """Drop cached blocks after a case so the next one starts clean (and after an OOM)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def set_memory_cap(gib: float, device: int = 0) -> float:
    """Cap this process's CUDA allocations at ``gib`` GiB (for "fits under 8/16/24 GiB"
    checks) via ``torch.cuda.set_per_process_memory_fraction``; returns the fraction set.

    The cap limits what the caching allocator reserves (``cudaMalloc``); the CUDA context
    and other processes are outside it."""
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib > 0:
        raise ValueError(f"a memory cap is a positive number of GiB, got {gib!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("--memory-cap needs a CUDA device: there is no allocator to cap on CPU")
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


@contextlib.contextmanager
def memory_cap(gib: float, device: int = 0) -> Iterator[float]:
    """``set_memory_cap(gib)`` inside the block, the previous fraction restored after it
    (also after an out-of-memory error). Yields the fraction set."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = float(getter(device)) if getter is not None and torch.cuda.is_available() else 1.0
    fraction = set_memory_cap(gib, device)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


def parse_memory_caps(text: str) -> tuple[float, ...]:
    """``"8,16,24"`` → ``(8.0, 16.0, 24.0)`` (GiB, sorted, unique); a clear error otherwise."""
    caps = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(
                f"memory caps are GiB numbers separated by commas, got {text!r}"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"a memory cap must be a positive number of GiB, got {part!r}")
        caps.append(value)
    return tuple(sorted(set(caps)))
