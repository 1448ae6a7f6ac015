"""The latent oracle: the dream agent's recipe trained on the real env's features instead of the dream's.

    python benchmarks/latent_oracle.py --checkpoint runs/cpu-demo/checkpoints/last.pt --seeds 4 \
        --dream-run runs/cpu-demo/agent/ppo-latent --name latent_oracle

A latent agent in the dream learns from the world model's features of dreamed frames. Here the same PPO
recipe (the preset's ``agent`` settings: envs, horizon, action noise, PPO hyper-parameters, MLP on
standardized features) learns from the features of *real* frames (``RealLatentVecEnv``): perfect physics,
the same observation, the same number of steps. Each seed then plays the same 20 real episodes as the dream
agent of that seed (seeds 10000 + seed). If the oracle is far above the dream agents, the dream is what
holds them back; if it is not, the recipe or the features are.

It spends real frames (``--timesteps`` per seed), so it is a diagnostic, not an agent for the budget.
By default rewards and terminations are the real env's. ``--dream-rules`` adds the dream's own: an episode also
ends once the termination head's probability on the real frame passes the preset's ``termination_threshold``,
and each reward loses the preset's termination penalty (``TerminationPenaltyVecEnv``), so the only difference
left to the dream is its physics and its frames.
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cartpole_view, write_results

REPO = Path(__file__).resolve().parents[1]


def preset_agent(preset: str, overrides: list[str]) -> dict:
    """The ``agent`` settings of ``configs/preset/<preset>.yaml`` over ``configs/agent/ppo.yaml``'s defaults,
    then ``overrides`` (``key=value`` dotlist, e.g. ``n_envs=8``, ``algo_kwargs.n_steps=16``)."""
    from omegaconf import OmegaConf

    path = REPO / "configs" / "preset" / f"{preset}.yaml"
    if not path.is_file():
        raise SystemExit(f"--preset {preset}: no such preset ({path})")
    base = OmegaConf.load(REPO / "configs" / "agent" / "ppo.yaml")
    for item in overrides:
        key = item.partition("=")[0]
        if "=" not in item or OmegaConf.select(base, key.split(".")[0]) is None:
            raise SystemExit(f"--set {item!r}: expected key=value with a key of configs/agent/ppo.yaml")
    merged = OmegaConf.merge(base, OmegaConf.load(path).get("agent", {}), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_container(merged, resolve=True)


def train_oracle(checkpoint: str, agent: dict, seed: int, timesteps: int, eval_every: int,
                 episodes: int, save_dir: str | None = None, dream_rules: bool = False) -> dict:
    """One seed: PPO on ``RealLatentVecEnv`` for ``timesteps`` real steps; real evaluations every
    ``eval_every`` steps on episodes 10000 + seed. With ``save_dir`` the policy is saved as
    ``<save_dir>/seed<seed>/policy.zip``; ``dream_rules``: the head's terminations and the penalty too.
    Returns {real_<steps>: mean return, train_return, ...}."""
    import torch
    from sfv_world.agents.evaluation import evaluate_real
    from sfv_world.agents.imagination import RandomActionVecEnv, TerminationPenaltyVecEnv, latent_feature_stats
    from sfv_world.agents.policies import StandardizedFeatures, algo_class, policy_for, resolve_schedules
    from sfv_world.agents.real_latent import RealLatentVecEnv
    from sfv_world.world import WorldRuntime
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import VecMonitor

    torch.manual_seed(seed)
    runtime = WorldRuntime.from_checkpoint(checkpoint, batch_size=int(agent["n_envs"]), seed=seed,
                                           features=str(agent.get("latent_features", "mean")))
    spec, env_cfg = cartpole_view(runtime, checkpoint, "the latent oracle")
    threshold = float(agent["termination_threshold"]) if dream_rules else None
    venv = RealLatentVecEnv(env_cfg, runtime, horizon=int(agent["horizon"]), termination_threshold=threshold)
    venv.seed(seed)
    mean, std = latent_feature_stats(venv, seed=seed)
    name, kwargs = policy_for("latent", venv.observation_space, None)
    kwargs = {**kwargs, "features_extractor_class": StandardizedFeatures,
              "features_extractor_kwargs": {"mean": mean.tolist(), "std": std.tolist()}}
    monitored = VecMonitor(venv)
    if dream_rules and float(agent["termination_penalty"]) > 0:
        monitored = TerminationPenaltyVecEnv(monitored, float(agent["termination_penalty"]),
                                             float(agent["termination_penalty_temperature"]))
    if float(agent["action_noise"]) > 0:
        monitored = RandomActionVecEnv(monitored, float(agent["action_noise"]), seed=seed)
    model = algo_class(str(agent["algo"]))(name, monitored, policy_kwargs=kwargs, seed=seed, device="cpu", verbose=0,
                                           **resolve_schedules(dict(agent["algo_kwargs"])))
    row: dict = {"seed": seed}
    start = time.perf_counter()

    class Evaluate(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next = eval_every

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next:
                self.next += eval_every
                ev = evaluate_real(self.model, env_cfg, spec, episodes=episodes, seed=10_000 + seed,
                                   runtime_factory=runtime.sibling)
                steps = self.num_timesteps
                row[f"real_{round(steps / 1000)}k" if steps >= 1000 else f"real_{steps}"] = round(ev.mean, 1)
                print(f"[oracle] seed {seed}, {self.num_timesteps} real steps: real return {ev.mean:.1f}", flush=True)
            return True

    model.learn(timesteps, callback=Evaluate(), progress_bar=True)
    infos = list(model.ep_info_buffer)
    row["train_return"] = round(float(np.mean([i["r"] for i in infos])), 1) if infos else None
    row["real_frames"] = int(model.num_timesteps)
    row["wall_s"] = round(time.perf_counter() - start, 1)
    if save_dir is not None:
        model.save(Path(save_dir) / f"seed{seed}" / "policy.zip")
    monitored.close()
    return row


def dream_returns(folder: str | None, seeds: list[int]) -> dict[int, float]:
    """The dream agents' last real return per seed (``agent_paired.seed_results``); {} without a folder."""
    if folder is None:
        return {}
    from agent_paired import seed_results

    try:
        found = seed_results(Path(folder), None)
    except ValueError as e:
        raise SystemExit(f"--dream-run {folder}: {e}") from None
    if len(found) < len(seeds):
        raise SystemExit(f"--dream-run {folder}: {len(found)} seed folders with eval.csv, {len(seeds)} needed")
    return {k: found[k]["real"] for k in seeds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--preset", default="cpu-demo", help="whose agent settings to use (configs/preset/<name>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of the preset's agent settings (n_envs=8, algo_kwargs.n_steps=16, ...)")
    p.add_argument("--seeds", type=int, default=4, help="PPO seeds 0..N-1 (the dream agents' seeds)")
    p.add_argument("--timesteps", type=int, default=None, help="real steps per seed (default: the preset's agent steps)")
    p.add_argument("--eval-every", type=int, default=None, help="default: the preset's agent.eval_every")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--dream-run", default=None, help="an agent folder (<run_dir>/agent/ppo-latent) to pair with")
    p.add_argument("--dream-rules", action="store_true",
                   help="end episodes by the termination head too and apply the termination penalty, as the dream does")
    p.add_argument("--save-dir", default=None, help="save each seed's policy as <dir>/seed<k>/policy.zip")
    p.add_argument("--name", default="latent_oracle")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
    for flag in ("seeds", "timesteps", "eval_every", "episodes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    agent = preset_agent(args.preset, args.set)
    timesteps = int(args.timesteps or agent["total_timesteps"])
    eval_every = int(args.eval_every or agent["eval_every"])
    seeds = list(range(args.seeds))
    dream = dream_returns(args.dream_run, seeds)
    rows = []
    for seed in seeds:
        row = train_oracle(args.checkpoint, agent, seed, timesteps, eval_every, args.episodes, args.save_dir,
                           args.dream_rules)
        if dream:
            row["dream_agent_real"] = round(dream[seed], 1)
        rows.append(row)
    summary = {"seed": "mean", **{k: round(float(np.mean([r[k] for r in rows])), 1) for k in rows[0]
                                  if k != "seed" and all(isinstance(r.get(k), (int, float)) for r in rows)}}
    rows.append(summary)
    write_results(args.name, rows, title="The latent oracle: the dream recipe on real features",
                  compares=(f"PPO with the {args.preset} preset's agent settings (envs {agent['n_envs']}, horizon "
                            f"{agent['horizon']}, action noise {agent['action_noise']}, {agent['algo_kwargs']}) "
                            f"trained {timesteps} steps on the world model's features of real CartPole frames; "
                            f"real_<k>k: mean return over {args.episodes} real episodes (seeds 10000 + seed) at k "
                            "thousand steps; "
                            + ("dream rules: episodes also end when the termination head passes "
                               f"{agent['termination_threshold']} on the real frame and rewards lose the penalty "
                               f"(c = {agent['termination_penalty']}); " if args.dream_rules else "")
                            + "train_return: the last training episodes' mean return (horizon and "
                            "action noise included); dream_agent_real: the dream-trained agent of the same seed on "
                            "the same episodes."),
                  config={"checkpoint": args.checkpoint, "preset": args.preset, "set": args.set, "timesteps": timesteps,
                          "eval_every": eval_every, "episodes": args.episodes, "dream_run": args.dream_run,
                          "save_dir": args.save_dir, "dream_rules": args.dream_rules})


if __name__ == "__main__":
    main()
