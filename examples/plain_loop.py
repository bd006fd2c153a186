"""The toolkit's kernels in a plain PyTorch training loop (no framework).

What it shows, on a tiny regression model that trains in seconds on a CPU:

- ``FlatArena.from_module``: the parameters become views of one flat bf16 buffer;
- ``FusedAdamW``: fp32 master weights, 8-bit moments, clipping and the non-finite check on
  the device, the bf16 weights rewritten in the same pass (one launch per step);
- ``GradAccumulator``: each micro-batch's gradients are folded into one fp32 accumulator by
  post-accumulate-grad hooks as backward produces them (no full-size bf16 gradient buffer),
  with the squared norm the optimizer's clipping reads;
- nothing in the step waits for the device: the loss stays a device tensor until the end.

Run: ``python examples/plain_loop.py`` (on CPU add ``TRITON_INTERPRET=1`` to run the Triton
kernels through the interpreter; without it the ops take their torch reference path).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from hybrid_triton import FlatArena
from hybrid_triton.accumulation import GradAccumulator
from hybrid_triton.optim import FusedAdamW


def make_data(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random regression task: y = tanh(x @ w) + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g) / 4
    y = torch.tanh(x @ w) + 0.01 * torch.randn(n, 4, generator=g)
    return x.to(device), y.to(device)


def train(steps: int = 30, micro_batches: int = 2, batch: int = 32, device: str | None = None):
    """Train the tiny model; returns ``(first_loss, last_loss)`` as floats."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    # Build the model on its device *before* the arena: .to() after packing would replace
    # the parameters and break their link to the flat buffer.
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4)).to(dev)
    model.to(torch.bfloat16)  # bf16 weights; FusedAdamW keeps the fp32 master copy
    arena = FlatArena.from_module(model)
    opt = FusedAdamW(arena, lr=3e-3, weight_decay=0.01, state_bits=8, max_grad_norm=1.0)
    accum = GradAccumulator(arena, num_micro_batches=micro_batches, module=model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    x_all, y_all = make_data(steps * batch, dev)
    losses = []
    for step in range(steps):
        x, y = x_all[step * batch : (step + 1) * batch], y_all[step * batch : (step + 1) * batch]
        loss_sum = torch.zeros((), device=dev)
        for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(xm.to(torch.bfloat16)).float(), ym)
            loss.backward()  # hooks fold grad / micro_batches into the fp32 accumulator
            loss_sum += loss.detach() / micro_batches
        assert accum.ready  # host-side counter: no sync
        # Clipping norm and the finite check come from the accumulator's device-side sum of
        # squares: no extra pass over the gradient, no host sync.
        opt.step(grad=accum.accumulator, grad_sumsq=accum.total_sumsq)
        sched.step()
        losses.append(loss_sum)
    values = torch.stack(losses).tolist()  # the only host sync of the run
    accum.remove()
    return values[0], values[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batches", type=int, default=2)
    args = parser.parse_args(argv)
    first, last = train(args.steps, args.micro_batches)
    print(f"plain loop: loss {first:.4f} -> {last:.4f} in {args.steps} steps")


if __name__ == "__main__":
    main()
