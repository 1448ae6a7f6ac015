"""Dream fidelity for control: do dreamed episodes end when real ones do, under the same open-loop policies?

A world model can predict the next frame well and still be useless to an agent: if pushing one way never
ends a dreamed episode, the agent learns nothing about balance. Measured on CartPole (benchmarks/results/
dream_fidelity_*.md): models whose always-left dreams lasted 17.8 steps (real 9.4) gave agents of 161-171,
models whose dreams lasted 95-103 gave 36-74, with the same open-loop prediction quality.

For a ``Discrete(n)`` action space the policies are ``random`` (uniform) and ``always_<a>`` for each action
``a``; each runs ``episodes`` episodes in the real env (from seeded resets, never rendered) and in the
dream (``DreamSB3VecEnv``: latent observations, contexts from the first frames of training episodes, the
agent's termination rule; one episode in each of ``episodes`` worlds), both truncated at ``horizon``
steps. The fidelity of a policy is ``log(dream mean length / real mean length)``; the check's ``worst``
is the largest ``|log ratio|`` over the policies, and the dream passes at ``max_ratio`` when
``exp(worst) <= max_ratio``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np


def policy_names(action_space) -> list[str]:
    """``["random", "always_0", ..., "always_<n-1>"]`` for a Discrete(n) space; other spaces are refused."""
    from gymnasium import spaces

    if not isinstance(action_space, spaces.Discrete):
        raise ValueError(f"dream fidelity needs a Discrete action space (constant-action policies), got {action_space}")
    return ["random"] + [f"always_{a}" for a in range(int(action_space.n))]


def policy_actions(policy: str, n: int, rng: np.random.Generator, num_actions: int) -> np.ndarray:
    """Actions int64 [n] of ``policy`` (``random`` or ``always_<a>``)."""
    if policy == "random":
        return rng.integers(0, num_actions, n)
    if policy.startswith("always_"):
        return np.full(n, int(policy.split("_", 1)[1]), np.int64)
    raise ValueError(f"unknown fidelity policy {policy!r}: expected 'random' or 'always_<action>'")


def real_lengths(env_cfg: Any, policy: str, episodes: int, horizon: int, seed: int) -> np.ndarray:
    """Episode lengths int64 [episodes] of ``policy`` in the real env of ``env_cfg`` (seeds seed, seed+1, ...)."""
    from sfv_world.envs.sources import make_source_env

    env = make_source_env(env_cfg)
    rng = np.random.default_rng(seed)
    n = int(env.action_space.n)
    out = np.zeros(episodes, np.int64)
    try:
        for ep in range(episodes):
            env.reset(seed=seed + ep)
            t, done = 0, False
            while not done and t < horizon:
                _, _, term, trunc, _ = env.step(int(policy_actions(policy, 1, rng, n)[0]))
                t += 1
                done = term or trunc
            out[ep] = t
    finally:
        env.close()
    return out


def dream_lengths(venv, policy: str, seed: int) -> np.ndarray:
    """Episode lengths int64 [num_envs] of ``policy`` in a dream vec env (``DreamSB3VecEnv``; its horizon
    truncates): the first episode of every world. (Taking the first N episodes to end over fewer worlds
    would favour short ones.)"""
    venv.seed(seed)
    venv.reset()
    rng = np.random.default_rng(seed)
    n, num_actions = venv.num_envs, int(venv.action_space.n)
    t = np.zeros(n, np.int64)
    out = np.full(n, -1, np.int64)
    while (out < 0).any():
        _, _, done, _ = venv.step(policy_actions(policy, n, rng, num_actions))
        t += 1
        first = done & (out < 0)
        out[first] = t[first]
    return out


def measure(checkpoint: str | Path, env_cfg: Any, *, dataset: str | Path | None = None, episodes: int = 64,
            horizon: int = 100, termination: str = "threshold",
            termination_threshold: float = 0.5, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Dream against real episode lengths for every open-loop policy of the action space.

    Returns {"policies": {name: {"real_mean", "dream_mean", "dream_at_horizon", "log_ratio"}}, "worst"
    (largest |log_ratio|), "worst_policy", "episodes", "horizon", "termination", "termination_threshold",
    "wall_s"}.
    """
    from tqdm.auto import tqdm

    from sfv_world.envs.sb3 import DreamSB3VecEnv

    if episodes < 1 or horizon < 1:
        raise ValueError(f"dream fidelity: episodes and horizon must be >= 1, got {episodes}, {horizon}")
    t0 = time.time()
    venv = DreamSB3VecEnv(str(checkpoint), num_envs=episodes, dataset=dataset, obs_mode="latent",
                          horizon=horizon, context_frames=4, context_start="episode_start", termination=termination,
                          termination_threshold=termination_threshold)
    names = policy_names(venv.action_space)
    rows: dict[str, dict[str, float]] = {}
    try:
        for name in tqdm(names, desc="dream fidelity", unit="policy", disable=not progress):
            real = real_lengths(env_cfg, name, episodes, horizon, seed)
            dream = dream_lengths(venv, name, seed)
            rows[name] = {"real_mean": float(real.mean()), "dream_mean": float(dream.mean()),
                          "dream_at_horizon": float((dream >= horizon).mean()),
                          "log_ratio": math.log(float(dream.mean()) / float(real.mean()))}
    finally:
        venv.close()
    worst = max(rows, key=lambda k: abs(rows[k]["log_ratio"]))
    return {"policies": rows, "worst": abs(rows[worst]["log_ratio"]), "worst_policy": worst, "episodes": episodes,
            "horizon": horizon, "termination": termination, "termination_threshold": termination_threshold,
            "wall_s": round(time.time() - t0, 1)}


def passes(result: dict[str, Any], max_ratio: float) -> bool:
    """Whether every policy's dream mean length is within a factor ``max_ratio`` (> 1) of the real one."""
    if not max_ratio > 1.0:
        raise ValueError(f"max_ratio must be > 1 (a factor between dream and real episode lengths), got {max_ratio}")
    return bool(result["worst"] <= math.log(max_ratio))


def summary(result: dict[str, Any]) -> str:
    """One line per policy: real and dreamed mean length and their ratio."""
    return "\n".join(f"  {name:10s} real {r['real_mean']:6.1f}  dream {r['dream_mean']:6.1f}  "
                     f"x{math.exp(r['log_ratio']):.2f}  ({100 * r['dream_at_horizon']:.0f}% at the horizon)"
                     for name, r in result["policies"].items())
