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


def check_strips(strips: Any, width: int | None = None, name: str = "env.strips") -> tuple[tuple[int, int], ...] | None:
    """Validate column strips ``[[left, right], ...]`` (right exclusive, columns of the cropped
    frame) or None. Two or more strips of one width; ``width``, when known, bounds them."""
    strips = _plain(strips)
    if strips is None:
        return None
    try:
        out = tuple((int(a), int(b)) for a, b in strips)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of [left, right] column ranges, got {strips!r}") from None
    if len(out) < 2 or any(a < 0 or b <= a for a, b in out):
        raise ValueError(f"{name} must be two or more [left, right] ranges with 0 <= left < right, got {strips!r}")
    if len({b - a for a, b in out}) != 1:
        raise ValueError(f"{name} must be ranges of one width (they are stacked top to bottom), got {strips!r}")
    if width is not None and max(b for _, b in out) > width:
        raise ValueError(f"{name} {[list(s) for s in out]} reaches past the {width} columns of the (cropped) frame")
    return out


def stack_strips(frame: np.ndarray, strips: Sequence[tuple[int, int]]) -> np.ndarray:
    """uint8 [H, W(, C)] -> [len(strips) * H, w(, C)]: the column ranges ``strips`` stacked top to bottom."""
    return np.ascontiguousarray(np.concatenate([frame[:, a:b] for a, b in strips], axis=0))


class CropFrame(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Crop the env's frames to the box ``[top, bottom, left, right]`` of the raw image (before any resize).

    With ``frame_source="render"`` it crops what ``render()`` returns; with ``"obs"`` the image
    observations (and ``observation_space``). CartPole's render is 400 x 600 and the cart and pole live
    in rows ~160-320, so cropping those rows gives the pole ~2.5x the rows of the full frame at the same
    stored size. A box larger than the frame is an error that names it.

    ``strips`` (optional, ``[[left, right], ...]`` columns of the cropped frame, one width) cuts a wide crop
    into column strips stacked top to bottom, so a square stored frame keeps more of its width: CartPole's
    160 x 600 crop as the strips [0, 360) and [240, 600) becomes 320 x 360, and a 32-pixel model frame gets
    11.25 raw columns per pixel instead of 18.75. Overlapping strips keep the cart whole in one of them.
    """

    def __init__(self, env: gym.Env, crop: Sequence[int], frame_source: FrameSource = "render",
                 strips: Sequence[Sequence[int]] | None = None):
        box = check_crop(crop, "CropFrame crop")
        cut = check_strips(strips, box[3] - box[2], "CropFrame strips")
        gym.utils.RecordConstructorArgs.__init__(self, crop=list(box), frame_source=frame_source,
                                                 strips=None if cut is None else [list(s) for s in cut])
        gym.Wrapper.__init__(self, env)
        if frame_source not in ("render", "obs"):
            raise ValueError(f"frame_source must be 'render' or 'obs', got {frame_source!r}")
        self.crop, self.strips, self.frame_source = box, cut, frame_source
        if frame_source == "obs":
            space = env.observation_space
            if not (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) in (2, 3)):
                raise ValueError(f"CropFrame(frame_source='obs') needs uint8 image observations, got {space}")
            self._check(space.shape)
            top, bottom, left, right = box
            shape = (bottom - top, right - left) if cut is None else (
                (bottom - top) * len(cut), cut[0][1] - cut[0][0])
            self.observation_space = spaces.Box(0, 255, (*shape, *space.shape[2:]), np.uint8)

    def _check(self, shape: tuple[int, ...]) -> None:
        _, bottom, _, right = self.crop
        if bottom > shape[0] or right > shape[1]:
            raise ValueError(f"env.crop {list(self.crop)} lies outside the {shape[0]}x{shape[1]} frame of {self.env}")

    def _cut(self, frame: Any) -> np.ndarray:
        frame = np.asarray(frame)
        self._check(frame.shape)
        top, bottom, left, right = self.crop
        frame = frame[top:bottom, left:right]
        return np.ascontiguousarray(frame) if self.strips is None else stack_strips(frame, self.strips)

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
    ``max_episode_steps``, optional ``crop`` ([top, bottom, left, right] of the raw frame) and ``strips``
    (column ranges of the crop stacked top to bottom; see :class:`CropFrame`). ALE ids (``ALE/...``)
    register ale-py's envs; MiniGrid ids register minigrid's and default to the three navigation actions. With ``frame_source="render"`` the env is
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
    strips = check_strips(_get(env_cfg, "strips"), None if crop is None else crop[3] - crop[2])
    if strips is not None and crop is None:
        raise ValueError(f"env.strips={[list(s) for s in strips]} needs env.crop (the strips are columns of the crop)")
    if crop is not None:
        env = CropFrame(env, crop, frame_source, strips)
    return env


def make_pixel_env(env_cfg: Any, frame_size: int = 64) -> PixelObservation:
    """``make_source_env`` wrapped in ``PixelObservation``: observations as the dataset stores them."""
    return PixelObservation(make_source_env(env_cfg), frame_size, _get(env_cfg, "frame_source", "render"))
