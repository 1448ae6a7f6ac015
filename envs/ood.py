"""OOD truncation: end an imagined episode when the world model flags its own rollout (issue 7).

A flagged step is a *truncation*, never a termination: the dream has left the data the model knows, so
the value of the state is unknown, not zero. SB3 then bootstraps from the last observation
(``infos[i]["TimeLimit.truncated"] = True`` with ``infos[i]["terminal_observation"]``).

- :class:`OODTruncation`: ``gymnasium.Wrapper`` for a single env whose ``info`` carries ``ood``
  (``sfv_world/Dream-v0``): ``truncated`` becomes True on a flagged step unless the step terminated.
- :class:`OODTruncationVecEnv`: SB3 ``VecEnvWrapper`` around :class:`~sfv_world.envs.sb3.DreamSB3VecEnv`:
  a flagged, not-yet-done world is ended with SB3's truncation semantics and restarted from a new
  context in the same step (``obs[i]`` is the next episode's first observation).

Both add ``info["ood_truncated"]`` (True on the step they cut) and count cuts in ``.truncations``.
``min_steps`` keeps the first steps of an episode from being cut (the reset context is scored separately,
in the reset info).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class OODTruncation(gym.Wrapper):
    """Truncate a single env's episode on the first step with ``info["ood"]`` (after ``min_steps`` steps)."""

    def __init__(self, env: gym.Env, min_steps: int = 1):
        super().__init__(env)
        if int(min_steps) < 1:
            raise ValueError(f"min_steps must be >= 1, got {min_steps}")
        self.min_steps = int(min_steps)
        self.truncations = 0
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._t = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._t += 1
        if "ood" not in info:
            raise KeyError("OODTruncation needs an env whose step info carries 'ood' (e.g. sfv_world/Dream-v0)")
        cut = bool(info["ood"]) and not terminated and not truncated and self._t >= self.min_steps
        if cut:
            info = dict(info)
            self.truncations += 1
            truncated = True
        info["ood_truncated"] = cut
        return obs, reward, terminated, truncated, info


def _sb3_wrapper_base():
    from stable_baselines3.common.vec_env.base_vec_env import VecEnvWrapper

    return VecEnvWrapper


class OODTruncationVecEnv(_sb3_wrapper_base()):
    """SB3 ``VecEnvWrapper``: end flagged imagined episodes as truncations and restart those worlds.

    venv: a :class:`~sfv_world.envs.sb3.DreamSB3VecEnv` itself (observation-changing wrappers such as
    VecFrameStack go *outside* this one: restarted worlds take ``core.observations``); min_steps: steps an
    episode runs before it may be cut.
    """

    def __init__(self, venv, min_steps: int = 1):
        super().__init__(venv)
        from sfv_world.envs.sb3 import DreamSB3VecEnv

        core = venv.core if isinstance(venv, DreamSB3VecEnv) else None
        if core is None:
            raise TypeError(f"OODTruncationVecEnv wraps a DreamSB3VecEnv (needs its .core), got {type(venv).__name__}")
        if int(min_steps) < 1:
            raise ValueError(f"min_steps must be >= 1, got {min_steps}")
        self.core = core
        self.min_steps = int(min_steps)
        self.truncations = 0
        self._steps = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self) -> np.ndarray:
        self._steps[:] = 0
        return self.venv.reset()

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self._steps += 1
        flagged = np.array([bool(info.get("ood", False)) for info in infos])
        cut = np.flatnonzero(flagged & ~dones & (self._steps >= self.min_steps))
        for info in infos:
            info["ood_truncated"] = False
        if cut.size:
            dones = dones.copy()
            for i in cut:
                infos[i]["terminal_observation"] = obs[i]
                infos[i]["TimeLimit.truncated"] = True
                infos[i]["ood_truncated"] = True
                dones[i] = True
            reset_info = self.core.reset_rows(cut)
            reset_infos = getattr(self.venv, "reset_infos", None)
            if reset_infos is not None:
                for j, i in enumerate(cut):
                    reset_infos[i] = {k: v[j] for k, v in reset_info.items()}
            new_obs = self.core.observations(cut)
            obs = obs.copy()
            obs[cut] = new_obs
            self.truncations += int(cut.size)
        self._steps[dones] = 0
        return obs, rewards, dones, infos
