"""Reward and termination prediction: a small separate pixel model, not a head on the deep block.

Design and why. The first design read the deep block's per-frame causal features (the mean of its
final hidden states over a frame's slots), detached. Measured on CartPole pixels (cpu-demo, 667 steps):
even a head refit on those frozen features reached only F1 0.16 on validation terminations -- the
mean-pooled features do not keep the fine pole angle that decides termination. A small CNN on the
pixels of frames (t-1, t, t+1) reached F1 0.81 in two minutes of training. So reward and termination
come from this separate model:

    transition t: (x_{t-1}, x_t, x_{t+1}, a_t) -> reward r_t, termination logit d_t

It reads the noise-augmented frames x_tilde, detached (the head loss never changes x_tilde.grad, the
flow-score-matching target), so training and dreaming see the same input: at generation the new frame
is x_tilde before the denoiser. It is causal by construction (frames <= t+1, action a_t) and costs one
small CNN pass per frame. For t = 0 (no x_{t-1}) frame t stands in for it.

Training and the decision threshold. Terminations are rare (~1 transition in 22 for random CartPole,
~1 in 140 inside 12-frame training clips), so the trainer does not fit this model on the flow's clips:
it draws its own balanced batches of single transitions (``train.head_batch_size``, a fraction
``train.head_terminal_fraction`` of them terminal; ``sfv_world.train.TransitionSet``). That shifts the
logit's prior, so at each evaluation the trainer picks the logit threshold that maximises F1 on every
validation transition and stores it in the buffer ``termination_offset``. The calibrated logit
(raw - offset, the default output) is > 0 exactly when the head says "terminated"; the loss uses the raw
logit (``calibrated=False``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

REWARD_MODES = ("regression", "sign")
HEAD_FRAMES = 3  # x_{t-1}, x_t, x_{t+1}


class RewardTerminationHead(nn.Module):
    """Pixel transition model: windows [N, 3, C, H, W] + actions -> (reward [N] or sign logits
    [N, 3], termination logit [N])."""

    def __init__(self, channels: int, frame_size: int, action_kind: str, action_dim: int, reward_mode: str,
                 width: int = 128):
        super().__init__()
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode={reward_mode!r}: expected one of {REWARD_MODES}")
        self.reward_mode, self.action_kind = reward_mode, action_kind
        self.encoder = nn.Sequential(  # [N, 3C, S, S] -> [N, 64, S/8, S/8]
            nn.Conv2d(HEAD_FRAMES * channels, 32, 3, 2, 1), nn.GELU(approximate="tanh"),
            nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(approximate="tanh"),
            nn.Conv2d(64, 64, 3, 2, 1), nn.GELU(approximate="tanh"),
            nn.Flatten(),
        )
        side = frame_size
        for _ in range(3):
            side = (side + 1) // 2
        self.project = nn.Linear(64 * side * side, width)
        self.action = nn.Embedding(action_dim, width) if action_kind == "discrete" else nn.Linear(action_dim, width)
        self.trunk = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(width, width), nn.GELU(approximate="tanh"))
        self.reward = nn.Linear(width, 1 if reward_mode == "regression" else 3)
        self.termination = nn.Linear(width, 1)
        # decision threshold on the raw termination logit, set by the trainer on validation data
        self.register_buffer("termination_offset", torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the calibrated threshold existed: threshold 0 (the plain logit)
        state_dict.setdefault(prefix + "termination_offset", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, windows: torch.Tensor, actions: torch.Tensor,
                calibrated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """windows float [N, 3, C, H, W] (x_{t-1}, x_t, x_{t+1}); actions int64 [N] | float [N, k] (a_t)
        -> (reward float [N] or sign logits [N, 3], termination logit float [N]; minus
        ``termination_offset`` when ``calibrated``, so > 0 means terminated)."""
        h = self.project(self.encoder(windows.flatten(1, 2)))  # [N, width]
        a = self.action(actions.long()) if self.action_kind == "discrete" else self.action(actions.to(h.dtype))
        h = self.trunk(h + a)
        r = self.reward(h)
        if self.reward_mode == "regression":
            r = r.squeeze(-1)
        d = self.termination(h).squeeze(-1)
        if calibrated:
            d = d - self.termination_offset.to(d.dtype)
        return r, d

    def transitions(self, x: torch.Tensor, actions: torch.Tensor, frame_mask: torch.Tensor | None = None,
                    calibrated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Every transition of a clip: x float [B, T, C, H, W], actions [B, T-1(, k)], frame_mask bool
        [B, T] | None -> (reward [B, T-1] (or [B, T-1, 3]), termination logit [B, T-1])."""
        B, T = x.shape[:2]
        if T < 2:
            shape = (B, 0, 3) if self.reward_mode == "sign" else (B, 0)
            return x.new_zeros(shape), x.new_zeros(B, 0)
        cur, nxt = x[:, :-1], x[:, 1:]
        prev = torch.cat([x[:, :1], x[:, :-2]], 1)  # x_{t-1}; frame 0 stands in for x_{-1}
        if frame_mask is not None:  # a padding frame before the first real one: use the real frame
            prev_real = torch.cat([frame_mask[:, :1], frame_mask[:, :-2]], 1)
            prev = torch.where(prev_real[:, :, None, None, None], prev, cur)
        windows = torch.stack([prev, cur, nxt], 2)  # [B, T-1, 3, C, H, W]
        r, d = self(windows.flatten(0, 1), actions.flatten(0, 1), calibrated)
        return r.reshape(B, T - 1, *r.shape[1:]), d.reshape(B, T - 1)

    def reward_value(self, reward: torch.Tensor) -> torch.Tensor:
        """Model output -> a reward value: the regression value, or the argmax sign in {-1, 0, +1}."""
        if self.reward_mode == "regression":
            return reward
        return (reward.argmax(-1) - 1).to(torch.float32)

    def loss(self, reward: torch.Tensor, termination_logit: torch.Tensor, rewards: torch.Tensor,
             terminations: torch.Tensor, mask: torch.Tensor | None,
             termination_pos_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Masked mean of the reward loss (MSE, or cross-entropy over sign classes) plus the
        termination binary cross-entropy. rewards float [B, T-1], terminations bool [B, T-1],
        mask bool [B, T-1] | None; termination_logit raw (``calibrated=False``). termination_pos_weight
        weighs terminal transitions in the BCE (1 with the trainer's balanced batches). Returns (scalar, metrics)."""
        dt = torch.promote_types(reward.dtype, torch.float32)  # autocast-safe: at least float32
        reward, termination_logit = reward.to(dt), termination_logit.to(dt)
        m = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
        mf = m.to(termination_logit.dtype)
        n = mf.sum().clamp(min=1.0)
        if self.reward_mode == "regression":
            r_loss = ((reward - rewards.to(reward.dtype)) ** 2 * mf).sum() / n
            r_metric = {"reward_mse": float(r_loss.detach())}
        else:
            target = (torch.sign(rewards) + 1).long()  # -1, 0, +1 -> 0, 1, 2
            ce = F.cross_entropy(reward.reshape(-1, 3), target.reshape(-1), reduction="none").view_as(mf)
            r_loss = (ce * mf).sum() / n
            acc = ((reward.argmax(-1) == target).to(mf.dtype) * mf).sum() / n
            r_metric = {"reward_ce": float(r_loss.detach()), "reward_acc": float(acc)}
        t = terminations.to(termination_logit.dtype)
        pos_weight = torch.tensor(float(termination_pos_weight), dtype=dt, device=t.device)
        bce = F.binary_cross_entropy_with_logits(termination_logit, t, reduction="none", pos_weight=pos_weight)
        t_loss = (bce * mf).sum() / n
        t_acc = (((termination_logit > 0) == terminations.bool()).to(mf.dtype) * mf).sum() / n
        metrics = {**r_metric, "termination_bce": float(t_loss.detach()), "termination_acc": float(t_acc)}
        return r_loss + t_loss, metrics


def f1_threshold(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The decision threshold on ``logits`` (float [N]) that maximises F1 against ``labels`` (bool [N]).

    Returns (threshold, F1 at it); predictions are ``logits > threshold``. Candidates are midpoints
    between consecutive distinct sorted logits (and below the smallest). No positives: (the largest
    logit, 1.0), so nothing is predicted positive.
    """
    logits, labels = logits.detach().double().flatten(), labels.bool().flatten()
    if logits.numel() != labels.numel():
        raise ValueError(f"f1_threshold: {logits.numel()} logits but {labels.numel()} labels")
    if logits.numel() == 0 or not bool(labels.any()):
        top = float(logits.max()) if logits.numel() else 0.0
        return top, 1.0
    order = torch.argsort(logits, descending=True)
    s, y = logits[order], labels[order].double()
    tp = torch.cumsum(y, 0)  # predicting the top k+1 as positive
    k = torch.arange(1, len(s) + 1, dtype=torch.float64)
    f1 = 2 * tp / (k + y.sum())
    distinct = torch.ones_like(s, dtype=torch.bool)  # cut only between distinct values
    distinct[:-1] = s[:-1] > s[1:]
    f1 = torch.where(distinct, f1, torch.zeros_like(f1))
    i = int(torch.argmax(f1))
    threshold = float((s[i] + s[i + 1]) / 2) if i + 1 < len(s) else float(s[i]) - 1.0
    return threshold, float(f1[i])
