"""``sfv-world collect env=<preset> [collect.*=...] [dataset=<folder>]``: record a dataset.

Builds the real env of ``cfg.env`` (``sfv_world.envs.sources``), the policy of ``cfg.collect.policy``
and runs the collector. Refuses to replace an existing dataset unless ``collect.overwrite=true``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
from omegaconf import DictConfig, OmegaConf

from sfv_world.datasets import RandomPolicy, SB3EpsilonGreedyPolicy, StickyRandomPolicy, collect, partial_path_for
from sfv_world.datasets.policies import Policy

POLICIES = ("random", "sticky", "sb3")


def make_policy(ccfg: Any, action_space: gym.spaces.Space, seed: int) -> Policy:
    """The collection policy named by ``collect.policy``."""
    name = ccfg.policy
    if name == "random":
        return RandomPolicy(action_space, seed=seed)
    if name == "sticky":
        return StickyRandomPolicy(action_space, p=float(ccfg.sticky_p), seed=seed)
    if name == "sb3":
        if not ccfg.get("policy_path"):
            raise SystemExit("sfv-world collect: collect.policy=sb3 needs collect.policy_path=<saved model .zip>")
        return SB3EpsilonGreedyPolicy(ccfg.policy_path, action_space, epsilon=float(ccfg.epsilon),
                                      frame_stack=int(ccfg.get("frame_stack", 1)),
                                      algo=str(ccfg.get("algo", "auto")), seed=seed)
    raise SystemExit(f"sfv-world collect: collect.policy must be one of {', '.join(POLICIES)}, got {name!r}")


class _StopRequest:
    """Ctrl-C and SIGTERM for the collector: raise KeyboardInterrupt now, and again at the next env step.

    Python runs a signal handler between two bytecodes of the main thread, which can fall inside a weakref
    callback or a ``__del__``; an exception raised there is printed as "Exception ignored" and dropped, and
    the collector would go on for ever. The flag makes the next ``step``/``reset`` raise again
    (:class:`_StopWhenAsked`), so one signal always stops the run.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum
        raise KeyboardInterrupt(f"signal {signum}")


class _StopWhenAsked(gym.Wrapper):
    """Raises KeyboardInterrupt from ``step``/``reset`` once ``request`` has seen a signal."""

    def __init__(self, env: gym.Env, request: _StopRequest) -> None:
        super().__init__(env)
        self.request = request

    def _check(self) -> None:
        if self.request.signum is not None:
            raise KeyboardInterrupt(f"signal {self.request.signum}")

    def step(self, action):
        self._check()
        return self.env.step(action)

    def reset(self, **kwargs):
        self._check()
        return self.env.reset(**kwargs)


def run(cfg: DictConfig) -> int:
    """Collect a dataset. SIGTERM is handled like Ctrl-C: finished episodes stay readable.

    The handlers are installed before the env exists on purpose: SDL (pygame, used by rendering
    envs such as CartPole) takes over SIGTERM when it is still at its default disposition, and then
    turns it into a quit event nobody reads, so ``kill`` would not stop the collector.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _run(cfg, None)
    request = _StopRequest()
    # a signal the parent set to ignored (`nohup`, `make test &` without job control) stays ignored
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        return _run(cfg, request)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def crop_list(env_cfg) -> list[int] | None:
    """The env config's crop box as a plain list (stored in the dataset's metadata), or None."""
    from sfv_world.envs.sources import check_crop

    box = check_crop(OmegaConf.select(env_cfg, "crop", default=None))
    return None if box is None else list(box)


def strips_list(env_cfg) -> list[list[int]] | None:
    """The env config's column strips as plain lists (stored in the dataset's metadata), or None."""
    from sfv_world.envs.sources import check_strips

    cut = check_strips(OmegaConf.select(env_cfg, "strips", default=None))
    return None if cut is None else [list(s) for s in cut]


def terminal_tail_steps(cfg) -> int:
    """Steps to record after a termination: ``collect.terminal_tail``, or where that is null the env
    config's ``terminal_tail`` (0 when neither is set). A non-integer raises ValueError naming the key."""
    for key in ("collect.terminal_tail", "env.terminal_tail"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer number of steps, got {value!r}")
        return value
    return 0


def _run(cfg: DictConfig, request: _StopRequest | None) -> int:
    from sfv_world.apps.inspect import format_summary, summarise
    from sfv_world.datasets import DatasetReader
    from sfv_world.envs.sources import make_source_env

    ccfg = cfg.collect
    path = Path(cfg.dataset)
    overwrite = bool(ccfg.overwrite)
    if path.exists() and not overwrite:
        raise SystemExit(f"sfv-world collect: dataset {path} already exists; pass collect.overwrite=true to replace it")
    if partial_path_for(path).exists() and not overwrite:
        raise SystemExit(f"sfv-world collect: {partial_path_for(path)} holds an interrupted collection; inspect it "
                         f"with `sfv-world inspect {partial_path_for(path)}`, delete it, or pass collect.overwrite=true")
    env = make_source_env(cfg.env)
    if request is not None:
        env = _StopWhenAsked(env, request)
    try:
        policy = make_policy(ccfg, env.action_space, int(cfg.seed))
        episodes = ccfg.episodes
        max_frames = ccfg.max_frames
        collect(env, path, policy,
                episodes=None if episodes is None else int(episodes),
                max_frames=None if max_frames is None else int(max_frames),
                frame_size=int(ccfg.frame_size), frame_source=cfg.env.frame_source, seed=int(cfg.seed),
                max_episode_steps=None if ccfg.max_episode_steps is None else int(ccfg.max_episode_steps),
                env_id=cfg.env.id, overwrite=overwrite, progress=bool(ccfg.get("progress", True)),
                terminal_tail=terminal_tail_steps(cfg),
                info={"env_name": cfg.env.name,
                      "env_kwargs": OmegaConf.to_container(cfg.env.kwargs, resolve=True) if cfg.env.kwargs else {},
                      "crop": crop_list(cfg.env), "strips": strips_list(cfg.env)})
    except KeyboardInterrupt:
        partial = partial_path_for(path)
        n = DatasetReader(partial).num_episodes if partial.exists() else 0
        print(f"\nsfv-world collect: interrupted; {n} finished episode(s) are readable in {partial} "
              f"(`sfv-world inspect {partial}`); {path} was not created", file=sys.stderr)
        return 130
    finally:
        env.close()
    with DatasetReader(path) as reader:
        print(format_summary(summarise(reader)))
    return 0
