"""FusedAdamW as a drop-in optimizer: parameter groups with their own lr and weight_decay (the
kernel's group table against per-group references and torch.optim.AdamW with per-group LR
schedules), add_param_group, parameters replaced after packing, bad hyper-parameters at step,
all-or-nothing load_state_dict, and gradients too large for an fp32 sum of squares."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from hybrid_triton.kernels.adamw import adamw_step, adamw_step_ref, new_state
from hybrid_triton.kernels.grad_norm import grad_norm, grad_norm_ref
from torch import nn

from hybrid_triton.arena import ArenaError, FlatArena
from hybrid_triton.optim import FusedAdamW
from tests.helpers import assert_close
from tests.tolerances import tol

FAST = {"block": 8192}


def make_model(device, seed=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.Tanh(), nn.Linear(13, 1)).to(device)


def decay_groups(model, wd=0.1, lr=None):
    """The Hugging Face Trainer's split: weights decay, biases and norms do not."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    second = {"params": no_decay, "weight_decay": 0.0}
    if lr is not None:
        second["lr"] = lr
    return [{"params": decay, "weight_decay": wd}, second]


def data(device, n=64):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 7, generator=g)
    return x.to(device), torch.sin(x.sum(1, keepdim=True)).to(device)


def one_step(model, opt, x, y):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


# ---------------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize(
    "starts", [[0, 5, 600], [0, 0, 1236], [0, 1237 - 1]], ids=["three", "empty-first", "last-one"]
)
def test_kernel_group_table_matches_reference(bits, starts, device):
    n = 1237  # prime: no group or block boundary lines up
    torch.manual_seed(0)
    g_starts = torch.tensor(starts, dtype=torch.int64, device=device)
    lr = torch.tensor([1e-2, 3e-3, 5e-2][: len(starts)], device=device)
    wd = torch.tensor([0.1, 0.0, 0.5][: len(starts)], device=device)
    master0, grad = torch.randn(n, device=device), torch.randn(n, device=device)
    results = []
    for fn in (adamw_step, adamw_step_ref):
        master, st, step = (
            master0.clone(),
            new_state(n, bits, device),
            torch.zeros(1, device=device),
        )
        for _ in range(3):
            fn(master, grad, st["exp_avg"], st["exp_avg_sq"], lr=lr, weight_decay=wd, step=step,
               state_bits=bits, exp_avg_scale=st["exp_avg_scale"],
               exp_avg_sq_scale=st["exp_avg_sq_scale"], group_starts=g_starts)  # fmt: skip
        results.append(master)
    # bf16 moments round differently in the interpreter (one bf16 ulp of m shifts p a little).
    atol = 1e-3 if bits == 16 else 1e-6
    assert_close("master", results[0], results[1], atol=atol, rtol=1e-5)
    if bits == 32:
        # The group table equals separate steps over each group's slice with its own values.
        bounds = [*starts, n]
        for i in range(len(starts)):
            a, b = bounds[i], bounds[i + 1]
            if any(bounds[j] > a for j in range(i + 1, len(starts)) if bounds[j] < b):
                continue
            m, st, step = master0[a:b].clone(), new_state(b - a, 32, device), torch.zeros(1)
            for _ in range(3):
                adamw_step_ref(m, grad[a:b], st["exp_avg"], st["exp_avg_sq"], lr=lr[i : i + 1],
                               weight_decay=float(wd[i]), step=step.to(device))  # fmt: skip
            assert_close(f"group {i}", results[1][a:b], m, atol=1e-6, rtol=1e-6)


def test_kernel_group_table_contract(device):
    n = 100
    st, step = new_state(n, 32, device), torch.zeros(1, device=device)
    args = (torch.zeros(n, device=device), torch.zeros(n, device=device), st["exp_avg"],
            st["exp_avg_sq"])  # fmt: skip
    starts = torch.tensor([0, 50], device=device)
    with pytest.raises(ValueError, match="lr must be a float32"):
        adamw_step(*args, lr=1e-3, step=step, group_starts=starts)
    with pytest.raises(ValueError, match="lr"):
        adamw_step(*args, lr=torch.ones(3, device=device), step=step, group_starts=starts)
    with pytest.raises(ValueError, match="group_starts"):
        adamw_step(*args, lr=torch.ones(2, device=device), step=step, group_starts=starts.float())


# -------------------------------------------------------------------------- groups, schedulers


@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
def test_two_groups_with_lambda_lr_match_torch_adamw(clip, device):
    ours, theirs = make_model(device), make_model(device)
    opt = FusedAdamW(decay_groups(ours, lr=3e-3), lr=1e-2, weight_decay=0.05,
                     max_grad_norm=clip, **FAST)  # fmt: skip
    ref = torch.optim.AdamW(decay_groups(theirs, lr=3e-3), lr=1e-2, weight_decay=0.05)
    lambdas = [lambda s: 1.0 / (1 + s), lambda s: 0.9**s]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambdas) for o in (opt, ref)]
    x, y = data(device)
    for _ in range(12):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if clip is not None and o is ref:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            o.step()
        for s in scheds:
            s.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(name, a, b, **tol("adamw", torch.float32))


