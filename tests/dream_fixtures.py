"""Tiny world-model checkpoints for the world/env/agent tests (no pretrained weights, no training).

``make_tiny_dataset`` writes a small synthetic dataset through the datasets API (a bright square that
an action moves left or right on 16x16 frames, Discrete(2) actions) and ``make_tiny_checkpoint``
saves a randomly initialised tiny ``WorldModel`` (configs/model/tiny.yaml) trained on nothing, with
its zero-initialised output layers perturbed so that the flow is not the identity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from gymnasium import spaces

REPO = Path(__file__).resolve().parents[1]


def tiny_model_config(frame_size: int | None = None, **overrides) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text())
    if frame_size is not None:
        cfg["frame_size"] = frame_size
    cfg.update(action_kind="discrete", action_dim=2)
    cfg.update(overrides)
    return cfg


def make_tiny_dataset(path: Path, episodes: int = 6, length: int = 12, frame_size: int = 16, seed: int = 0) -> Path:
    """A dataset of ``episodes`` episodes of ``length`` transitions of a moving square."""
    from sfv_world.datasets import EpisodeWriter

    rng = np.random.default_rng(seed)
    with EpisodeWriter(path, action_space=spaces.Discrete(2), frame_shape=(frame_size, frame_size, 3),
                       env_id="TinySquare-v0") as writer:
        for _ in range(episodes):
            pos = int(rng.integers(2, frame_size - 6))
            frames, actions = [], []
            for t in range(length + 1):
                f = np.full((frame_size, frame_size, 3), 30, np.uint8)
                f[frame_size // 2 - 2 : frame_size // 2 + 2, pos : pos + 4] = (250, 200, 40)
                frames.append(f)
                if t < length:
                    a = int(rng.integers(0, 2))
                    actions.append(a)
                    pos = int(np.clip(pos + (1 if a else -1), 0, frame_size - 4))
            terms = np.zeros(length, bool)
            terms[-1] = True
            writer.add_episode(np.stack(frames), np.asarray(actions, np.int64), np.ones(length, np.float32),
                               terms, np.zeros(length, bool))
    return path


def make_tiny_checkpoint(path: Path, dataset: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                         model_overrides: dict | None = None, sampler: dict | None = None,
                         termination_bias: float | None = None) -> Path:
    """Save a random-init tiny WorldModel checkpoint whose dataset metadata points at ``dataset``.

    ``termination_bias`` (e.g. -20) pins the termination head's logit low, so that episodes end only
    by truncation (long rollouts, learning tests).
    """
    from sfv_world.datasets import DatasetReader

    from sfv_world.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from sfv_world.model import StarFlowVConfig, WorldModel

    torch.manual_seed(seed)
    reader = DatasetReader(dataset)
    config = StarFlowVConfig.from_dict(tiny_model_config(**(model_overrides or {})))
    model = WorldModel(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and bool((p == 0).all()):
                p.normal_(0.0, 0.05)
        if termination_bias is not None:
            model.flow.heads.termination.weight.zero_()
            model.flow.heads.termination.bias.fill_(termination_bias)
    ids = list(reader.episode_ids)
    payload = {
        "format_version": CHECKPOINT_FORMAT,
        "model_config": config.to_dict(),
        "model": model.state_dict(),
        "dataset": {**reader.metadata, "path": str(reader.path),
                    "splits": {"train": ids[:-1], "val": ids[-1:], "test": []}},
        "config": {"sampler": {"method": "jacobi", "block_size_first": 4, "block_size": 16, "threshold": 1e-3,
                               "max_iter": 8, "warm_start": True, "cfg": 0.0, "temperature": 1.0,
                               "denoise": True,
                               # an untrained model's frames are noise far outside the data's range: no
                               # bound, so the env tests see the horizon (the bound's own tests set it)
                               "bound_sigmas": 0.0, **(sampler or {})}},
        "step": 0,
        "calibration": None,
    }
    reader.close()
    return save_checkpoint(path, payload)
