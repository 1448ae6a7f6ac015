"""Why do an agent's real CartPole episodes end? Pole angle, cart position, or the time limit.

    python benchmarks/real_failures.py --checkpoint runs/cpu-demo/checkpoints/last.pt \
        --policies runs/cpu-demo/agent/ppo-latent/seed0/policy.zip,runs/cpu-demo/agent/ppo-latent/seed1/policy.zip

A dream-trained agent's real return says *how long* it lasts; this says *how* it fails. Each policy (an SB3
``policy.zip`` trained on the checkpoint's latent features, ``agent.obs_mode=latent``) plays ``--episodes`` real
episodes with the checkpoint's view of CartPole-v1 (``agents.evaluation.evaluate_real``); as each ends, the true
state says why: |theta| > 12 degrees ("pole"), |x| > 2.4 ("cart"), or neither (the 500-step time limit). It
reports the count of each cause, the mean return, and the median |x| and |theta| at the end. Writes
``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cartpole_view, write_results

THETA_LIMIT = 12 * 2 * math.pi / 360  # CartPole-v1's termination angle (rad)
X_LIMIT = 2.4


def end_state(env) -> tuple[float, float]:
    """(x, theta) of a CartPole env's true state."""
    x, _, theta, _ = env.unwrapped.state
    return float(x), float(theta)


def cause(x: float, theta: float) -> str:
    """Why a CartPole episode ended at true state (x, theta)."""
    if abs(theta) > THETA_LIMIT:
        return "pole"
    return "cart" if abs(x) > X_LIMIT else "time_limit"


def main() -> None:
    from sfv_world.agents.evaluation import evaluate_real
    from sfv_world.agents.policies import algo_class
    from sfv_world.apps.policy_io import policy_input
    from sfv_world.world import WorldRuntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--policies", required=True, help="comma-separated SB3 policy.zip files (latent observations)")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=30_000, help="real episodes use seeds seed .. seed+episodes-1")
    p.add_argument("--algo", default="ppo")
    p.add_argument("--name", default="real_failures")
    args = p.parse_args()
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
    paths = [s.strip() for s in args.policies.split(",") if s.strip()]
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"--policies: {path}: no such file")

    runtime = WorldRuntime.from_checkpoint(args.checkpoint, batch_size=1, seed=args.seed)
    spec, env_cfg = cartpole_view(runtime, args.checkpoint, "the failure causes")
    cls = algo_class(args.algo)
    rows = []
    for path in paths:
        model = cls.load(path, device="cpu")
        _, _, runtime.features = policy_input(model, runtime.frame_shape, runtime.feature_dims)
        res = evaluate_real(model, env_cfg, spec, args.episodes, args.seed, runtime_factory=runtime.sibling,
                            describe_end=end_state)
        ends = [e for e in res.ends if e is not None]
        causes = [cause(x, th) for x, th in ends]
        rows.append({"policy": path, "return_mean": round(res.mean, 1), "return_std": round(res.std, 1),
                     "pole": causes.count("pole"), "cart": causes.count("cart"),
                     "time_limit": causes.count("time_limit"),
                     "median_abs_x_at_end": round(float(np.median([abs(x) for x, _ in ends])), 3),
                     "median_abs_theta_deg_at_end": round(float(np.degrees(np.median([abs(t) for _, t in ends]))), 2)})
        print(rows[-1], flush=True)
    write_results(args.name, rows, title=f"Why real episodes end: {args.name}",
                  config={**vars(args), "view": spec.view_config()},
                  compares=f"{args.episodes} real CartPole-v1 episodes per policy (seeds {args.seed}+); the cause is read "
                           f"off the true state at the end: pole (|theta| > 12 deg), cart (|x| > 2.4), or the time limit.")


if __name__ == "__main__":
    main()
