"""Choosing among every seed's late snapshots (``agent.select=halving``) against among the seeds alone (``best``).

    python benchmarks/agent_snapshot_selection.py --label "make demo, session 12" \
        --checkpoint runs/cpu-demo/checkpoints/last.pt --agent-dir runs/cpu-demo/agent/ppo-latent \
        --from-steps 50000 --episodes 40

Measure: every candidate (each ``seed<s>/`` run's last policy, its snapshots of at least ``--from-steps`` steps,
and the seeds' ensemble) plays the same ``--episodes`` real episodes (seeds 30000 + seed: neither the agent's
selection episodes, 10000 + seed, nor the pipeline's final evaluation, 20000 + seed). That gives each
candidate's real return with a standard error of about std / sqrt(episodes), and the spread of the pool.

Simulate: the two rules are replayed ``--trials`` times on those measured episodes. In each trial the episodes
are shuffled; a rule's selection episodes are the first ones of the shuffle (``best``: ``--best-episodes``
each for the seeds and their ensemble; ``halving``: :func:`sfv_world.agents.selection.successive_halving`
with ``--budget`` real frames), and the chosen candidate is judged on the episodes the rule did not use. For
CartPole (reward 1 per step) a cut episode's return is its length, so a cut is replayed exactly.
``--raw`` re-simulates the episodes of an earlier run's JSON without playing them again.
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results


def measure(label: str, checkpoint: str, agent_dir: str, from_steps: int, episodes: int, seed: int) -> dict:
    """Real returns [candidates, episodes] of every candidate on the same episodes (seeds 30000 + seed on)."""
    from omegaconf import OmegaConf
    from sfv_world.agents.ensemble import load_ensemble
    from sfv_world.agents.evaluation import ObservationSpec, evaluate_real
    from sfv_world.agents.imagination import AgentSettings, halving_candidates
    from sfv_world.agents.policies import algo_class
    from sfv_world.apps.policy_io import policy_input
    from sfv_world.world import WorldRuntime

    start = time.perf_counter()
    out = Path(agent_dir)
    seed_dirs = sorted((p for p in out.glob("seed*") if (p / "policy.zip").is_file()), key=lambda p: int(p.name[4:]))
    if not seed_dirs:
        raise SystemExit(f"--agent-dir {agent_dir}: no seed<s>/policy.zip (an agent.seeds run)")
    first = int(seed_dirs[0].name[4:])
    runtime = WorldRuntime.from_checkpoint(checkpoint, batch_size=1, seed=seed)
    spec = ObservationSpec.from_runtime(runtime, "latent", 1)
    env_cfg = OmegaConf.create({"name": "cartpole", "id": runtime.dataset_meta.get("env_id", "CartPole-v1"),
                                "frame_source": "render", "kwargs": {},
                                **spec.view_config()})
    ensemble = load_ensemble([p / "policy.zip" for p in seed_dirs], algo_class("ppo"))
    _, _, runtime.features = policy_input(ensemble.models[0], runtime.frame_shape, runtime.feature_dims)
    settings = AgentSettings(obs_mode="latent", latent_features=runtime.features, seed=first, seeds=len(seed_dirs),
                             snapshot_every=1, select="halving", select_snapshots_from=from_steps)
    candidates = halving_candidates(out, settings, ensemble)
    returns, lengths = {}, {}
    for i, (name, policy) in enumerate(candidates.items()):
        r = evaluate_real(policy, env_cfg, spec, episodes, 30_000 + seed, runtime_factory=runtime.sibling)
        returns[name], lengths[name] = r.returns.tolist(), r.lengths.tolist()
        print(f"[{i + 1}/{len(candidates)}] {name}: {r.mean:.1f} +- {r.std:.1f}", flush=True)
    return {"model": label, "checkpoint": checkpoint, "agent_dir": agent_dir, "from_steps": from_steps,
            "episodes": episodes, "episode_seed": 30_000 + seed, "returns": returns, "lengths": lengths,
            "measure_wall_s": round(time.perf_counter() - start, 1)}


def simulate(raw: dict, trials: int, budget: int, best_episodes: int, first_episodes: int, keep: int) -> dict:
    """Expected held-out return of the candidate each rule picks, over ``trials`` shuffles of the episodes."""
    from sfv_world.agents.selection import successive_halving

    names = list(raw["returns"])
    R = np.array([raw["returns"][n] for n in names])  # [C, E] float64
    L = np.array([raw["lengths"][n] for n in names])  # [C, E] int64
    if not np.array_equal(R, L):
        raise SystemExit(f"{raw['model']}: returns differ from lengths; the replay of cut episodes assumes CartPole")
    index = {n: i for i, n in enumerate(names)}
    seeds_pool = [n for n in names if "@" not in n]  # the last policies and the ensemble: agent.select=best's pool
    E = R.shape[1]
    rng = np.random.default_rng(0)
    best_vals, halving_vals, halving_frames, halving_used, chosen_counts = [], [], [], [], {}
    for _ in range(trials):
        perm = rng.permutation(E)
        # best: every seed and the ensemble on the same first best_episodes episodes
        sel = perm[:best_episodes]
        pick = max(seeds_pool, key=lambda n: R[index[n], sel].mean())
        best_vals.append(R[index[pick], perm[best_episodes:]].mean())

        used = [0]

        def evaluate(name, episodes, seed, max_steps):
            if seed + episodes >= E:  # the chosen one must keep unused episodes to be judged on
                raise SystemExit(f"halving asked for episode {seed + episodes} of {E} measured: pass more --episodes")
            cols = perm[seed:seed + episodes]
            used[0] = max(used[0], seed + episodes)
            cut = np.minimum(L[index[name], cols], max_steps)
            return cut.astype(np.float64), cut

        chosen, rounds, _ = successive_halving(names, evaluate, budget, first_episodes=first_episodes, keep=keep,
                                               seed=0)
        halving_vals.append(R[index[chosen], perm[used[0]:]].mean())
        halving_frames.append(sum(r.real_frames for r in rounds))
        halving_used.append(used[0])
        chosen_counts[chosen] = chosen_counts.get(chosen, 0) + 1
    means = R.mean(axis=1)
    top = sorted(chosen_counts.items(), key=lambda kv: -kv[1])[:5]
    return {
        "model": raw["model"], "candidates": len(names), "episodes": E,
        "pool_mean": float(means.mean()), "pool_best": float(means.max()), "pool_best_name": names[int(means.argmax())],
        "seeds_pool_best": float(max(means[index[n]] for n in seeds_pool)),
        "best_rule_held_out": float(np.mean(best_vals)), "halving_held_out": float(np.mean(halving_vals)),
        "halving_minus_best": float(np.mean(np.array(halving_vals) - np.array(best_vals))),
        "halving_frames_mean": float(np.mean(halving_frames)), "halving_episodes_used_max": int(max(halving_used)),
        "halving_top_choices": ", ".join(f"{n} {c}" for n, c in top),
        "candidate_means": {n: float(m) for n, m in zip(names, means)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--checkpoint", action="append", default=[])
    p.add_argument("--agent-dir", action="append", default=[])
    p.add_argument("--raw", action="append", default=[], help="an earlier result JSON whose measured rows to re-use")
    p.add_argument("--from-steps", type=int, default=50_000)
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--budget", type=int, default=25_000, help="halving's real frames (make demo leaves ~27k)")
    p.add_argument("--best-episodes", type=int, default=20)
    p.add_argument("--first-episodes", type=int, default=2)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--name", default="agent_snapshot_selection")
    args = p.parse_args()
    if not (len(args.label) == len(args.checkpoint) == len(args.agent_dir)):
        raise SystemExit("--label, --checkpoint and --agent-dir come in threes")
    for path in args.checkpoint + args.agent_dir + args.raw:
        if not Path(path).exists():
            raise SystemExit(f"{path}: no such file or folder")
    raws = [row["raw"] for path in args.raw for row in json.loads(Path(path).read_text())["rows"]]
    raws += [measure(*spec, args.from_steps, args.episodes, args.seed)
             for spec in zip(args.label, args.checkpoint, args.agent_dir)]
    if not raws:
        raise SystemExit("nothing to simulate: give --label/--checkpoint/--agent-dir or --raw")
    rows = []
    for raw in raws:
        row = simulate(raw, args.trials, args.budget, args.best_episodes, args.first_episodes, args.keep)
        print(json.dumps({k: v for k, v in row.items() if k != "candidate_means"}), flush=True)
        rows.append(row | {"raw": raw})
    write_results(
        args.name, rows, title="Choosing among late snapshots by successive halving (agent.select=halving) "
                               "against among the seeds (agent.select=best)",
        config={k: v for k, v in vars(args).items()},
        columns=["model", "candidates", "episodes", "pool_mean", "pool_best", "seeds_pool_best", "best_rule_held_out",
                 "halving_held_out", "halving_minus_best", "halving_frames_mean", "halving_top_choices"],
        compares=(f"Each candidate played the same {args.episodes} real episodes. Over {args.trials} shuffles of them: "
                  f"best_rule_held_out is agent.select=best ({args.best_episodes} episodes for each seed and their "
                  f"ensemble), halving_held_out agent.select=halving (budget {args.budget} real frames, first round "
                  f"{args.first_episodes} episodes, keep 1/{args.keep}), each judged on the episodes it did not use. "
                  "pool_best is the best candidate's mean over all episodes (an upper bound, biased up by the max)."),
    )


if __name__ == "__main__":
    main()
