"""Collection policies. A policy is any object with ``reset(seed)`` and ``__call__(frame) -> action``.

``frame`` is the preprocessed frame the dataset stores (uint8 [H, W, C]); the action must be a member
of the env's action space. The collector calls ``reset(seed=...)`` at the start of every episode with
that episode's seed, so a policy that draws its randomness from it makes collection reproducible.
"""

from __future__ import annotations

import copy
import os
from collections import deque
from typing import Any, Protocol, runtime_checkable

import numpy as np
from gymnasium import spaces


@runtime_checkable
class Policy(Protocol):
    """What the collector needs from a policy."""

    name: str

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (re-seed the policy's randomness when ``seed`` is given)."""

    def __call__(self, frame: np.ndarray) -> Any:
        """Action for the current preprocessed frame uint8 [H, W, C]."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored in the dataset metadata."""


class RandomPolicy:
    """Uniformly random actions from (a private copy of) ``action_space``."""

    name = "random"

    def __init__(self, action_space: spaces.Space, seed: int | None = None):
        self.action_space = copy.deepcopy(action_space)
        self.action_space.seed(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.action_space.seed(seed)

    def __call__(self, frame: np.ndarray) -> Any:
        return self.action_space.sample()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class StickyRandomPolicy(RandomPolicy):
    """Random actions that repeat the previous action with probability ``p`` (0 <= p < 1)."""

    name = "sticky"

    def __init__(self, action_space: spaces.Space, p: float = 0.75, seed: int | None = None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"StickyRandomPolicy: p must be in [0, 1), got {p}")
        super().__init__(action_space, seed)
        self.p = float(p)
        self._rng = np.random.default_rng(seed)
        self._last: Any = None

    def reset(self, seed: int | None = None) -> None:
        super().reset(seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._last = None

    def __call__(self, frame: np.ndarray) -> Any:
        if self._last is None or self._rng.random() >= self.p:
            self._last = self.action_space.sample()
        return self._last

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "p": self.p}


SB3_ALGORITHMS = ("PPO", "DQN", "A2C", "SAC", "TD3", "DDPG")


def load_sb3_model(path: str | os.PathLike, algo: str = "auto", device: str = "cpu") -> Any:
    """Load a saved stable-baselines3 model (.zip). ``algo`` names its class (PPO, DQN, ...); "auto"
    tries each of :data:`SB3_ALGORITHMS` in turn."""
    import stable_baselines3 as sb3

    if not os.path.exists(path):
        raise FileNotFoundError(f"policy_path: no saved SB3 model at {path}")
    names = SB3_ALGORITHMS if algo == "auto" else (algo.upper(),)
    errors = []
    for name in names:
        cls = getattr(sb3, name, None)
        if cls is None:
            raise ValueError(f"algo: unknown stable-baselines3 algorithm {algo!r} (known: {', '.join(SB3_ALGORITHMS)})")
        try:
            return cls.load(path, device=device)
        except Exception as e:  # SB3 raises assorted errors for a mismatched class
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise ValueError(f"policy_path: could not load {path} as any of {', '.join(names)}:\n  " + "\n  ".join(errors))


class SB3EpsilonGreedyPolicy:
    """A saved SB3 policy, mixed epsilon-greedily with uniform random actions.

    The model sees the same preprocessed frames as the dataset, uint8 [H, W, C]; with ``frame_stack``
    = k the last k frames are concatenated along the channel axis ([H, W, C*k], zeros before the first
    frame, like SB3's ``VecFrameStack`` with ``channels_order="last"``). SB3 itself transposes HWC to
    the CHW layout a CnnPolicy trained under ``VecTransposeImage`` expects.

    Args:
        path: saved model (.zip); or pass ``model`` directly.
        action_space: the env's action space (for the random actions).
        epsilon: probability of a uniformly random action instead of the model's.
        frame_stack: number of stacked frames the model was trained on.
        deterministic: use the model's deterministic action.
    """

    name = "sb3"

    def __init__(self, path: str | os.PathLike | None, action_space: spaces.Space, epsilon: float = 0.1,
                 frame_stack: int = 1, algo: str = "auto", deterministic: bool = True,
                 device: str = "cpu", seed: int | None = None, model: Any = None):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"SB3EpsilonGreedyPolicy: epsilon must be in [0, 1], got {epsilon}")
        if frame_stack < 1:
            raise ValueError(f"SB3EpsilonGreedyPolicy: frame_stack must be >= 1, got {frame_stack}")
        if model is None and path is None:
            raise ValueError("SB3EpsilonGreedyPolicy: give policy_path (a saved SB3 model) or model")
        self.path = None if path is None else str(path)
        self.model = model if model is not None else load_sb3_model(path, algo, device)
        self.epsilon = float(epsilon)
        self.frame_stack = int(frame_stack)
        self.deterministic = deterministic
        self.random = RandomPolicy(action_space, seed)
        self._rng = np.random.default_rng(seed)
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)

    def reset(self, seed: int | None = None) -> None:
        self.random.reset(seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._frames.clear()

    def observation(self, frame: np.ndarray) -> np.ndarray:
        """Push ``frame`` and return the model input uint8 [H, W, C * frame_stack]."""
        if not self._frames:
            for _ in range(self.frame_stack - 1):
                self._frames.append(np.zeros_like(frame))
        self._frames.append(frame)
        return np.concatenate(list(self._frames), axis=-1) if self.frame_stack > 1 else frame

    def _check_shape(self, obs: np.ndarray) -> None:
        expected = tuple(self.model.observation_space.shape)
        if obs.shape != expected and obs.shape[::-1][:1] + obs.shape[:2] != expected:
            raise ValueError(
                f"SB3EpsilonGreedyPolicy: the model expects observations of shape {expected}, the dataset "
                f"frames stacked {self.frame_stack}x give {obs.shape} (check frame_size and frame_stack)")

    def __call__(self, frame: np.ndarray) -> Any:
        obs = self.observation(frame)
        if self._rng.random() < self.epsilon:
            return self.random(frame)
        self._check_shape(obs)
        action, _ = self.model.predict(obs, deterministic=self.deterministic)
        return action.item() if np.ndim(action) == 0 else action

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "epsilon": self.epsilon,
                "frame_stack": self.frame_stack, "algorithm": type(self.model).__name__,
                "deterministic": self.deterministic}
