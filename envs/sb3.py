"""The dream as a stable-baselines3 ``VecEnv``: N worlds, one batched model call per step.

SB3's contract (``stable_baselines3.common.vec_env.VecEnv``):
- ``reset()`` returns observations only; per-env seeds/options set by ``seed()``/``set_options()`` apply
  at the next ``reset()`` and reset infos go to ``self.reset_infos``;
- ``step_wait()`` returns ``(obs, rewards float32 [N], dones bool [N], infos list[dict])``;
- a finished env is reset inside the same step: ``obs[i]`` is already the first observation of the
  next episode, ``infos[i]["terminal_observation"]`` is the last one, and
  ``infos[i]["TimeLimit.truncated"]`` is True when the episode ended by the horizon, not by termination.
Every ``infos[i]`` also carries ``log_likelihood`` (bits/dim), ``jacobi_iterations``, ``termination_logit``, ``out_of_range``,
``ood_score`` and ``ood``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from sfv_world.envs.dream import DreamCore
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvStepReturn,
)


class DreamSB3VecEnv(VecEnv):
    """SB3 ``VecEnv`` over a :class:`~sfv_world.envs.dream.DreamCore` (same arguments as ``DreamCore``)."""

    def __init__(self, checkpoint: str | Path | None = None, num_envs: int = 1, render_mode: str | None = None,
                 **kwargs: Any):
        if render_mode is not None and render_mode != "rgb_array":
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.core = DreamCore(checkpoint, num_envs=num_envs, **kwargs)
        self.render_mode = render_mode
        self._actions: np.ndarray | None = None
        self._seeded = False
        super().__init__(self.core.num_envs, self.core.observation_space, self.core.action_space)

    @property
    def runtime(self):
        return self.core.runtime

    # -- SB3 VecEnv API ------------------------------------------------------------------------------

    def reset(self) -> np.ndarray:
        seed = next((s for s in self._seeds if s is not None), None)
        if seed is not None:
            self.core.seed(int(seed))
        elif not self._seeded:
            self.core.seed(int(np.random.default_rng().integers(0, 2**62)))
        self._seeded = True
        options = self._options[0] if self._options and self._options[0] else None
        info = self.core.reset_rows(np.arange(self.num_envs), options)
        self.reset_infos = [{k: v[i] for k, v in info.items()} for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return self.core.observations()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = self.core.validate_actions(actions, name="DreamSB3VecEnv.step: actions")

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("DreamSB3VecEnv.step_wait called without step_async")
        obs, rewards, terminated, truncated, info = self.core.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        infos: list[dict[str, Any]] = [
            {"log_likelihood": float(info["log_likelihood"][i]), "jacobi_iterations": int(info["jacobi_iterations"][i]),
             "termination_logit": float(info["termination_logit"][i]),
             "out_of_range": bool(info["out_of_range"][i]),
             "ood_score": float(info["ood_score"][i]), "ood": bool(info["ood"][i])}
            for i in range(self.num_envs)
        ]
        done_rows = np.flatnonzero(dones)
        if done_rows.size:
            for i in done_rows:
                infos[i]["terminal_observation"] = obs[i]
                infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            reset_info = self.core.reset_rows(done_rows)
            for j, i in enumerate(done_rows):
                self.reset_infos[i] = {k: v[j] for k, v in reset_info.items()}
            obs = self.core.observations()
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        pass

    def get_images(self) -> Sequence[np.ndarray | None]:
        return list(self.core.frames())

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Attributes of the (shared) dream: the same value for every index."""
        if attr_name == "render_mode":
            value = self.render_mode
        elif hasattr(self.core, attr_name):
            value = getattr(self.core, attr_name)
        else:
            value = getattr(self, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if indices is not None and sorted(self._indices(indices)) != list(range(self.num_envs)):
            raise ValueError("DreamSB3VecEnv shares one core: set_attr applies to all envs (indices=None)")
        setattr(self.core, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        method = getattr(self.core, method_name)
        result = method(*method_args, **method_kwargs)
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._indices(indices)]
