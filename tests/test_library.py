"""The torch custom ops (``torch.ops.hybrid_triton.*``): each equals its launcher, passes
``torch.library.opcheck`` (schema, fake implementation, mutation declarations), and a step
that uses them compiles whole under ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import pytest
import torch
from hybrid_triton.kernels import library as lib
from hybrid_triton.kernels.adamw import adamw_step, new_state
from hybrid_triton.kernels.cast_scale import cast_scale
from hybrid_triton.kernels.unscale import unscale

SIZES = [1, 127, 1000]  # one element, a prime below a block, not a multiple of the block


def _scalar(value: float, device) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


@pytest.mark.parametrize("n", SIZES)
def test_ops_equal_their_launchers(n, device):
    x = torch.randn(n, device=device)
    scale = _scalar(3.0, device)
    torch.testing.assert_close(
        torch.ops.hybrid_triton.cast_scale(x, scale, torch.bfloat16),
        cast_scale(x, scale, out_dtype=torch.bfloat16),
        rtol=0,
        atol=0,
    )
    g = torch.randn(n, device=device, dtype=torch.bfloat16)
    inv = _scalar(0.25, device)
    torch.testing.assert_close(
        torch.ops.hybrid_triton.unscale(g, inv), unscale(g, inv), rtol=0, atol=0
    )
    out = torch.full((n,), float("nan"), device=device)
    flag = torch.zeros(1, device=device)
    g[-1] = float("inf")
    torch.ops.hybrid_triton.unscale_(g, inv, out, flag)
    assert flag.item() == 1.0 and torch.isinf(out[-1])
    acc = torch.randn(n, device=device)
    expected = acc + g.float() * 0.5
    torch.ops.hybrid_triton.accumulate_grads_(acc, g, _scalar(0.5, device), False, None)
    torch.testing.assert_close(acc, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("state_bits", [32, 8])
def test_adamw_op_equals_the_launcher(state_bits, device):
    n = 700
    master = torch.randn(n, device=device)
    grad = torch.randn(n, device=device)
    state = new_state(n, state_bits, device)
    master2, state2 = master.clone(), {k: v.clone() if v is not None else None
                                       for k, v in state.items()}  # fmt: skip
    step, step2 = torch.zeros(1, device=device), torch.zeros(1, device=device)
    lr = _scalar(1e-2, device)
    for _ in range(2):
        torch.ops.hybrid_triton.adamw_step_(
            master, grad, state["exp_avg"], state["exp_avg_sq"], step, lr, 0.9, 0.999, 1e-8,
            0.01, None, None, None, state_bits, state["exp_avg_scale"], state["exp_avg_sq_scale"],
        )  # fmt: skip
        adamw_step(
            master2, grad, state2["exp_avg"], state2["exp_avg_sq"], lr=lr, weight_decay=0.01,
            step=step2, state_bits=state_bits, exp_avg_scale=state2["exp_avg_scale"],
            exp_avg_sq_scale=state2["exp_avg_sq_scale"],
        )  # fmt: skip
    torch.testing.assert_close(master, master2, rtol=0, atol=0)
    assert step.item() == step2.item() == 2.0


def test_opcheck_schemas_and_fake_implementations(device):
    n = 33
    x, scale = torch.randn(n, device=device), _scalar(2.0, device)
    torch.library.opcheck(torch.ops.hybrid_triton.cast_scale.default, (x, scale, torch.float16))
    out, flag = torch.empty(n, dtype=torch.bfloat16, device=device), torch.zeros(1, device=device)
    torch.library.opcheck(torch.ops.hybrid_triton.cast_scale_.default, (x, scale, out, flag))
    g = torch.randn(n, device=device, dtype=torch.float16)
    torch.library.opcheck(torch.ops.hybrid_triton.unscale.default, (g, scale))
    acc = torch.randn(n, device=device)
    torch.library.opcheck(
        torch.ops.hybrid_triton.accumulate_grads_.default, (acc, g, scale, True, flag)
    )


def test_a_compiled_step_keeps_the_ops_whole(device):
    """Unscale a gradient, accumulate it and cast the result: one graph, no break."""
    n = 257

    def step(grad, acc, inv, alpha, scale, out, flag):
        g32 = torch.ops.hybrid_triton.unscale(grad, inv)
        torch.ops.hybrid_triton.accumulate_grads_(acc, g32, alpha, False, flag)
        torch.ops.hybrid_triton.cast_scale_(acc, scale, out, flag)
        return out

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = lambda: (
        torch.randn(n, device=device, dtype=torch.bfloat16),
        torch.randn(n, device=device),
        _scalar(0.5, device),
        _scalar(0.25, device),
        _scalar(2.0, device),
        torch.empty(n, dtype=torch.bfloat16, device=device),
        torch.zeros(1, device=device),
    )
    torch.manual_seed(0)
    eager_args = args()
    torch.manual_seed(0)
    compiled_args = args()
    torch.testing.assert_close(compiled(*compiled_args), step(*eager_args), rtol=0, atol=0)
    torch.testing.assert_close(compiled_args[1], eager_args[1], rtol=0, atol=0)  # acc mutated
    torch._dynamo.reset()  # drop the compiled code and the fake tensors its guards keep


@pytest.mark.gpu
def test_compiled_step_with_inductor_on_the_gpu():
    n = 1 << 20
    x = torch.randn(n, device="cuda")
    scale = _scalar(3.0, "cuda")
    fn = torch.compile(
        lambda x, s: torch.ops.hybrid_triton.cast_scale(x, s, torch.bfloat16) * 2,
        fullgraph=True,
    )
    torch.testing.assert_close(fn(x, scale), cast_scale(x, scale) * 2, rtol=0, atol=0)


def test_every_op_is_registered_under_the_namespace():
    for name in ("cast_scale", "cast_scale_", "unscale", "unscale_", "accumulate_grads_",
                 "adamw_step_"):  # fmt: skip
        assert hasattr(getattr(torch.ops, lib.NAMESPACE), name), name
