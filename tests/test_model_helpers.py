"""Shared helpers for the model-core tests (tiny configs, random non-zero heads). No tests here."""
from __future__ import annotations

import torch
import yaml
from pathlib import Path

from sfv_world.model import StarFlowVConfig, WorldModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def tiny_config(**overrides) -> StarFlowVConfig:
    """configs/model/tiny.yaml (16x16, p=4 -> 4x4 tokens of d=48) with discrete actions (n=3)."""
    d = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    d.update(action_kind="discrete", action_dim=3)
    d.update(overrides)
    return StarFlowVConfig.from_dict(d)


def randomize_heads(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give every zero-initialised output head (flow W_out, denoiser proj_out) random weights."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "proj_out" in name:
            with torch.no_grad():
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def random_model(dtype=torch.float64, seed: int = 0, std: float = 0.05, **overrides) -> WorldModel:
    torch.manual_seed(seed)
    m = WorldModel(tiny_config(**overrides)).to(dtype)
    randomize_heads(m, std, seed)
    return m.eval()


def random_clip(cfg: StarFlowVConfig, B: int = 2, T: int = 3, dtype=torch.float64, seed: int = 1):
    """x_tilde [B,T,C,H,W] ~ 0.5 N(0,1) and discrete actions [B,T-1]."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(B, T, cfg.channels, cfg.frame_size, cfg.frame_size, generator=g, dtype=torch.float64)
    a = torch.randint(0, cfg.action_dim, (B, T - 1), generator=g)
    return x.to(dtype), a
