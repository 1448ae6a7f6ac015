"""Perception cap on CartPole: how well can a policy balance from the world model's latent features?

    python benchmarks/perception_probe.py --checkpoint runs/cpu-demo/checkpoints/last.pt [--checkpoint B ...]

A latent agent (``obs_mode=latent``) sees only the world model's causal features of the frames so far. No
dream is involved here: this asks how much of the true state those features carry, i.e. the best real
return any policy on them could reach, whatever the dream teaches.

A true-state controller (push right when theta + 0.5 theta_dot + 0.02 x + 0.1 x_dot > 0; 500 of 500 on
the state vector) is behaviour-cloned onto the features of *real* frames with DAgger:
- round 0: real episodes driven by the controller, with a random action with probability 0.25, so the
  data hold recoveries; every frame is labelled with the controller's action at the true state;
- rounds 1..R: episodes driven by the current clone, labelled the same way, added to the data;
- the clone: an MLP (2 x 256, tanh) on the features standardized per dimension, cross-entropy, Adam.
The clone is then scored on ``--episodes`` real episodes (seeds 20000+) that act on features alone. A linear
probe's held-out RMSE of theta and theta_dot from the same features is reported beside it.

Each checkpoint is read through the crop its dataset was collected with (``env.crop`` from the dataset's
metadata). Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

CONTROLLER_GAINS = np.array([0.02, 0.1, 1.0, 0.5])  # on (x, x_dot, theta, theta_dot)


def controller(states: np.ndarray) -> np.ndarray:
    """The expert: states float [N, 4] -> actions int64 [N] (1: push right)."""
    return (states @ CONTROLLER_GAINS > 0).astype(np.int64)


def run_episodes(runtime_factory, env_cfg, spec, policy, episodes: int, seed: int, noise: float, max_steps: int,
                 rng: np.random.Generator):
    """Real episodes in lock-step. policy(features float [N, D], states float [N, 4]) -> actions int64 [N].

    Returns (features float32 [M, D], states float64 [M, 4], lengths int64 [episodes]) over every step taken
    (M = sum of lengths), features and states being those the action was chosen on.
    """
    from sfv_world.agents.evaluation import make_real_pixel_env

    envs = [make_real_pixel_env(env_cfg, spec) for _ in range(episodes)]
    frames = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])  # uint8 [N, h, w, C]
    states = np.stack([np.asarray(env.unwrapped.state, np.float64) for env in envs])
    runtime = runtime_factory(episodes)
    runtime.seed(seed)
    feats = runtime.reset(frames[:, None], np.zeros((episodes, 0), np.int64)).features
    seen_f, seen_s = [], []
    lengths = np.zeros(episodes, np.int64)
    active = np.ones(episodes, bool)
    try:
        for _ in range(max_steps):
            if not active.any():
                break
            seen_f.append(feats[active].astype(np.float32))
            seen_s.append(states[active].copy())
            actions = policy(feats, states)
            flip = rng.random(episodes) < noise
            actions[flip] = rng.integers(0, 2, int(flip.sum()))
            for i in np.flatnonzero(active):
                frames[i], _, term, trunc, _ = envs[i].step(int(actions[i]))
                states[i] = envs[i].unwrapped.state
                lengths[i] += 1
                active[i] = not (term or trunc)
            feats = runtime.observe(frames, actions).features
    finally:
        for env in envs:
            env.close()
    return np.concatenate(seen_f), np.concatenate(seen_s), lengths


def fit_clone(features: np.ndarray, actions: np.ndarray, mean: np.ndarray, std: np.ndarray, epochs: int, seed: int):
    """MLP features float [M, D] -> action logits [M, 2], trained by cross-entropy; returns a policy function."""
    import torch

    torch.manual_seed(seed)
    dim = features.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)

    def standardize(f) -> torch.Tensor:
        return ((torch.as_tensor(f, dtype=torch.float32) - mean_t) / std_t).clamp(-10, 10)

    x, y = standardize(features), torch.as_tensor(actions)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(256):
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def policy(feats, _states):
        return net(standardize(feats)).argmax(1).numpy().astype(np.int64)

    return policy


def linear_probe_rmse(features: np.ndarray, states: np.ndarray, ridge: float = 1.0) -> np.ndarray:
    """Held-out (every 2nd of 10 blocks) RMSE float [4] of a ridge regression features -> true state."""
    x = np.c_[(features - features.mean(0)) / (features.std(0) + 1e-6), np.ones(len(features))]
    test = (np.arange(len(x)) * 10 // len(x)) % 2 == 1
    w = np.linalg.solve(x[~test].T @ x[~test] + ridge * np.eye(x.shape[1]), x[~test].T @ states[~test])
    return np.sqrt(((x[test] @ w - states[test]) ** 2).mean(0))


def probe_checkpoint(path: str, args) -> dict:
    from omegaconf import OmegaConf
    from sfv_world.agents.evaluation import ObservationSpec
    from sfv_world.world import WorldRuntime
    from tqdm.auto import tqdm

    start = time.perf_counter()
    base = WorldRuntime.from_checkpoint(path, batch_size=1, seed=args.seed, features=args.features)
    spec = ObservationSpec.from_runtime(base, "latent", 1)
    env_id = base.dataset_meta.get("env_id")
    if env_id not in (None, "CartPole-v1"):
        raise SystemExit(f"--checkpoint {path}: its dataset's env is {env_id!r}; the controller needs CartPole-v1")
    env_cfg = OmegaConf.create({"name": "cartpole", "id": "CartPole-v1", "frame_source": "render", "kwargs": {},
                                **spec.view_config()})
    factory = base.sibling

    rng = np.random.default_rng(args.seed)
    bar = tqdm(total=args.rounds + 2, desc=Path(path).parent.parent.name or path, unit="round")
    feats, states, _ = run_episodes(factory, env_cfg, spec, lambda f, s: controller(s), args.train_episodes,
                                    40_000, args.noise, args.max_steps, rng)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    clone = fit_clone(feats, controller(states), mean, std, args.epochs, args.seed)
    bar.update()
    for r in range(args.rounds):
        f, s, _ = run_episodes(factory, env_cfg, spec, clone, args.train_episodes, 41_000 + 100 * r, 0.0,
                               args.max_steps, rng)
        feats, states = np.concatenate([feats, f]), np.concatenate([states, s])
        clone = fit_clone(feats, controller(states), mean, std, args.epochs, args.seed)
        bar.update()
    _, _, lengths = run_episodes(factory, env_cfg, spec, clone, args.episodes, 20_000, 0.0, 500, rng)
    bar.update()
    bar.close()
    rmse = linear_probe_rmse(feats, states)
    return {"checkpoint": path, "features": args.features, "crop": None if spec.crop is None else list(spec.crop),
            "frames_seen": len(feats), "clone_real_return_mean": float(lengths.mean()),
            "clone_real_return_std": float(lengths.std()), "probe_rmse_theta_deg": float(np.degrees(rmse[2])),
            "probe_rmse_theta_dot": float(rmse[3]), "state_std_theta_deg": float(np.degrees(states[:, 2].std())),
            "wall_s": round(time.perf_counter() - start, 1), "returns": lengths.tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", required=True, help="a CartPole world model (repeatable)")
    p.add_argument("--label", action="append", default=None, help="a row label per --checkpoint")
    p.add_argument("--rounds", type=int, default=2, help="DAgger rounds after the controller's own episodes")
    p.add_argument("--train-episodes", type=int, default=32, help="real episodes per round")
    p.add_argument("--max-steps", type=int, default=250, help="steps per training episode")
    p.add_argument("--noise", type=float, default=0.25, help="random-action probability in round 0")
    p.add_argument("--epochs", type=int, default=300, help="passes over the data per fit")
    p.add_argument("--episodes", type=int, default=20, help="real episodes that score the clone (seeds 20000+)")
    p.add_argument("--features", choices=["mean", "slots"], default="mean",
                   help="the latent observation: slot-mean [D] or every token slot [F * D] (agent.latent_features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="perception_probe")
    args = p.parse_args()
    labels = args.label or args.checkpoint
    if len(labels) != len(args.checkpoint):
        raise SystemExit(f"--label given {len(labels)} times for {len(args.checkpoint)} --checkpoint")
    for path in args.checkpoint:
        if not Path(path).is_file():
            raise SystemExit(f"--checkpoint {path}: no such file")
    rows = []
    for label, path in zip(labels, args.checkpoint):
        row = {"model": label, **probe_checkpoint(path, args)}
        print({k: v for k, v in row.items() if k != "returns"}, flush=True)
        rows.append(row)
    write_results(
        args.name, rows, title="Perception cap: a true-state controller cloned onto the world model's latent features",
        config=vars(args),
        columns=["model", "features", "crop", "clone_real_return_mean", "clone_real_return_std", "probe_rmse_theta_deg",
                 "probe_rmse_theta_dot", "state_std_theta_deg", "frames_seen", "wall_s"],
        compares=(f"DAgger ({args.rounds} rounds of {args.train_episodes} real episodes) clones the controller "
                  "theta + 0.5 theta_dot + 0.02 x + 0.1 x_dot > 0 onto the features of real frames; the clone "
                  f"acts on features alone for {args.episodes} real episodes (return = length, cap 500). Not a "
                  "dream result: the best a latent policy could do on these features."),
    )


if __name__ == "__main__":
    main()
