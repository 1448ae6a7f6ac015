"""How an agent's episodes end in the dream and in the real env: is the dream harder than reality, and why?

    python benchmarks/dream_endings.py --checkpoint runs/cpu-demo/checkpoints/last.pt \
        --dataset runs/cpu-demo/data/cartpole --agent dream=runs/cpu-demo/agent/ppo-latent/seed0/policy.zip

A latent agent's dreamed training episodes (~60 steps on the cpu-demo models) are shorter than its real ones.
The dream can only end an episode through its termination head, so either the dreamed pole really falls
sooner (physics, sampling noise) or the head ends episodes whose pole is still upright. This plays each
``--agent`` (an SB3 latent policy; ``label=path``) as it trains: the preset's horizon, action noise and
dream settings, actions sampled from the policy (``--deterministic`` for its mode), ``--per-row`` episodes in
each of ``n_envs`` worlds, once in the dream and once in the real env (``RealLatentVecEnv``, the same features
of real frames). A pixel->state probe fitted on the dataset's real frames (``dream_physics.StateProbe``) reads
the cart position x and the pole angle theta off every frame of both worlds, so the ends compare on one scale.

Per world it reports the episodes' mean and median length, the share ended by termination (not the
horizon), the median probe |theta| and |x| of the terminal frames, and the share of terminations that came
*upright* (probe |theta| < ``--upright-deg`` and |x| < 1.8 on the terminal frame: the real rule ends at 12
degrees or 2.4). For the real env it adds the true |theta| at the end and how often the head, on the real
frames, would have ended the episode earlier at the dream's threshold, and how many steps early (median).
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cartpole_view, write_results

X_LIMIT_UPRIGHT = 1.8  # |x| below this is far from the real 2.4 limit
THETA_LIMIT = 12 * 2 * np.pi / 360  # CartPole-v1 ends an episode past this |theta| (radians), or past |x| = 2.4


def parse_agents(items: list[str]) -> list[tuple[str, Path]]:
    """``label=path`` (split at the last '=') or a bare path (labelled by its parent folder)."""
    out = []
    for item in items:
        label, sep, path = item.rpartition("=")
        path_ = Path(path)
        if not path_.is_file():
            raise SystemExit(f"--agent {item}: no such file {path_}")
        out.append((label if sep else path_.parent.name, path_))
    return out


class EpisodeLog:
    """Per-row running episodes of one world; finished ones are kept while a row is under its quota.

    Each step gives the probe's state float64 [N, 4] of every row's newest frame; ``finish`` closes the rows
    that ended with their end cause and extra per-episode fields.
    """

    def __init__(self, n: int, per_row: int):
        self.per_row = per_row
        self.done_count = np.zeros(n, dtype=np.int64)
        self.length = np.zeros(n, dtype=np.int64)
        self.max_theta = np.zeros(n)
        self.head_first: list[int | None] = [None] * n  # the step at which the head first passed the threshold
        self.episodes: list[dict[str, Any]] = []

    @property
    def complete(self) -> bool:
        return bool((self.done_count >= self.per_row).all())

    def step(self, probe_state: np.ndarray, head_fired: np.ndarray) -> None:
        self.length += 1
        self.max_theta = np.maximum(self.max_theta, np.abs(probe_state[:, 2]))
        for i in np.flatnonzero(head_fired):
            if self.head_first[i] is None:
                self.head_first[i] = int(self.length[i])

    def finish(self, rows: np.ndarray, probe_state: np.ndarray, terminated: np.ndarray, extra: list[dict]) -> None:
        for j, i in enumerate(rows):
            if self.done_count[i] < self.per_row:
                self.episodes.append({"length": int(self.length[i]), "terminated": bool(terminated[j]),
                                      "theta_end": float(abs(probe_state[j, 2])), "x_end": float(abs(probe_state[j, 0])),
                                      "max_theta": float(self.max_theta[i]), "head_first": self.head_first[i],
                                      **extra[j]})
            self.done_count[i] += 1
            self.length[i], self.max_theta[i], self.head_first[i] = 0, 0.0, None


def act(model, obs: np.ndarray, noise: float, rng: np.random.Generator, deterministic: bool) -> np.ndarray:
    """The policy's actions int64 [N], each replaced by a uniformly random one with probability ``noise``."""
    actions = np.asarray(model.predict(obs, deterministic=deterministic)[0]).astype(np.int64)
    swap = rng.random(len(actions)) < noise
    actions[swap] = rng.integers(0, 2, int(swap.sum()))
    return actions


