"""Checkpoints: one ``.pt`` file, written atomically (temp file in the same folder, then ``os.replace``).

Payload (a dict; DESIGN.md section 3):
    format_version  int                      CHECKPOINT_FORMAT
    model_config    dict                     StarFlowVConfig fields (incl. action_kind / action_dim)
    model           dict[str, Tensor]        WorldModel.state_dict() (flow, heads, denoiser)
    dataset         dict                     dataset metadata: action_space (serialised), frame_shape
                                             (H, W, C) of the stored frames, env id, ...
    config          dict                     the resolved run config (hydra, as a plain dict)
    step            int                      optimiser steps taken
    calibration     dict | None              OOD calibration statistics, once computed
    train           dict | None              optimiser / scheduler / RNG / data-position states for resume
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format_version", "model_config", "model", "dataset", "config", "step")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically; a crash mid-write leaves any previous file intact."""
    path = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"refusing to write checkpoint {path}: payload lacks keys {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Raises CheckpointError naming the file for: a missing file, an unreadable/truncated file, missing
    keys, or an unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {e}") from e
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict payload")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks keys {missing}: not an sfv-world checkpoint?")
    if payload["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format_version={payload['format_version']}, "
            f"this sfv-world reads {CHECKPOINT_FORMAT}"
        )
    return payload


def check_model_config(path: str | os.PathLike, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise CheckpointError naming every key whose value differs between two model configs."""
    keys = sorted(set(saved) | set(expected))
    diff = [
        f"{k}: checkpoint={saved.get(k, '<missing>')!r} config={expected.get(k, '<missing>')!r}"
        for k in keys
        if saved.get(k, "<missing>") != expected.get(k, "<missing>")
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was trained with another model config; mismatched keys:\n  " + "\n  ".join(diff)
        )


def build_world_model(payload: dict[str, Any], device: str | torch.device = "cpu", path: str = "<checkpoint>"):
    """Instantiate the WorldModel described by a loaded checkpoint and load its weights (eval mode)."""
    from sfv_world.model import StarFlowVConfig, WorldModel

    config = StarFlowVConfig.from_dict(payload["model_config"])
    model = WorldModel(config)
    result = model.load_state_dict(payload["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: missing={result.missing_keys[:8]} "
            f"unexpected={result.unexpected_keys[:8]}"
        )
    return model.to(device).eval()


def load_world_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a checkpoint file and return ``(WorldModel in eval mode, payload)``."""
    payload = load_checkpoint(path, map_location="cpu")
    return build_world_model(payload, device=device, path=str(path)), payload
