"""Divergence monitor: is a Predict step's real loss still where it should be?

Every Predict step still runs the forward pass, so its real loss is known. The monitor compares
it, with relative (scale-free) measures only, against

- the loss the dynamics model predicted for that step: ``|loss - predicted| / |predicted|``;
- the recent history of real losses from Full/Correct steps (``observe``): the rise above the
  history mean, in units of the larger of the history's standard deviation and a relative floor
  (``rel_warning`` of the mean), so a perfectly flat history does not make every wiggle a
  divergence.

A non-finite loss is critical at once. ``escalate_after`` warnings in a row are critical. On a
critical level the trainer rolls back to the Predict entry snapshot and forces a Full phase.

The seed checked the previous step's loss against the prediction *error* passed where the
predicted loss was expected (seed-digest 8.1); here ``check`` receives the step's own loss and
its prediction, after the forward pass of that step.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Any


class Level(enum.IntEnum):
    OK = 0
    CAUTION = 1
    WARNING = 2
    CRITICAL = 3


@dataclass(frozen=True)
class Verdict:
    level: Level
    reason: str
    rel_error: float  # |loss - predicted| / |predicted| (nan without a prediction)
    rise: float  # (loss - history mean) / max(history std, rel_warning * |mean|)

    @property
    def critical(self) -> bool:
        return self.level is Level.CRITICAL


class DivergenceMonitor:
    def __init__(
        self,
        rel_warning: float = 0.15,
        rel_critical: float = 0.5,
        sigma: float = 4.0,
        history: int = 50,
        escalate_after: int = 3,
    ) -> None:
        if not 0 < rel_warning < rel_critical:
            raise ValueError(
                f"DivergenceMonitor: need 0 < rel_warning < rel_critical, got {rel_warning}, "
                f"{rel_critical}"
            )
        self.rel_warning = float(rel_warning)
        self.rel_critical = float(rel_critical)
        self.sigma = float(sigma)
        self.history: deque[float] = deque(maxlen=int(history))
        self.escalate_after = int(escalate_after)
        self.consecutive_warnings = 0
        self.counts = {level.name.lower(): 0 for level in Level}
        self.last: Verdict | None = None

    def observe(self, loss: float) -> None:
        """A real loss from a step whose weights came from the optimizer (Full/Correct)."""
        if math.isfinite(loss):
            self.history.append(float(loss))

    def _rise(self, loss: float) -> float:
        if len(self.history) < 2:
            return 0.0
        n = len(self.history)
        mean = sum(self.history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
        scale = max(std, self.rel_warning * abs(mean), 1e-12)
        return (loss - mean) / scale

    def critical_limit(self, predicted: float | None = None) -> float:
        """The loss above which :meth:`check` would be critical (for a device-side guard)."""
        limit = math.inf
        if predicted is not None and math.isfinite(predicted):
            limit = abs(predicted) * (1.0 + self.rel_critical) + (predicted - abs(predicted))
        if len(self.history) >= 2:
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
            scale = max(std, self.rel_warning * abs(mean), 1e-12)
            limit = min(limit, mean + 2 * self.sigma * scale)
        return limit

    def check(self, loss: float, predicted: float | None = None) -> Verdict:
        """Judge one Predict step: its real ``loss`` and the ``predicted`` loss for it."""
        if not math.isfinite(loss):
            verdict = Verdict(Level.CRITICAL, f"non-finite loss {loss}", math.nan, math.inf)
        else:
            rel = math.nan
            if predicted is not None and math.isfinite(predicted):
                rel = abs(loss - predicted) / max(abs(predicted), 1e-12)
            rise = self._rise(loss)
            level, reasons = Level.OK, []
            if not math.isnan(rel):
                if rel > self.rel_critical:
                    level = Level.CRITICAL
                    reasons.append(f"loss {loss:.4g} is {rel:.1%} off the prediction")
                elif rel > self.rel_warning:
                    level = max(level, Level.WARNING)
                    reasons.append(f"loss {loss:.4g} is {rel:.1%} off the prediction")
                elif rel > self.rel_warning / 2:
                    level = max(level, Level.CAUTION)
            if rise > 2 * self.sigma:
                level = Level.CRITICAL
                reasons.append(f"loss rose {rise:.1f} scales above its recent history")
            elif rise > self.sigma:
                level = max(level, Level.WARNING)
                reasons.append(f"loss rose {rise:.1f} scales above its recent history")
            if level is Level.WARNING:
                self.consecutive_warnings += 1
                if self.consecutive_warnings >= self.escalate_after:
                    level = Level.CRITICAL
                    reasons.append(f"{self.consecutive_warnings} warnings in a row")
            elif level < Level.WARNING:
                self.consecutive_warnings = 0
            verdict = Verdict(level, "; ".join(reasons) or "ok", rel, rise)
        if verdict.critical:
            self.consecutive_warnings = 0
        self.counts[verdict.level.name.lower()] += 1
        self.last = verdict
        return verdict

    def reset_streak(self) -> None:
        self.consecutive_warnings = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "consecutive_warnings": self.consecutive_warnings,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything is checked before anything changes (a bad state raises ValueError)."""
        try:
            history = [float(x) for x in state["history"]]
            streak, counts = state["consecutive_warnings"], dict(state["counts"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                "DivergenceMonitor state: expected history (numbers), consecutive_warnings "
                f"and counts ({type(exc).__name__}: {exc})"
            ) from None
        if not all(math.isfinite(x) for x in history):
            raise ValueError("DivergenceMonitor state: the history holds non-finite losses")
        if isinstance(streak, bool) or not isinstance(streak, int) or streak < 0:
            raise ValueError(f"DivergenceMonitor state: consecutive_warnings is {streak!r}")
        if set(counts) != set(self.counts):
            raise ValueError(f"DivergenceMonitor state: counts has {sorted(counts)}")
        self.history.clear()
        self.history.extend(history)
        self.consecutive_warnings = streak
        self.counts = counts


class OutlierFilter:
    """Keeps single outlier losses (one bad batch) out of the loss history and the trend.

    A loss is an outlier when it lies more than ``k`` robust deviations (1.4826 * the median
    absolute deviation, which one outlier cannot move) above the median of the last
    ``window`` accepted losses. Only rises are filtered: a sudden drop is no danger to the
    history. A run of ``persist`` outliers in a row is a real change of level, not a bad
    batch: it is accepted from then on (and the divergence monitor judges it).
    """

    def __init__(self, window: int = 32, k: float = 8.0, min_history: int = 8, persist: int = 3):
        self.history: deque[float] = deque(maxlen=int(window))
        self.k = float(k)
        self.min_history = int(min_history)
        self.persist = int(persist)
        self.streak = 0
        self.rejected = 0

    def limit(self) -> float:
        """The loss above which :meth:`accept` would reject now (``inf``: none)."""
        if len(self.history) < self.min_history or self.streak + 1 >= self.persist:
            return math.inf
        xs = sorted(self.history)
        med = xs[len(xs) // 2]
        mad = sorted(abs(x - med) for x in xs)[len(xs) // 2]
        return med + self.k * max(1.4826 * mad, 1e-3 * abs(med), 1e-12)

    def accept(self, loss: float) -> bool:
        """Whether ``loss`` may enter the history (and remember it if so)."""
        if not math.isfinite(loss):
            return False
        if loss > self.limit():
            self.streak += 1
            self.rejected += 1
            return False
        self.streak = 0
        self.history.append(float(loss))
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "streak": self.streak, "rejected": self.rejected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history, streak, rejected = _check_filter_state(state)
        self.history.clear()
        self.history.extend(history)
        self.streak, self.rejected = streak, rejected


def _check_filter_state(state: Any) -> tuple[list[float], int, int]:
    try:
        history = [float(x) for x in state["history"]]
        streak, rejected = state["streak"], state["rejected"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"OutlierFilter state: expected history (numbers), streak and rejected ({exc})"
        ) from None
    if not all(math.isfinite(x) for x in history):
        raise ValueError("OutlierFilter state: the history holds non-finite losses")
    for name, v in (("streak", streak), ("rejected", rejected)):
        if type(v) is not int or v < 0:
            raise ValueError(f"OutlierFilter state: {name} must be an int >= 0, got {v!r}")
    return history, streak, rejected