def dream_episodes(model, checkpoint: str, dataset: str, probe, agent: dict, per_row: int, seed: int,
                   deterministic: bool, progress) -> list[dict]:
    """Episodes in the dream with the preset's dream settings; the terminal frame is the one the head ended on."""
    from sfv_world.agents.imagination import AgentSettings, dream_vec_env

    venv = dream_vec_env(checkpoint, AgentSettings.from_config(agent, dataset=dataset), obs_mode="latent")
    venv.seed(seed)
    core, rng = venv.core, np.random.default_rng(seed)
    obs = venv.reset()
    log = EpisodeLog(venv.num_envs, per_row)
    while not log.complete:
        actions = act(model, obs, float(agent["action_noise"]), rng, deterministic)
        obs, _, terminated, truncated, info = core.step(core.validate_actions(actions))
        state = probe(core.frames())  # [N, 4] of the newest (terminal, for finished rows) frames
        log.step(state, terminated)
        rows = np.flatnonzero(terminated | truncated)
        if rows.size:
            log.finish(rows, state[rows], terminated[rows],
                       [{"cause": "head" if terminated[i] else "horizon"} for i in rows])
            core.reset_rows(rows)
            obs = core.observations()
        progress(log)
    return log.episodes


def real_episodes(model, checkpoint: str, probe, agent: dict, per_row: int, seed: int, deterministic: bool,
                  progress) -> list[dict]:
    """Episodes in the real env seen through the features; true states and the head's logit on real frames."""
    import gymnasium as gym
    from sfv_world.agents.real_latent import RealLatentVecEnv
    from sfv_world.world import WorldRuntime

    class StateInInfo(gym.Wrapper):
        """Adds the true CartPole state and the frame (uint8 [h, w, C]) to every step's info."""

        def step(self, action):
            frame, r, term, trunc, info = self.env.step(action)
            return frame, r, term, trunc, {**info, "state": np.array(self.env.unwrapped.state), "frame": frame}

    runtime = WorldRuntime.from_checkpoint(checkpoint, batch_size=int(agent["n_envs"]), seed=seed,
                                           features=str(agent["latent_features"]))
    _, env_cfg = cartpole_view(runtime, checkpoint, "dream_endings")
    venv = RealLatentVecEnv(env_cfg, runtime, horizon=int(agent["horizon"]))
    venv.envs = [StateInInfo(e) for e in venv.envs]
    venv.seed(seed)
    rng = np.random.default_rng(seed)
    threshold = float(agent["termination_threshold"])
    logit_threshold = np.log(threshold / (1.0 - threshold))  # sigmoid(logit) > threshold, without overflow
    obs = venv.reset()
    log = EpisodeLog(venv.num_envs, per_row)
    while not log.complete:
        obs, _, dones, infos = venv.step(act(model, obs, float(agent["action_noise"]), rng, deterministic))
        state = probe(np.stack([i["frame"] for i in infos]))
        logit = np.array([i["termination_logit"] for i in infos])
        log.step(state, logit > logit_threshold)
        rows = np.flatnonzero(dones)
        if rows.size:
            extra = []
            for i in rows:
                x, _, theta, _ = infos[i]["state"]
                truncated = infos[i]["TimeLimit.truncated"]
                cause = "horizon" if truncated else ("angle" if abs(theta) > THETA_LIMIT else "position")
                extra.append({"cause": cause, "true_theta_end": float(abs(theta)), "true_x_end": float(abs(x))})
            log.finish(rows, state[rows], ~np.array([infos[i]["TimeLimit.truncated"] for i in rows]), extra)
        progress(log)
    venv.close()
    return log.episodes


def summarize(agent_label: str, world: str, episodes: list[dict], upright_deg: float) -> dict:
    """One table row: lengths, termination share, the terminal frames' probe angle and the upright ends."""
    lengths = np.array([e["length"] for e in episodes])
    ended = [e for e in episodes if e["terminated"]]
    theta_end = np.degrees([e["theta_end"] for e in ended]) if ended else np.array([np.nan])
    x_end = np.array([e["x_end"] for e in ended]) if ended else np.array([np.nan])
    upright = (theta_end < upright_deg) & (x_end < X_LIMIT_UPRIGHT)
    row = {"agent": agent_label, "world": world, "episodes": len(episodes),
           "length_mean": round(float(lengths.mean()), 1), "length_median": float(np.median(lengths)),
           "terminated": round(len(ended) / len(episodes), 3),
           "probe_theta_end_deg": round(float(np.median(theta_end)), 2),
           "probe_x_end": round(float(np.median(x_end)), 2),
           "upright_ends": round(float(upright.mean()), 3) if ended else float("nan"),
           "max_theta_deg": round(float(np.degrees(np.median([e["max_theta"] for e in episodes]))), 2)}
    if world == "real":
        true_theta = np.degrees([e["true_theta_end"] for e in ended]) if ended else np.array([np.nan])
        early = [e["length"] - e["head_first"] for e in episodes if e["head_first"] is not None
                 and e["head_first"] < e["length"]]
        row["true_theta_end_deg"] = round(float(np.median(true_theta)), 2)
        row["by_angle"] = round(sum(e["cause"] == "angle" for e in episodes) / len(episodes), 3)
        row["head_early"] = round(len(early) / len(episodes), 3)
        row["head_early_steps"] = float(np.median(early)) if early else 0.0
    return row


