"""Collecting real data with an agent trained in imagination (the DIAMOND-style outer loop).

When a random policy's data do not cover good play, the standard fix is to iterate: collect with the
current policy -> retrain the world model on all data so far -> continue training the agent in the new
dream. :class:`BatchedImaginationAgentPolicy` is the collection policy (the datasets' ``BatchPolicy`` for
``collect_batched``: it receives the frames as the dataset stores them), :func:`merge_datasets`
concatenates datasets through the datasets API.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
from sfv_world.agents.evaluation import ObservationSpec, dataset_crop, dataset_strips
from sfv_world.envs.wrappers import stack_frames


class BatchedImaginationAgentPolicy:
    """An SB3 policy trained in the dream, acting epsilon-greedily in N real envs in lock-step (the datasets'
    ``BatchPolicy``).

    Each stored frame (uint8 [S, S, C]) is area-resized to the model's size and turned into the dream's
    observation: the channel stack (first frame repeated at an episode start, like ``FrameStack``) or,
    for ``obs_mode=latent``, the world model's features of the real history (float32 [N, D]). One
    ``model.predict`` and, for ``obs_mode=latent``, one ``runtime.observe`` per step for all rows
    (``runtime`` must have batch size N); a row that starts an episode is restarted alone
    (``runtime.reset(rows=...)``). Each row's epsilon-greedy draws come from a generator seeded with
    its episode's seed, so collection is reproducible for a given N.
    """

    name = "sb3-imagination"

    def __init__(self, model, action_space, spec: ObservationSpec, n_envs: int, epsilon: float = 0.1,
                 runtime=None, path: str | None = None):
        if not 0.0 <= float(epsilon) <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if int(n_envs) < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        if spec.obs_mode == "latent" and (runtime is None or runtime.batch_size != int(n_envs)):
            got = None if runtime is None else runtime.batch_size
            raise ValueError(f"obs_mode='latent' needs a WorldRuntime of batch size n_envs={n_envs} (runtime=...), "
                             f"got batch size {got}")
        self.model, self.action_space, self.spec = model, action_space, spec
        self.n, self.epsilon, self.runtime, self.path = int(n_envs), float(epsilon), runtime, path
        self.rngs: list[np.random.Generator] = [np.random.default_rng(i) for i in range(self.n)]
        self.spaces = [copy.deepcopy(action_space) for _ in range(self.n)]
        self.obs: np.ndarray | None = None  # [N, ...] the policy's observation of every row
        self.stack: np.ndarray | None = None  # pixels: uint8 [N, S, h, w, C]

    def _small(self, frames: np.ndarray) -> np.ndarray:
        from sfv_world.datasets import area_resize

        size = self.spec.model_frame_size
        return frames if frames.shape[1] == size else area_resize(frames, size)

    def start(self, rows: np.ndarray, frames: np.ndarray, seeds: list[int]) -> None:
        rows = np.asarray(rows, np.int64)
        small = self._small(frames)  # [R, h, w, C]
        for r, s in zip(rows.tolist(), seeds):
            self.rngs[r] = np.random.default_rng(int(s))
            self.spaces[r].seed(int(s))
        if self.spec.obs_mode == "latent":
            empty = np.zeros((len(rows), 0), np.int64)
            if self.obs is None:  # the first start: every world is reset once (rows missing repeat row 0)
                full = np.repeat(small[:1], self.n, axis=0)
                full[rows] = small
                self.obs = self.runtime.reset(full[:, None], np.zeros((self.n, 0), np.int64)).features
            else:
                self.obs[rows] = self.runtime.reset(small[:, None], empty, rows=rows).features
            return
        if self.stack is None:
            self.stack = np.repeat(np.repeat(small[:1], self.n, axis=0)[:, None], self.spec.frame_stack, axis=1)
        self.stack[rows] = np.repeat(small[:, None], self.spec.frame_stack, axis=1)
        self.obs = stack_frames(self.stack)

    def act(self) -> np.ndarray:
        actions, _ = self.model.predict(self.obs, deterministic=True)
        actions = np.array(actions).reshape(self.n, *np.shape(actions)[1:])
        for i in range(self.n):
            if self.rngs[i].random() < self.epsilon:
                actions[i] = self.spaces[i].sample()
        return actions

    def advance(self, frames: np.ndarray, actions: np.ndarray) -> None:
        small = self._small(frames)
        if self.spec.obs_mode == "latent":
            self.obs = self.runtime.observe(small, actions).features
            return
        self.stack = np.concatenate([self.stack[:, 1:], small[:, None]], axis=1)
        self.obs = stack_frames(self.stack)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "epsilon": self.epsilon, "obs_mode": self.spec.obs_mode,
                "frame_stack": self.spec.frame_stack, "model_frame_size": self.spec.model_frame_size,
                "n_envs": self.n}


def merge_datasets(sources: list[str | Path], dest: str | Path, overwrite: bool = False) -> Path:
    """Write one dataset holding every episode of ``sources`` in order (same action space and frame shape)."""
    from sfv_world.datasets import DatasetReader, EpisodeWriter

    if not sources:
        raise ValueError("merge_datasets: no source datasets")
    readers = [DatasetReader(s) for s in sources]
    try:
        first = readers[0]
        crop, strips = dataset_crop(first.metadata), dataset_strips(first.metadata)
        for r in readers[1:]:
            if r.action_space != first.action_space or r.frame_shape != first.frame_shape:
                raise ValueError(f"merge_datasets: {r.path} ({r.action_space}, {r.frame_shape}) does not match "
                                 f"{first.path} ({first.action_space}, {first.frame_shape})")
            view = (dataset_crop(r.metadata), dataset_strips(r.metadata))
            if view != (crop, strips):
                raise ValueError(f"merge_datasets: {r.path} was cut with crop / strips {view}, {first.path} with "
                                 f"{(crop, strips)}: their frames show different views")
        sfv = first.metadata.get("sfv_world", {})
        with EpisodeWriter(dest, action_space=first.action_space, frame_shape=first.frame_shape,
                           env_id=first.env_id, env_spec=first.metadata.get("env_spec"), overwrite=overwrite,
                           info={"merged_from": [str(r.path) for r in readers],
                                 # each source's collect(terminal_tail=k); the data itself marks every tail
                                 "merged_terminal_tails": [int(r.metadata.get("sfv_world", {}).get("terminal_tail", 0))
                                                           for r in readers],
                                 "crop": None if crop is None else list(crop),
                                 "strips": None if strips is None else [list(s) for s in strips],
                                 **{k: v for k, v in sfv.items() if k in ("env_name", "env_kwargs", "frame_source")}}
                           ) as writer:
            for r in readers:
                for eid in r.episode_ids:
                    ep = r.load_episode(eid)
                    writer.add_episode(ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations,
                                       seed=ep.seed)
    finally:
        for r in readers:
            r.close()
    return Path(dest)