def test_empty_group_and_changed_weight_decay(device):
    ours, theirs = make_model(device), make_model(device)
    groups = [{"params": []}, *decay_groups(ours)]
    opt = FusedAdamW(groups, lr=1e-2, **FAST)
    ref = torch.optim.AdamW([{"params": []}, *decay_groups(theirs)], lr=1e-2)
    x, y = data(device)
    for i in range(4):
        if i == 2:
            opt.param_groups[2]["weight_decay"] = ref.param_groups[2]["weight_decay"] = 0.3
        for model, o in ((ours, opt), (theirs, ref)):
            one_step(model, o, x, y)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(name, a, b, **tol("adamw", torch.float32))


def test_add_param_group_is_refused_and_changes_nothing(device):
    model = make_model(device)
    opt = FusedAdamW(list(model[0].parameters()), lr=1e-2, **FAST)
    extra = list(model[3].parameters())
    before = [p.data_ptr() for p in extra]
    with pytest.raises(ValueError, match="cannot be added later"):
        opt.add_param_group({"params": extra})
    assert len(opt.param_groups) == 1
    assert [p.data_ptr() for p in extra] == before


# ------------------------------------------------------------------- replaced parameters, lr


def fingerprint(opt: FusedAdamW) -> str:
    """Hash of everything the optimizer holds: state buffers, master, arena, param_groups."""
    h = hashlib.sha256()
    tensors = [*opt.flat_state.values(), opt.master, opt.arena_group.flat, opt.lr_tensor]
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    h.update(repr(groups).encode())
    return h.hexdigest()


def stepped(device, bits=8, seed=3, **kw):
    model = make_model(device, seed)
    opt = FusedAdamW(FlatArena.from_module(model), lr=1e-2, state_bits=bits, **FAST, **kw)
    x, y = data(device)
    one_step(model, opt, x, y)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    return model, opt


@pytest.mark.parametrize(
    "replace",
    [
        lambda m: m.double(),
        lambda m: m.half(),
        lambda m: setattr(m[0].weight, "data", m[0].weight.data.clone()),
        lambda m: setattr(m[3], "bias", nn.Parameter(torch.zeros_like(m[3].bias))),
    ],
    ids=["to-double", "half", "p.data", "new-parameter"],
)
def test_parameters_replaced_after_packing_are_refused(replace, device):
    model, opt = stepped(device)
    replace(model)
    before = fingerprint(opt)
    with pytest.raises(ArenaError, match="after the optimizer was built"):
        opt.step()
    assert fingerprint(opt) == before


def test_new_parameter_detected_with_module_argument(device):
    model = make_model(device)
    opt = FusedAdamW(decay_groups(model), lr=1e-2, module=model, **FAST)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    with pytest.raises(ArenaError, match=r"new nn\.Parameter"):
        opt.step()


@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", float("nan")), ("lr", float("inf")), ("lr", -1e-3), ("weight_decay", -0.1),
     ("betas", (0.9, 1.5)), ("eps", 0.0)],
    ids=["lr-nan", "lr-inf", "lr-negative", "wd-negative", "beta2", "eps"],
)  # fmt: skip
def test_bad_hyper_parameters_at_step_are_refused(key, value, device):
    _, opt = stepped(device)
    opt.param_groups[0][key] = value
    before = fingerprint(opt)
    with pytest.raises(ValueError, match=key):
        opt.step()
    assert fingerprint(opt) == before


# --------------------------------------------------------------------------- load_state_dict


def _bad_states(sd, device):
    def edit(fn):
        bad = copy.deepcopy(sd)
        fn(bad)
        return bad

    def set_group(k, v):
        return edit(lambda s: s["param_groups"][0].__setitem__(k, v))

    return {
        "lr-negative": set_group("lr", -5.0),
        "lr-nan": set_group("lr", float("nan")),
        "betas": set_group("betas", (0.9, 1.0)),
        "betas-shape": set_group("betas", (0.9,)),
        "step-nan": edit(lambda s: s["state"]["step"].fill_(float("nan"))),
        "step-fraction": edit(lambda s: s["state"]["step"].fill_(1.5)),
        "missing-state-entry": edit(lambda s: s["state"].pop("exp_avg_sq")),
        "missing-param-groups": edit(lambda s: s.pop("param_groups")),
        "wrong-dtype": edit(lambda s: s["state"].update(exp_avg=s["state"]["exp_avg"].int())),
        "groups-count": edit(lambda s: s["param_groups"].append(dict(s["param_groups"][0]))),
        "state-bits": edit(lambda s: s["layout"].__setitem__("state_bits", 4)),
    }  # fmt: skip


