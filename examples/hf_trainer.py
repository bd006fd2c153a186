"""The toolkit's fused AdamW inside a Hugging Face ``transformers.Trainer``, on a Hugging Face
model, with the Trainer's decay / no-decay parameter groups.

``Trainer`` accepts any ``torch.optim.Optimizer`` through ``optimizers=(optimizer, scheduler)``;
with ``scheduler=None`` it builds its own learning-rate schedule on the optimizer's groups.
``FusedAdamW`` takes the groups ``Trainer`` itself would build (weights decay; biases and norms
do not), keeps 8-bit moments (about 2 bytes of state per parameter instead of 8), clips on the
device, and updates every group in one launch. The model is a tiny GPT-2 built from a config
(nothing is downloaded); any ``AutoModelForCausalLM.from_config(...)`` plugs in the same way.

Three things to get right (each is commented below):

1. Put the model on the device ``Trainer`` will use *before* building the optimizer: the
   optimizer packs the parameters into one flat buffer, and a later ``.to(device)`` would
   replace them (``step`` then refuses to run, with a message saying so).
2. Let the optimizer clip on the device (``FusedAdamW(max_grad_norm=...)``) and turn
   ``Trainer``'s own clipping off (``max_grad_norm=0``), so the gradient is not clipped twice.
3. Do not call ``opt.attach_flat_grads()`` here: ``Trainer`` zeroes gradients through
   ``model.zero_grad()``, which sets ``p.grad = None`` and detaches the flat views;
   ``FusedAdamW`` then gathers each ``p.grad`` itself (one copy per tensor).

Run: ``python examples/hf_trainer.py`` (needs ``pip install transformers accelerate``; they
are not dependencies of hybrid_triton). ``--loop`` trains the same model and optimizer in a
plain loop with a per-group ``LambdaLR`` instead (needs ``transformers`` only).
``tests/test_examples.py`` runs the Trainer when both are installed, the loop otherwise.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

VOCAB, SEQ = 64, 32


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The groups ``Trainer.create_optimizer`` builds: weight decay on every parameter except
    biases and normalization weights."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], ["bias", "layernorm", "rmsnorm"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


class CountingData(torch.utils.data.Dataset):
    """Token rows that count up modulo the vocabulary from a random start: learnable in a few
    steps, as dict rows ``{"input_ids", "labels"}`` (the model shifts the labels itself)."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (start + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@torch.no_grad()
def mean_loss(model: nn.Module, data: CountingData, device: torch.device) -> float:
    ids = data.ids.to(device)
    return model(input_ids=ids, labels=ids).loss.item()


def build(device: torch.device, lr: float):
    from hybrid_triton import FusedAdamW

    torch.manual_seed(0)
    model = tiny_gpt2().to(device)  # (1) on the training device before packing
    opt = FusedAdamW(
        decay_groups(model, weight_decay=0.01),
        lr=lr,
        state_bits=8,
        max_grad_norm=1.0,  # (2) clipped on the device
        module=model,  # lets step() notice parameters replaced on the module later
    )
    return model, opt


def train_with_trainer(steps: int, batch: int, lr: float) -> tuple[float, float, object]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_trainer_example_"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=lr,  # the optimizer carries its own lr; kept equal for clarity
        warmup_steps=2,
        max_grad_norm=0.0,  # (2) FusedAdamW clips, on the device
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    data = CountingData()
    model, opt = build(args.device, lr)
    before = mean_loss(model, data, args.device)
    # scheduler None: Trainer builds its linear warm-up / decay schedule on our groups.
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    return before, mean_loss(model, data, args.device), opt


def train_in_a_loop(steps: int, batch: int, lr: float) -> tuple[float, float, object]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = CountingData()
    model, opt = build(device, lr)
    # One schedule per group, as Trainer's LambdaLR-based schedules do.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: min(1.0, (s + 1) / 2)] * 2)
    before = mean_loss(model, data, device)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = data.ids[torch.randint(0, len(data), (batch,), generator=g)].to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return before, mean_loss(model, data, device), opt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--loop", action="store_true", help="a plain loop instead of Trainer")
    args = parser.parse_args(argv)
    run = train_in_a_loop if args.loop else train_with_trainer
    before, after, opt = run(args.steps, args.batch, args.lr)
    groups = ", ".join(
        f"{len(g['params'])} tensors with weight_decay={g['weight_decay']}"
        for g in opt.param_groups
    )
    print(f"param groups: {groups}")
    print(f"optimizer state: {opt.state_bytes() / opt.arena_group.param_numel:.2f} B/parameter")
    print(f"hf {'loop' if args.loop else 'trainer'}: loss {before:.4f} -> {after:.4f} in "
          f"{args.steps} steps")  # fmt: skip


if __name__ == "__main__":
    main()
