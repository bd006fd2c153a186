"""A model of the training run itself: an RSSM ensemble over normalized training features.

Used by the phase-aware trainer (DESIGN.md, RSSM ensemble dynamics):

    model = DynamicsModel(num_segment_groups=G, config=DynamicsConfig(device="cuda"))
    model.observe(stats)          # every Full step: features, online training, calibration
    pred = model.predict(T)       # Prediction(loss_mean [T], loss_var [T], scales_mean [T, G], ...)
    pred.confidence               # 0-d tensor in [0, 1]; model.confidence() for the default T

Pieces, top to bottom:

- ``FeatureEncoder``: the training state as a feature vector in log space (scale-free: log
  loss, log changes, log norms), normalized online with running statistics (``RunningNorm``).
- ``DynamicsModel``: K members stacked in one set of ``[K, ...]`` parameters; each has its own
  GRU cell (hidden H), a Gaussian latent with a learned prior p(z | h) and posterior
  q(z | h, x_next) (as in RSSM), and heads predicting the next normalized log loss and each
  group's next normalized log update norm (residual on the current value).
- Online training (``observe``): truncated BPTT over the last ``bptt_window`` transitions,
  heads trained through both the posterior and the prior mean (the rollout uses the prior
  mean), plus a KL term; each member sees a bootstrap subset of the transitions. With
  ``train_every = n`` one observe in n trains; the others only filter (one GRU step).
- Prediction: ``hybrid_triton.kernels.rssm.rssm_rollout`` (one launch, every member and step)
  reads the parameters in place. The loss is log-normal per member spread: mean and variance
  come from the member mean and variance of the normalized log loss.
- Confidence: every observe issues a ``calibration_horizon``-step rollout; when the real losses
  arrive, the relative error |pred - real| / real at each lead is divided by the relative
  spread the ensemble predicted for it. Confidence for a new prediction is the fraction of
  those held-out ratios that, scaled by the new spread, stay within ``rel_tolerance``: an
  empirical probability, calibrated on data the model had not trained on when it predicted.

Nothing here calls ``.item()``: features, statistics, calibration and confidence stay on the
device, so ``observe`` and ``predict`` can run inside a sync-free step.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hybrid_triton.kernels.rssm import (
    RSSMFeedback,
    RSSMWeights,
    gru_cell_batched,
    make_workspace,
    rssm_rollout,
)

PHASES = ("warmup", "full", "predict", "correct")


@dataclass
class DynamicsConfig:
    ensemble: int = 5  # K members
    hidden: int = 256  # H, GRU hidden size per member
    latent: int = 32  # S, Gaussian latent size
    bptt_window: int = 16  # transitions unrolled (truncated BPTT) per training update
    # observe() trains on every train_every-th call; the others only encode the features,
    # score the pending forecasts, advance the filtered state and issue the calibration
    # rollout. Why: one update (a bptt_window-step unroll of small ops, its backward and Adam)
    # is launch-bound, about 70 ms on an H100, next to a GPT-2 small step of about 66 ms.
    train_every: int = 1
    lr: float = 1e-3
    grad_clip: float = 1.0
    kl_weight: float = 0.1
    bootstrap: float = 0.8  # probability that a member trains on a given observe
    norm_momentum: float = 0.01  # running statistics: Welford, then EMA after 1/momentum steps
    calibration_horizon: int = 8  # leads checked against real losses; default predict horizon
    calibration_size: int = 512  # held-out error ratios kept
    min_calibration: int = 16  # below this many ratios, confidence is 0
    rel_tolerance: float = 0.05  # a prediction is "right" within this relative loss error
    weight_dtype: torch.dtype = torch.float32  # rollout weights; bf16 keeps a shadow copy
    device: str | torch.device = "cpu"
    seed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Prediction:
    """A T-step forecast (batch 1). Losses in the units of the observed loss."""

    loss_mean: torch.Tensor  # [T]
    loss_var: torch.Tensor  # [T]
    scales_mean: torch.Tensor  # [T, G] next update norm / last observed update norm, per group
    confidence: torch.Tensor  # 0-d, in [0, 1]
    loss_members: torch.Tensor  # [K, T] each member's loss trajectory


class RunningNorm(nn.Module):
    """Per-feature running mean and variance: Welford until 1/momentum samples, then an EMA
    (so the statistics follow a drifting run). Device tensors only."""

    def __init__(self, size: int, momentum: float, fixed: torch.Tensor | None = None):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))
        self.register_buffer("count", torch.zeros(()))
        # fixed[i] = True: passed through unnormalized (one-hot phase).
        self.register_buffer(
            "fixed", fixed if fixed is not None else torch.zeros(size, dtype=torch.bool)
        )

    def update(self, x: torch.Tensor) -> None:
        self.count += 1
        weight = torch.clamp(1.0 / self.count, min=self.momentum)
        delta = x - self.mean
        self.mean += weight * delta
        # first sample: var stays at its prior 1 (weight 1 would set it to 0)
        new_var = (1 - weight) * (self.var + weight * delta * delta)
        self.var.copy_(torch.where(self.count > 1, new_var, self.var))

    def std(self) -> torch.Tensor:
        return torch.where(self.fixed, torch.ones_like(self.var), self.var.clamp_min(1e-8).sqrt())

    def center(self) -> torch.Tensor:
        return torch.where(self.fixed, torch.zeros_like(self.mean), self.mean)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center()) / self.std()


class FeatureEncoder(nn.Module):
    """Raw (log-space) features of the training state. Layout, for G segment groups:

    0 log loss | 1 change of log loss | 2 trend (fast - slow EMA of log loss) | 3 log noise
    (EMA of |change|) | 4 log grad norm | 5 its change | 6 log grad norm - its slow EMA |
    7 log lr | 8 log1p(step) | 9 optimizer summary (log, 0 if not given) | 10.. G log update
    norms | then G changes of them | then 4 phase one-hot.
    """

    FAST, SLOW = 0.25, 1.0 / 32

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups
        self.size = 14 + 2 * groups
        self.register_buffer("prev_log_loss", torch.zeros(()))
        self.register_buffer("prev_log_gn", torch.zeros(()))
        self.register_buffer("prev_log_upd", torch.zeros(groups))
        self.register_buffer("ema_fast", torch.zeros(()))
        self.register_buffer("ema_slow", torch.zeros(()))
        self.register_buffer("ema_noise", torch.zeros(()))
        self.register_buffer("ema_gn", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    # slot indices
    LOSS, DLOSS, TREND, NOISE, GN, DGN, GNREL, LR, STEP, OPT, UPD = range(11)

    def dupd(self, g: int) -> int:
        return self.UPD + self.groups + g

    def phase_slot(self, phase: int) -> int:
        return self.UPD + 2 * self.groups + phase

    def encode(self, stats: Mapping[str, Any]) -> torch.Tensor:
        device = self.ema_fast.device

        def scalar(v: Any) -> torch.Tensor:
            if isinstance(v, torch.Tensor):
                return v.to(device=device, dtype=torch.float32).reshape(())
            # A host number becomes a fill kernel's argument: torch.as_tensor(number,
            # device="cuda") copies from pageable memory and waits for the whole queue (the
            # trainer passes its step counter as an int: that was a host sync per Full step).
            return torch.full((), float(v), dtype=torch.float32, device=device)

        log_loss = scalar(stats["loss"]).clamp_min(1e-12).log()
        log_gn = scalar(stats["grad_norm"]).clamp_min(1e-12).log()
        upd = torch.as_tensor(stats["update_norms"], dtype=torch.float32, device=device).reshape(-1)
        if upd.numel() != self.groups:
            raise ValueError(
                f"update_norms has {upd.numel()} values; expected {self.groups} groups"
            )
        log_upd = upd.clamp_min(1e-20).log()
        log_lr = scalar(stats["lr"]).clamp_min(1e-20).log()
        step = scalar(stats["step"])
        opt = stats.get("optimizer")
        # No optimizer summary given: the feature is 0.
        log_opt = (
            scalar(opt).clamp_min(1e-20).log()
            if opt is not None
            else torch.zeros((), device=device)
        )
        phase = stats.get("phase", "full")
        phase_id = PHASES.index(phase.lower()) if isinstance(phase, str) else int(phase)

        seen = self.seen
        d_loss = torch.where(seen, log_loss - self.prev_log_loss, torch.zeros_like(log_loss))
        d_gn = torch.where(seen, log_gn - self.prev_log_gn, torch.zeros_like(log_gn))
        d_upd = torch.where(seen, log_upd - self.prev_log_upd, torch.zeros_like(log_upd))
        self.ema_fast.copy_(
            torch.where(seen, self.ema_fast + self.FAST * (log_loss - self.ema_fast), log_loss)
        )
        self.ema_slow.copy_(
            torch.where(seen, self.ema_slow + self.SLOW * (log_loss - self.ema_slow), log_loss)
        )
        self.ema_noise.copy_(self.ema_noise + self.FAST * (d_loss.abs() - self.ema_noise))
        self.ema_gn.copy_(
            torch.where(seen, self.ema_gn + self.SLOW * (log_gn - self.ema_gn), log_gn)
        )
        self.prev_log_loss.copy_(log_loss)
        self.prev_log_gn.copy_(log_gn)
        self.prev_log_upd.copy_(log_upd)
        self.seen.fill_(True)

        # A comparison with a Python int is a kernel argument; item assignment of a Python
        # float would copy a host scalar to the device (a sync under sync-debug mode).
        phase_vec = (torch.arange(4, device=device) == phase_id).to(torch.float32)
        head = torch.stack(
            [
                log_loss,
                d_loss,
                self.ema_fast - self.ema_slow,
                (self.ema_noise + 1e-8).log(),
                log_gn,
                d_gn,
                log_gn - self.ema_gn,
                log_lr,
                torch.log1p(step),
                log_opt,
            ]
        )
        return torch.cat([head, log_upd, d_upd, phase_vec])


def _uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator) -> nn.Parameter:
    return nn.Parameter((torch.rand(shape, generator=gen) * 2 - 1) * bound)


class DynamicsModel(nn.Module):
    """RSSM ensemble over training features; see the module docstring for the interface."""

    @staticmethod
    def parameter_count(num_segment_groups: int, config: DynamicsConfig | None = None) -> int:
        """Trainable parameters of a model with these settings, from the shapes ``__init__``
        makes (no model built: the planner counts the trainer's dynamics model with it)."""
        cfg = config or DynamicsConfig()
        K, H, S = cfg.ensemble, cfg.hidden, cfg.latent
        n_in = FeatureEncoder(num_segment_groups).size
        n_out = 1 + num_segment_groups
        gru = 3 * H * (n_in + S) + 3 * H * H + 2 * 3 * H  # w_ih, w_hh, b_ih, b_hh
        prior = 2 * (S * H + S)  # mean and std: weights and biases
        post = 2 * S * (H + n_in) + 2 * S
        head = n_out * (H + S) + n_out
        return K * (gru + prior + post + head)

    def __init__(self, num_segment_groups: int, config: DynamicsConfig | None = None):
        super().__init__()
        cfg = config or DynamicsConfig()
        if num_segment_groups < 1:
            raise ValueError(f"num_segment_groups must be >= 1, got {num_segment_groups}")
        if cfg.ensemble < 1 or cfg.hidden < 1 or cfg.latent < 1 or cfg.bptt_window < 1:
            raise ValueError("ensemble, hidden, latent and bptt_window must all be >= 1")
        if isinstance(cfg.train_every, bool) or not isinstance(cfg.train_every, int):
            raise ValueError(f"train_every must be an int >= 1, got {cfg.train_every!r}")
        if cfg.train_every < 1:
            raise ValueError(f"train_every must be an int >= 1, got {cfg.train_every!r}")
        if cfg.weight_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"weight_dtype must be float32 or bfloat16, got {cfg.weight_dtype}")
        self.config = cfg
        self.groups = G = num_segment_groups
        K, H, S = cfg.ensemble, cfg.hidden, cfg.latent
        self.features = FeatureEncoder(G)
        n_in = self.features.size
        n_out = 1 + G
        self.sizes = (K, H, S, n_in, n_out)
        fixed = torch.zeros(n_in, dtype=torch.bool)
        fixed[-4:] = True
        self.norm = RunningNorm(n_in, cfg.norm_momentum, fixed)

        gen = torch.Generator().manual_seed(cfg.seed)
        gru = 1.0 / math.sqrt(H)
        self.w_ih = _uniform((K, 3 * H, n_in + S), gru, gen)
        self.w_hh = _uniform((K, 3 * H, H), gru, gen)
        self.b_ih = _uniform((K, 3 * H), gru, gen)
        self.b_hh = _uniform((K, 3 * H), gru, gen)
        self.w_prior = _uniform((K, S, H), gru, gen)
        self.b_prior = nn.Parameter(torch.zeros(K, S))
        self.w_prior_std = _uniform((K, S, H), gru, gen)
        self.b_prior_std = nn.Parameter(torch.zeros(K, S))
        post = 1.0 / math.sqrt(H + n_in)
        self.w_post = _uniform((K, 2 * S, H + n_in), post, gen)
        self.b_post = nn.Parameter(torch.zeros(K, 2 * S))
        # Small heads: at the start each member predicts "no change" (the residual skip).
        self.w_head = _uniform((K, n_out, H + S), 0.01 / math.sqrt(H + S), gen)
        self.b_head = nn.Parameter(torch.zeros(K, n_out))

        # Filtered state (batch 1): h_{t-1}, z_{t-1} before consuming the latest features.
        self.register_buffer("h", torch.zeros(K, 1, H))
        self.register_buffer("z", torch.zeros(K, 1, S))
        self.register_buffer("h_start", torch.zeros(K, 1, H))  # state at the window's start
        self.register_buffer("z_start", torch.zeros(K, 1, S))
        self.register_buffer("last_raw", torch.zeros(n_in))
        n_cal = cfg.calibration_size
        self.register_buffer("calib_ratio", torch.zeros(n_cal))  # rel error / predicted spread
        self.register_buffer("calib_rel_err", torch.zeros(n_cal))
        self.register_buffer("calib_lead", torch.zeros(n_cal, dtype=torch.long))
        self.register_buffer("latest_spread", torch.full((cfg.calibration_horizon,), float("inf")))

        self.to(cfg.device)
        self.optimizer = torch.optim.Adam(self._trained_parameters(), lr=cfg.lr)
        self._gen = torch.Generator(device=self.h.device).manual_seed(cfg.seed + 1)
        self._feedback: RSSMFeedback | None = None  # rebuilt after each observe
        self._feedback_base: tuple | None = None
        self._window: deque[torch.Tensor] = deque()  # raw features, oldest first
        self._pending: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque()
        self._observed = 0
        self._calib_written = 0
        self._shadow: RSSMWeights | None = None
        self._workspace: torch.Tensor | None = None

    # ---------------------------------------------------------------- weights for the kernel
    def _trained_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def rollout_weights(self) -> RSSMWeights:
        """The parameters as the kernel reads them: the same storage (fp32) or a bf16 shadow
        refreshed once per training update, never a copy per call."""
        weights = RSSMWeights(
            self.w_ih.detach(),
            self.w_hh.detach(),
            self.b_ih.detach(),
            self.b_hh.detach(),
            self.w_prior.detach(),
            self.b_prior.detach(),
            self.w_head.detach(),
            self.b_head.detach(),
        )
        if self.config.weight_dtype == torch.float32:
            return weights
        if self._shadow is None:
            self._shadow = RSSMWeights(*(w.to(self.config.weight_dtype) for w in weights))
        return self._shadow

    def feedback(self) -> RSSMFeedback:
        """Linear maps that turn the heads' outputs into the next step's normalized features
        (built on the device from the running statistics). Levels (log loss, log update norms)
        take the predicted values, their changes follow, the step advances, the rest holds.
        Cached until the next ``observe`` changes the statistics."""
        if self._feedback is None:
            self._feedback = self._build_feedback()
        return self._feedback

    def _build_feedback(self) -> RSSMFeedback:
        n_in, n_out = self.sizes[3], self.sizes[4]
        enc = self.features
        device = self.h.device
        if self._feedback_base is None:  # the parts that do not depend on the statistics
            levels = torch.tensor([enc.LOSS, *range(enc.UPD, enc.UPD + self.groups)], device=device)
            changes = torch.tensor(
                [enc.DLOSS, *(enc.dupd(g) for g in range(self.groups))], device=device
            )
            outs = torch.arange(n_out, device=device)
            skip = torch.zeros(n_out, n_in, device=device)
            skip[outs, levels] = 1.0  # heads predict the change of each level
            mix = torch.eye(n_in, device=device)
            mix[levels, levels] = 0.0  # levels take the predicted values ...
            mix[changes, changes] = 0.0  # ... and their changes follow from them
            feed = torch.zeros(n_in, n_out, device=device)
            feed[levels, outs] = 1.0
            self._feedback_base = (levels, changes, outs, skip, mix, feed)
        levels, changes, outs, skip, mix_base, feed_base = self._feedback_base
        std, center = self.norm.std(), self.norm.center()
        # raw change = std_lvl * (y - x_lvl), then normalized by the change's own statistics
        ratio = std[levels] / std[changes]
        mix = mix_base.index_put((changes, levels), -ratio)
        feed = feed_base.index_put((changes, outs), ratio)
        drift = torch.zeros(n_in, device=device).index_put(
            (changes,), -center[changes] / std[changes]
        )
        # log1p(step) grows by about 1/(step+1) per step (held at the entry value).
        step = torch.expm1(self.last_raw[enc.STEP])
        drift[enc.STEP] = 1.0 / ((step + 1.0) * std[enc.STEP])
        return RSSMFeedback(skip, mix, feed, drift)

    # ---------------------------------------------------------------- torch forward pieces
    def _posterior(
        self, h: torch.Tensor, x_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.baddbmm(
            self.b_post.unsqueeze(1), torch.cat([h, x_next], -1), self.w_post.transpose(1, 2)
        )
        mean, log_std = out.chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)

    def _prior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.baddbmm(self.b_prior.unsqueeze(1), h, self.w_prior.transpose(1, 2))
        log_std = torch.baddbmm(self.b_prior_std.unsqueeze(1), h, self.w_prior_std.transpose(1, 2))
        return mean, log_std.clamp(-5.0, 2.0)

    def _heads(
        self, h: torch.Tensor, z: torch.Tensor, x: torch.Tensor, skip: torch.Tensor
    ) -> torch.Tensor:
        y = torch.baddbmm(
            self.b_head.unsqueeze(1), torch.cat([h, z], -1), self.w_head.transpose(1, 2)
        )
        return y + x @ skip.T

    def _targets(self, x_next: torch.Tensor) -> torch.Tensor:
        enc = self.features
        return torch.cat(
            [x_next[..., enc.LOSS : enc.LOSS + 1], x_next[..., enc.UPD : enc.UPD + self.groups]], -1
        )

    # ---------------------------------------------------------------- online use
    @torch.no_grad()
    def _encode(self, stats: Mapping[str, Any]) -> torch.Tensor:
        raw = self.features.encode(stats)
        self.norm.update(raw)
        self.last_raw.copy_(raw)
        self._feedback = None
        return raw

    def observe(self, stats: Mapping[str, Any]) -> torch.Tensor:
        """Record one Full step and train online. ``stats``: ``loss``, ``grad_norm``,
        ``update_norms`` (G values), ``lr``, ``step``, optionally ``phase`` (name or 0-3) and
        ``optimizer`` (a positive summary such as the mean of sqrt(v)). Values may be floats or
        0-d device tensors. Returns the training loss (a device tensor, 0 before 2 steps)."""
        raw = self._encode(stats)
        self._observed += 1
        self._score_pending(raw)
        self._window.append(raw)
        if self._observed % self.config.train_every == 0:
            loss = self._train()
        else:
            loss = self._filter()
        self._issue_calibration_rollout()
        return loss

    @torch.no_grad()
    def _filter(self) -> torch.Tensor:
        """An observe without training: the filtered state consumes the newest features (one
        GRU step, the posterior mean as the latent, as at the end of :meth:`_train`) and the
        window slides, so the next update still unrolls ``bptt_window`` transitions."""
        K = self.config.ensemble
        if len(self._window) >= 2:
            x_prev, x_new = self.norm.normalize(torch.stack(list(self._window)[-2:]))
            h = gru_cell_batched(
                torch.cat([x_prev.expand(K, 1, -1), self.z], -1),
                self.h,
                self.w_ih,
                self.w_hh,
                self.b_ih,
                self.b_hh,
            )
            self.h.copy_(h)
            self.z.copy_(self._posterior(h, x_new.expand(K, 1, -1))[0])
        self._slide()
        return torch.zeros((), device=self.h.device)

    @torch.no_grad()
    def _slide(self) -> None:
        """Past ``bptt_window`` transitions: advance the window's start state by one."""
        if len(self._window) <= self.config.bptt_window:
            return
        K = self.config.ensemble
        x0, x1 = self.norm.normalize(torch.stack(list(self._window)[:2]))
        x0, x1 = x0.expand(K, 1, -1), x1.expand(K, 1, -1)
        h0 = gru_cell_batched(
            torch.cat([x0, self.z_start], -1),
            self.h_start,
            self.w_ih,
            self.w_hh,
            self.b_ih,
            self.b_hh,
        )
        self.h_start.copy_(h0)
        self.z_start.copy_(self._posterior(h0, x1)[0])
        self._window.popleft()

    def _train(self) -> torch.Tensor:
        cfg = self.config
        K = cfg.ensemble
        if len(self._window) < 2:
            return torch.zeros((), device=self.h.device)
        xs = self.norm.normalize(torch.stack(list(self._window)))  # [W+1, I]
        skip = self.feedback().skip
        h, z = self.h_start, self.z_start
        mse = torch.zeros(K, device=xs.device)
        kl = torch.zeros(K, device=xs.device)
        for i in range(xs.shape[0] - 1):
            x = xs[i].expand(K, 1, -1)
            x_next = xs[i + 1].expand(K, 1, -1)
            h = gru_cell_batched(
                torch.cat([x, z], -1), h, self.w_ih, self.w_hh, self.b_ih, self.b_hh
            )
            p_mean, p_log_std = self._prior(h)
            q_mean, q_log_std = self._posterior(h, x_next)
            noise = torch.randn(q_mean.shape, generator=self._gen, device=xs.device)
            z = q_mean + q_log_std.exp() * noise
            target = self._targets(x_next)
            y_post = self._heads(h, z, x, skip)
            y_prior = self._heads(h, p_mean, x, skip)  # the path the rollout takes
            mse = (
                mse + ((y_post - target) ** 2).mean((1, 2)) + ((y_prior - target) ** 2).mean((1, 2))
            )
            kl_step = (
                p_log_std
                - q_log_std
                + ((2 * q_log_std).exp() + (q_mean - p_mean) ** 2) / (2 * (2 * p_log_std).exp())
                - 0.5
            )
            kl = kl + kl_step.sum(-1).mean(-1)
        steps = xs.shape[0] - 1
        per_member = (mse + cfg.kl_weight * kl) / steps
        keep = (torch.rand(K, generator=self._gen, device=xs.device) < cfg.bootstrap).float()
        loss = (per_member * keep).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._trained_parameters(), cfg.grad_clip)
        self.optimizer.step()
        self._shadow = None
        with torch.no_grad():
            # Filtered state for prediction: h_{t-1}, z_{t-1} = posterior mean given x_t.
            self.h.copy_(h.detach())
            self.z.copy_(self._posterior(h.detach(), xs[-1].expand(K, 1, -1))[0])
        self._slide()
        return (per_member * keep).sum().detach()

    # ---------------------------------------------------------------- prediction
    @torch.no_grad()
    def _rollout(self, horizon: int):
        K, H = self.sizes[0], self.sizes[1]
        x0 = self.norm.normalize(self.last_raw).unsqueeze(0).contiguous()
        if self._workspace is None:
            self._workspace = make_workspace(K, 1, H, self.h.device)
        return rssm_rollout(
            x0,
            self.h.contiguous(),
            self.z.contiguous(),
            self.rollout_weights(),
            self.feedback(),
            horizon,
            workspace=self._workspace,
        )

    def _decode(self, result) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.features
        std, center = self.norm.std(), self.norm.center()
        s0, c0 = std[enc.LOSS], center[enc.LOSS]
        m = result.mean[:, 0, 0]
        v = result.var[:, 0, 0]
        # members' log losses spread as a log-normal: its mean and variance
        log_mu = c0 + s0 * m
        sv = s0 * s0 * v
        loss_mean = torch.exp(log_mu + 0.5 * sv)
        loss_var = torch.expm1(sv) * torch.exp(2 * log_mu + sv)
        g = slice(enc.UPD, enc.UPD + self.groups)
        x_now = self.norm.normalize(self.last_raw)[g]
        scales = torch.exp(std[g] * (result.mean[:, 0, 1:] - x_now))
        members = torch.exp(c0 + s0 * result.traj[:, :, 0, 0])
        return loss_mean, loss_var, scales, members

    def predict(self, horizon: int | None = None) -> Prediction:
        """Roll every member ``horizon`` steps (default ``calibration_horizon``) in one launch."""
        horizon = self.config.calibration_horizon if horizon is None else horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
        loss_mean, loss_var, scales, members = self._decode(self._rollout(horizon))
        spread = loss_var.clamp_min(0).sqrt() / loss_mean
        return Prediction(loss_mean, loss_var, scales, self._confidence_for(spread), members)

    # ---------------------------------------------------------------- calibration
    def _issue_calibration_rollout(self) -> None:
        if len(self._window) < 2:
            return
        loss_mean, loss_var, _, _ = self._decode(self._rollout(self.config.calibration_horizon))
        spread = loss_var.clamp_min(0).sqrt() / loss_mean
        self.latest_spread.copy_(spread)
        self._pending.append((self._observed, loss_mean, spread))
        while (
            self._pending
            and self._observed - self._pending[0][0] >= self.config.calibration_horizon
        ):
            self._pending.popleft()

    @torch.no_grad()
    def _score_pending(self, raw: torch.Tensor) -> None:
        """Held-out scoring: predictions issued before this step vs the loss just observed."""
        actual = raw[self.features.LOSS].exp()
        n_cal = self.config.calibration_size
        for issued, loss_mean, spread in self._pending:
            lead = self._observed - issued
            if 1 <= lead <= loss_mean.numel():
                rel_err = (loss_mean[lead - 1] - actual).abs() / actual
                slot = self._calib_written % n_cal
                self.calib_rel_err[slot] = rel_err
                self.calib_ratio[slot] = rel_err / spread[lead - 1].clamp_min(1e-6)
                self.calib_lead[slot : slot + 1].fill_(lead)  # a kernel argument, not a copy
                self._calib_written += 1

    def _confidence_for(self, spread: torch.Tensor) -> torch.Tensor:
        n = min(self._calib_written, self.config.calibration_size)
        if n < self.config.min_calibration:
            return torch.zeros((), device=spread.device)
        worst = spread.max().clamp_min(1e-6)
        ok = (self.calib_ratio[:n] * worst <= self.config.rel_tolerance).float()
        return ok.mean()

    def confidence(self) -> torch.Tensor:
        """Confidence of the latest ``calibration_horizon``-step forecast (0-d tensor)."""
        return self._confidence_for(self.latest_spread)

    def relative_errors(self) -> dict[int, torch.Tensor]:
        """Mean held-out relative loss error by lead (1..calibration_horizon), device tensors."""
        n = min(self._calib_written, self.config.calibration_size)
        lead, err = self.calib_lead[:n], self.calib_rel_err[:n]
        out = {}
        for k in range(1, self.config.calibration_horizon + 1):
            mask = (lead == k).float()
            out[k] = (err * mask).sum() / mask.sum().clamp_min(1)
        return out

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "window": [t.clone() for t in self._window],
            "pending": [(i, m.clone(), s.clone()) for i, m, s in self._pending],
            "observed": self._observed,
            "calib_written": self._calib_written,
            "generator": self._gen.get_state(),
        }

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        device = self.h.device
        self._window = deque(t.to(device) for t in state["window"])
        self._pending = deque((i, m.to(device), s.to(device)) for i, m, s in state["pending"])
        self._observed = int(state["observed"])
        self._calib_written = int(state["calib_written"])
        self._gen.set_state(state["generator"])
        self._shadow = None
        self._feedback = None
