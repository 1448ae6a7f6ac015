"""Observation wrappers shared by the dream and the real envs, so both see exactly the same input.

- :func:`stack_frames` / :class:`FrameStack`: the frame stack of the dream env, channels-last
  (``[H, W, S*C]``, oldest frame first), which is what SB3's ``CnnPolicy`` expects.
- :class:`ResizeObservation`: area-resize uint8 HWC frames to the world model's frame size.
- :class:`LatentObservation`: replace each real frame by the world model's causal feature vector,
  computed by teacher-forcing the real history through a :class:`~sfv_world.world.WorldRuntime`
  (the same computation the dream uses for its own frames).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def stack_frames(frames: np.ndarray) -> np.ndarray:
    """uint8 ``[..., S, H, W, C]`` -> uint8 ``[..., H, W, S*C]`` (oldest frame in the first channels)."""
    *lead, s, h, w, c = frames.shape
    moved = np.moveaxis(frames, -4, -2)  # [..., H, W, S, C]
    return np.ascontiguousarray(moved.reshape(*lead, h, w, s * c))


def stacked_frame_space(height: int, width: int, channels: int, stack: int) -> spaces.Box:
    """The observation space of ``stack`` channel-stacked uint8 frames: Box(0, 255, [H, W, stack*C])."""
    return spaces.Box(0, 255, shape=(height, width, channels * stack), dtype=np.uint8)


class FrameStack(gym.ObservationWrapper):
    """Channel-stack the last ``stack`` uint8 HWC frames; at reset the first frame is repeated.

    Observation: uint8 ``[H, W, stack*C]``, oldest first (identical layout to ``DreamEnv(frame_stack=...)``).
    """

    def __init__(self, env: gym.Env, stack: int):
        super().__init__(env)
        if stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        space = env.observation_space
        if not (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3):
            raise ValueError(f"FrameStack needs a uint8 HWC Box observation space, got {space}")
        h, w, c = space.shape
        self.stack = int(stack)
        self.observation_space = stacked_frame_space(h, w, c, self.stack)
        self._frames = np.zeros((self.stack, h, w, c), dtype=np.uint8)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._frames[:] = obs
        return stack_frames(self._frames), info

    def observation(self, observation: np.ndarray) -> np.ndarray:
        self._frames = np.roll(self._frames, -1, axis=0)
        self._frames[-1] = observation
        return stack_frames(self._frames)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.observation(obs), reward, terminated, truncated, info


class ResizeObservation(gym.ObservationWrapper):
    """Area-resize uint8 HWC frames to ``size x size`` with the datasets' ``area_resize`` (integer factor)."""

    def __init__(self, env: gym.Env, size: int):
        super().__init__(env)
        space = env.observation_space
        if not (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3):
            raise ValueError(f"ResizeObservation needs a uint8 HWC Box observation space, got {space}")
        self.size = int(size)
        self.observation_space = spaces.Box(0, 255, shape=(self.size, self.size, space.shape[2]), dtype=np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        from sfv_world.datasets import area_resize

        if observation.shape[0] == self.size and observation.shape[1] == self.size:
            return observation
        return area_resize(observation, self.size)


class LatentObservation(gym.Wrapper):
    """Real env -> the world model's causal features of the real history (``obs_mode=latent``).

    Wraps an env whose observations are uint8 HWC frames at the world model's frame size. Each new real
    frame is appended to a batch-1 :class:`~sfv_world.world.WorldRuntime` by teacher forcing
    (``runtime.observe``): the KV cache then holds the real history, and the observation is the feature
    vector the dream would have produced for that frame. Observation: float32 ``[D]``.

    ``info`` gains ``log_likelihood`` (bits/dim of the real frame under the model).
    """

    def __init__(self, env: gym.Env, runtime):
        super().__init__(env)
        if runtime.batch_size != 1:
            raise ValueError(f"LatentObservation needs a runtime with batch_size=1, got {runtime.batch_size}")
        self.runtime = runtime
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(runtime.feature_dim,), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        out = self.runtime.reset(obs[None, None], np.zeros((1, 0), dtype=np.int64))
        info = dict(info)
        info["log_likelihood"] = float(out.log_likelihood[0, -1])
        return out.features[0].astype(np.float32), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        out = self.runtime.observe(obs[None], np.asarray([action]))
        info = dict(info)
        info["log_likelihood"] = float(out.log_likelihood[0])
        return out.features[0].astype(np.float32), reward, terminated, truncated, info
