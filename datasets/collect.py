"""Record episodes from any Gymnasium env into an sfv-world dataset.

The env is handed in by the caller (``datasets`` never imports ``sfv_world.envs``). Frames come from
``env.render()`` (``frame_source="render"``, the env must use ``render_mode="rgb_array"``) or from the
observations themselves (``frame_source="obs"``, uint8 [H, W, C] or [H, W]), and are area-resized to
``frame_size`` x ``frame_size`` before they are stored and before the policy sees them.

Terminal tails (``terminal_tail=k``): after an episode terminates, the env steps on for k more steps
under the same policy, recorded with ``terminations`` True (their rewards are whatever the env returns;
CartPole gives 0). A world model trained on them sees what follows the end (the pole falling past the
limit), and its termination head learns those frames are terminal. ``metadata["sfv_world"]
["terminal_tail"]`` records k; :func:`sfv_world.datasets.format.live_steps` finds the real end.

Reproducibility: episode i is reset with seed ``seed + i`` and the policy is reset with the same seed,
so the same env, policy and seed give identical arrays.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from sfv_world.datasets.format import EpisodeWriter
from sfv_world.datasets.policies import Policy
from sfv_world.datasets.preprocess import preprocess_frame, to_hwc_uint8

FrameSource = Literal["render", "obs"]


def get_frame(env: gym.Env, obs: Any, frame_source: FrameSource) -> np.ndarray:
    """The raw frame of the current env state: ``env.render()`` or the observation itself."""
    if frame_source == "render":
        frame = env.render()
        if frame is None:
            raise ValueError(f"frame_source='render' but {env} returned no frame from render(); "
                             f"make it with render_mode='rgb_array'")
        return np.asarray(frame)
    if frame_source == "obs":
        arr = np.asarray(obs) if hasattr(obs, "shape") else None
        if arr is None or arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            got = type(obs).__name__ if arr is None else f"{arr.dtype} array of shape {arr.shape}"
            raise ValueError(f"frame_source='obs' needs image observations (uint8 [H, W, C] or [H, W]), got "
                             f"{got} from {env}; use frame_source='render'")
        return arr
    raise ValueError(f"frame_source must be 'render' or 'obs', got {frame_source!r}")


@dataclass
class CollectStats:
    """What :func:`collect` wrote."""

    path: Path
    episodes: int = 0
    transitions: int = 0
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def _env_spec_json(env: gym.Env) -> str | None:
    spec = getattr(env, "spec", None)
    if spec is None:
        return None
    try:
        return spec.to_json()
    except (TypeError, ValueError):
        return None


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return repr(obj)


def _check_collect_args(who: str, envs: list[gym.Env], episodes: int | None, max_frames: int | None,
                        max_episode_steps: int | None, frame_size: int, frame_source: str,
                        terminal_tail: int = 0) -> None:
    """Raise ValueError, naming the argument, for arguments :func:`collect` / :func:`collect_batched` cannot use."""
    if episodes is None and max_frames is None:
        raise ValueError(f"{who}: give episodes or max_frames (or both)")
    if isinstance(terminal_tail, bool) or not isinstance(terminal_tail, (int, np.integer)) or not 0 <= terminal_tail <= 1000:
        raise ValueError(f"{who}: terminal_tail must be an integer number of steps in 0..1000, got {terminal_tail!r}")
    for name, value in (("episodes", episodes), ("max_frames", max_frames),
                        ("max_episode_steps", max_episode_steps)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{who}: {name} must be >= 1, got {value}")
    if int(frame_size) < 1:
        raise ValueError(f"{who}: frame_size must be >= 1, got {frame_size}")
    if frame_source not in ("render", "obs"):
        raise ValueError(f"{who}: frame_source must be 'render' or 'obs', got {frame_source!r}")
    for i, env in enumerate(envs):
        if frame_source == "render" and getattr(env, "render_mode", None) != "rgb_array":
            where = f"{env}" if len(envs) == 1 and who == "collect" else f"envs[{i}]"
            raise ValueError(f"{who}: frame_source='render' needs an env made with render_mode='rgb_array', "
                             f"{where} has render_mode={getattr(env, 'render_mode', None)!r}")


def _step_past_end(env: gym.Env, action: Any) -> tuple[Any, float, bool]:
    """One step of an env that has already terminated (a terminal-tail step): (obs, reward, truncated).
    Gymnasium's "step() after terminated" warning is expected here and silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs, reward, _, truncated, _ = env.step(action)
    return obs, float(reward), bool(truncated)


