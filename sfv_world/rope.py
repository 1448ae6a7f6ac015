"""Three-axis rotary position embedding (STARFLOW_V.md §1.6).

Half of the head dimension holds rotation frequencies, laid out as

    [ row (n_s) | col (n_s) | frame (8) ]     with  n_s = (head_dim/2 - 8) / 2

so head_dim must be >= 32 and head_dim/2 - 8 even. Spatial coordinates are scaled so that a frame's
token grid spans ``SPATIAL_SPAN`` units whatever its size (the release's pt_seq_len rule); the third
axis is the frame index. Attention scores then depend only on *relative* positions: shifting every
frame index by a constant (left padding, a re-encoded window) leaves them unchanged.
"""
from __future__ import annotations

import torch

TIME_FREQS = 8  # frequency slots of the frame axis
SPATIAL_SPAN = 32.0  # token grids are scaled to span this many units (pt_seq_len)
BASE = 10_000.0


def check_head_dim(head_dim: int) -> None:
    """Raise ValueError unless head_dim admits the [row | col | frame] split."""
    half = head_dim // 2
    if head_dim % 2 or half <= TIME_FREQS or (half - TIME_FREQS) % 2:
        raise ValueError(
            f"head_dim={head_dim}: the 3-axis RoPE needs an even head_dim with head_dim/2 - {TIME_FREQS} "
            f"a positive even number (head_dim >= 32, e.g. 32 or 64)"
        )


def token_positions(grid_h: int, grid_w: int, frames: torch.Tensor) -> torch.Tensor:
    """Positions of the tokens of whole frames, in raster order.

    frames: float [T] frame indices. Returns float [T*grid_h*grid_w, 3] = (row, col, frame).
    """
    scale = SPATIAL_SPAN / (grid_h * grid_w) ** 0.5
    rows = torch.arange(grid_h, dtype=frames.dtype, device=frames.device).repeat_interleave(grid_w) * scale
    cols = torch.arange(grid_w, dtype=frames.dtype, device=frames.device).repeat(grid_h) * scale
    F = grid_h * grid_w
    t = frames.repeat_interleave(F)  # [T*F]
    return torch.stack([rows.repeat(len(frames)), cols.repeat(len(frames)), t], dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for positions float [N, 3] -> (cos, sin), each [N, head_dim/2] (same dtype)."""
    check_head_dim(head_dim)
    n_s = (head_dim // 2 - TIME_FREQS) // 2
    dt, dev = positions.dtype, positions.device
    spatial = BASE ** (-torch.arange(n_s, dtype=dt, device=dev) / n_s)  # [n_s]
    temporal = BASE ** (-torch.arange(TIME_FREQS, dtype=dt, device=dev) / TIME_FREQS)  # [8]
    angles = torch.cat(
        [positions[:, :1] * spatial, positions[:, 1:2] * spatial, positions[:, 2:3] * temporal], dim=-1
    )  # [N, head_dim/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., n, head_dim] by the tables cos, sin [n, head_dim/2] (rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
