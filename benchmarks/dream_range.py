"""How far a dream's frames leave the data's range, and what the bound (``sampler.bound_sigmas``) does about it.

Real frames lie in [-1, 1] in model space plus sigma-noise. A saved latent policy (SB3, on the checkpoint's
features; or uniformly random actions) plays N dream worlds for S steps, with a uniformly random action
instead of its own with probability ``--epsilon`` (the cpu-demo agents train with 0.2). For each bound it
records, per world and step, the largest |value| of the inverted frame before any clamp (``WorldStep.frame_peak``),
whether the world clamped it (``out_of_range``), and the predicted reward. Every bound replays the same seeds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_policy_args, write_results  # noqa: E402

QUANTILES = (0.5, 0.9, 0.99, 0.999)


def play(checkpoint: str, policy, bound_sigmas: float, num_envs: int, steps: int, epsilon: float, seed: int,
         dataset: str | None, threshold: float) -> dict:
    """One run: (peak float32 [steps, N], clamped bool [steps, N], reward float32 [steps, N], wall_s)."""
    import torch
    from tqdm import tqdm

    from sfv_world.envs.sb3 import DreamSB3VecEnv

    torch.manual_seed(seed)
    venv = DreamSB3VecEnv(checkpoint, num_envs=num_envs, obs_mode="latent", horizon=200, context_start="episode_start",
                          termination_threshold=threshold, dataset=dataset, sampler={"bound_sigmas": bound_sigmas})
    venv.seed(seed)
    rt = venv.core.runtime
    seen = [None]  # the runtime's latest WorldStep
    step = rt.step

    def recording(actions, **kwargs):
        seen[0] = step(actions, **kwargs)
        return seen[0]

    rt.step = recording
    rng = np.random.default_rng(seed)
    obs = venv.reset()
    peak, clamped, reward = [], [], []
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"bound_sigmas={bound_sigmas:g}", leave=False):
        if policy is None:
            act = rng.integers(0, venv.action_space.n, num_envs)
        else:
            act = policy.predict(obs, deterministic=False)[0]
        noise = rng.random(num_envs) < epsilon
        act = np.where(noise, rng.integers(0, venv.action_space.n, num_envs), act)
        obs, r, _, _ = venv.step(act)
        out = seen[0]
        peak.append(out.frame_peak)
        clamped.append(out.out_of_range)
        reward.append(r)
    wall = time.perf_counter() - t0
    venv.close()
    return {"peak": np.array(peak), "clamped": np.array(clamped), "reward": np.array(reward), "wall_s": wall,
            "bound": rt.frame_bound}


def summary(run: dict, bound_sigmas: float, num_envs: int, steps: int) -> dict:
    """One table row of a run (see `play`)."""
    peak, reward = run["peak"], run["reward"]
    row = {"bound_sigmas": bound_sigmas, "bound": run["bound"] if run["bound"] is not None else "none",
           "clamped_fraction": float(run["clamped"].mean())}
    for q in QUANTILES:
        row[f"peak_q{q * 100:g}"] = float(np.nanquantile(peak, q))
    row.update(peak_max=float(np.nanmax(peak)), reward_min=float(reward.min()), reward_max=float(reward.max()),
               reward_off_by_1_fraction=float((np.abs(reward - np.median(reward)) > 1).mean()),
               env_steps_per_s=num_envs * steps / run["wall_s"])
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--policy", default=None, help="SB3 policy.zip on the checkpoint's latent features (default: random)")
    p.add_argument("--algo", default="ppo")
    p.add_argument("--bound-sigmas", type=float, action="append",
                   help="sampler.bound_sigmas to compare (repeatable; 0: no bound; default: 0 and 30)")
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--epsilon", type=float, default=0.2, help="probability of a random action instead of the policy's")
    p.add_argument("--termination-threshold", type=float, default=0.1)
    p.add_argument("--dataset", default=None, help="dataset folder for reset context (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--name", default="dream_range")
    args = p.parse_args(argv)
    check_policy_args(args)
    bounds = args.bound_sigmas or [0.0, 30.0]
    if any(b < 0 for b in bounds):
        raise SystemExit(f"--bound-sigmas {bounds}: each must be >= 0 (0: no bound)")
    import torch

    from sfv_world.agents.policies import algo_class

    torch.set_num_threads(args.threads)
    policy = None if args.policy is None else algo_class(args.algo).load(args.policy, device="cpu")
    rows = []
    for b in bounds:
        run = play(args.checkpoint, policy, b, args.num_envs, args.steps, args.epsilon, args.seed, args.dataset,
                   args.termination_threshold)
        rows.append(summary(run, b, args.num_envs, args.steps))
    config = {k: v for k, v in vars(args).items() if k != "bound_sigmas"} | {"bound_sigmas": bounds}
    write_results(args.name, rows, title="How far dreamed frames leave the data's range (model space, data in [-1, 1])",
                  config=config,
                  compares=f"{args.num_envs} dream worlds x {args.steps} steps per bound, same seeds; policy "
                           f"{args.policy or 'random'} with epsilon {args.epsilon}. peak: the largest |value| of an "
                           "inverted frame before any clamp (quantiles over world-steps); clamped_fraction: world-steps "
                           "whose frame was clamped to 1 + bound_sigmas * sigma and teacher-forced.")


if __name__ == "__main__":
    main()
