"""Open-loop prediction quality on the states an agent visits vs those a random policy visits.

    .venv/bin/python benchmarks/quality_on_agent_data.py --dataset runs/cpu-demo/iter1/data/cartpole \
        --checkpoint base=runs/cpu-demo/checkpoints/last.pt --checkpoint finetuned=runs/cpu-demo/iter1/checkpoints/last.pt

``--dataset`` is a DIAMOND iteration's merged dataset (``merge_datasets``: the random-policy episodes
first, then those the agent collected; the boundary is read from its ``merged_from`` metadata). The
held-out episodes are the test split of the *last* ``--checkpoint`` (trained on that dataset), divided
by source; every checkpoint is scored on the same windows with ``sfv-world quality``
(``quality.episodes``), temperature 0. Compares: model PSNR against copy-last on each source, and the
gap between sources: a dream an agent trains in must be right where the agent goes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

from sfv_world.apps.cli import compose
from sfv_world.apps.quality import evaluate_quality
from sfv_world.checkpoint import load_checkpoint
from sfv_world.datasets import DatasetReader


def first_collected_episode(reader: DatasetReader) -> int:
    """Episodes of a merged dataset before this id came from its first source (the random policy)."""
    sources = (reader.metadata.get("sfv_world") or {}).get("merged_from")
    if not sources or len(sources) < 2:
        raise SystemExit(f"--dataset {reader.path} is not a merged DIAMOND dataset (no 'merged_from' in its metadata)")
    with DatasetReader(sources[0]) as first:
        return first.num_episodes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="merged dataset of a DIAMOND iteration")
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="a world model to score (repeatable); the last one's test split is used")
    p.add_argument("--max-windows", type=int, default=64, help="windows per source")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = []
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            p.error(f"--checkpoint {item!r}: expected NAME=PATH of an existing checkpoint")
        models.append((name, path))
    with DatasetReader(args.dataset) as reader:
        boundary = first_collected_episode(reader)
    test = [int(e) for e in load_checkpoint(models[-1][1])["dataset"]["splits"]["test"]]
    sources = {"random policy": [e for e in test if e < boundary], "agent": [e for e in test if e >= boundary]}
    rows = []
    for source, ids in sources.items():
        if not ids:
            p.error(f"the test split of {models[-1][1]} holds no {source} episode")
        for name, path in models:
            cfg = compose(["device=cpu", f"checkpoint={path}", f"quality.dataset={args.dataset}",
                           f"quality.episodes=[{','.join(map(str, ids))}]", f"quality.max_windows={args.max_windows}",
                           "quality.temperatures=[0]", "run_dir=/tmp/sfv_quality_on_agent_data",
                           "quality.output=/tmp/sfv_quality_on_agent_data/quality.json"])
            q = evaluate_quality(cfg)
            pm, pc = q["psnr_model"], q["psnr_copy_last"]
            rows.append({"episodes": source, "model": name, "test_episodes": q["test_episodes"], "windows": q["windows"],
                         "psnr_h1": pm[0], "copy_last_h1": pc[0], "psnr_h4": pm[min(3, len(pm) - 1)],
                         "copy_last_h4": pc[min(3, len(pc) - 1)], "psnr_h8": pm[-1], "copy_last_h8": pc[-1],
                         "termination_f1": q["termination_f1"]})
            print(rows[-1], flush=True)
    write_results("quality_on_agent_data", rows,
                  title="Open-loop quality: random-policy vs agent-collected held-out episodes",
                  config={"dataset": args.dataset, "checkpoints": dict(models), "first_agent_episode": boundary,
                          "max_windows": args.max_windows, "temperature": 0},
                  compares="PSNR (dB, MSE pooled over windows) of each model against copy-last, on held-out "
                           "episodes of each source, same windows for every model; horizon steps 1, 4 and 8.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
