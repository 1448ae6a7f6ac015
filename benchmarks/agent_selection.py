"""Choosing among seeds by real return (``agent.select=best``): does the choice hold on other episodes?

    python benchmarks/agent_selection.py \
        --spec "demo;runs/cpu-demo/checkpoints/last.pt;runs/cpu-demo/agent/ppo-latent/seed0/policy.zip,...;0"

Each ``--spec`` is ``label;checkpoint;policy.zip,policy.zip,...;seed``: independently seeded agents trained in
that checkpoint's dream (``agent.seeds``), the first with seed ``seed``. The candidates are each agent and their
ensemble (mean action distribution), exactly as :func:`sfv_world.agents.imagination.select_agent` sees them:
all play the same ``--episodes`` real episodes (seeds 10000 + seed, the agent's own evaluation episodes) and
the best mean return is chosen. Every candidate then plays ``--episodes`` held-out real episodes (seeds
20000 + seed, the pipeline's final evaluation): the chosen one's held-out return against the ensemble's (what
``agent.select=ensemble`` would give) measures what the choice is worth, winner's curse included.
The crop of each checkpoint's dataset is used for its real env. Writes ``benchmarks/results/<name>.json``, ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results


def run_spec(label: str, checkpoint: str, policies: list[str], seed: int, episodes: int) -> dict:
    from omegaconf import OmegaConf
    from sfv_world.agents.ensemble import load_ensemble
    from sfv_world.agents.evaluation import ObservationSpec, evaluate_real
    from sfv_world.agents.imagination import AgentSettings, select_agent
    from sfv_world.agents.policies import algo_class
    from sfv_world.apps.policy_io import policy_input
    from sfv_world.world import WorldRuntime

    start = time.perf_counter()
    runtime = WorldRuntime.from_checkpoint(checkpoint, batch_size=1, seed=seed)
    spec = ObservationSpec.from_runtime(runtime, "latent", 1)
    env_cfg = OmegaConf.create({"name": "cartpole", "id": runtime.dataset_meta.get("env_id", "CartPole-v1"),
                                "frame_source": "render", "kwargs": {},
                                **spec.view_config()})
    ensemble = load_ensemble(policies, algo_class("ppo"))
    candidates = {f"seed{seed + k}": m for k, m in enumerate(ensemble.models)}
    candidates["ensemble"] = ensemble
    _, _, runtime.features = policy_input(ensemble.models[0], runtime.frame_shape, runtime.feature_dims)
    settings = AgentSettings(obs_mode="latent", latent_features=runtime.features, eval_episodes=episodes, seed=seed,
                             seeds=len(policies), select="best")
    selection, _ = select_agent(candidates, runtime, env_cfg, settings)
    held_out = {name: evaluate_real(policy, env_cfg, spec, episodes, 20_000 + seed, runtime_factory=runtime.sibling).mean
                for name, policy in candidates.items()}
    chosen = selection["selected"]
    print(f"{label}: selection {selection['scores']} -> {chosen}; held-out {held_out}", flush=True)
    return {"model": label, "crop": None if spec.crop is None else list(spec.crop), "chosen": chosen,
            "chosen_selection_return": selection["scores"][chosen], "chosen_held_out_return": held_out[chosen],
            "ensemble_held_out_return": held_out["ensemble"],
            "best_member_held_out_return": max(v for k, v in held_out.items() if k != "ensemble"),
            "selection_real_frames": selection["real_frames"],
            "selection_scores": selection["scores"], "held_out_scores": held_out, "checkpoint": checkpoint,
            "policies": policies, "seed": seed, "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", action="append", required=True, help="label;checkpoint;policy,policy,...;seed")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--name", default="agent_selection")
    args = p.parse_args()
    specs = []
    for raw in args.spec:
        parts = raw.split(";")
        if len(parts) != 4:
            raise SystemExit(f"--spec {raw!r}: expected label;checkpoint;policy,policy,...;seed")
        label, ckpt, pols, seed = parts
        pols = [q for q in pols.split(",") if q]
        for path in [ckpt, *pols]:
            if not Path(path).is_file():
                raise SystemExit(f"--spec {label}: {path}: no such file")
        if len(pols) < 2:
            raise SystemExit(f"--spec {label}: needs at least two policies, got {len(pols)}")
        specs.append((label, ckpt, pols, int(seed)))
    rows = [run_spec(*s, args.episodes) for s in specs]
    write_results(
        args.name, rows, title="Choosing among seeded agents by real return (agent.select=best), judged on held-out episodes",
        config=vars(args),
        columns=["model", "crop", "chosen", "chosen_selection_return", "chosen_held_out_return",
                 "ensemble_held_out_return", "best_member_held_out_return", "selection_real_frames"],
        compares=(f"Candidates: each seed's agent and their ensemble. Selection on {args.episodes} real episodes "
                  f"(seeds 10000 + seed), judged on {args.episodes} others (20000 + seed). chosen_held_out_return "
                  "is what agent.select=best gives; ensemble_held_out_return what agent.select=ensemble gives."),
    )


if __name__ == "__main__":
    main()
