"""The trainer's Warmup/Full steps are the plain optimizer loop: same seed, same data, same
FusedAdamW settings (betas, weight decay, clipping, a per-step learning rate) give the same
losses and weights as ``loss.backward(); opt.step()`` written by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybrid_triton.arena import FlatArena
from hybrid_triton.optim import FusedAdamW
from hybrid_triton.scheduler import TrainerConfig
from hybrid_triton.trainer import HybridTrainer

VOCAB = 61  # prime: no block multiple
STEPS = 6
# The recipes' settings (hybrid_triton.recipes.OptimConfig), clipping made active by a low norm.
OPT = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=0.05)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyLM(nn.Module):
    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.out = nn.Linear(dim, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def lr_at(step: int) -> float:
    return 3e-2 * (step + 1) / STEPS  # a warm-up ramp: the trainer must follow a schedule


def data(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (4, 7), generator=g), torch.randint(0, VOCAB, (4, 7), generator=g))
        for _ in range(STEPS)
    ]


@pytest.mark.parametrize("warmup", [0, 3], ids=["full_only", "warmup_then_full"])
def test_trainer_full_phase_matches_plain_fused_adamw_loop(warmup, tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    plain_model = copy.deepcopy(model)
    start = copy.deepcopy(model)
    batches = data()

    log = tmp_path / "metrics.jsonl"
    cfg = TrainerConfig(  # the Full phase outlasts the run: no Predict
        warmup_steps=warmup,
        full_steps=STEPS,
        dynamics_model="trend",
        host_lag=0,
        metrics_path=str(log),
    )
    trainer = HybridTrainer(model, lm_loss, config=cfg, lr=lr_at(0), optimizer_kwargs=OPT)
    for i, batch in enumerate(batches):
        trainer.optimizer.param_groups[0]["lr"] = lr_at(i)
        out = trainer.step(batch)
        assert out["phase"] in ("warmup", "full")
    trainer.flush()
    trainer.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    trainer_losses = [r["loss"] for r in records if r.get("type", "step") == "step"]

    opt = FusedAdamW(FlatArena.from_module(plain_model), lr=lr_at(0), **OPT)
    plain_losses = []
    for i, batch in enumerate(batches):
        opt.param_groups[0]["lr"] = lr_at(i)
        opt.zero_grad()
        loss = lm_loss(plain_model, batch)
        loss.backward()
        opt.step()
        plain_losses.append(loss.item())

    assert len(trainer_losses) == STEPS
    torch.testing.assert_close(
        torch.tensor(trainer_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6
    )
    # The weights moved (a test that cannot fail is a defect) and identically.
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), start.parameters()))
    assert moved > 1e-3