def _run_episode(env: gym.Env, policy: Policy, seed: int, frame_source: FrameSource, frame_size: int,
                 max_steps: int | None, obs: Any = None, terminal_tail: int = 0) -> dict[str, np.ndarray]:
    """One episode: frames uint8 [T+1, S, S, C], actions [T], rewards, terminations, truncations [T].

    ``obs`` is the observation of an env already reset with ``seed`` (else the env is reset here).
    After a termination the env steps on for up to ``terminal_tail`` more steps (fewer if ``max_steps``
    or the env's own truncation comes first), each recorded with ``terminations`` True.
    """
    if obs is None:
        obs, _ = env.reset(seed=seed)
    policy.reset(seed=seed)
    frame = preprocess_frame(get_frame(env, obs, frame_source), frame_size)
    frames, actions, rewards, terms, truncs = [frame], [], [], [], []
    tail_left = None  # steps left in the terminal tail, once terminated
    while True:
        action = policy(frame)
        if tail_left is None:
            obs, reward, terminated, truncated, _ = env.step(action)
        else:
            obs, reward, truncated = _step_past_end(env, action)
            terminated, tail_left = True, tail_left - 1
        frame = preprocess_frame(get_frame(env, obs, frame_source), frame_size)
        frames.append(frame)
        actions.append(np.asarray(action))
        rewards.append(float(reward))
        capped = max_steps is not None and len(actions) >= max_steps
        terms.append(bool(terminated))
        truncs.append(bool(truncated or capped) and not terminated)
        if terminated and tail_left is None:
            tail_left = int(terminal_tail)
        if truncated or capped or (terminated and tail_left == 0):
            break
    return {"observations": np.stack(frames), "actions": np.stack(actions),
            "rewards": np.asarray(rewards, np.float32), "terminations": np.asarray(terms),
            "truncations": np.asarray(truncs)}


def collect(env: gym.Env, path: str | os.PathLike, policy: Policy, *, episodes: int | None = 100,
            max_frames: int | None = None, frame_size: int = 64, frame_source: FrameSource = "render",
            seed: int = 0, max_episode_steps: int | None = None, env_id: str | None = None,
            overwrite: bool = False, progress: bool = True, terminal_tail: int = 0,
            info: dict[str, Any] | None = None) -> CollectStats:
    """Record episodes from ``env`` with ``policy`` into a new dataset at ``path``.

    Stops after ``episodes`` episodes or ``max_frames`` transitions in total, whichever comes first
    (at least one must be given); an episode cut by ``max_frames`` or ``max_episode_steps`` ends with
    ``truncations[-1] = True``. A terminated episode steps on for ``terminal_tail`` more steps (see the
    module docstring); they count as transitions. Writing is crash-safe (see :class:`EpisodeWriter`).

    Returns a :class:`CollectStats`. ``info`` adds JSON-able facts to ``metadata["sfv_world"]``.
    """
    _check_collect_args("collect", [env], episodes, max_frames, max_episode_steps, frame_size, frame_source,
                        terminal_tail)
    env_id = env_id or (env.spec.id if env.spec is not None else type(env.unwrapped).__name__)

    # the frame shape is known after the first reset, which is episode 0's (ALE reloads its ROM on every
    # seeded reset, ~65 ms: the price of per-episode seeds)
    first_obs, _ = env.reset(seed=seed)
    channels = to_hwc_uint8(get_frame(env, first_obs, frame_source)).shape[-1]
    frame_shape = (int(frame_size), int(frame_size), int(channels))
    meta = {"env_id": env_id, "frame_size": int(frame_size), "frame_source": frame_source,
            "seed": int(seed), "policy": _jsonable(policy.describe()),
            "max_episode_steps": max_episode_steps, "preprocessing": "area_resize",
            "terminal_tail": int(terminal_tail), **(info or {})}
    stats = CollectStats(path=Path(path))
    budget = max_frames if max_frames is not None else float("inf")
    bar = tqdm(total=max_frames if max_frames is not None else episodes,
               unit="frame" if max_frames is not None else "ep", disable=not progress,
               desc=f"collect {env_id}", dynamic_ncols=True)
    with EpisodeWriter(path, action_space=env.action_space, frame_shape=frame_shape, env_id=env_id,
                       env_spec=_env_spec_json(env), info=meta, algorithm_name=policy.name,
                       overwrite=overwrite) as writer, bar:
        while (episodes is None or stats.episodes < episodes) and stats.transitions < budget:
            remaining = budget - stats.transitions
            cap = max_episode_steps
            if remaining != float("inf"):
                cap = int(remaining) if cap is None else min(cap, int(remaining))
            ep_seed = int(seed) + stats.episodes
            ep = _run_episode(env, policy, ep_seed, frame_source, int(frame_size), cap, first_obs,
                              int(terminal_tail))
            first_obs = None
            writer.add_episode(**ep, seed=ep_seed)
            n = len(ep["rewards"])
            stats.episodes += 1
            stats.transitions += n
            stats.returns.append(float(ep["rewards"].sum()))
            stats.lengths.append(n)
            bar.update(n if max_frames is not None else 1)
            bar.set_postfix(episodes=stats.episodes, frames=stats.transitions,
                            mean_return=f"{np.mean(stats.returns):.2f}")
    return stats


