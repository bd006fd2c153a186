"""The toolkit's fused AdamW inside a Hugging Face ``transformers.Trainer``.

``Trainer`` accepts any ``torch.optim.Optimizer`` through ``optimizers=(optimizer, scheduler)``.
``FusedAdamW`` is one: here it keeps 8-bit moments (about 2 bytes of state per parameter
instead of 8) and clips on the device. The model is a tiny ``nn.Module`` whose ``forward``
returns ``{"loss", "logits"}``, which is all ``Trainer`` needs; a Hugging Face model
(``AutoModelForCausalLM.from_config(...)``) plugs in the same way.

Three things to get right (each is commented below):

1. Put the model on the device ``Trainer`` will use *before* ``FlatArena.from_module``: a
   later ``.to(device)`` replaces the parameters and breaks their link to the flat buffer.
2. Let the optimizer clip on the device (``FusedAdamW(max_grad_norm=...)``) and turn
   ``Trainer``'s own clipping off (``max_grad_norm=0``), so the gradient is not clipped twice
   (``Trainer`` may still compute a norm for its logs).
3. Do not call ``opt.attach_flat_grads()`` here: ``Trainer`` zeroes gradients through
   ``model.zero_grad()``, which sets ``p.grad = None`` and detaches the flat views;
   ``FusedAdamW`` then gathers each ``p.grad`` itself (one copy per tensor).

Run: ``python examples/hf_trainer.py`` (needs ``pip install transformers accelerate``; they
are not dependencies of hybrid_triton). ``tests/test_examples.py`` runs it when they are
installed and skips it otherwise.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn


class TinyRegressor(nn.Module):
    """``forward(x, labels=None) -> {"loss", "logits"}``, the contract ``Trainer`` expects."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.mse_loss(logits.float(), labels)
        return out


class RegressionData(torch.utils.data.Dataset):
    """y = tanh(x @ w) + noise, as dict rows ``{"x", "labels"}`` (Trainer's default collator
    stacks them)."""

    def __init__(self, n: int = 512, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        w = torch.randn(16, 4, generator=g) / 4
        self.y = torch.tanh(self.x @ w) + 0.01 * torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


@torch.no_grad()
def mean_loss(model: nn.Module, data: RegressionData, device: torch.device) -> float:
    return model(data.x.to(device), data.y.to(device))["loss"].item()


def train(steps: int = 30, batch: int = 32, output_dir: str | None = None) -> tuple[float, float]:
    """Fine-tune ``TinyRegressor`` with ``Trainer`` and ``FusedAdamW``; returns the mean loss
    over the data set before and after."""
    from transformers import Trainer, TrainingArguments

    from hybrid_triton import FlatArena
    from hybrid_triton.optim import FusedAdamW

    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="hf_trainer_example_"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=3e-3,  # the optimizer below carries its own lr; kept equal for clarity
        max_grad_norm=0.0,  # (2) FusedAdamW clips, on the device
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # keep the "x" column for forward(x, labels)
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    data = RegressionData()
    model = TinyRegressor().to(args.device)  # (1) on Trainer's device before packing
    arena = FlatArena.from_module(model)
    opt = FusedAdamW(arena, lr=3e-3, weight_decay=0.01, state_bits=8, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    before = mean_loss(model, data, args.device)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    after = mean_loss(model, data, args.device)
    print(f"optimizer state: {opt.state_bytes() / arena.param_numel:.2f} bytes per parameter")
    return before, after


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    before, after = train(args.steps)
    print(f"hf trainer: loss {before:.4f} -> {after:.4f} in {args.steps} steps")


if __name__ == "__main__":
    main()