def main(argv: list[str] | None = None) -> None:
    import torch
    from latent_oracle import preset_agent
    from stable_baselines3 import PPO
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True, help="the checkpoint's CartPole dataset folder (probe + dream contexts)")
    p.add_argument("--agent", action="append", required=True, metavar="LABEL=PATH",
                   help="an SB3 PPO latent policy .zip (repeatable)")
    p.add_argument("--preset", default="cpu-demo", help="whose agent settings (horizon, noise, dream) to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an agent setting")
    p.add_argument("--per-row", type=int, default=2, help="episodes counted per world row (n_envs rows)")
    p.add_argument("--upright-deg", type=float, default=6.0)
    p.add_argument("--deterministic", action="store_true", help="the policy's mode instead of sampled actions")
    p.add_argument("--probe-episodes", type=int, default=200, help="dataset episodes the probe is fitted on")
    p.add_argument("--worlds", default="dream,real", help="comma-separated: dream, real")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="dream_endings")
    args = p.parse_args(argv)
    for flag, path, kind in (("--checkpoint", args.checkpoint, "file"), ("--dataset", args.dataset, "folder")):
        if not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
            raise SystemExit(f"{flag} {path}: no such {kind}")
    if args.per_row < 1 or args.probe_episodes < 2:
        raise SystemExit("--per-row must be >= 1 and --probe-episodes >= 2")
    worlds = [w.strip() for w in args.worlds.split(",")]
    if not worlds or any(w not in ("dream", "real") for w in worlds):
        raise SystemExit(f"--worlds {args.worlds}: expected a comma-separated subset of dream, real")
    agents = parse_agents(args.agent)
    agent = preset_agent(args.preset, args.set)

    from dream_physics import cartpole_probe
    from sfv_world.checkpoint import load_checkpoint

    frame_size = int(load_checkpoint(args.checkpoint)["model_config"]["frame_size"])
    probe = cartpole_probe(args.dataset, args.probe_episodes, frame_size)
    print(f"probe held-out R^2: x {probe.r2[0]:.3f}, theta {probe.r2[2]:.3f}", flush=True)

    rows = []
    total = int(agent["n_envs"]) * args.per_row
    for label, path in agents:
        model = PPO.load(path, device="cpu")
        for world in worlds:
            torch.manual_seed(args.seed)  # the policy samples its actions with torch's global generator
            bar = tqdm(total=total, desc=f"{label} in the {world}", unit="episode")

            def progress(log, bar=bar):
                bar.update(min(len(log.episodes), total) - bar.n)

            if world == "dream":
                eps = dream_episodes(model, args.checkpoint, args.dataset, probe, agent, args.per_row, args.seed,
                                     args.deterministic, progress)
            else:
                eps = real_episodes(model, args.checkpoint, probe, agent, args.per_row, args.seed, args.deterministic,
                                    progress)
            bar.close()
            rows.append(summarize(label, world, eps, args.upright_deg))
            print(rows[-1], flush=True)
    write_results(
        args.name, rows, title="How episodes end in the dream and in the real env, under the same agent",
        config={**vars(args), "agent_settings": {k: agent[k] for k in ("n_envs", "horizon", "action_noise",
                                                                       "termination_threshold", "termination",
                                                                       "time_scale", "context_start")},
                "probe_r2_x": round(float(probe.r2[0]), 4), "probe_r2_theta": round(float(probe.r2[2]), 4)},
        compares=(f"Each agent plays {args.per_row} episodes in each of {agent['n_envs']} worlds (horizon "
                  f"{agent['horizon']}, action noise {agent['action_noise']}, "
                  f"{'mode' if args.deterministic else 'sampled'} actions) in the dream (termination head at "
                  f"{agent['termination_threshold']}) and in the real env. probe_*: a pixel->state ridge probe's "
                  f"reading of the terminal frames (held-out R^2 x {probe.r2[0]:.3f}, theta {probe.r2[2]:.3f}); "
                  f"upright_ends: terminations with probe |theta| < {args.upright_deg} deg and |x| < "
                  f"{X_LIMIT_UPRIGHT}; max_theta_deg: median over episodes of the largest probe |theta|; real only: "
                  "true_theta_end_deg, by_angle (share ended by the pole, not the cart), head_early (share of episodes "
                  "in which the head, on the real frames, passed the dream's threshold before the real end) and "
                  "head_early_steps (median steps early)."))


if __name__ == "__main__":
    main()
