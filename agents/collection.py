"""Collecting real data with an agent trained in imagination (the DIAMOND-style outer loop).

When a random policy's data do not cover good play, the standard fix is to iterate: collect with the
current policy -> retrain the world model on all data so far -> continue training the agent in the new
dream. :class:`ImaginationAgentPolicy` is the collection policy (the datasets' ``Policy`` protocol: it
receives the frames as the dataset stores them), :func:`merge_datasets` concatenates datasets through
the datasets API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sfv_world.agents.evaluation import ObservationSpec
from sfv_world.envs.wrappers import stack_frames


class ImaginationAgentPolicy:
    """An SB3 policy trained in the dream, acting on stored-size frames, epsilon-greedy.

    Each stored frame (uint8 [S, S, C]) is area-resized to the model's size and turned into the dream's
    observation: the channel stack (first frame repeated at an episode start, like ``FrameStack``) or,
    for ``obs_mode=latent``, the world model's features of the real history (``runtime.observe`` with the
    policy's own previous action).
    """

    name = "sb3-imagination"

    def __init__(self, model, action_space, spec: ObservationSpec, epsilon: float = 0.1, seed: int | None = None,
                 runtime=None, path: str | None = None):
        if not 0.0 <= float(epsilon) <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if spec.obs_mode == "latent" and runtime is None:
            raise ValueError("obs_mode='latent' needs a batch-1 WorldRuntime (runtime=...)")
        self.model, self.action_space, self.spec = model, action_space, spec
        self.epsilon, self.runtime, self.path = float(epsilon), runtime, path
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.action_space.seed(None if seed is None else int(seed))
        self.stack: np.ndarray | None = None
        self.last_action: Any = None

    def observation(self, frame: np.ndarray) -> np.ndarray:
        from sfv_world.datasets import area_resize

        small = frame if frame.shape[0] == self.spec.model_frame_size else area_resize(frame, self.spec.model_frame_size)
        if self.spec.obs_mode == "latent":
            if self.last_action is None:
                return self.runtime.reset(small[None, None], np.zeros((1, 0), np.int64)).features[0]
            return self.runtime.observe(small[None], np.asarray([self.last_action])).features[0]
        if self.stack is None:
            self.stack = np.repeat(small[None], self.spec.frame_stack, axis=0)
        else:
            self.stack = np.concatenate([self.stack[1:], small[None]])
        return stack_frames(self.stack)

    def __call__(self, frame: np.ndarray) -> Any:
        obs = self.observation(frame)
        if self.rng.random() < self.epsilon:
            action = self.action_space.sample()
        else:
            action, _ = self.model.predict(obs, deterministic=True)
            action = np.asarray(action).item() if np.ndim(action) == 0 else np.asarray(action)
        self.last_action = action
        return action

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "epsilon": self.epsilon, "obs_mode": self.spec.obs_mode,
                "frame_stack": self.spec.frame_stack, "model_frame_size": self.spec.model_frame_size}


def merge_datasets(sources: list[str | Path], dest: str | Path, overwrite: bool = False) -> Path:
    """Write one dataset holding every episode of ``sources`` in order (same action space and frame shape)."""
    from sfv_world.datasets import DatasetReader, EpisodeWriter

    if not sources:
        raise ValueError("merge_datasets: no source datasets")
    readers = [DatasetReader(s) for s in sources]
    try:
        first = readers[0]
        for r in readers[1:]:
            if r.action_space != first.action_space or r.frame_shape != first.frame_shape:
                raise ValueError(f"merge_datasets: {r.path} ({r.action_space}, {r.frame_shape}) does not match "
                                 f"{first.path} ({first.action_space}, {first.frame_shape})")
        sfv = first.metadata.get("sfv_world", {})
        with EpisodeWriter(dest, action_space=first.action_space, frame_shape=first.frame_shape,
                           env_id=first.env_id, env_spec=first.metadata.get("env_spec"), overwrite=overwrite,
                           info={"merged_from": [str(r.path) for r in readers],
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
