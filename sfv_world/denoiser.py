"""Flow-score matching (STARFLOW_V.md §4): a learned, near-causal denoiser regressing the flow's score.

Target (w = 1 convention). The flow loss is a mean over `loss_numel` dimensions, so
x_tilde.grad = grad(NLL)/loss_numel and

    g = x_tilde.grad * loss_numel * sigma = sigma * grad NLL(x_tilde) = -sigma * grad log p(x_tilde)

(std ~ 1, an epsilon-prediction). The denoiser s_phi regresses g with its own optimiser; at sampling
one Tweedie step is x_hat = x_tilde + sigma^2 grad log p = x_tilde - sigma * s_phi(x_tilde).

Network: patch tokens of all frames -> proj_in (+ frame-aligned action conditioning, as in the deep
block) -> transformer layers -> zero-initialised proj_out. Masks (full attention inside a frame):

    layer 0:        frame n sees frames n-G+1 .. n+lookahead     (G = window = DENOISER_WINDOW)
    layers 1..L-1:  frame n sees frame n only

so across all layers the output for frame n depends on exactly frames n-G+1 .. n+lookahead
(lookahead 0 or 1): one frame of look-ahead in total, not per layer (the release's mask leaks
(A-1) * layers frames, §4.2), and a past window that does not grow with depth. Temporal mixing
happens in the first layer; the later layers refine each frame spatially. At generation this
makes the newest frame cheap: later layers run on its F tokens only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sfv_world.flow import TransformerLayer
from sfv_world.rope import rope_cos_sin, token_positions
from sfv_world.tokens import ActionEmbedding, patchify, unpatchify

DENOISER_WINDOW = 4  # G: frame n sees frames n-G+1 .. n+lookahead (the newest plus 3 past)


def score_target(x_tilde_grad: torch.Tensor, sigma: float, loss_numel_scale: float | torch.Tensor) -> torch.Tensor:
    """g = x_tilde.grad * loss_numel_scale * sigma = sigma * grad NLL(x_tilde), detached.

    loss_numel_scale: the number of dimensions the flow loss averages over (`StarFlowV.loss_numel`;
    x_tilde.numel() when there is no padding).
    """
    return (x_tilde_grad * loss_numel_scale * sigma).detach()


class FlowScoreDenoiser(nn.Module):
    """s_phi(x_tilde, a) -> score estimate with the shape of x_tilde, frame-causal (+ lookahead)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.sigma, self.lookahead, self.window = c.sigma, c.denoiser_lookahead, DENOISER_WINDOW
        d, W = c.token_dim, c.denoiser_width
        self.proj_in = nn.Linear(d, W)
        self.action_embed = ActionEmbedding(c.action_kind, c.action_dim, W)
        self.layers = nn.ModuleList([TransformerLayer(W, c.head_dim) for _ in range(c.denoiser_layers)])
        self.norm = nn.RMSNorm(W)
        self.proj_out = nn.Linear(W, d)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def frame_masks(self, T: int, device, frame_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention masks for layer 0 (frames n-G+1 .. n+lookahead) and later layers (frame n).

        Each [N, N] bool, or [B, 1, N, N] with frame_mask bool [B, T] (False frames are masked keys;
        a query always sees its own frame, so padding rows stay finite).
        """
        F = self.config.tokens_per_frame
        f = torch.arange(T, device=device).repeat_interleave(F)
        fq, fk = f[:, None], f[None, :]
        first = (fk <= fq + self.lookahead) & (fk > fq - self.window)
        rest = fk == fq
        if frame_mask is None:
            return first, rest
        keys = frame_mask.repeat_interleave(F, dim=1)[:, None, :] | rest  # [B, N, N]
        return (first & keys)[:, None], (rest & keys)[:, None]

    def forward(self, x_tilde: torch.Tensor, actions: torch.Tensor, drop_actions: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None, last_frame_only: bool = False) -> torch.Tensor:
        """x_tilde [B, T, C, H, W]; actions [B, T-1(, k)]; drop_actions bool [B] | None; frame_mask bool
        [B, T] | None (False = padding: masked keys, and the next real frame gets START).

        Returns the score estimate [B, T, C, H, W] (target scale: sigma * grad NLL), or only the
        newest frame's [B, 1, C, H, W] with last_frame_only (F queries in layer 0, then F tokens).
        """
        c = self.config
        B, T = x_tilde.shape[:2]
        F = c.tokens_per_frame
        if frame_mask is not None:  # padding content never matters, even NaN
            x_tilde = torch.where(frame_mask[:, :, None, None, None], x_tilde, torch.zeros_like(x_tilde))
        tokens = patchify(x_tilde, c.patch_size).reshape(B, T * F, c.token_dim)
        cond = self.action_embed.frame_conditioning(actions, T, drop_actions, frame_mask)  # [B, T, D]
        h = self.proj_in(tokens) + cond.repeat_interleave(F, dim=1)
        frames = torch.arange(T, dtype=torch.float64, device=x_tilde.device)
        cos, sin = rope_cos_sin(token_positions(c.grid, c.grid, frames), c.head_dim)
        first, rest = self.frame_masks(T, x_tilde.device, frame_mask)
        for i, layer in enumerate(self.layers):
            if not last_frame_only:
                h = layer(h, cos, sin, first if i == 0 else rest, False)
            elif i == 0:  # the newest frame's queries against the window's keys
                q = slice((T - 1) * F, T * F)
                h = layer(h, cos, sin, first[..., q, :], False, queries=q)  # [B, F, D]
                cos, sin, T = cos[q], sin[q], 1
            else:  # frame-local layers: the newest frame alone is exact
                h = layer(h, cos, sin, None, False)
        score = self.proj_out(self.norm(h)).reshape(B, T, F, c.token_dim)
        return unpatchify(score, c.patch_size, c.channels, c.frame_size, c.frame_size)

    def denoise(self, x_tilde: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """One Tweedie step on a clip: x_hat = x_tilde - sigma * s_phi(x_tilde). Shapes as forward."""
        return x_tilde - self.sigma * self(x_tilde, actions)

    @torch.no_grad()
    def denoise_latest(self, x_window: torch.Tensor, actions: torch.Tensor,
                       frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise the newest frame of a short window in one batched pass.

        x_window [B, W, C, H, W] (oldest first); actions [B, W-1(, k)]; frame_mask bool [B, W] | None
        (False = padding frames, e.g. GenerationState.history_mask). Returns [B, C, H, W]. Only the
        newest frame's tokens are computed (layer 0 reads the window's keys). With lookahead 1 the newest frame is denoised
        without its look-ahead frame (as the last frame of a training clip); for the exact
        one-frame-lagged output use `denoise_frame(..., index=-2)`.
        """
        score = self(x_window, actions, frame_mask=frame_mask, last_frame_only=True)[:, 0]
        return x_window[:, -1] - self.sigma * score

    @torch.no_grad()
    def denoise_frame(self, x_window: torch.Tensor, actions: torch.Tensor, index: int = -1,
                      frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised frame `index` of a window [B, W, C, H, W] -> [B, C, H, W]."""
        return (x_window - self.sigma * self(x_window, actions, frame_mask=frame_mask))[:, index]


def flow_score_matching_loss(denoiser: FlowScoreDenoiser, x_tilde: torch.Tensor, g: torch.Tensor,
                             actions: torch.Tensor, drop_actions: torch.Tensor | None = None) -> torch.Tensor:
    """L_FSM = mean over elements of (s_phi(x_tilde, a) - g)^2; x_tilde and g are detached."""
    return (denoiser(x_tilde.detach(), actions, drop_actions) - g.detach()).square().mean()
