"""Metrics: one JSONL record per trainer step, per-phase peak memory, and a run summary.

Records are written when their values have reached the host (the trainer reads device values
``host_lag`` steps late, so writing never waits for the GPU). Per-phase peaks: at every phase
boundary the collector reads ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` for
the phase that ends and calls ``torch.cuda.reset_peak_memory_stats``, so each phase's peak is
its own (DESIGN.md: report per-phase peaks, never time-weighted savings). On CPU the memory
fields are ``None``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsCollector:
    def __init__(
        self,
        path: str | os.PathLike | None = None,
        progress: bool = False,
        total: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.path = None if path is None else os.fspath(path)
        self.device = torch.device(device)
        self.records = 0
        self.counters: dict[str, Any] = {
            "steps": {},
            "precision_switches": 0,
            "rollbacks": 0,
            "transitions": 0,
            "predict_steps_rolled_back": 0,
            # Steps the device skipped (a non-finite loss or gradient: no optimizer step).
            "skipped_steps": 0,
            # Real losses kept out of the loss history as single outliers (trainer).
            "outliers": 0,
        }
        # phase name -> {"allocated": max bytes, "reserved": max bytes} over all its phases
        self.phase_peaks: dict[str, dict[str, int]] = {}
        self.last_precision: str | None = None
        self.losses: dict[str, list[float]] = {}
        # Step times (ms) per phase, and of the first step of each phase instance.
        self.step_ms: dict[str, list[float]] = {}
        self.first_step_ms: dict[str, list[float]] = {}
        self._fh = None
        self._resumed = False
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------ memory
    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def memory_now(self) -> tuple[int | None, int | None]:
        if not self.on_cuda:
            return None, None
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)

    def phase_boundary(self, ending_phase: str | None) -> dict[str, int] | None:
        """Close the ending phase's peak and reset the allocator's peak counters."""
        if not self.on_cuda:
            return None
        peak = {
            "allocated": torch.cuda.max_memory_allocated(self.device),
            "reserved": torch.cuda.max_memory_reserved(self.device),
        }
        if ending_phase is not None:
            cur = self.phase_peaks.setdefault(ending_phase, {"allocated": 0, "reserved": 0})
            cur["allocated"] = max(cur["allocated"], peak["allocated"])
            cur["reserved"] = max(cur["reserved"], peak["reserved"])
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def memory_saved(self, phase: str) -> int | None:
        """Full phase's measured peak minus ``phase``'s (bytes; None until both are known)."""
        full, cur = self.phase_peaks.get("full"), self.phase_peaks.get(phase)
        if not full or not cur:
            return None
        return full["allocated"] - cur["allocated"]

    # ------------------------------------------------------------------ records
    def note_precision(self, precision: str) -> None:
        if self.last_precision is not None and precision != self.last_precision:
            self.counters["precision_switches"] += 1
        self.last_precision = precision

    def record(self, rec: dict[str, Any]) -> None:
        phase = rec.get("phase", "?")
        steps = self.counters["steps"]
        steps[phase] = steps.get(phase, 0) + 1
        loss = rec.get("loss")
        gnorm = rec.get("grad_norm")
        if any(isinstance(v, float) and not math.isfinite(v) for v in (loss, gnorm)):
            self.counters["skipped_steps"] += 1  # the device skipped its optimizer step
        if isinstance(loss, float) and math.isfinite(loss):  # skipped steps are counted above
            self.losses.setdefault(phase, []).append(loss)
        ms = rec.get("step_ms")
        if isinstance(ms, float):
            self.step_ms.setdefault(phase, []).append(ms)
            del self.step_ms[phase][:-1000]
            if rec.get("phase_step") == 0:
                self.first_step_ms.setdefault(phase, []).append(ms)
                del self.first_step_ms[phase][:-1000]
        self.records += 1
        if self.path is not None:
            if self._fh is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                # A fresh run starts the file anew (a reused path must not mix two runs); a
                # resumed one (load_state_dict) continues it.
                mode = "a" if self._resumed else "w"
                self._fh = open(self.path, mode, encoding="utf-8")  # noqa: SIM115 (kept open)
            self._fh.write(json.dumps(_clean(rec), sort_keys=True) + "\n")
            self._fh.flush()
        if self._bar is not None:
            self._bar.update(1)
            if isinstance(loss, float):
                self._bar.set_postfix(phase=phase, loss=f"{loss:.4f}")

    def summary(self) -> dict[str, Any]:
        mean_loss = {
            p: (sum(v[-20:]) / len(v[-20:]) if v else None) for p, v in self.losses.items()
        }
        saved = {p: self.memory_saved(p) for p in self.phase_peaks if p != "full"}

        def median(xs: list[float]) -> float | None:
            if not xs:
                return None
            ys = sorted(xs)
            mid = len(ys) // 2
            return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2

        return _clean(
            {
                "records": self.records,
                **self.counters,
                "phase_peaks": self.phase_peaks,
                "memory_saved_vs_full": saved,
                "recent_mean_loss": mean_loss,
                "step_ms_median": {p: median(v) for p, v in self.step_ms.items()},
                # The mean as well: work done on one step in n (the dynamics model's training
                # update on Full steps) moves the mean, not the median.
                "step_ms_mean": {
                    p: (sum(v) / len(v) if v else None) for p, v in self.step_ms.items()
                },
                "first_step_ms_median": {p: median(v) for p, v in self.first_step_ms.items()},
            }
        )

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "counters": json.loads(json.dumps(self.counters)),
            "phase_peaks": json.loads(json.dumps(self.phase_peaks)),
            "last_precision": self.last_precision,
            "losses": {k: list(v[-100:]) for k, v in self.losses.items()},
            "step_ms": {k: list(v) for k, v in self.step_ms.items()},
            "first_step_ms": {k: list(v) for k, v in self.first_step_ms.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("counters"), dict):
            raise ValueError("MetricsCollector state: expected a dict with a counters dict")
        for key in ("records", "phase_peaks", "last_precision", "losses"):
            if key not in state:
                raise ValueError(f"MetricsCollector state: missing {key!r}")
        records = int(state["records"])
        losses = {k: list(v) for k, v in state["losses"].items()}
        self._resumed = True
        self.records = records
        # Counters added since the checkpoint was written start at 0.
        self.counters = {**dict.fromkeys(("skipped_steps", "outliers"), 0), **state["counters"]}
        self.phase_peaks = state["phase_peaks"]
        self.last_precision = state["last_precision"]
        self.losses = losses
        self.step_ms = {k: list(v) for k, v in state.get("step_ms", {}).items()}
        self.first_step_ms = {k: list(v) for k, v in state.get("first_step_ms", {}).items()}
