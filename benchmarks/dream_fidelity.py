"""Dream fidelity for control: episode lengths in the dream against the real env under fixed policies.

    python benchmarks/dream_fidelity.py --checkpoint runs/cpu-demo/checkpoints/last.pt [--episodes 128]

An agent trained in imagination can only learn to balance CartPole if the dream ends episodes where the
real env does. This runs the same open-loop policies (uniform random, always action 0, alternating 0/1)
in the real env (from its state, no rendering: the lengths depend only on the dynamics) and in the dream
(``DreamSB3VecEnv``, 64 worlds, contexts from the first frames of training episodes, the checkpoint's
calibrated termination threshold, horizon 200), and reports mean and median episode lengths for each.
Writes ``benchmarks/results/dream_fidelity.json`` and ``.md``.

The dream's lengths are the first ``--episodes`` episodes to end over its 64 worlds, which favours short
episodes when they outnumber the worlds (the recorded results were measured so). The pipeline's gate,
``sfv_world.agents.fidelity``, takes each world's first episode instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

POLICIES = ("random", "always_0", "alternate")


def action(policy: str, n: int, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Actions int64 [n] of ``policy`` at per-episode step counters ``t`` (int [n])."""
    if policy == "random":
        return rng.integers(0, 2, n)
    if policy == "always_0":
        return np.zeros(n, np.int64)
    return (t % 2).astype(np.int64)


def real_lengths(env_id: str, policy: str, episodes: int, horizon: int, seed: int) -> np.ndarray:
    import gymnasium as gym

    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    out = []
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        t, done = 0, False
        while not done and t < horizon:
            _, _, term, trunc, _ = env.step(int(action(policy, 1, np.array([t]), rng)[0]))
            t += 1
            done = term or trunc
        out.append(t)
    env.close()
    return np.asarray(out)


def dream_lengths(checkpoint: str, policy: str, episodes: int, horizon: int, seed: int, num_envs: int,
                  termination: str, sampler: dict | None = None, threshold: float = 0.5) -> tuple[np.ndarray, float]:
    from sfv_world.envs.sb3 import DreamSB3VecEnv

    venv = DreamSB3VecEnv(checkpoint, num_envs=num_envs, obs_mode="latent", horizon=horizon, context_frames=4,
                          context_start="episode_start", termination=termination, sampler=sampler,
                          termination_threshold=threshold)
    venv.seed(seed)
    venv.reset()
    rng = np.random.default_rng(seed)
    t = np.zeros(num_envs, np.int64)
    out: list[int] = []
    steps, t0 = 0, time.time()
    while len(out) < episodes:
        _, _, done, _ = venv.step(action(policy, num_envs, t, rng))
        t += 1
        steps += num_envs
        for i in np.flatnonzero(done):
            out.append(int(t[i]))
            t[i] = 0
    venv.close()
    return np.asarray(out[:episodes]), steps / (time.time() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--env-id", default="CartPole-v1")
    p.add_argument("--episodes", type=int, default=128)
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--termination", default="threshold", choices=("threshold", "sample"))
    p.add_argument("--termination-threshold", type=float, action="append", default=None,
                   help="terminate when sigmoid(logit) > this (repeatable: one row per value; default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="sampler temperature (default: the checkpoint's)")
    p.add_argument("--name", default="dream_fidelity", help="results/<name>.json and .md")
    args = p.parse_args()
    sampler = None if args.temperature is None else {"temperature": args.temperature}
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
    if args.threads:
        torch.set_num_threads(args.threads)
    thresholds = args.termination_threshold or [0.5]
    rows = []
    for policy in POLICIES:
        real = real_lengths(args.env_id, policy, args.episodes, args.horizon, args.seed)
        for threshold in thresholds:
            dream, rate = dream_lengths(args.checkpoint, policy, args.episodes, args.horizon, args.seed,
                                        args.num_envs, args.termination, sampler, threshold)
            rows.append({"policy": policy, "termination_threshold": threshold,
                         "real_mean_length": float(real.mean()), "real_median": float(np.median(real)),
                         "dream_mean_length": float(dream.mean()), "dream_median": float(np.median(dream)),
                         "dream_at_horizon": float((dream >= args.horizon).mean()),
                         "dream_steps_per_s": round(rate, 1)})
    write_results(
        args.name, rows, title="Dream episode lengths vs the real env under fixed policies",
        config=vars(args),
        compares=(f"{args.episodes} episodes per policy, truncated at {args.horizon} steps; dream: "
                  f"{args.num_envs} worlds from episode-start contexts, termination `{args.termination}` "
                  "(threshold: sigmoid(logit) > termination_threshold). "
                  "A dream fit for policy learning ends episodes about when the real env does."),
    )


if __name__ == "__main__":
    main()
