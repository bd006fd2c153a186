"""Divergence monitor: relative measures, escalation, non-finite losses."""

from __future__ import annotations

import math

import pytest

from hybrid_triton.divergence import DivergenceMonitor, Level


def monitor(**kw) -> DivergenceMonitor:
    m = DivergenceMonitor(**{"rel_warning": 0.1, "rel_critical": 0.4, "sigma": 4.0, **kw})
    for x in [3.0, 2.98, 2.97, 2.95, 2.96, 2.93, 2.92, 2.9]:
        m.observe(x)
    return m


def test_close_prediction_is_ok():
    assert monitor().check(2.89, 2.9).level is Level.OK


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_is_critical(loss):
    assert monitor().check(loss, 2.9).critical


def test_relative_error_levels():
    m = monitor()
    assert m.check(2.9 * 1.2, 2.9).level is Level.WARNING  # 20% off, rise < sigma
    assert m.check(2.9 * 1.6, 2.9).critical  # 60% off


def test_scale_free():
    # The same relative situation at a loss 1000x smaller gives the same verdict.
    a = monitor().check(3.2, 2.9)
    b = DivergenceMonitor(rel_warning=0.1, rel_critical=0.4, sigma=4.0)
    for x in [3.0, 2.98, 2.97, 2.95, 2.96, 2.93, 2.92, 2.9]:
        b.observe(x / 1000)
    assert b.check(3.2 / 1000, 2.9 / 1000).level is a.level


def test_rise_over_history_without_prediction():
    m = monitor()
    assert m.check(2.9).level is Level.OK
    # mean ~2.95, scale = max(std, 0.1 * mean) ~0.295: +2.5 scales -> warning; +9 -> critical
    assert m.check(2.95 + 1.5).level is Level.WARNING
    assert m.check(2.95 + 2.7).critical


def test_warnings_escalate():
    m = monitor(escalate_after=3)
    levels = [m.check(2.9 * 1.2, 2.9).level for _ in range(3)]
    assert levels == [Level.WARNING, Level.WARNING, Level.CRITICAL]
    assert m.consecutive_warnings == 0
    assert m.check(2.9, 2.9).level is Level.OK


def test_ok_resets_streak():
    m = monitor(escalate_after=2)
    m.check(2.9 * 1.2, 2.9)
    m.check(2.9, 2.9)
    assert m.check(2.9 * 1.2, 2.9).level is Level.WARNING


def test_state_roundtrip():
    m = monitor()
    m.check(2.9 * 1.2, 2.9)
    other = DivergenceMonitor(rel_warning=0.1, rel_critical=0.4, sigma=4.0)
    other.load_state_dict(m.state_dict())
    assert other.check(2.9 * 1.2, 2.9).level is m.check(2.9 * 1.2, 2.9).level
    assert other.counts == m.counts


def test_bad_thresholds():
    with pytest.raises(ValueError, match="rel_warning"):
        DivergenceMonitor(rel_warning=0.5, rel_critical=0.2)
