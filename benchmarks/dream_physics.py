"""Dream physics on CartPole: does the dreamed cart move and the dreamed pole fall as in the real env?

    python benchmarks/dream_physics.py --checkpoint runs/cpu-demo/checkpoints/last.pt \
        --dataset runs/cpu-demo/data/cartpole [--windows 16,12,8]

Episode lengths (``dream_fidelity.py``) say *that* a dream is too forgiving; this says *how*. A linear
probe (ridge regression from the model-size pixels to the true state) is fitted on real frames of the
dataset, whose true states come from replaying each episode's seed and actions in CartPole-v1; its held-out
R^2 is reported. The probe then reads the cart position x and pole angle theta off *dreamed* frames.

Both worlds start like the dataset's episodes: the dream from the first 4 frames of training episodes,
the real env from a seeded reset plus 3 random steps. Then the same open-loop policy runs for ``--steps``
steps (``always_0``: push left every step; ``random``). Per world it reports the fraction of episodes still
running after 10 and after ``--steps`` steps, the mean (shift) and std over episodes (spread) of the cart's
displacement x - x0 of the episodes still running, and the median of each episode's largest |theta|. The
dream is run with each KV-cache window in ``--windows`` (``WorldRuntime.context_window``). Writes
``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

CONTEXT_FRAMES = 4


def true_states(env, episode) -> np.ndarray:
    """CartPole states float64 [T+1, 4] (x, x_dot, theta, theta_dot) of a logged episode, by replay."""
    env.reset(seed=int(episode.seed))
    states = [np.array(env.unwrapped.state, np.float64)]
    for a in episode.actions:
        env.step(int(a))
        states.append(np.array(env.unwrapped.state, np.float64))
    return np.stack(states)


class StateProbe:
    """Ridge regression uint8 frames [N, h, w, C] -> state float64 [N, 4], fitted on real frames."""

    def __init__(self, frames: np.ndarray, states: np.ndarray, ridge: float = 1.0, holdout: float = 0.15):
        x = frames.reshape(len(frames), -1).astype(np.float64) / 255.0
        n_fit = int(len(x) * (1.0 - holdout))
        self.mean = x[:n_fit].mean(0)
        xc = x - self.mean
        gram = xc[:n_fit].T @ xc[:n_fit] + ridge * np.eye(x.shape[1])
        self.weights = np.linalg.solve(gram, xc[:n_fit].T @ states[:n_fit])
        pred, true = xc[n_fit:] @ self.weights, states[n_fit:]
        self.r2 = 1.0 - ((pred - true) ** 2).mean(0) / true.var(0)  # float64 [4], held-out episodes' frames

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return (frames.reshape(len(frames), -1).astype(np.float64) / 255.0 - self.mean) @ self.weights


def fit_probe(reader, episode_ids: list[int], frame_size: int) -> StateProbe:
    """The probe on the real frames of ``episode_ids`` (an open ``DatasetReader``) at ``frame_size``, with
    their true states by replay."""
    import gymnasium as gym
    from sfv_world.datasets import ClipDataset

    clips = ClipDataset(reader, episode_ids, clip_len=2, frame_size=frame_size, pad_start=False)
    env = gym.make("CartPole-v1")
    frames = [clips.episode_frames(e) for e in episode_ids]
    states = [true_states(env, reader.load_episode(e, observations=False)) for e in episode_ids]
    return StateProbe(np.concatenate(frames), np.concatenate(states))


def cartpole_probe(dataset: str, episodes: list[int] | int | None, frame_size: int) -> StateProbe:
    """``fit_probe`` on a CartPole-v1 dataset folder: on the episode ids ``episodes``, on its first N episodes (an
    int N) or on all of them (None). Exits naming ``--dataset`` if the dataset is not CartPole-v1's."""
    from sfv_world.datasets import DatasetReader

    with DatasetReader(dataset) as reader:
        if reader.env_id != "CartPole-v1":
            raise SystemExit(f"--dataset {dataset}: env_id is {reader.env_id!r}; the state probe needs CartPole-v1")
        ids = episodes if isinstance(episodes, list) else [int(e) for e in reader.episode_ids][:episodes]
        return fit_probe(reader, ids, frame_size)


