"""Reward and termination heads on the deep block's per-frame causal features.

Design: a small MLP on *detached* deep features (see `StarFlowV.forward` for exactly what a frame's
features depend on). Reusing the deep block costs nothing at generation (its hidden states are
already computed by the inversion) and sees the whole causal past; detaching keeps the head loss out
of x_tilde.grad, which is the flow-score-matching target.

For transition t, (frame t, action a_t) -> frame t+1, the heads read the features of frame t+1:
they depend on frames <= t, actions <= a_t, and frame t+1 except its last token in raster order.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

REWARD_MODES = ("regression", "sign")


class RewardTerminationHead(nn.Module):
    """features [..., D] -> (reward [...] or sign logits [..., 3], termination logit [...])."""

    def __init__(self, width: int, reward_mode: str):
        super().__init__()
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode={reward_mode!r}: expected one of {REWARD_MODES}")
        self.reward_mode = reward_mode
        self.trunk = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(approximate="tanh"))
        self.reward = nn.Linear(width, 1 if reward_mode == "regression" else 3)
        self.termination = nn.Linear(width, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(features)
        r = self.reward(h)
        if self.reward_mode == "regression":
            r = r.squeeze(-1)
        return r, self.termination(h).squeeze(-1)

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
        mask bool [B, T-1] | None. termination_pos_weight weighs terminal transitions in the BCE:
        they are the last step of an episode, so in clip windows they are rare (~0.4% for CartPole
        in 12-frame clips) and an unweighted head learns to never predict them. Returns (scalar, metrics)."""
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
