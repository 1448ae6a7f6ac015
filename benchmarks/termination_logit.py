"""How does the termination head's logit on real CartPole frames grow with the true pole angle?

    python benchmarks/termination_logit.py --checkpoint runs/cpu-demo/checkpoints/last.pt \
        --policy runs/cpu-demo/agent/ppo-latent/seed0/policy.zip --epsilon 0.3

``agent.termination_penalty`` pays a dream agent ``1 - c * sigmoid(logit / T)`` per step instead of 1, on the
premise that the head's logit is graded far below the decision threshold: that it already rises while the pole
is still upright enough for the episode to go on. This checks the premise on real frames, where the true state
is known. ``--episodes`` real CartPole-v1 episodes run with the checkpoint's view of the env; their frames are
appended to a :class:`~sfv_world.world.WorldRuntime` (teacher forcing, as in the agents' real evaluation) and
each live step's logit is binned by the true |theta|. The actions come from ``--policy`` (an SB3 ``policy.zip``
on the checkpoint's latent features), replaced by a uniformly random one with probability ``--epsilon``, or
are all random without a policy (then few steps are near upright). Each row is a bin: steps, the logit's
median and 10th / 90th percentiles, and the penalty ``sigmoid(logit / T)`` at the median for each ``--temperature``.
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cartpole_view, check_policy_args, write_results

BINS_DEG = (0, 1, 2, 4, 6, 8, 10, 12)


def collect_logits(runtime, env_cfg, spec, policy, episodes: int, epsilon: float, max_steps: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(|theta| in degrees float64 [S], termination logit float64 [S]) of every live real step."""
    from sfv_world.agents.evaluation import make_real_pixel_env

    n = int(episodes)
    rng = np.random.default_rng(seed)
    envs = [make_real_pixel_env(env_cfg, spec) for _ in range(n)]
    try:
        frames = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
        rt = runtime.sibling(n)
        rt.seed(seed)
        obs = rt.reset(frames[:, None], np.zeros((n, 0), np.int64)).features
        active = np.ones(n, dtype=bool)
        theta, logit = [], []
        for _ in range(int(max_steps)):
            if policy is None:
                actions = rng.integers(0, 2, n)
            else:
                actions = np.asarray(policy.predict(obs, deterministic=True)[0]).reshape(n)
                actions = np.where(rng.random(n) < epsilon, rng.integers(0, 2, n), actions)
            live = active.copy()
            for i in np.flatnonzero(active):
                f, _, term, trunc, _ = envs[i].step(actions[i])
                frames[i] = f
                if term or trunc:
                    active[i] = False
            out = rt.observe(frames, actions)
            obs = out.features
            for i in np.flatnonzero(live & active):  # the step's frame is still inside the real episode
                theta.append(abs(np.degrees(envs[i].unwrapped.state[2])))
                logit.append(float(out.termination_logit[i]))
            if not active.any():
                break
    finally:
        for env in envs:
            env.close()
    return np.asarray(theta, np.float64), np.asarray(logit, np.float64)


def main(argv: list[str] | None = None) -> None:
    from sfv_world.agents.policies import algo_class
    from sfv_world.apps.policy_io import policy_input
    from sfv_world.world import WorldRuntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--policy", default=None, help="SB3 policy.zip on the checkpoint's latent features (default: random)")
    p.add_argument("--epsilon", type=float, default=0.3, help="probability of a random action instead of the policy's")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--temperature", type=float, action="append", help="penalty temperature T (repeatable; default 10)")
    p.add_argument("--seed", type=int, default=500)
    p.add_argument("--algo", default="ppo")
    p.add_argument("--name", default="termination_logit")
    args = p.parse_args(argv)
    check_policy_args(args)
    if args.episodes < 1 or args.max_steps < 1:
        raise SystemExit("--episodes and --max-steps must be >= 1")
    temps = args.temperature or [10.0]
    if any(not t > 0 for t in temps):
        raise SystemExit(f"--temperature {temps}: each must be > 0")

    runtime = WorldRuntime.from_checkpoint(args.checkpoint, batch_size=1, seed=args.seed)
    spec, env_cfg = cartpole_view(runtime, args.checkpoint, "the pole angle")
    policy = None
    if args.policy is not None:
        policy = algo_class(args.algo).load(args.policy, device="cpu")
        _, _, runtime.features = policy_input(policy, runtime.frame_shape, runtime.feature_dims)
    theta, logit = collect_logits(runtime, env_cfg, spec, policy, args.episodes, args.epsilon, args.max_steps,
                                  args.seed)
    rows = []
    for lo, hi in zip(BINS_DEG[:-1], BINS_DEG[1:]):
        m = (theta >= lo) & (theta < hi)
        if not m.any():
            continue
        med = float(np.median(logit[m]))
        row = {"abs_theta_deg": f"{lo}-{hi}", "steps": int(m.sum()), "logit_median": round(med, 1),
               "logit_q10": round(float(np.quantile(logit[m], 0.1)), 1),
               "logit_q90": round(float(np.quantile(logit[m], 0.9)), 1)}
        for t in temps:
            row[f"penalty_T{t:g}_at_median"] = round(1.0 / (1.0 + np.exp(-med / t)), 3)
        rows.append(row)
    corr = float(np.corrcoef(theta, logit)[0, 1]) if theta.size > 2 else float("nan")
    write_results(args.name, rows, title="The termination head's logit against the true pole angle (real CartPole frames)",
                  config={**vars(args), "view": spec.view_config(), "live_steps": int(theta.size),
                          "corr_abs_theta_logit": round(corr, 3)},
                  compares=(f"{args.episodes} real CartPole-v1 episodes (seeds {args.seed}+), "
                            f"{'policy ' + args.policy + f' with epsilon {args.epsilon}' if args.policy else 'random actions'}; "
                            f"the head's logit on each live step's real frame (teacher forcing), binned by the true "
                            f"|theta| (the episode ends at 12 degrees); {theta.size} steps, correlation of |theta| "
                            f"with the logit {corr:.2f}. The penalty columns are sigmoid(median logit / T)."))


if __name__ == "__main__":
    main()
