"""Writing frame sequences as videos: mp4 when an encoder is installed, GIF otherwise.

mp4 needs the ``imageio-ffmpeg`` package (an ffmpeg binary for imageio). It is optional: without it
:func:`write_video` writes a GIF beside the requested path and says so in its return value.
Also :func:`side_by_side`, the ``real | dream | |difference|`` strip used by rollouts and play.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def mp4_available() -> bool:
    """True when imageio can encode mp4 (the ``imageio-ffmpeg`` package is importable)."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [..., H, W, C] by an integer factor."""
    if int(scale) < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    if scale == 1:
        return frames
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of two uint8 image arrays of the same shape, as uint8."""
    if a.shape != b.shape:
        raise ValueError(f"difference: shapes differ, {a.shape} vs {b.shape}")
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.uint8)


def side_by_side(*panels: np.ndarray, separator: int = 1) -> np.ndarray:
    """Concatenate uint8 [T, H, W, C] videos (or [H, W, C] images) left to right, white separators."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    shape = panels[0].shape
    for p in panels:
        if p.shape != shape or p.dtype != np.uint8:
            raise ValueError(f"side_by_side: every panel must be uint8 {shape}, got {p.dtype} {p.shape}")
    sep = np.full((*shape[:-2], separator, shape[-1]), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i, p in enumerate(panels):
        if i:
            parts.append(sep)
        parts.append(p)
    return np.concatenate(parts, axis=-2)


def write_video(frames: np.ndarray, path: str | Path, fps: float = 8.0, scale: int = 1) -> Path:
    """Write uint8 [T, H, W, C] frames (C = 1 or 3) as a video; returns the path actually written.

    A ``.mp4`` path is encoded with ffmpeg when :func:`mp4_available`, else the frames go to the same
    path with a ``.gif`` suffix. ``.gif`` paths are always GIFs. ``scale`` upscales (nearest) first.
    """
    import imageio.v3 as iio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] < 1:
        raise ValueError(f"write_video({path}): frames must be uint8 [T>=1, H, W, 1|3], got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise ValueError(f"write_video({path}): fps must be > 0, got {fps}")
    frames = upscale(frames, scale)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"write_video: {path} must end in .mp4 or .gif")
    if suffix == ".mp4" and not mp4_available():
        path = path.with_suffix(".gif")
        suffix = ".gif"
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        # libx264 wants even sizes: pad by one pixel where needed
        h, w = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        iio.imwrite(path, frames, fps=fps, codec="libx264", plugin="FFMPEG", macro_block_size=1)
    else:
        iio.imwrite(path, frames, duration=1000.0 / fps, loop=0)
    return path
