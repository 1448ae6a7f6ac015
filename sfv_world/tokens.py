"""Patch tokens and frame-aligned action conditioning, shared by the flow and the denoiser.

patchify: x [B, T, C, H, W] -> [B, T, F, d], F = (H/p)(W/p) tokens in raster order, d = p*p*C in
(p p c) order (STARFLOW_V.md §0).

Action conditioning (STARFLOW_V.md §9.3): frame t is conditioned on c_t = E(a_{t-1}), added to every
input slot that parameterises a token of frame t. Frame 0, and the first real frame after start
padding, get a learned START embedding; classifier-free guidance replaces E(a) by a learned NULL.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """x [..., C, H, W] -> tokens [..., (H/p)(W/p), p*p*C]."""
    *lead, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(*lead, C, h, p, w, p)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # [..., h, w, p, p, C]
    return x.reshape(*lead, h * w, p * p * C)


def unpatchify(tokens: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """tokens [..., F, p*p*C] -> x [..., C, H, W] (inverse of `patchify`)."""
    *lead, F, d = tokens.shape
    h, w = H // p, W // p
    n = len(lead)
    x = tokens.reshape(*lead, h, w, p, p, C)
    x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)  # [..., C, h, p, w, p]
    return x.reshape(*lead, C, H, W)


def start_flags(frame_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: frame t starts a sequence (t = 0, or frame t-1 is start padding)."""
    prev_valid = torch.cat([torch.zeros_like(frame_mask[:, :1]), frame_mask[:, :-1]], dim=1)
    return ~prev_valid


class ActionEmbedding(nn.Module):
    """E(a) for Discrete (nn.Embedding over action_dim actions) or Box (MLP on action_dim floats),
    plus learned START and NULL embeddings of width D."""

    def __init__(self, action_kind: str, action_dim: int, width: int):
        super().__init__()
        self.kind = action_kind
        # Unit-scale embeddings at init, comparable to W_in(s): with GPT-style 0.02 the unconditional
        # shallow blocks learn to model the action's effect as multimodality before the deep block
        # starts to read the action (measured on a toy whose next frame is set by the action: the
        # action was then all but ignored; at unit scale it is used from the first steps).
        if action_kind == "discrete":
            self.embed = nn.Embedding(action_dim, width)  # N(0, 1)
        elif action_kind == "box":
            self.embed = nn.Sequential(nn.Linear(action_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))
            nn.init.normal_(self.embed[2].weight, std=3.0 / width ** 0.5)  # ~unit-scale output
        else:
            raise ValueError(f"action_kind={action_kind!r}: expected 'discrete' or 'box'")
        self.start = nn.Parameter(torch.randn(width))
        self.null = nn.Parameter(torch.randn(width))

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        """actions int64 [...] (discrete) or float [..., k] (box) -> [..., D]."""
        if self.kind == "discrete":
            return self.embed(actions.long())
        return self.embed(actions.to(self.start.dtype))

    def frame_conditioning(self, actions: torch.Tensor, T: int, drop: torch.Tensor | None = None,
                           frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame additive conditions c [B, T, D].

        actions [B, T-1] | [B, T-1, k] (a_t between frames t and t+1); drop bool [B] | None (rows
        whose actions become NULL); frame_mask bool [B, T] | None (False = start padding).
        """
        B = actions.shape[0]
        if frame_mask is None:
            frame_mask = torch.ones(B, T, dtype=torch.bool, device=self.start.device)
        start = start_flags(frame_mask)  # [B, T]
        if T > 1:
            # actions out of padding are never used: sanitise them so any filler value is safe
            pad = start[:, 1:].reshape(B, T - 1, *([1] * (actions.dim() - 2)))
            emb = self(torch.where(pad, torch.zeros_like(actions), actions))  # [B, T-1, D]
            if drop is not None:
                emb = torch.where(drop[:, None, None], self.null.to(emb.dtype), emb)
            c = torch.cat([self.start.expand(B, 1, -1).to(emb.dtype), emb], dim=1)
        else:
            c = self.start.expand(B, 1, -1)
        return torch.where(start[..., None], self.start.to(c.dtype), c)  # [B, T, D]

    def step_conditioning(self, action: torch.Tensor | None, has_prev: torch.Tensor,
                          null: bool = False) -> torch.Tensor:
        """Condition for one new frame per row: E(action) (or NULL), START where has_prev is False.

        action [B] | [B, k] | None; has_prev bool [B]. Returns [B, D].
        """
        B = has_prev.shape[0]
        if null or action is None:
            c = self.null.expand(B, -1)
        else:
            c = self(action)
        return torch.where(has_prev[:, None], c, self.start)