def test_load_state_dict_refuses_each_bad_state_and_changes_nothing(device):
    _, donor = stepped(device, seed=4)
    one = donor.state_dict()
    saved = copy.deepcopy(one)
    _, opt = stepped(device)
    for name, bad in _bad_states(saved, device).items():
        before = fingerprint(opt)
        with pytest.raises(ValueError):
            opt.load_state_dict(bad)
        assert fingerprint(opt) == before, name
    opt.load_state_dict(saved)  # the good one still loads
    assert fingerprint(opt) != before


def test_load_state_dict_refuses_a_transposed_layout(device):
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4, bias=False).to(device), nn.Linear(4, 8, bias=False).to(device)
    opt_a = FusedAdamW(FlatArena.from_module(a), lr=1e-2, **FAST)
    opt_b = FusedAdamW(FlatArena.from_module(b), lr=1e-2, **FAST)
    before = fingerprint(opt_b)
    with pytest.raises(ValueError, match="shapes"):
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert fingerprint(opt_b) == before


# ----------------------------------------------------------------------- large finite grads


@pytest.mark.parametrize(
    "values",
    [
        torch.full((10007,), 1e20),
        torch.cat([torch.randn(5000), torch.tensor([3e25])]),
        torch.randn(4099) * 1e-30,
        torch.zeros(5),
        torch.tensor([1.0, float("inf")]),
        torch.tensor([1.0, float("nan"), 1e20]),
    ],
    ids=["1e20", "one-3e25", "tiny", "zeros", "inf", "nan"],
)
def test_grad_norm_does_not_overflow(values, device):
    g = values.to(device)
    want = torch.linalg.vector_norm(g.double()).float().reshape(1)
    for fn in (grad_norm, grad_norm_ref):
        got = fn(g)
        if torch.isfinite(want).all():
            assert_close(fn.__name__, got, want, atol=0.0, rtol=1e-5)
        else:
            assert torch.equal(torch.isnan(got), torch.isnan(want.to(device)))
            assert not torch.isfinite(got).any()


@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_1e20_gradients_step_like_float64_adamw(clip, device):
    torch.manual_seed(0)
    w0 = torch.randn(300)
    grad = torch.randn(300).sign() * 1e20
    p = nn.Parameter(w0.clone().to(device))
    opt = FusedAdamW([p], lr=1e-2, weight_decay=0.1, max_grad_norm=clip, **FAST)
    p.grad = grad.to(device)
    opt.step()
    q = nn.Parameter(w0.double())
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
    q.grad = grad.double()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([q], clip)
    ref.step()
    assert opt.flat_state["step"].item() == 1, "a finite step was skipped"
    assert torch.isfinite(opt.last_grad_norm).all()
    assert_close("param", p.detach().double().cpu(), q.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["flat", "per-tensor"])
def test_accumulate_float64_sums_do_not_overflow(mode, device):
    from hybrid_triton.kernels._segments import Segments
    from hybrid_triton.kernels.accumulate import accumulate_grads, accumulate_grads_ref

    seg = Segments.from_numels([5000, 3, 1237], align=64)
    grad = torch.randn(seg.total, device=device) * 1e20
    want = grad.double().square()
    for fn in (accumulate_grads, accumulate_grads_ref):
        acc = torch.zeros(seg.total, device=device)
        total = torch.zeros(1, dtype=torch.float64, device=device)
        sums = torch.zeros(len(seg), dtype=torch.float64, device=device)
        flag = torch.zeros(1, device=device)
        if mode == "flat":
            fn(acc, grad, first=True, segments=seg, seg_sumsq=sums, total_sumsq=total,
               found_inf=flag)  # fmt: skip
        else:
            for i, (off, n) in enumerate(zip(seg.offsets, seg.numels)):
                fn(acc[off : off + n], grad[off : off + n], first=True, seg_sumsq=sums,
                   total_sumsq=total, segment_index=i, found_inf=flag)  # fmt: skip
        per_seg = torch.stack([want[o : o + n].sum() for o, n in zip(seg.offsets, seg.numels)])
        assert_close(f"{fn.__name__} seg_sumsq", sums, per_seg, atol=0.0, rtol=1e-6)
        assert_close(f"{fn.__name__} total_sumsq", total, per_seg.sum().reshape(1), atol=0.0,
                     rtol=1e-6)  # fmt: skip
        assert flag.item() == 0.0, "finite 1e20 gradients flagged as non-finite"
    with pytest.raises(ValueError, match="one dtype"):
        accumulate_grads(acc, grad, segments=seg, seg_sumsq=sums.float(), total_sumsq=total)


def test_step_with_float64_sumsq_of_1e20_gradients(device):
    p = nn.Parameter(torch.randn(300, device=device))
    opt = FusedAdamW([p], lr=1e-2, max_grad_norm=1.0, **FAST)
    grad = torch.randn(opt.arena_group.numel, device=device) * 1e20
    sumsq = grad.double().square().sum().reshape(1)
    opt.step(grad=grad, grad_sumsq=sumsq)
    assert opt.flat_state["step"].item() == 1
    assert_close("norm", opt.last_grad_norm.double(), sumsq.sqrt(), atol=0.0, rtol=1e-6)