# ----------------------------------------------------------------------------------------------
# lock-step collection over N envs (a policy that is cheaper per frame in a batch, e.g. one that runs
# a world model to compute its observations)


@runtime_checkable
class BatchPolicy(Protocol):
    """What :func:`collect_batched` needs from a policy acting on N envs in lock-step.

    Row i of every array belongs to env i. A row whose episode has ended and that starts no new one is
    still passed along (with its last frame) and its action is ignored.
    """

    name: str

    def start(self, rows: np.ndarray, frames: np.ndarray, seeds: list[int]) -> None:
        """Episodes begin in ``rows`` (int64 [R]) at preprocessed frames uint8 [R, H, W, C], episode
        ``seeds`` [R] (re-seed the rows' randomness from them for reproducibility)."""

    def act(self) -> np.ndarray:
        """Actions for every row's current frame: [N] (Discrete) or [N, A] (Box)."""

    def advance(self, frames: np.ndarray, actions: np.ndarray) -> None:
        """Every row took ``actions`` and now shows ``frames`` uint8 [N, H, W, C]."""

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored in the dataset metadata."""


@dataclass
class _Running:
    """An episode in progress in one env row."""

    seed: int
    frames: list[np.ndarray]
    actions: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terms: list[bool] = field(default_factory=list)
    truncs: list[bool] = field(default_factory=list)
    tail_left: int | None = None  # steps left in the terminal tail, once terminated

    def arrays(self) -> dict[str, np.ndarray]:
        return {"observations": np.stack(self.frames), "actions": np.stack(self.actions),
                "rewards": np.asarray(self.rewards, np.float32), "terminations": np.asarray(self.terms),
                "truncations": np.asarray(self.truncs)}


def collect_batched(envs: list[gym.Env], path: str | os.PathLike, policy: BatchPolicy, *,
                    episodes: int | None = 100, max_frames: int | None = None, frame_size: int = 64,
                    frame_source: FrameSource = "render", seed: int = 0, max_episode_steps: int | None = None,
                    env_id: str | None = None, overwrite: bool = False, progress: bool = True,
                    terminal_tail: int = 0, info: dict[str, Any] | None = None) -> CollectStats:
    """Record episodes from N copies of an env stepped in lock-step with one batched ``policy``.

    Same dataset, arguments and stopping rules as :func:`collect`: episode k (in the order episodes
    *start*) is reset with seed ``seed + k``; a row whose episode ends starts the next one while the
    others continue. Episodes are written in the order they end. ``max_frames`` counts the running
    episodes' transitions too: when it is reached every running episode is cut there and stored with
    ``truncations[-1] = True``. ``terminal_tail`` as in :func:`collect`: a terminated row steps on (its
    actions still from ``policy``) before its next episode starts. Results depend on ``len(envs)`` but
    not on timing.
    """
    if not envs:
        raise ValueError("collect_batched: envs is empty")
    _check_collect_args("collect_batched", envs, episodes, max_frames, max_episode_steps, frame_size, frame_source,
                        terminal_tail)
    env0 = envs[0]
    env_id = env_id or (env0.spec.id if env0.spec is not None else type(env0.unwrapped).__name__)
    n_envs = len(envs)
    budget = max_frames if max_frames is not None else float("inf")
    wanted = episodes if episodes is not None else float("inf")
    stats = CollectStats(path=Path(path))
    running: list[_Running | None] = [None] * n_envs
    started = 0

    def begin(rows: list[int]) -> tuple[np.ndarray, list[int]]:
        nonlocal started
        frames, seeds = [], []
        for i in rows:
            obs, _ = envs[i].reset(seed=int(seed) + started)
            frame = preprocess_frame(get_frame(envs[i], obs, frame_source), frame_size)
            running[i] = _Running(int(seed) + started, [frame])
            frames.append(frame)
            seeds.append(int(seed) + started)
            started += 1
        return np.stack(frames), seeds

    first_rows = list(range(int(min(n_envs, wanted))))
    first_frames, first_seeds = begin(first_rows)
    frame_shape = tuple(int(s) for s in first_frames.shape[1:])
    current = np.repeat(first_frames[:1], n_envs, axis=0)  # [N, H, W, C]; rows with no episode repeat row 0
    current[first_rows] = first_frames
    policy.start(np.asarray(first_rows, np.int64), first_frames, first_seeds)
    meta = {"env_id": env_id, "frame_size": int(frame_size), "frame_source": frame_source, "seed": int(seed),
            "policy": _jsonable(policy.describe()), "max_episode_steps": max_episode_steps,
            "preprocessing": "area_resize", "collect_envs": n_envs, "terminal_tail": int(terminal_tail),
            **(info or {})}
    bar = tqdm(total=max_frames if max_frames is not None else episodes,
               unit="frame" if max_frames is not None else "ep", disable=not progress,
               desc=f"collect {env_id} x{n_envs}", dynamic_ncols=True)

    def finish(i: int) -> None:
        ep = running[i]
        running[i] = None
        n = len(ep.actions)
        if n == 0:  # started but never stepped (the frame budget ran out first): nothing to store
            return
        writer.add_episode(**ep.arrays(), seed=ep.seed)
        stats.episodes += 1
        stats.transitions += n
        stats.returns.append(float(np.sum(ep.rewards)))
        stats.lengths.append(n)
        bar.update(n if max_frames is not None else 1)
        bar.set_postfix(episodes=stats.episodes, frames=stats.transitions, mean_return=f"{np.mean(stats.returns):.2f}")

    with EpisodeWriter(path, action_space=env0.action_space, frame_shape=frame_shape, env_id=env_id,
                       env_spec=_env_spec_json(env0), info=meta, algorithm_name=policy.name,
                       overwrite=overwrite) as writer, bar:
        while any(r is not None for r in running):
            held = stats.transitions + sum(len(r.actions) for r in running if r is not None)
            active = [i for i in range(n_envs) if running[i] is not None]
            room = budget - held
            stepping = active[: int(min(len(active), room))]
            actions = np.asarray(policy.act())
            ended: list[int] = []
            for i in stepping:
                ep = running[i]
                if ep.tail_left is None:
                    obs, reward, terminated, truncated, _ = envs[i].step(actions[i])
                else:
                    obs, reward, truncated = _step_past_end(envs[i], actions[i])
                    terminated, ep.tail_left = True, ep.tail_left - 1
                frame = preprocess_frame(get_frame(envs[i], obs, frame_source), frame_size)
                current[i] = frame
                ep.frames.append(frame)
                ep.actions.append(np.asarray(actions[i]))
                ep.rewards.append(float(reward))
                if max_episode_steps is not None and len(ep.actions) >= max_episode_steps:
                    truncated = True
                ep.terms.append(bool(terminated))
                ep.truncs.append(bool(truncated) and not terminated)
                if terminated and ep.tail_left is None:
                    ep.tail_left = int(terminal_tail)
                if truncated or (terminated and ep.tail_left == 0):
                    ended.append(i)
            if held + len(stepping) >= budget:  # the frame budget is spent: cut every running episode here
                for i in active:
                    ep = running[i]
                    if ep.actions and not (ep.terms[-1] or ep.truncs[-1]):
                        ep.truncs[-1] = True
                    finish(i)
                break
            policy.advance(current, actions)
            for i in ended:
                finish(i)
            restart = ended[: int(max(0, min(len(ended), wanted - started)))]
            if restart:
                frames, seeds = begin(restart)
                current[restart] = frames
                policy.start(np.asarray(restart, np.int64), frames, seeds)
    return stats
