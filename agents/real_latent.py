"""The real environment seen through the world model's features: an SB3 ``VecEnv`` for the latent oracle.

A latent agent trained in the dream sees the world model's causal features of *dreamed* frames; in the
real env it sees the same features of *real* frames (:func:`sfv_world.agents.evaluation.evaluate_real`).
:class:`RealLatentVecEnv` lets an agent learn from the second directly: N real pixel envs in lock-step, each
real frame appended to a batched :class:`~sfv_world.world.WorldRuntime` (one cached forward pass per step
for all rows, no inversion), and the observation is the newest frame's features, float32 [D].

Training there costs real frames, so it is not a way to meet a real-frame budget. It is the upper bound
of the dream route: the same observation, recipe and step count with perfect physics
(``benchmarks/latent_oracle.py``). SB3's auto-reset contract holds as in the dream's VecEnv:
``terminal_observation`` and ``TimeLimit.truncated`` in the infos of a finished row, which restarts alone.

Every step's infos also carry the world model's ``termination_logit`` on the real frame (as the dream's do,
so ``TerminationPenaltyVecEnv`` applies unchanged) and the real env's own info. With ``termination_threshold``
the dream's termination rule is added to the real one: an episode also ends once the head's probability on the
real frame passes the threshold (``info["head_terminated"]``), which isolates the head's part in the dream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from sfv_world.agents.evaluation import ObservationSpec, make_real_pixel_env
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn


class RealLatentVecEnv(VecEnv):
    """N real envs whose observations are a world model's latent features of the real frames.

    env_cfg: the real env's config (its crop must match the runtime's dataset: ``spec.check_env``);
    runtime: a ``WorldRuntime`` of batch size N (its ``features`` setting picks mean or slot features);
    horizon: truncate an episode after this many steps (None: only the env's own time limit);
    termination_threshold: also terminate when sigmoid(termination logit) of the real frame passes this, in (0, 1)
    (None: only the real env terminates).
    Episode k of row i (counted over the run) uses seed ``seed() + i + N * k``, so a seeded run is reproducible.
    """

    def __init__(self, env_cfg: Any, runtime, horizon: int | None = None, termination_threshold: float | None = None):
        spec = ObservationSpec.from_runtime(runtime, "latent", 1)
        spec.check_env(env_cfg)
        if horizon is not None and int(horizon) < 1:
            raise ValueError(f"RealLatentVecEnv: horizon must be >= 1 or None, got {horizon}")
        if termination_threshold is not None and not 0.0 < float(termination_threshold) < 1.0:
            raise ValueError(f"RealLatentVecEnv: termination_threshold must be in (0, 1) or None, "
                             f"got {termination_threshold}")
        self.termination_threshold = None if termination_threshold is None else float(termination_threshold)
        n = int(runtime.batch_size)
        self.runtime, self.horizon = runtime, None if horizon is None else int(horizon)
        self.envs = [make_real_pixel_env(env_cfg, dataclasses.replace(spec, frame_stack=1)) for _ in range(n)]
        self.frames: np.ndarray | None = None  # uint8 [N, h, w, C]: the newest real frame of every row
        self.lengths = np.zeros(n, dtype=np.int64)
        self.episodes = np.zeros(n, dtype=np.int64)  # episodes started per row (seeds)
        self.base_seed = 0
        self._actions: np.ndarray | None = None
        dim = runtime.feature_dim
        space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        super().__init__(n, space, self.envs[0].action_space)

    def _start(self, rows: np.ndarray) -> np.ndarray:
        """Reset the real envs of ``rows`` int64 [R] and the runtime's rows; returns their features float32 [R, D]."""
        frames = np.stack([self.envs[i].reset(seed=int(self.base_seed + i + self.num_envs * self.episodes[i]))[0]
                           for i in rows])
        self.episodes[rows] += 1
        self.lengths[rows] = 0
        empty = np.zeros((len(rows), 0), dtype=np.int64)
        if self.frames is None:
            self.frames = frames
            return self.runtime.reset(frames[:, None], empty).features
        self.frames[rows] = frames
        return self.runtime.reset(frames[:, None], empty, rows=rows).features  # [R, D]

    # -- SB3 VecEnv API ------------------------------------------------------------------------------

    def reset(self) -> np.ndarray:
        seed = next((s for s in self._seeds if s is not None), None)
        if seed is not None:
            self.base_seed = int(seed)
            self.runtime.seed(int(seed))
            self.episodes[:] = 0
        self.frames = None
        obs = self._start(np.arange(self.num_envs))
        self.reset_infos = [{} for _ in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs.astype(np.float32)

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions).reshape(self.num_envs, *np.shape(actions)[1:])
        for i, a in enumerate(actions):
            if not self.action_space.contains(a.item() if a.ndim == 0 else a):
                raise ValueError(f"RealLatentVecEnv.step: actions[{i}] = {a.tolist()!r} is not in {self.action_space}")
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("RealLatentVecEnv.step_wait called without step_async")
        if self.frames is None:
            raise RuntimeError("RealLatentVecEnv.step before reset")
        actions, self._actions = self._actions, None
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float32)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        infos: list[dict[str, Any]] = []
        for i, env in enumerate(self.envs):
            frame, r, term, trunc, info = env.step(actions[i])
            self.frames[i] = frame
            rewards[i], terminated[i], truncated[i] = float(r), bool(term), bool(trunc)
            infos.append(dict(info))
        self.lengths += 1
        if self.horizon is not None:
            truncated |= self.lengths >= self.horizon
        seen = self.runtime.observe(self.frames, actions)
        obs = seen.features.astype(np.float32)  # [N, D]
        head = np.zeros(n, dtype=bool)
        if self.termination_threshold is not None:
            head = seen.termination_prob > self.termination_threshold
            terminated |= head
        truncated &= ~terminated
        for i in range(n):
            infos[i]["termination_logit"] = float(seen.termination_logit[i])
            infos[i]["head_terminated"] = bool(head[i])
        dones = terminated | truncated
        rows = np.flatnonzero(dones)
        for i in rows:
            infos[i]["terminal_observation"] = obs[i].copy()
            infos[i]["TimeLimit.truncated"] = bool(truncated[i])
        if rows.size:
            obs[rows] = self._start(rows)
        return obs, rewards, dones, infos

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        """The newest real frame of every row (the model's size), uint8 [h, w, C]; None before reset."""
        return [None] * self.num_envs if self.frames is None else list(self.frames)

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.envs[i], attr_name) for i in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for i in self._indices(indices):
            setattr(self.envs[i], attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        return [getattr(self.envs[i], method_name)(*method_args, **method_kwargs) for i in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        from stable_baselines3.common import env_util

        return [env_util.is_wrapped(self.envs[i], wrapper_class) for i in self._indices(indices)]
