"""Fault injection: bad losses at every phase, rejected steps, bad states, failed writes.

Each test asserts that nothing changed on error and that a run never ends worse silently: it
rolls back, skips, or raises.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trainer import CYCLE, _run_into_predict, batches, lm_loss, make_trainer

from hybrid_triton.checkpoint import load_checkpoint, save_checkpoint
from hybrid_triton.divergence import DivergenceMonitor, OutlierFilter
from hybrid_triton.scheduler import Phase


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hybrid_triton.data import load_corpus

    return load_corpus(
        tokenizer="byte", max_files=12, val_every=3, cache_dir=tmp_path_factory.mktemp("corpus")
    )


def _spy(monkeypatch, obj, name, log):
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        log.append((name, args, out))
        return out

    monkeypatch.setattr(obj, name, wrapped)


def test_rejected_predict_step_teaches_nothing(corpus, monkeypatch):
    tr = make_trainer({**CYCLE, "offload": "cpu"})
    data = batches(corpus, 60)
    used = _run_into_predict(tr, data)
    log: list = []
    _spy(monkeypatch, tr.divergence, "check", log)
    _spy(monkeypatch, tr.corrector, "observe_loss", log)
    _spy(monkeypatch, tr.dynamics, "observe", log)
    tr._alphas.mul_(1e4)  # the predicted steps blow the loss up
    for batch in data[used : used + 4]:
        tr.step(batch)
    tr.flush()
    assert tr.metrics.counters["rollbacks"] == 1
    rejected = {args[0] for name, args, out in log if name == "check" and out.critical}
    assert rejected
    taught = {args[0] for name, args, _ in log if name in ("observe_loss", "observe")}
    assert not rejected & taught, "a rejected loss reached the corrector or the dynamics model"


class _Spiky:
    """lm_loss, times ``factor`` on the batches whose index is in ``at``."""

    def __init__(self, at, factor=100.0):
        self.at, self.factor, self.calls = set(at), factor, 0

    def __call__(self, model, batch):
        loss = lm_loss(model, batch)
        i, self.calls = self.calls, self.calls + 1
        return loss * self.factor if i in self.at else loss


def test_full_step_outliers_stay_out_of_the_loss_history(corpus):
    cfg = {**CYCLE, "warmup_steps": 2, "full_steps": 30, "confidence_threshold": 0.99}
    torch.manual_seed(0)
    from test_trainer import CharModel

    from hybrid_triton.scheduler import TrainerConfig
    from hybrid_triton.trainer import HybridTrainer

    spiky = _Spiky(at={14})
    tr = HybridTrainer(CharModel(), spiky, config=TrainerConfig(**cfg), lr=1e-2)
    for batch in batches(corpus, 20):
        tr.step(batch)
    tr.flush()
    assert tr.phase is Phase.FULL
    assert max(tr.dynamics.losses) < 20, "the outlier reached the trend model"
    assert max(tr.divergence.history) < 20, "the outlier reached the divergence history"
    assert tr.metrics.summary()["outliers"] == 1


# ------------------------------------------------------------------------ fingerprints
def fingerprint(obj, _seen=None, _depth=0):
    """Every tensor's bytes and every attribute reachable from ``obj`` (a freed tensor by its
    shape and storage size), as a nested structure that compares with ``==``."""
    _seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        need = (obj.storage_offset() + obj.numel()) * obj.element_size()
        if obj.numel() and obj.untyped_storage().nbytes() < need:  # freed (offloaded)
            return ("freed", tuple(obj.shape), str(obj.dtype))
        return (
            "t",
            tuple(obj.shape),
            str(obj.dtype),
            obj.detach().cpu().clone().numpy().tobytes(),
        )
    if isinstance(obj, (int, float, str, bool, type(None))):
        return ("nan",) if isinstance(obj, float) and math.isnan(obj) else obj
    if id(obj) in _seen or _depth > 12:
        return ("seen",)
    _seen.add(id(obj))
    if isinstance(obj, dict):
        return {str(k): fingerprint(v, _seen, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, deque)):
        return [fingerprint(v, _seen, _depth + 1) for v in obj]
    if isinstance(obj, torch.nn.Module):
        return fingerprint(obj.state_dict(), _seen, _depth + 1)
    module = type(obj).__module__ or ""
    if module.startswith("hybrid_triton") and hasattr(obj, "__dict__"):
        skip = ("_fh", "_bar", "_stream", "_events", "loss_fn", "model")
        return {k: fingerprint(v, _seen, _depth + 1) for k, v in vars(obj).items() if k not in skip}
    return ("obj", type(obj).__name__)


def _resave(src, dst, edit):
    state = load_checkpoint(src)
    edit(state)
    save_checkpoint(dst, state)


def _other(cfg, **kw):
    torch.manual_seed(1)
    from test_trainer import CharModel

    from hybrid_triton.scheduler import TrainerConfig
    from hybrid_triton.trainer import HybridTrainer

    return HybridTrainer(CharModel(), lm_loss, config=TrainerConfig(**cfg), lr=1e-2, **kw)


def test_bad_checkpoints_change_nothing(corpus, tmp_path):
    tr = make_trainer({**CYCLE, "offload": "compress"})
    data = batches(corpus, 40)
    used = _run_into_predict(tr, data)
    good = tmp_path / "good.ckpt"
    tr.save(good)
    bad = []
    other = _other({**CYCLE, "offload": "compress", "dynamics_model": "rssm"})
    bad.append(tmp_path / "rssm.ckpt")
    other.save(bad[-1])
    other = _other({**CYCLE, "offload": "compress"}, max_groups=1)
    bad.append(tmp_path / "groups.ckpt")
    other.save(bad[-1])
    for key in ("corrector", "pending", "dynamics", "metrics"):
        bad.append(tmp_path / f"no-{key}.ckpt")
        _resave(good, bad[-1], lambda st, key=key: st.pop(key))
    edits = {
        "corrector-shape": lambda st: st["corrector"].update(last_fit=torch.zeros(99)),
        "offload-payload": lambda st: st["offloader"]["payload"].update(bogus=None),
        "offload-stats": lambda st: st["offloader"]["stats"].update(nonsense=1),
        "snapshot": lambda st: st.update(snapshot=torch.zeros(3)),
        "outliers": lambda st: st.update(outliers={"history": [math.nan], "streak": 0}),
        "divergence": lambda st: st.update(divergence=[]),
    }
    for name, edit in edits.items():
        bad.append(tmp_path / f"{name}.ckpt")
        _resave(good, bad[-1], edit)
    before = fingerprint(tr)
    for path in bad:
        with pytest.raises(ValueError):
            tr.load(path)
        assert fingerprint(tr) == before, path.name
    # The good file still loads, and training goes on (a save while the moments are being
    # restored must not free them again).
    tr.load(good)
    assert fingerprint(tr)["episode"] == before["episode"]
    for batch in data[used : used + 2]:
        tr.step(batch)


def test_outlier_filter_and_monitor_loads_validate_first():
    f = OutlierFilter()
    for x in [1.0, 1.1, 0.9] * 4:
        f.accept(x)
    before = fingerprint(f)
    for state in (None, {}, {"history": ["a"], "streak": 0, "rejected": 0},
                  {"history": [1.0], "streak": -1, "rejected": 0},
                  {"history": [math.inf], "streak": 0, "rejected": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            f.load_state_dict(state)
        assert fingerprint(f) == before


def test_outlier_filter_accepts_a_lasting_change():
    f = OutlierFilter(persist=3)
    for x in [2.0 + 0.01 * (i % 3) for i in range(10)]:
        assert f.accept(x)
    assert not f.accept(50.0)  # one bad batch
    assert f.accept(2.0)
    assert [f.accept(9.0) for _ in range(3)] == [False, False, True]  # a new level
    assert f.accept(1.0)  # drops are never outliers


# ------------------------------------------------------------- bad losses at every phase
class _Poison:
    """lm_loss, replaced by ``value`` on the steps (loss calls) in ``at``."""

    def __init__(self, value, at):
        self.value, self.at, self.calls = value, set(at), 0

    def __call__(self, model, batch):
        loss = lm_loss(model, batch)
        i, self.calls = self.calls, self.calls + 1
        # A bad batch: its loss and its gradient both scaled to ``value`` (NaN/inf poison
        # the gradient too, as they would in a real step).
        return loss * (self.value / loss.detach()) if i in self.at else loss


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e30])
def test_bad_losses_at_every_phase_never_pass_silently(corpus, value):
    # A long Warmup: an outlier is recognised against at least 8 earlier losses (the first
    # steps of a run have no history to judge a finite outlier by; NaN/inf need none).
    cfg = {**CYCLE, "warmup_steps": 10, "offload": "compress", "grad_path": "flat"}
    clean = _other(cfg)
    data = batches(corpus, 36)
    phases = [clean.step(b)["phase"] for b in data]
    clean.flush()
    # One bad batch in each phase the clean run went through: the first step of each phase
    # at index >= 9 (Predict has no backward, but its forward loss is judged).
    firsts = {}
    for i, p in enumerate(phases):
        if i >= 9:
            firsts.setdefault(p, i)
    assert {"warmup", "full", "predict", "correct"} <= set(firsts), phases
    poison = _Poison(value, at=set(firsts.values()))
    from test_trainer import CharModel

    from hybrid_triton.scheduler import TrainerConfig
    from hybrid_triton.trainer import HybridTrainer

    torch.manual_seed(1)
    tr = HybridTrainer(CharModel(), poison, config=TrainerConfig(**cfg), lr=1e-2)
    for b in data:
        tr.step(b)
    tr.flush()
    summary = tr.metrics.summary()
    assert torch.isfinite(tr.master).all()
    handled = summary["skipped_steps"] + summary["rollbacks"] + summary["outliers"]
    assert handled >= 1, summary
    if not math.isfinite(value):
        assert summary["skipped_steps"] >= 1
    # The run does not end worse than the clean one by more than noise.
    held = batches(corpus, 4, start=100)
    with torch.no_grad():
        ours = sum(float(lm_loss(tr.model, b)) for b in held)
        theirs = sum(float(lm_loss(clean.model, b)) for b in held)
    # A skipped step is a lost step (counted above): 30 steps at lr 1e-2 move fast, so the
    # bound allows the lost steps, not a blow-up.
    assert ours < 1.10 * theirs, (ours, theirs)


# ------------------------------------------------------------- failed and killed writes
@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_killed_or_full_disk_saves_keep_the_old_checkpoint(
    corpus, tmp_path, monkeypatch, where, err
):
    tr = make_trainer(CYCLE)
    for b in batches(corpus, 3):
        tr.step(b)
    path = tmp_path / "run.ckpt"
    tr.save(path)
    old = path.read_bytes()
    tr.step(batches(corpus, 1, start=3)[0])
    before = fingerprint(tr)

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    if where == "write":
        import builtins

        from hybrid_triton import checkpoint

        class HalfFull:  # the magic is written, then the disk is full
            def __init__(self, fh):
                self.fh, self.calls = fh, 0

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, b):
                self.calls += 1
                if self.calls > 1:
                    fail()
                return self.fh.write(b)

        monkeypatch.setattr(
            checkpoint,
            "open",
            lambda *a, **k: HalfFull(builtins.open(*a, **k)),  # noqa: SIM115
            raising=False,
        )
    else:
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(OSError):
        tr.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt"]
    assert fingerprint(tr) == before
    fresh = make_trainer(CYCLE, seed=5)
    fresh.load(path)


def test_reused_metrics_path_starts_fresh_and_resume_continues(corpus, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 99, "phase": "old run"}\n')
    tr = make_trainer({**CYCLE, "metrics_path": str(path)})
    data = batches(corpus, 4)
    for b in data[:2]:
        tr.step(b)
    tr.flush()
    ckpt = tmp_path / "c.ckpt"
    tr.save(ckpt)
    tr.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    resumed = make_trainer({**CYCLE, "metrics_path": str(path)}, seed=3)
    resumed.load(ckpt)
    for b in data[2:]:
        resumed.step(b)
    resumed.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


# --------------------------------------------------------- property-based state loads
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.builds(lambda n: torch.full((n,), math.nan), st.integers(0, 4)),
)


def _mutated(state, key, value):
    bad = dict(state)
    if value is _DROP:
        bad.pop(key)
    else:
        bad[key] = value
    return bad


_DROP = object()


def _components():
    from hybrid_triton.residuals import Corrector

    corr = Corrector(3, "cpu", 0.9, 0.5)
    corr.observe_loss(2.0, 1.9)
    mon = DivergenceMonitor(0.1, 0.5, 3.0, 8, 3)
    for x in (2.0, 2.1, 1.9):
        mon.observe(x)
    filt = OutlierFilter()
    for x in (2.0, 2.1, 1.9):
        filt.accept(x)
    return {"corrector": corr, "divergence": mon, "outliers": filt}


@settings(max_examples=40, deadline=None)
@given(
    which=st.sampled_from(["corrector", "divergence", "outliers"]),
    key_index=st.integers(0, 10),
    value=st.one_of(_values, st.just(_DROP)),
)
def test_component_loads_refuse_bad_values_and_change_nothing(which, key_index, value):
    part = _components()[which]
    state = part.state_dict()
    key = sorted(state)[key_index % len(state)]
    bad = _mutated(state, key, value)
    before = fingerprint(part)
    try:
        part.load_state_dict(bad)
    except ValueError:
        assert fingerprint(part) == before
    else:  # accepted: then it was a valid value, and the object holds it
        after = part.state_dict()
        assert set(after) == set(state)
