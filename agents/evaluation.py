"""Real-env evaluation with exactly the dream's observations.

A real episode is seen through the dataset's preprocessing (``PixelObservation``: same frame source,
same ``area_resize`` to the stored size), then area-resized to the world model's frame size, then either
channel-stacked (``obs_mode=pixels``, :class:`~sfv_world.envs.wrappers.FrameStack` layout) or replaced by
the world model's causal features of the real history (``obs_mode=latent``, teacher forcing through a
:class:`~sfv_world.world.WorldRuntime`). :func:`evaluate_real` runs N episodes in lock-step so that the
policy and the world model are called once per step for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from sfv_world.envs.sources import make_pixel_env
from sfv_world.envs.wrappers import FrameStack, ResizeObservation, stack_frames


@dataclass
class ObservationSpec:
    """What an agent sees: obs_mode, frame sizes (stored by the dataset, used by the model), stack."""

    obs_mode: str
    stored_frame_size: int
    model_frame_size: int
    frame_stack: int = 1

    @classmethod
    def from_runtime(cls, runtime, obs_mode: str, frame_stack: int) -> ObservationSpec:
        stored = runtime.dataset_meta.get("sfv_world", {}).get("frame_shape") or [runtime.frame_shape[0]]
        return cls(obs_mode, int(stored[0]), int(runtime.frame_shape[0]), int(frame_stack))


def make_real_pixel_env(env_cfg: Any, spec: ObservationSpec) -> gym.Env:
    """The real env with dream-identical pixel observations: uint8 [h, w, C * frame_stack]."""
    env: gym.Env = ResizeObservation(make_pixel_env(env_cfg, spec.stored_frame_size), spec.model_frame_size)
    if spec.frame_stack > 1:
        env = FrameStack(env, spec.frame_stack)
    return env


@dataclass
class EvalResult:
    """Returns and lengths of N real episodes."""

    returns: np.ndarray  # float64 [N]
    lengths: np.ndarray  # int64 [N]

    @property
    def mean(self) -> float:
        return float(self.returns.mean())

    @property
    def std(self) -> float:
        return float(self.returns.std())

    def as_dict(self) -> dict[str, Any]:
        return {"return_mean": self.mean, "return_std": self.std, "length_mean": float(self.lengths.mean()),
                "returns": self.returns.round(3).tolist(), "episodes": int(self.returns.size)}


def evaluate_real(
    policy,
    env_cfg: Any,
    spec: ObservationSpec,
    episodes: int = 20,
    seed: int = 10_000,
    runtime_factory=None,
    deterministic: bool = True,
    max_steps: int = 100_000,
) -> EvalResult:
    """Run ``episodes`` real episodes (seeds ``seed + i``) with an SB3 ``policy`` in lock-step.

    ``runtime_factory(batch_size) -> WorldRuntime`` is required for ``obs_mode=latent``: every real
    frame is appended to the runtime (``observe``) and the policy sees the resulting features.
    """
    n = int(episodes)
    if n < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    envs = [ResizeObservation(make_pixel_env(env_cfg, spec.stored_frame_size), spec.model_frame_size) for _ in range(n)]
    frames = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])  # [N, h, w, C]
    returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    runtime = None
    if spec.obs_mode == "latent":
        if runtime_factory is None:
            raise ValueError("obs_mode='latent' evaluation needs runtime_factory (a WorldRuntime per batch size)")
        runtime = runtime_factory(n)
        runtime.seed(seed)
        empty = np.zeros((n, 0), dtype=np.int64)
        obs = runtime.reset(frames[:, None], empty).features
    elif spec.obs_mode == "pixels":
        stack = np.repeat(frames[:, None], spec.frame_stack, axis=1)  # [N, S, h, w, C], reset repeats
        obs = stack_frames(stack)
    else:
        raise ValueError(f"obs_mode must be 'pixels' or 'latent', got {spec.obs_mode!r}")
    try:
        for _ in range(max_steps):
            if not active.any():
                break
            actions, _ = policy.predict(obs, deterministic=deterministic)
            actions = np.asarray(actions).reshape(n, *np.shape(actions)[1:])
            for i in np.flatnonzero(active):
                f, r, term, trunc, _ = envs[i].step(actions[i])
                frames[i] = f
                returns[i] += float(r)
                lengths[i] += 1
                if term or trunc:
                    active[i] = False
            if runtime is not None:
                obs = runtime.observe(frames, actions).features
            else:
                stack = np.concatenate([stack[:, 1:], frames[:, None]], axis=1)
                obs = stack_frames(stack)
    finally:
        for env in envs:
            env.close()
    return EvalResult(returns, lengths)
