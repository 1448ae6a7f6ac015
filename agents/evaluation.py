"""Real-env evaluation with exactly the dream's observations.

A real episode is seen through the dataset's preprocessing (``PixelObservation``: same frame source,
same ``area_resize`` to the stored size), then area-resized to the world model's frame size, then either
channel-stacked (``obs_mode=pixels``, :class:`~sfv_world.envs.wrappers.FrameStack` layout) or replaced by
the world model's causal features of the real history (``obs_mode=latent``, teacher forcing through a
:class:`~sfv_world.world.WorldRuntime`). :func:`evaluate_real` runs N episodes in lock-step so that the
policy and the world model are called once per step for all of them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from sfv_world.envs.sources import check_crop, check_strips, make_pixel_env
from sfv_world.envs.wrappers import FrameStack, ResizeObservation, stack_frames


@dataclass
class ObservationSpec:
    """What an agent sees: obs_mode, frame sizes (stored by the dataset, used by the model), stack."""

    obs_mode: str
    stored_frame_size: int
    model_frame_size: int
    frame_stack: int = 1
    crop: tuple[int, int, int, int] | None = None  # the dataset's crop box of the raw frame (env.crop)
    strips: tuple[tuple[int, int], ...] | None = None  # its column strips of the crop (env.strips)

    @classmethod
    def from_meta(cls, dataset_meta: dict, model_frame_size: int, obs_mode: str, frame_stack: int) -> ObservationSpec:
        """The spec of a world model trained on a dataset with metadata ``dataset_meta`` (its frame size,
        crop and strips under ``"sfv_world"``) at ``model_frame_size``."""
        meta = dataset_meta.get("sfv_world") or {}
        stored = meta.get("frame_shape") or [model_frame_size]
        return cls(obs_mode, int(stored[0]), int(model_frame_size), int(frame_stack), dataset_crop(dataset_meta),
                   dataset_strips(dataset_meta))

    @classmethod
    def from_runtime(cls, runtime, obs_mode: str, frame_stack: int) -> ObservationSpec:
        return cls.from_meta(runtime.dataset_meta, int(runtime.frame_shape[0]), obs_mode, frame_stack)

    def check_env(self, env_cfg: Any) -> None:
        """Raise if the real env config would crop (or strip) its frames differently from the world model's data."""
        get = env_cfg.get if hasattr(env_cfg, "get") else lambda k, d=None: getattr(env_cfg, k, d)
        crop = check_crop(get("crop"))
        if crop != self.crop:
            raise ValueError(f"env.crop={None if crop is None else list(crop)} but the world model's dataset was "
                             f"collected with crop {None if self.crop is None else list(self.crop)}: the real env "
                             f"would show the agent other frames; pass env.crop={self._override(self.crop)}")
        strips = check_strips(get("strips"))
        if strips != self.strips:
            raise ValueError(f"env.strips={self._override(strips)} but the world model's dataset was collected "
                             f"with strips {self._override(self.strips)}: the real env would show the agent other "
                             f"frames; pass env.strips={self._override(self.strips)}")

    def view_config(self) -> dict[str, Any]:
        """The env-config keys that reproduce the dataset's view: {"crop": list | None, "strips": list | None}."""
        return {"crop": None if self.crop is None else list(self.crop),
                "strips": None if self.strips is None else [list(s) for s in self.strips]}

    @staticmethod
    def _override(value: Any) -> str:
        return "null" if value is None else json.dumps(value, separators=(",", ":"))


def _env_spec_crop_kwargs(dataset_meta: dict) -> dict | None:
    """The ``CropFrame`` wrapper's kwargs recorded in a dataset's ``env_spec``, or None."""
    spec = dataset_meta.get("env_spec")
    try:
        wrappers = json.loads(spec).get("additional_wrappers", []) if isinstance(spec, str) else []
    except (ValueError, AttributeError):
        wrappers = []
    for w in wrappers:
        if isinstance(w, dict) and w.get("name") == "CropFrame":
            return w.get("kwargs") or {}
    return None


def dataset_crop(dataset_meta: dict) -> tuple[int, int, int, int] | None:
    """The crop box a dataset's frames were cut with: ``metadata["sfv_world"]["crop"]``, or for datasets
    written before that field, the ``CropFrame`` wrapper recorded in its ``env_spec``; None: no crop."""
    meta = dataset_meta.get("sfv_world") or {}
    if "crop" in meta:
        return check_crop(meta["crop"], "the dataset's crop")
    kwargs = _env_spec_crop_kwargs(dataset_meta)
    return None if kwargs is None else check_crop(kwargs.get("crop"), "the dataset's env_spec crop")


def dataset_strips(dataset_meta: dict) -> tuple[tuple[int, int], ...] | None:
    """The column strips of a dataset's crop (``metadata["sfv_world"]["strips"]``, else the ``CropFrame``
    wrapper in its ``env_spec``); None: the crop is not cut into strips."""
    meta = dataset_meta.get("sfv_world") or {}
    if "strips" in meta:
        return check_strips(meta["strips"], name="the dataset's strips")
    kwargs = _env_spec_crop_kwargs(dataset_meta)
    return None if kwargs is None else check_strips(kwargs.get("strips"), name="the dataset's env_spec strips")


def make_real_pixel_env(env_cfg: Any, spec: ObservationSpec) -> gym.Env:
    """The real env with dream-identical pixel observations: uint8 [h, w, C * frame_stack]."""
    spec.check_env(env_cfg)
    env: gym.Env = ResizeObservation(make_pixel_env(env_cfg, spec.stored_frame_size), spec.model_frame_size)
    if spec.frame_stack > 1:
        env = FrameStack(env, spec.frame_stack)
    return env


@dataclass
class EvalResult:
    """Returns and lengths of N real episodes."""

    returns: np.ndarray  # float64 [N]
    lengths: np.ndarray  # int64 [N]
    ends: list[Any] | None = None  # describe_end(env) of each episode as it ended (None: still running / not asked)

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
    describe_end: Callable[[gym.Env], Any] | None = None,
) -> EvalResult:
    """Run ``episodes`` real episodes (seeds ``seed + i``) with an SB3 ``policy`` in lock-step.

    ``runtime_factory(batch_size) -> WorldRuntime`` is required for ``obs_mode=latent``: every real
    frame is appended to the runtime (``observe``) and the policy sees the resulting features.
    ``describe_end(env)``, where given, is called on each episode's env as the episode ends (before it is
    closed) and its results go to ``EvalResult.ends`` (why episodes end: ``benchmarks/real_failures.py``).
    """
    n = int(episodes)
    if n < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    single = dataclasses.replace(spec, frame_stack=1)  # frames are stacked here, for all episodes at once
    envs = [make_real_pixel_env(env_cfg, single) for _ in range(n)]
    frames = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])  # [N, h, w, C]
    returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
    ends: list[Any] | None = [None] * n if describe_end is not None else None
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
                    if ends is not None:
                        ends[i] = describe_end(envs[i])
            if runtime is not None:
                obs = runtime.observe(frames, actions).features
            else:
                stack = np.concatenate([stack[:, 1:], frames[:, None]], axis=1)
                obs = stack_frames(stack)
    finally:
        for env in envs:
            env.close()
    return EvalResult(returns, lengths, ends)