def policy_actions(policy: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if policy == "always_0":
        return np.zeros(n, np.int64)
    if policy == "random":
        return rng.integers(0, 2, n)
    raise ValueError(f"unknown policy {policy!r}")


def summarize(world: str, policy: str, x: np.ndarray, theta: np.ndarray, steps: int) -> dict:
    """x, theta: float [steps+1, N], NaN once an episode has ended."""
    alive = ~np.isnan(theta)
    dx = x - x[:1]
    return {"policy": policy, "world": world,
            "running_after_10": float(alive[10].mean()), f"running_after_{steps}": float(alive[steps].mean()),
            "x_shift_10": float(np.nanmean(dx[10])) if alive[10].any() else float("nan"),
            f"x_shift_{steps}": float(np.nanmean(dx[steps])) if alive[steps].any() else float("nan"),
            "x_spread_10": float(np.nanstd(dx[10])) if alive[10].any() else float("nan"),
            f"x_spread_{steps}": float(np.nanstd(dx[steps])) if alive[steps].any() else float("nan"),
            "max_abs_theta_deg_median": float(np.degrees(np.median(np.nanmax(np.abs(theta), 0))))}


def real_run(env, policy: str, episodes: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.full((steps + 1, episodes), np.nan)
    theta = np.full((steps + 1, episodes), np.nan)
    for i in range(episodes):
        env.reset(seed=seed + i)
        for _ in range(CONTEXT_FRAMES - 1):
            env.step(int(rng.integers(0, 2)))
        x[0, i], theta[0, i] = env.unwrapped.state[0], env.unwrapped.state[2]
        for t in range(1, steps + 1):
            _, _, terminated, _, _ = env.step(int(policy_actions(policy, 1, rng)[0]))
            if terminated:
                break
            x[t, i], theta[t, i] = env.unwrapped.state[0], env.unwrapped.state[2]
    return x, theta


def parse_sampler(text: str) -> dict:
    """``"default"`` -> {} (the checkpoint's run settings); ``"threshold=1e-6,max_iter=64"`` -> overrides."""
    if text.strip() == "default":
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--samplers: {item!r} is not key=value")
        try:
            out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def dream_run(checkpoint: str, dataset: str, probe: StateProbe, policy: str, num_envs: int, steps: int, seed: int,
              window: int, sampler: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    from sfv_world.envs.sb3 import DreamSB3VecEnv

    venv = DreamSB3VecEnv(checkpoint, num_envs=num_envs, obs_mode="pixels", frame_stack=1, horizon=steps + 1,
                          context_frames=CONTEXT_FRAMES, context_start="episode_start", context_window=window,
                          dataset=dataset, sampler=sampler or None)
    venv.seed(seed)
    rng = np.random.default_rng(seed)
    state = probe(venv.reset())
    x, theta = [state[:, 0]], [state[:, 2]]
    alive = np.ones(num_envs, bool)
    for _ in range(steps):
        obs, _, done, infos = venv.step(policy_actions(policy, num_envs, rng))
        frames = np.stack([infos[i]["terminal_observation"] if done[i] else obs[i] for i in range(num_envs)])
        alive &= ~done
        state = probe(frames)
        x.append(np.where(alive, state[:, 0], np.nan))
        theta.append(np.where(alive, state[:, 2], np.nan))
    venv.close()
    return np.stack(x), np.stack(theta)


def main() -> None:
    import gymnasium as gym
    from sfv_world.checkpoint import load_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True, help="the checkpoint's CartPole dataset folder (probe + dream contexts)")
    p.add_argument("--windows", default="16,12,8", help="comma-separated dream KV-cache windows")
    p.add_argument("--samplers", default="default",
                   help="semicolon-separated sampler variants: 'default' (the checkpoint's) or key=value,... overrides")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-envs", type=int, default=64)
    p.add_argument("--probe-episodes", type=int, default=None, help="episodes to fit the probe on (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="dream_physics")
    args = p.parse_args()
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
    if not Path(args.dataset).is_dir():
        raise SystemExit(f"--dataset {args.dataset}: no such folder")
    windows = [int(w) for w in args.windows.split(",")]
    samplers = [(v.strip(), parse_sampler(v)) for v in args.samplers.split(";")]

    frame_size = int(load_checkpoint(args.checkpoint)["model_config"]["frame_size"])
    probe = cartpole_probe(args.dataset, args.probe_episodes, frame_size)  # None: all episodes
    env = gym.make("CartPole-v1")
    print(f"probe held-out R^2: x {probe.r2[0]:.3f}, theta {probe.r2[2]:.3f}", flush=True)

    rows = []
    for policy in ("always_0", "random"):
        rows.append(summarize("real", policy, *real_run(env, policy, args.num_envs, args.steps, 1000 + args.seed),
                              args.steps))
        for w in windows:
            for name, sampler in samplers:
                x, theta = dream_run(args.checkpoint, args.dataset, probe, policy, args.num_envs, args.steps,
                                     args.seed, w, sampler)
                label = f"dream, window {w}" + ("" if name == "default" else f", sampler {name}")
                rows.append(summarize(label, policy, x, theta, args.steps))
                print(rows[-1], flush=True)
    write_results(
        args.name, rows, title="Dream physics on CartPole: cart displacement and pole angle read off dreamed frames",
        config={**vars(args), "probe_r2_x": round(float(probe.r2[0]), 4), "probe_r2_theta": round(float(probe.r2[2]), 4)},
        compares=(f"{args.num_envs} episodes per world; states read by a pixel->state ridge probe fitted on real "
                  f"frames (held-out R^2: x {probe.r2[0]:.3f}, theta {probe.r2[2]:.3f}); real: true states. "
                  "Episodes end on termination (real: |theta| > 12 deg or |x| > 2.4; dream: the head)."),
    )


if __name__ == "__main__":
    main()
