"""The toolkit's fused AdamW in a PyTorch Lightning ``LightningModule``.

``configure_optimizers`` returns a ``FusedAdamW`` (8-bit moments, device-side clipping) and a
cosine LR scheduler. Lightning's automatic optimization calls ``optimizer.step(closure)``;
``FusedAdamW.step`` runs the closure (forward and backward) and then its single-launch update.

Two things to get right (commented below):

1. Build the ``FlatArena`` inside ``configure_optimizers``: Lightning calls it after moving the
   module to its device, and packing must come after any ``.to(device)``.
2. Let the optimizer clip (``max_grad_norm``) and leave Lightning's ``gradient_clip_val``
   unset, so the gradients are not clipped twice.

Run: ``python examples/lightning_module.py`` (needs ``pip install lightning``; it is not a
dependency of hybrid_triton). ``tests/test_examples.py`` runs it when Lightning is installed
and skips it otherwise.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

try:  # the unified package, or the older standalone one
    import lightning.pytorch as pl
except ModuleNotFoundError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as pl


class TinyRegression(pl.LightningModule):
    def __init__(self, steps: int, lr: float = 3e-3, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, 4))
        self.steps = steps
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        from hybrid_triton import FlatArena
        from hybrid_triton.optim import FusedAdamW

        arena = FlatArena.from_module(self)  # (1) the module is on its device by now
        opt = FusedAdamW(arena, lr=self.lr, weight_decay=0.01, state_bits=8, max_grad_norm=1.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_data(n: int = 512, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g) / 4
    y = torch.tanh(x @ w) + 0.01 * torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, y)


@torch.no_grad()
def mean_loss(model: TinyRegression, data: torch.utils.data.TensorDataset) -> float:
    x, y = data.tensors
    return nn.functional.mse_loss(model(x.to(model.device)), y.to(model.device)).item()


def train(steps: int = 30, batch: int = 32) -> tuple[float, float]:
    """Fit ``TinyRegression`` for ``steps`` steps; returns the mean loss before and after."""
    torch.manual_seed(0)
    data = make_data()
    model = TinyRegression(steps)
    before = mean_loss(model, data)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(prefix="lightning_example_"),
        # (2) no gradient_clip_val: FusedAdamW clips on the device
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)
    trainer.fit(model, loader)
    return before, mean_loss(model, data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    before, after = train(args.steps)
    print(f"lightning: loss {before:.4f} -> {after:.4f} in {args.steps} steps")


if __name__ == "__main__":
    main()
