"""Real source environments (CartPole pixels, ALE Atari, MiniGrid) and the pixel-observation wrapper.

``make_source_env(cfg.env)`` builds the env a config names (``configs/env/*.yaml``: ``id``,
``frame_source``, ``kwargs``, optional ``action_subset`` and ``crop``); the apps layer hands it to the collector.
``PixelObservation`` turns any env into one whose observations are exactly the frames a dataset stores
(same frame source, same ``area_resize``), so agents evaluated in the real env see dream-like inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sfv_world.datasets.collect import FrameSource, get_frame
from sfv_world.datasets.preprocess import preprocess_frame

# MiniGrid's first three actions (turn left, turn right, move forward) are the ones that matter in
# the navigation envs; pickup/drop/toggle/done do nothing there.
MINIGRID_NAVIGATION_ACTIONS = (0, 1, 2)


class ActionSubset(gym.ActionWrapper, gym.utils.RecordConstructorArgs):
    """Expose only some actions of a Discrete env: action i of Discrete(len(subset)) -> subset[i].

    Its arguments are recorded in ``env.spec`` (so a dataset's ``env_spec`` can rebuild the env).
    """

    def __init__(self, env: gym.Env, subset: Sequence[int]):
        gym.utils.RecordConstructorArgs.__init__(self, subset=[int(a) for a in subset])
        gym.ActionWrapper.__init__(self, env)
        if not isinstance(env.action_space, spaces.Discrete):
            raise ValueError(f"action_subset needs a Discrete action space, {env} has {env.action_space}")
        base = env.action_space
        subset = [int(a) for a in subset]
        bad = [a for a in subset if not base.contains(np.int64(a))]
        if not subset or bad or len(set(subset)) != len(subset):
            raise ValueError(f"action_subset {subset} must be distinct actions of {base}")
        self.subset = subset
        self.action_space = spaces.Discrete(len(subset))

    def action(self, action: Any) -> int:
        return self.subset[int(action)]


def check_crop(crop: Any, name: str = "env.crop") -> tuple[int, int, int, int] | None:
    """Validate a crop box ``[top, bottom, left, right]`` (pixel bounds, bottom/right exclusive) or None."""
    crop = _plain(crop)
    if crop is None:
        return None
    try:
        box = tuple(int(v) for v in crop)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be [top, bottom, left, right] pixel bounds, got {crop!r}") from None
    if len(box) != 4 or box[0] < 0 or box[2] < 0 or box[1] <= box[0] or box[3] <= box[2]:
        raise ValueError(f"{name} must be [top, bottom, left, right] with 0 <= top < bottom and "
                         f"0 <= left < right, got {list(crop)}")
    return box  # type: ignore[return-value]


class CropFrame(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Crop the env's frames to the box ``[top, bottom, left, right]`` of the raw image (before any resize).

    With ``frame_source="render"`` it crops what ``render()`` returns; with ``"obs"`` the image
    observations (and ``observation_space``). CartPole's render is 400 x 600 and the cart and pole live
    in rows ~160-320, so cropping those rows gives the pole ~2.5x the rows of the full frame at the same
    stored size. A box larger than the frame is an error that names it.
    """

    def __init__(self, env: gym.Env, crop: Sequence[int], frame_source: FrameSource = "render"):
        box = check_crop(crop, "CropFrame crop")
        gym.utils.RecordConstructorArgs.__init__(self, crop=list(box), frame_source=frame_source)
        gym.Wrapper.__init__(self, env)
        if frame_source not in ("render", "obs"):
            raise ValueError(f"frame_source must be 'render' or 'obs', got {frame_source!r}")
        self.crop, self.frame_source = box, frame_source
        if frame_source == "obs":
            space = env.observation_space
            if not (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3)):
                raise ValueError(f"CropFrame(frame_source='obs') needs uint8 image observations, got {space}")
            self._check(space.shape)
            top, bottom, left, right = box
            shape = (bottom - top, right - left, *space.shape[2:])
            self.observation_space = spaces.Box(0, 255, shape, np.uint8)

    def _check(self, shape: tuple[int, ...]) -> None:
        _, bottom, _, right = self.crop
        if bottom > shape[0] or right > shape[1]:
            raise ValueError(f"env.crop {list(self.crop)} lies outside the {shape[0]}x{shape[1]} frame of {self.env}")

    def _cut(self, frame: Any) -> np.ndarray:
        frame = np.asarray(frame)
        self._check(frame.shape)
        top, bottom, left, right = self.crop
        return np.ascontiguousarray(frame[top:bottom, left:right])

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return (self._cut(obs) if self.frame_source == "obs" else obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return (self._cut(obs) if self.frame_source == "obs" else obs), reward, terminated, truncated, info

    def render(self):
        frame = self.env.render()
        if self.frame_source != "render" or frame is None or np.asarray(frame).ndim < 2:
            return frame
        return self._cut(frame)


class PixelObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Observations become the dataset's frames: uint8 [frame_size, frame_size, C].

    ``frame_source="render"`` takes ``env.render()`` (the env needs ``render_mode="rgb_array"``);
    ``"obs"`` takes the image observation itself. Both are area-resized like the collector does.
    """

    def __init__(self, env: gym.Env, frame_size: int = 64, frame_source: FrameSource = "render"):
        gym.utils.RecordConstructorArgs.__init__(self, frame_size=int(frame_size), frame_source=frame_source)
        gym.ObservationWrapper.__init__(self, env)
        if frame_source not in ("render", "obs"):
            raise ValueError(f"frame_source must be 'render' or 'obs', got {frame_source!r}")
        if frame_source == "render" and env.render_mode != "rgb_array":
            raise ValueError(f"PixelObservation(frame_source='render') needs render_mode='rgb_array', "
                             f"{env} has render_mode={env.render_mode!r}")
        self.frame_size = int(frame_size)
        self.frame_source: FrameSource = frame_source
        channels = self._channels(env.observation_space) if frame_source == "obs" else 3
        self.observation_space = spaces.Box(0, 255, (self.frame_size, self.frame_size, channels), np.uint8)

    @staticmethod
    def _channels(space: spaces.Space) -> int:
        if not (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3)):
            raise ValueError(f"frame_source='obs' needs uint8 image observations, got {space}")
        return 1 if len(space.shape) == 2 else int(space.shape[2])

    def observation(self, observation: Any) -> np.ndarray:
        return preprocess_frame(get_frame(self.env, observation, self.frame_source), self.frame_size)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _plain(obj: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return obj


def make_source_env(env_cfg: Any, *, render_mode: str | None = None) -> gym.Env:
    """Build the real env of an env config (``configs/env/*.yaml`` or any mapping).

    Keys: ``id`` (gymnasium id), ``frame_source`` ("render" | "obs"), ``kwargs`` (passed to
    ``gym.make``), optional ``action_subset`` (list of Discrete actions to keep) and
    ``max_episode_steps``, optional ``crop`` ([top, bottom, left, right] of the raw frame, see
    :class:`CropFrame`). ALE ids (``ALE/...``) register ale-py's envs; MiniGrid ids register
    minigrid's and default to the three navigation actions. With ``frame_source="render"`` the env is
    made with ``render_mode="rgb_array"`` unless ``render_mode`` says otherwise.
    """
    env_id = _get(env_cfg, "id")
    if not env_id:
        raise ValueError(f"env config has no 'id': {env_cfg!r}")
    frame_source = _get(env_cfg, "frame_source", "render")
    if frame_source not in ("render", "obs"):
        raise ValueError(f"env.frame_source must be 'render' or 'obs', got {frame_source!r}")
    kwargs = dict(_plain(_get(env_cfg, "kwargs")) or {})
    action_subset = _plain(_get(env_cfg, "action_subset"))
    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    if env_id.startswith("MiniGrid"):
        import minigrid

        gym.register_envs(minigrid)
        if action_subset is None:
            action_subset = list(MINIGRID_NAVIGATION_ACTIONS)
    render_mode = render_mode or kwargs.pop("render_mode", None)
    if render_mode is None and frame_source == "render":
        render_mode = "rgb_array"
    max_steps = _get(env_cfg, "max_episode_steps")
    if max_steps is not None:
        kwargs["max_episode_steps"] = int(max_steps)
    env = gym.make(env_id, render_mode=render_mode, **kwargs)
    if action_subset is not None:
        env = ActionSubset(env, action_subset)
    crop = check_crop(_get(env_cfg, "crop"))
    if crop is not None:
        env = CropFrame(env, crop, frame_source)
    return env


def make_pixel_env(env_cfg: Any, frame_size: int = 64) -> PixelObservation:
    """``make_source_env`` wrapped in ``PixelObservation``: observations as the dataset stores them."""
    return PixelObservation(make_source_env(env_cfg), frame_size, _get(env_cfg, "frame_source", "render"))
