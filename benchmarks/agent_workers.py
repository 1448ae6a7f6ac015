"""Seeds in parallel: imagined PPO steps/s of ``agent.seeds=2`` trained one after another vs two at a time.

    .venv/bin/python benchmarks/agent_workers.py --checkpoint runs/cpu-demo/checkpoints/last.pt \
        --dataset runs/cpu-demo/data/cartpole [--steps 6400]

Rows (same checkpoint, same cpu-demo agent settings, same seeds, in one run):
  * ``workers=1``: the serial path, each seed on every core (torch's default threads);
  * ``workers=2``: :func:`sfv_world.agents.imagination.train_members_in_parallel`, two spawned processes with
    ``cores // 2`` torch threads each.
Each seed learns ``--steps`` imagined steps in a latent dream of batch 64 and plays ``--eval-episodes`` real
episodes at the end, as in ``make demo``. Compares: the wall-clock rate of the two seeds together
(``2 * steps / wall``) between the rows; the ratio is measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(REPO / "runs" / "cpu-demo" / "checkpoints" / "last.pt"))
    ap.add_argument("--dataset", default=None, help="dream context dataset (default: the checkpoint's)")
    ap.add_argument("--steps", type=int, default=6400, help="imagined steps per seed")
    ap.add_argument("--eval-episodes", type=int, default=5, help="real episodes each seed plays at the end")
    ap.add_argument("--name", default="agent_workers")
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint} does not exist (train one: make demo)")

    from sfv_world.agents.imagination import AgentSettings, train_agent

    preset = OmegaConf.load(REPO / "configs" / "preset" / "cpu-demo.yaml")
    agent_cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "agent" / "ppo.yaml"), preset.agent)
    env_cfg = OmegaConf.load(REPO / "configs" / "env" / "cartpole.yaml")
    base = AgentSettings.from_config(OmegaConf.to_container(agent_cfg, resolve=True), dataset=args.dataset)
    base = replace(base, seeds=2, select="ensemble", total_timesteps=args.steps, eval_every=10**9,
                   eval_episodes=args.eval_episodes, snapshot_every=None, select_snapshots_from=None)
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = train_agent(args.checkpoint, env_cfg, Path(tmp), replace(base, workers=workers), progress=True)
            wall = time.perf_counter() - t0
        steps = int(result["dream_steps"])
        rows.append({"workers": workers, "seeds": 2, "imagined_steps": steps, "wall_s": round(wall, 1),
                     "steps_per_s": round(steps / wall, 1)})
        print(rows[-1], flush=True)
    for r in rows:
        r["speedup_vs_serial"] = round(r["steps_per_s"] / rows[0]["steps_per_s"], 2)
    write_results(args.name, rows, title="Seeds in parallel: two latent PPO seeds in the dream, serial vs two workers",
                  config=vars(args), compares="wall-clock imagined steps/s of both seeds together (each seed: "
                  f"{args.steps} imagined steps at batch 64 plus {args.eval_episodes} real episodes), workers=2 "
                  "against the serial path, measured in one run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
