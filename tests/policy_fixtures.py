"""A saved (random-init) SB3 policy on the tiny dream's observations, for play and rollout tests."""

from __future__ import annotations

from pathlib import Path


def save_tiny_policy(checkpoint: Path, path: Path, frame_stack: int = 1) -> Path:
    """PPO with an MlpPolicy on ``sfv_world/Dream-v0`` pixels (``frame_stack`` frames), saved to ``path``."""
    import gymnasium as gym
    import sfv_world.envs  # noqa: F401  (registers the dream)
    from stable_baselines3 import PPO

    env = gym.make("sfv_world/Dream-v0", checkpoint=str(checkpoint), horizon=20, frame_stack=frame_stack)
    model = PPO("MlpPolicy", env, n_steps=8, batch_size=8, seed=0, device="cpu")
    model.save(path)
    env.close()
    return Path(path)
