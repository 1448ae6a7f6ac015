"""Policy choices for SB3 agents on dream observations.

SB3's ``NatureCNN`` (8x8/4, 4x4/2, 3x3/1 convolutions) needs frames of at least 36x36 pixels; the
``cpu-demo`` world model works at 32x32 and the test models at 16x16. :class:`SmallCNN` is the same
three-convolution design with strides scaled down for such frames.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

NATURE_CNN_MIN_SIDE = 36
ALGOS = ("ppo", "a2c", "dqn")


class SmallCNN(BaseFeaturesExtractor):
    """CNN features for small channel-first uint8 images ([C, H, W], 8 <= H, W < 36).

    conv 4x4/2 (32) -> conv 3x3/2 (64) -> conv 3x3/1 pad 1 (64) -> flatten -> linear(features_dim), ReLUs.
    """

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 256, normalized_image: bool = False):
        super().__init__(observation_space, features_dim)
        if not is_image_space(observation_space, check_channels=False, normalized_image=normalized_image):
            raise ValueError(f"SmallCNN needs an image observation space, got {observation_space}")
        c = observation_space.shape[0]
        self.cnn = nn.Sequential(
            nn.Conv2d(c, 32, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.cnn(torch.as_tensor(observation_space.sample()[None]).float()).shape[1]
        self.linear = nn.Sequential(nn.Linear(n_flat, features_dim), nn.ReLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(observations))


class StandardizedFeatures(BaseFeaturesExtractor):
    """Latent observations standardized per dimension: ((obs - mean) / std) clipped to +-``clip``.

    The world model's causal features sit at per-dimension offsets of ~0.5 with a state-dependent spread
    of only ~0.08 (cpu-demo CartPole), so an MLP on the raw vector starts out nearly blind to the state.
    ``mean`` and ``std`` (float [D]) are measured once on dream observations before training
    (:func:`sfv_world.agents.imagination.latent_feature_stats`) and stored with the policy, so the real-env
    evaluation applies exactly the same map.
    """

    def __init__(self, observation_space: gym.spaces.Box, mean: list[float], std: list[float], clip: float = 10.0):
        dim = int(observation_space.shape[0])
        super().__init__(observation_space, dim)
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if observation_space.shape != (dim,) or mean_t.shape != (dim,) or std_t.shape != (dim,):
            raise ValueError(f"StandardizedFeatures: mean {tuple(mean_t.shape)} and std {tuple(std_t.shape)} must "
                             f"match the flat observation space {observation_space.shape}")
        if not bool((std_t > 0).all()):
            raise ValueError("StandardizedFeatures: std must be > 0 in every dimension")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.clip = float(clip)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """observations float [N, D] -> standardized float [N, D]."""
        return ((observations.float() - self.mean) / self.std).clamp(-self.clip, self.clip)


def policy_for(obs_mode: str, observation_space: gym.spaces.Space, policy: str | None = None) -> tuple[str, dict[str, Any]]:
    """(SB3 policy name, policy_kwargs) for an observation mode.

    pixels -> ``CnnPolicy`` (with :class:`SmallCNN` below 36x36 pixels); latent -> ``MlpPolicy``.
    ``policy`` None or ``"auto"`` picks the mode's policy; naming the other one is an error (a CNN cannot
    read feature vectors, and an MLP on raw frames is not what ``pixels`` means here).
    """
    if obs_mode == "pixels":
        name = "CnnPolicy"
        shape = observation_space.shape
        kwargs: dict[str, Any] = {}
        if min(shape[0], shape[1]) < NATURE_CNN_MIN_SIDE:  # HWC before SB3's transpose
            kwargs["features_extractor_class"] = SmallCNN
    elif obs_mode == "latent":
        name, kwargs = "MlpPolicy", {"net_arch": [256, 256]}
    else:
        raise ValueError(f"obs_mode must be 'pixels' or 'latent', got {obs_mode!r}")
    if policy not in (None, "auto", name):
        raise ValueError(f"agent.policy={policy!r} does not fit obs_mode={obs_mode!r} (use {name})")
    return name, kwargs


def algo_class(algo: str):
    """The SB3 class for ``ppo`` / ``a2c`` / ``dqn``."""
    from stable_baselines3 import A2C, DQN, PPO

    table = {"ppo": PPO, "a2c": A2C, "dqn": DQN}
    key = str(algo).lower()
    if key not in table:
        raise ValueError(f"agent.algo must be one of {ALGOS}, got {algo!r}")
    return table[key]


def algo_kwargs(algo: str, n_envs: int, total_timesteps: int) -> dict[str, Any]:
    """Hyper-parameters per algorithm for many parallel, cheap dream envs."""
    key = str(algo).lower()
    if key == "ppo":
        n_steps = max(16, min(128, 8192 // max(1, n_envs)))
        batch = max(32, min(512, (n_steps * n_envs) // 4))
        return {"n_steps": n_steps, "batch_size": batch, "n_epochs": 4, "learning_rate": 2.5e-4,
                "ent_coef": 0.01, "clip_range": 0.1, "gamma": 0.99, "gae_lambda": 0.95}
    if key == "a2c":
        return {"n_steps": 5, "learning_rate": 7e-4, "ent_coef": 0.01}
    if key == "dqn":
        return {"buffer_size": min(100_000, max(1000, total_timesteps)), "learning_starts": min(1000, total_timesteps // 10),
                "train_freq": 4, "target_update_interval": 1000, "exploration_fraction": 0.2,
                "optimize_memory_usage": False}
    raise ValueError(f"agent.algo must be one of {ALGOS}, got {algo!r}")


SCHEDULE_KEYS = ("learning_rate", "clip_range")


def resolve_schedules(kwargs: dict[str, Any]) -> dict[str, Any]:
    """SB3 keyword arguments with ``"lin_<value>"`` strings (rl-zoo's notation) for ``learning_rate`` or
    ``clip_range`` turned into SB3's linear schedule from ``value`` at the start to 0 at the end
    (``stable_baselines3.common.utils.LinearSchedule``). Other values pass through unchanged."""
    from stable_baselines3.common.utils import LinearSchedule

    out = dict(kwargs)
    for key in SCHEDULE_KEYS:
        value = out.get(key)
        if isinstance(value, str):
            try:
                if not value.startswith("lin_"):
                    raise ValueError
                start = float(value[4:])
            except ValueError:
                raise ValueError(f"agent.algo_kwargs.{key}={value!r}: expected a number or 'lin_<number>' "
                                 f"(linear decay to 0), e.g. 'lin_1e-3'") from None
            out[key] = LinearSchedule(start, 0.0, 1.0)
    return out
