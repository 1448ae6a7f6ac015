"""``sfv-world inspect <dataset>``: summarise a dataset and write a contact sheet of sample frames.

Prints episodes, transitions and frames, frame size, the action histogram, return and length
statistics, and how episodes ended; writes a PNG grid of frames sampled evenly through the dataset.
Reading validates the structure of every episode and the values of every action/reward/flag.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from omegaconf import DictConfig

from sfv_world.datasets import DatasetError, DatasetReader


def action_histogram(actions: np.ndarray, space: spaces.Space) -> dict[str, Any]:
    """Discrete: counts per action; MultiDiscrete: counts per dimension; Box: per-dimension stats."""
    if isinstance(space, spaces.Discrete):
        counts = np.bincount(actions - space.start, minlength=space.n)
        return {int(space.start + a): int(c) for a, c in enumerate(counts)}
    if isinstance(space, spaces.MultiDiscrete):
        flat_start = space.start.reshape(-1)
        return {f"dim{d}": np.bincount(actions[:, d] - flat_start[d], minlength=int(n)).tolist()
                for d, n in enumerate(space.nvec.reshape(-1))}
    return {f"dim{d}": {"mean": float(actions[:, d].mean()), "std": float(actions[:, d].std()),
                        "min": float(actions[:, d].min()), "max": float(actions[:, d].max())}
            for d in range(actions.shape[1])}


def summarise(reader: DatasetReader) -> dict[str, Any]:
    """Statistics of a dataset (loads and validates all actions/rewards, no frames)."""
    eps = [reader.load_episode(e, observations=False) for e in reader.episode_ids]
    returns = np.array([float(ep.rewards.sum()) for ep in eps]) if eps else np.zeros(0)
    lengths = np.array([len(ep) for ep in eps]) if eps else np.zeros(0, int)
    actions = np.concatenate([ep.actions for ep in eps]) if eps else np.zeros((0,), np.int64)
    sfv = reader.metadata.get("sfv_world", {})

    def stats(x: np.ndarray) -> dict[str, float]:
        if not x.size:
            return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
        return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}

    size_mb = sum(p.stat().st_size for p in Path(reader.path).rglob("*") if p.is_file()) / 1e6
    data_mb = reader.data_file.stat().st_size / 1e6
    h, w, c = reader.frame_shape
    return {
        "path": str(reader.path),
        "complete": reader.complete,
        "env_id": reader.env_id,
        "policy": sfv.get("policy"),
        "seed": sfv.get("seed"),
        "episodes": reader.num_episodes,
        "transitions": reader.num_transitions,
        "frames": reader.num_frames,
        "frame_shape": list(reader.frame_shape),
        "action_space": str(reader.action_space),
        "action_histogram": action_histogram(actions, reader.action_space) if eps else {},
        "returns": stats(returns),
        "lengths": stats(lengths.astype(float)),
        "terminated": int(sum(bool(ep.terminations[-1]) for ep in eps)),
        "truncated": int(sum(bool(ep.truncations[-1]) for ep in eps)),
        "size_mb": round(size_mb, 2),
        "compression_ratio": round(reader.num_frames * h * w * c / 1e6 / data_mb, 1) if data_mb else None,
    }


def format_summary(s: dict[str, Any]) -> str:
    r, ln = s["returns"], s["lengths"]
    hist = s["action_histogram"]
    total = max(sum(hist.values()), 1) if hist and all(isinstance(v, int) for v in hist.values()) else None
    if total:
        hist_txt = "  ".join(f"{a}: {n} ({100 * n / total:.0f}%)" for a, n in hist.items())
    else:
        hist_txt = str(hist)
    lines = [
        f"dataset      {s['path']}{'' if s['complete'] else '  (PARTIAL: interrupted collection)'}",
        f"env          {s['env_id']}   policy {s['policy']}   seed {s['seed']}",
        f"episodes     {s['episodes']}   transitions {s['transitions']}   frames {s['frames']}",
        f"frame size   {s['frame_shape'][0]}x{s['frame_shape'][1]}x{s['frame_shape'][2]} (H x W x C, uint8)",
        f"actions      {s['action_space']}   {hist_txt}",
        f"returns      mean {r['mean']:.3f}  std {r['std']:.3f}  min {r['min']:.3f}  max {r['max']:.3f}",
        f"lengths      mean {ln['mean']:.1f}  min {ln['min']:.0f}  max {ln['max']:.0f}   "
        f"ended: {s['terminated']} terminated, {s['truncated']} truncated",
        f"on disk      {s['size_mb']} MB (main_data.hdf5 {s['compression_ratio']}x smaller than raw frames)",
    ]
    return "\n".join(lines)


def sample_frames(reader: DatasetReader, n: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``n`` frames evenly spaced through the dataset: uint8 [n, H, W, C] and their (episode, t)."""
    if reader.num_episodes == 0 or n < 1:
        return np.zeros((0, *reader.frame_shape), np.uint8), []
    offsets = np.cumsum([0] + [reader.episode_lengths[e] + 1 for e in reader.episode_ids])
    picks = np.linspace(0, offsets[-1] - 1, num=min(n, int(offsets[-1]))).round().astype(int)
    where = []
    for g in picks:
        k = int(np.searchsorted(offsets, g, side="right") - 1)
        where.append((reader.episode_ids[k], int(g - offsets[k])))
    frames = np.stack([reader.read_frames(e, t, t + 1)[0] for e, t in where])
    return frames, where


def contact_sheet(frames: np.ndarray, scale: int = 2, pad: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, C] frames into one RGB image uint8 [rows*(H*scale+pad)+pad, ..., 3]."""
    n, h, w, c = frames.shape
    if c == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[..., :3].repeat(scale, axis=1).repeat(scale, axis=2)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    hh, ww = h * scale, w * scale
    sheet = np.full((rows * (hh + pad) + pad, cols * (ww + pad) + pad, 3), 40, np.uint8)
    for i, f in enumerate(frames):
        r, q = divmod(i, cols)
        y, x = pad + r * (hh + pad), pad + q * (ww + pad)
        sheet[y : y + hh, x : x + ww] = f
    return sheet


def inspect_dataset(path: str | Path, sheet_path: str | Path | None = None, samples: int = 16) -> dict[str, Any]:
    """Summarise the dataset at ``path``, write its contact sheet, return the summary dict."""
    from PIL import Image

    with DatasetReader(path) as reader:
        summary = summarise(reader)
        frames, where = sample_frames(reader, samples)
    sheet_path = Path(sheet_path) if sheet_path else Path(reader.path) / "contact_sheet.png"
    if len(frames):
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(contact_sheet(frames)).save(sheet_path)
        summary["contact_sheet"] = str(sheet_path)
        summary["contact_sheet_frames"] = where
    return summary


def run(cfg: DictConfig) -> int:
    path = cfg.inspect.path
    try:
        summary = inspect_dataset(path, cfg.inspect.get("contact_sheet"), int(cfg.inspect.get("samples", 16)))
    except DatasetError as e:
        raise SystemExit(f"sfv-world inspect: {e}") from e
    print(format_summary(summary))
    if "contact_sheet" in summary:
        print(f"contact sheet {summary['contact_sheet']} ({len(summary['contact_sheet_frames'])} frames)")
    return 0
