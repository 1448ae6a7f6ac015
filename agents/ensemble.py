"""Snapshot ensembles: several saved SB3 policies acting as one.

PPO's policy in the dream swings by tens of real-return points from one update to the next. Averaging
the action distributions of snapshots taken along training (``agent.snapshot_every``) smooths those
swings: :class:`PolicyEnsemble` has SB3's ``predict`` signature, so the real-env evaluation, the
pipeline's data collection and every other consumer of a saved policy use it unchanged.

How members are combined, by the kind of SB3 policy:
- actor-critic (PPO, A2C) with a Discrete action space: the mean of the members' action probabilities;
  ``deterministic`` takes its argmax, otherwise an action is sampled from it;
- DQN: the mean of the members' Q-values, then argmax (``deterministic`` is ignored, as in SB3);
- Box actions: the mean of the members' actions.

On disk an ensemble is ``ensemble.json`` in an agent folder, listing member ``.zip`` files relative to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

MANIFEST = "ensemble.json"


class PolicyEnsemble:
    """``models``: loaded SB3 models with the same observation and action spaces."""

    def __init__(self, models: list[Any], paths: list[str] | None = None, seed: int = 0):
        if not models:
            raise ValueError("PolicyEnsemble needs at least one member")
        first = models[0]
        for i, m in enumerate(models[1:], 1):
            if m.observation_space != first.observation_space or m.action_space != first.action_space:
                raise ValueError(f"ensemble member {i} sees {m.observation_space} / acts in {m.action_space}; member 0 "
                                 f"sees {first.observation_space} / acts in {first.action_space}")
        if not isinstance(first.action_space, (spaces.Discrete, spaces.Box)):
            raise ValueError(f"PolicyEnsemble supports Discrete and Box action spaces, got {first.action_space}")
        self.models, self.paths = list(models), list(paths or [])
        self.observation_space, self.action_space = first.observation_space, first.action_space
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.models)

    def action_probs(self, obs: np.ndarray) -> np.ndarray:
        """Discrete actor-critic members: mean action probabilities of a batch, float32 [N, n_actions]."""
        return self._mean_output(self.models[0].policy.obs_to_tensor(obs)[0])

    def _mean_output(self, t: torch.Tensor) -> np.ndarray:
        """Preprocessed observations [N, ...] -> the members' mean action probabilities (actor-critic) or
        mean Q-values (DQN), float32 [N, n_actions]."""
        with torch.no_grad():
            if hasattr(self.models[0].policy, "q_net"):
                out = sum(m.policy.q_net(t) for m in self.models)
            else:
                out = sum(m.policy.get_distribution(t).distribution.probs for m in self.models)
        return (out / len(self.models)).cpu().numpy()

    def predict(self, observation: np.ndarray, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        """SB3's ``predict``: a batch of observations [N, ...] -> actions [N] (Discrete) or [N, A] (Box); one
        observation -> one action. Observations are preprocessed as SB3 does (channel order, batching)."""
        if isinstance(self.action_space, spaces.Box):
            return np.mean([m.predict(observation, deterministic=deterministic)[0] for m in self.models], axis=0), None
        t, vectorized = self.models[0].policy.obs_to_tensor(observation)  # [N, ...], N = 1 for one observation
        out = self._mean_output(t)
        if deterministic or hasattr(self.models[0].policy, "q_net"):
            actions = out.argmax(-1)
        else:  # sample from the mean distribution
            cum = out.cumsum(-1)
            u = self.rng.random((len(out), 1)) * cum[:, -1:]
            actions = np.minimum((u > cum).sum(-1), out.shape[1] - 1)
        return (actions if vectorized else actions[0]), None

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/ensemble.json`` listing the members (relative to ``folder`` where possible)."""
        folder = Path(folder)
        if len(self.paths) != len(self.models):
            raise ValueError("PolicyEnsemble.save needs the members' paths (build it with load_ensemble)")
        members = []
        for p in self.paths:
            p = Path(p)
            try:
                members.append(str(p.resolve().relative_to(folder.resolve())))
            except ValueError:
                members.append(str(p))
        path = folder / MANIFEST
        path.write_text(json.dumps({"members": members, "combine": "mean action distribution"}, indent=1))
        return path


def load_ensemble(paths: list[str | Path], algo_cls, device: str = "cpu") -> PolicyEnsemble:
    """Load each ``.zip`` in ``paths`` with ``algo_cls`` (an SB3 class) into one ensemble."""
    return PolicyEnsemble([algo_cls.load(p, device=device) for p in paths], [str(p) for p in paths])


def load_agent_policy(folder: str | Path, algo_cls, device: str = "cpu"):
    """An agent folder's policy: the ensemble of ``ensemble.json`` if there is one, else ``policy.zip``."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            members = json.loads(manifest.read_text())["members"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}: not an ensemble manifest ({e})") from e
        paths = [p if Path(p).is_absolute() else folder / p for p in members]
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"{manifest}: member files missing: {', '.join(missing)}")
        return load_ensemble(paths, algo_cls, device)
    path = folder / "policy.zip"
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no policy.zip (or {MANIFEST}); train the agent first")
    return algo_cls.load(path, device=device)
