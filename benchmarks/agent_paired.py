"""Paired agent runs: the same seeds and real episodes under two or more dream settings, side by side.

    python benchmarks/agent_paired.py \
        --run "preset=/tmp/a/agent/ppo-latent" --run "temperature 0.5=/tmp/b/agent/ppo-latent" \
        --name agent_temperature_s26

Each ``--run`` is ``label=folder``: an imagination agent's folder (``<run_dir>/agent/ppo-latent``) whose seeds
``seed0``, ``seed1``, ... were trained by ``sfv-world agent`` with ``agent.seeds=N``. Every seed's ``eval.csv``
holds its real return over its own 20 evaluation episodes (seeds 10000 + seed), so seed k of two runs played the
same real episodes, and their difference is paired: the world model, PPO seed and episodes are the same, only
the setting differs. ``--at`` picks the evaluation at that many imagined steps (default: each seed's last).

One row per run: each seed's real return and dreamed training-episode return, their means, and (for every run
after the first) the mean paired difference from the first run with the number of seeds it beat. Where the run
chose an agent with real episodes (``agent.select``), its choice and selection-episode return are listed too.
Nothing is trained here; the numbers are those the agent runs logged. Writes ``benchmarks/results/<name>.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results


def parse_run(text: str) -> tuple[str, Path]:
    """``label=folder`` (split at the last ``=``, so a label may hold one: ``sampler.temperature=0.5=runs/a``) ->
    (label, folder); exits naming the argument if it is malformed or has no seeds."""
    label, sep, folder = text.rpartition("=")
    if not sep or not label.strip() or not folder.strip():
        raise SystemExit(f"--run {text!r}: expected label=folder")
    path = Path(folder.strip())
    if not (path / "seed0" / "eval.csv").is_file():
        raise SystemExit(f"--run {text!r}: {path / 'seed0' / 'eval.csv'} not found (an agent folder with seed0, seed1, ...)")
    return label.strip(), path


def seed_results(folder: Path, at: int | None) -> list[dict[str, float]]:
    """[{real, dreamed, timesteps}] per seed folder ``seed<k>`` of an agent run, in seed order.

    at: imagined steps of the evaluation to read (the first row at or past it); None: each seed's last row.
    Raises ValueError naming the file if a seed has no such evaluation.
    """
    from sfv_world.agents.imagination import read_eval_csv

    out = []
    k = 0
    while (folder / f"seed{k}" / "eval.csv").is_file():
        path = folder / f"seed{k}" / "eval.csv"
        log = read_eval_csv(path)
        steps, real = log["timesteps"], log["real_return_mean"]
        ok = np.isfinite(real)
        if at is not None:
            ok &= steps >= at
        if not ok.any():
            raise ValueError(f"{path}: no real evaluation" + (f" at or past {at} imagined steps" if at else ""))
        i = int(np.flatnonzero(ok)[0] if at is not None else np.flatnonzero(ok)[-1])
        out.append({"real": float(real[i]), "dreamed": float(log["imagined_return_mean"][i]),
                    "timesteps": int(steps[i])})
        k += 1
    return out


def selection_summary(folder: Path) -> dict[str, object]:
    """The run's real-episode choice from its ``result.json`` ({} where it chose without real episodes)."""
    path = folder / "result.json"
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    sel = result.get("selection") or {}
    if not sel.get("selected"):
        return {}
    return {"selected": sel["selected"], "selected_return": round(float(result["real_return_mean"]), 1)}


def paired_rows(runs: list[tuple[str, Path]], at: int | None) -> list[dict[str, object]]:
    """One table row per run; the paired columns compare each run with the first over their common seeds."""
    results = [seed_results(folder, at) for _, folder in runs]
    base = [r["real"] for r in results[0]]
    rows = []
    for (label, folder), seeds in zip(runs, results):
        real = [s["real"] for s in seeds]
        row: dict[str, object] = {"run": label, "seeds": len(seeds)}
        for k, s in enumerate(seeds):
            row[f"seed{k}"] = round(s["real"], 1)
        row["mean"] = round(float(np.mean(real)), 1)
        row["dreamed_mean"] = round(float(np.mean([s["dreamed"] for s in seeds])), 1)
        n = min(len(base), len(real))
        diff = np.array(real[:n]) - np.array(base[:n])
        row["paired_diff"] = round(float(diff.mean()), 1) if rows and n else ""
        row["better"] = f"{int((diff > 0).sum())} of {n}" if rows and n else ""
        row.update(selection_summary(folder) or {"selected": "", "selected_return": ""})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="label=agent folder (<run_dir>/agent/ppo-latent)")
    p.add_argument("--at", type=int, default=None, help="imagined steps of the evaluation to compare (default: last)")
    p.add_argument("--name", default="agent_paired")
    p.add_argument("--title", default="Paired agent runs: the same model, PPO seeds and real episodes")
    p.add_argument("--note", default="", help="what the runs differ in (added to the table's description)")
    args = p.parse_args(argv)
    if len(args.run) < 2:
        raise SystemExit("--run: give at least two runs to compare")
    if args.at is not None and args.at < 1:
        raise SystemExit(f"--at {args.at}: must be a positive number of imagined steps")
    runs = [parse_run(r) for r in args.run]
    try:
        rows = paired_rows(runs, args.at)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    most = max(int(row["seeds"]) for row in rows)
    columns = ["run", "seeds", *(f"seed{k}" for k in range(most)), "mean", "dreamed_mean", "paired_diff", "better",
               "selected", "selected_return"]
    compares = ("Real return of each PPO seed over its own 20 real CartPole episodes (seeds 10000 + seed, the same in "
                "every run), " + ("at the last evaluation" if args.at is None else f"at {args.at} imagined steps")
                + "; dreamed_mean: the training episodes' mean return in the dream there; paired_diff: the mean "
                "per-seed difference from the first run, better: seeds above it; selected: the run's choice among "
                "seeds, snapshots and ensemble with real episodes, and its return on them. " + args.note).strip()
    write_results(args.name, rows, title=args.title, compares=compares, columns=columns,
                  config={"runs": {label: str(folder) for label, folder in runs}, "at": args.at})


if __name__ == "__main__":
    main()
