"""The pixel seam: a `FrameCodec` maps frames to the model space and back.

The model always works on float frames [..., C, H, W] in "model space". `IdentityCodec` is the
TARFlow-style pixel space: x = u8 / 127.5 - 1 in [-1, 1]. A learned latent autoencoder can later
implement the same interface (its `channels` and `frame_size` then describe the latent).
"""
from __future__ import annotations

import torch


class FrameCodec:
    """Interface: encode frames to model space, decode back."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] (0..255) or float in [-1, 1] -> float [..., C', H', W'] model space."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """float [..., C', H', W'] model space -> uint8 [..., C, H, W]."""
        raise NotImplementedError


class IdentityCodec(FrameCodec):
    """Pixels in [-1, 1]: x = u8/127.5 - 1; decode rounds and clips back to uint8."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dtype == torch.uint8:
            return frames.to(self.dtype) / 127.5 - 1.0
        if not frames.is_floating_point():
            raise TypeError(f"IdentityCodec.encode: expected uint8 or float frames, got {frames.dtype}")
        return frames

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
