"""Open-loop prediction quality: from k real context frames, replay logged actions for H steps.

Used by the trainer (sample GIFs at each evaluation), by ``sfv-world quality`` (the report written to
``benchmarks/results/quality.json``) and by the pipeline report. Everything here takes tensors and
numpy arrays; the dataset is read by the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfv_world.autoencoder import IdentityCodec
from sfv_world.denoiser import DENOISER_WINDOW


def mse(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean squared error of uint8 images, one value per leading index: [..., H, W, C] -> float64 [...]."""
    if pred.shape != target.shape:
        raise ValueError(f"mse: shapes differ, pred {pred.shape} vs target {target.shape}")
    diff = pred.astype(np.float64) - target.astype(np.float64)
    return np.mean(diff * diff, axis=(-3, -2, -1))


def psnr_from_mse(mse_values: np.ndarray) -> np.ndarray:
    """PSNR in dB of 8-bit images from their mean squared error (inf for an exact match)."""
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / np.asarray(mse_values, dtype=np.float64))


def psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of uint8 images, one value per leading index.

    pred, target: uint8 [..., H, W, C] of the same shape -> float64 [...] (inf where identical,
    clipped to 100 dB so means stay finite).
    """
    return np.minimum(psnr_from_mse(mse(pred, target)), 100.0)


def to_hwc_uint8(frames: torch.Tensor) -> np.ndarray:
    """uint8 [..., C, H, W] tensor -> uint8 [..., H, W, C] numpy array."""
    return frames.movedim(-3, -1).contiguous().cpu().numpy()


@torch.no_grad()
def open_loop_rollout(
    model,
    batch: dict[str, torch.Tensor],
    context: int,
    sampler: dict[str, Any],
    device: torch.device | str = "cpu",
    seed: int = 0,
    horizon: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``horizon`` frames open-loop after ``context`` real frames, replaying logged actions.

    batch: ``frames`` uint8 [B, T, C, H, W] at the model's frame size, ``actions`` [B, T-1].
    Returns (real, dream), both uint8 [B, horizon, H, W, C]; horizon defaults to T - context.
    """
    from sfv_world.sampling import JacobiConfig
    from sfv_world.world import denoise_enabled

    frames, actions = batch["frames"].to(device), batch["actions"].to(device)
    T = frames.shape[1]
    horizon = T - context if horizon is None else horizon
    if not 1 <= context < T or context + horizon > T:
        raise ValueError(f"open_loop_rollout: context={context}, horizon={horizon} do not fit clips of {T} frames")
    codec = IdentityCodec()
    sigma = model.config.sigma
    gen = torch.Generator(device=device).manual_seed(seed)

    x_ctx = codec.encode(frames[:, :context])
    x_ctx = x_ctx + sigma * torch.randn(x_ctx.shape, generator=gen, device=device)
    state, _ = model.flow.encode_context(x_ctx, actions[:, : context - 1])
    jacobi = JacobiConfig(**{k: sampler[k] for k in ("block_size_first", "block_size", "threshold", "max_iter", "warm_start")})
    window, window_actions = [x_ctx[:, -1]], []
    dream = []
    for h in range(horizon):
        a = actions[:, context - 1 + h]
        sample = model.flow.generate_frame(
            state, a, generator=gen, method=sampler["method"], jacobi=jacobi,
            cfg_scale=float(sampler["cfg"]), temperature=float(sampler["temperature"]),
        )
        window.append(sample.x_tilde)
        window_actions.append(a)
        x_hat = sample.x_tilde
        if denoise_enabled(sampler.get("denoise", "auto"), float(sampler["temperature"])):
            x_hat = model.denoiser.denoise_latest(torch.stack(window, 1), torch.stack(window_actions, 1))
        dream.append(codec.decode(x_hat))
        window, window_actions = window[-DENOISER_WINDOW:], window_actions[-(DENOISER_WINDOW - 1):]
    real = to_hwc_uint8(frames[:, context : context + horizon])
    return real, to_hwc_uint8(torch.stack(dream, 1))


def side_by_side_gif(real: np.ndarray, dream: np.ndarray, path: str | Path, scale: int = 4, fps: int = 8) -> Path:
    """Write a GIF of ``real | dream | |difference|`` (uint8 [T, H, W, C] each), upscaled ``scale`` times."""
    import imageio.v3 as iio

    diff = np.abs(real.astype(np.int16) - dream.astype(np.int16)).astype(np.uint8)
    sep = np.full((real.shape[0], real.shape[1], 1, 3), 255, np.uint8)
    strip = np.concatenate([real, sep, dream, sep, diff], axis=2)
    strip = strip.repeat(scale, axis=1).repeat(scale, axis=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, strip, duration=1000 / fps, loop=0)
    return path
