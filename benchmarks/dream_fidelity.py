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

``--policies a.zip,b.zip`` adds closed-loop rows: each saved SB3 latent-observation policy (deterministic
actions) in the same dream (each world's first episode) and in ``--episodes`` real episodes from pixels
(``agents.evaluation.evaluate_real``: features from the checkpoint's forward pass over the real frames, real
lengths cut at the horizon). Open-loop
policies end episodes within ~25 steps; a trained agent shows whether the dream ends *long* episodes
where the real env does (a dream harsher than the real env caps what an agent can learn in it).
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


def dream_lengths(checkpoint: str, policy, episodes: int, horizon: int, seed: int, num_envs: int,
                  termination: str, sampler: dict | None = None, threshold: float = 0.5,
                  dataset: str | None = None) -> tuple[np.ndarray, float]:
    """Lengths int [episodes] of the first episodes to end in the dream, and its env-steps/s.

    ``policy``: one of POLICIES (open loop), or a loaded SB3 model acting on the latent features
    (deterministic). For a model the lengths are each world's *first* episode (int [num_envs]; ``episodes``
    is not used): the first episodes to end over all worlds would favour short ones, and a trained policy's
    episodes are long enough for that to matter."""
    from sfv_world.envs.sb3 import DreamSB3VecEnv

    venv = DreamSB3VecEnv(checkpoint, num_envs=num_envs, obs_mode="latent", horizon=horizon, context_frames=4,
                          context_start="episode_start", termination=termination, sampler=sampler,
                          termination_threshold=threshold, dataset=dataset)
    venv.seed(seed)
    obs = venv.reset()
    rng = np.random.default_rng(seed)
    t = np.zeros(num_envs, np.int64)
    out: list[int] = []
    steps, t0 = 0, time.time()
    closed_loop = not isinstance(policy, str)
    first = np.zeros(num_envs, np.int64)  # closed loop: each world's first episode length (0: running)
    while (not (first > 0).all()) if closed_loop else len(out) < episodes:
        act = policy.predict(obs, deterministic=True)[0] if closed_loop else action(policy, num_envs, t, rng)
        obs, _, done, _ = venv.step(act)
        t += 1
        steps += num_envs
        for i in np.flatnonzero(done):
            out.append(int(t[i]))
            if first[i] == 0:
                first[i] = t[i]
            t[i] = 0
    venv.close()
    return (first if closed_loop else np.asarray(out[:episodes])), steps / (time.time() - t0)


def closed_loop_real(checkpoint: str, path: str, algo: str, episodes: int, horizon: int, seed: int):
    """(the loaded SB3 model, its real episode lengths int [episodes] cut at ``horizon``) for a latent policy.

    The real env is the checkpoint's view of its dataset's env (crop, resize), and the policy sees the
    world model's features of the real frames (``evaluate_real``), as in the agents' evaluation."""
    from omegaconf import OmegaConf
    from sfv_world.agents.evaluation import ObservationSpec, evaluate_real
    from sfv_world.agents.policies import algo_class
    from sfv_world.apps.policy_io import policy_input
    from sfv_world.world import WorldRuntime

    runtime = WorldRuntime.from_checkpoint(checkpoint, batch_size=1, seed=seed)
    model = algo_class(algo).load(path, device="cpu")
    obs_mode, _, features = policy_input(model, runtime.frame_shape, runtime.feature_dims)
    if obs_mode != "latent" or features != "mean":
        raise SystemExit(f"--policies: {path} observes {obs_mode} ({features}); only latent mean-feature policies "
                         "run in this benchmark's dream")
    spec = ObservationSpec.from_runtime(runtime, "latent", 1)
    env_id = runtime.dataset_meta.get("env_id", "CartPole-v1")
    env_cfg = OmegaConf.create({"name": env_id, "id": env_id, "frame_source": "render", "kwargs": {},
                                **spec.view_config()})
    res = evaluate_real(model, env_cfg, spec, episodes, seed, runtime_factory=runtime.sibling, max_steps=horizon)
    return model, np.minimum(res.lengths, horizon)


def length_row(policy: str, threshold: float, real: np.ndarray, dream: np.ndarray, horizon: int,
               rate: float) -> dict:
    """One table row: mean / median lengths in both worlds (ints [episodes] each)."""
    return {"policy": policy, "termination_threshold": threshold,
            "real_mean_length": float(real.mean()), "real_median": float(np.median(real)),
            "dream_mean_length": float(dream.mean()), "dream_median": float(np.median(dream)),
            "dream_at_horizon": float((dream >= horizon).mean()),
            "dream_steps_per_s": round(rate, 1)}


def main(argv: list[str] | None = None) -> None:
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
    p.add_argument("--policies", default="", help="comma-separated SB3 policy.zip files (latent observations, "
                                                  "mean features): closed-loop rows")
    p.add_argument("--skip-open-loop", action="store_true", help="only the --policies rows")
    p.add_argument("--algo", default="ppo", help="SB3 algorithm of --policies")
    p.add_argument("--dataset", default=None,
                   help="dream contexts from this dataset folder (default: the checkpoint's own)")
    args = p.parse_args(argv)
    sampler = None if args.temperature is None else {"temperature": args.temperature}
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
    paths = [s.strip() for s in args.policies.split(",") if s.strip()]
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"--policies: {path}: no such file")
    if args.skip_open_loop and not paths:
        raise SystemExit("--skip-open-loop needs --policies")
    if args.threads:
        torch.set_num_threads(args.threads)
    thresholds = args.termination_threshold or [0.5]
    rows = []
    for path in paths:
        model, real = closed_loop_real(args.checkpoint, path, args.algo, args.episodes, args.horizon, args.seed)
        for threshold in thresholds:
            dream, rate = dream_lengths(args.checkpoint, model, args.episodes, args.horizon, args.seed,
                                        args.num_envs, args.termination, sampler, threshold, args.dataset)
            rows.append(length_row(path, threshold, real, dream, args.horizon, rate))
    for policy in () if args.skip_open_loop else POLICIES:
        real = real_lengths(args.env_id, policy, args.episodes, args.horizon, args.seed)
        for threshold in thresholds:
            dream, rate = dream_lengths(args.checkpoint, policy, args.episodes, args.horizon, args.seed,
                                        args.num_envs, args.termination, sampler, threshold, args.dataset)
            rows.append(length_row(policy, threshold, real, dream, args.horizon, rate))
    kinds = "trained policies" if args.skip_open_loop else "fixed and trained policies" if paths else "fixed policies"
    write_results(
        args.name, rows, title="Dream episode lengths vs the real env under " + kinds,
        config=vars(args),
        compares=(f"{args.episodes} episodes per policy ({args.num_envs}, each world's first, for a trained "
                  f"policy's dream), truncated at {args.horizon} steps; dream: "
                  f"{args.num_envs} worlds from episode-start contexts, termination `{args.termination}` "
                  "(threshold: sigmoid(logit) > termination_threshold). "
                  "A dream fit for policy learning ends episodes about when the real env does."),
    )


if __name__ == "__main__":
    main()
