"""Wall time of `sfv-world rollout` (open-loop replay of held-out episodes) against issue 6's claim:
"a rollout over 16 held-out CartPole episodes runs in under 2 minutes on CPU".

    .venv/bin/python benchmarks/rollout_timing.py --checkpoint runs/cpu-demo/checkpoints/last.pt [--threads 1]

The rollout command is run twice, with everything it writes (the generated HDF5 dataset, videos,
plots and JSON) going to a temporary folder:
- with the default sampler settings (`configs/sampler/jacobi.yaml`);
- as the worst case for the sampler, with `sampler.threshold=0`: block Jacobi never stops early, so
  every frame costs the full number of iterations a trained model could need.

Columns: Jacobi iterations per frame, and seconds spent generating (open loop, all episodes in one
batch), teacher-forcing (the NLL of the real and copy-last frames), loading plus writing outputs, and
in total. PSNR is that of the whole run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

CLAIM_SECONDS = 120.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/cpu-demo/checkpoints/last.pt")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--context", type=int, default=4)
    ap.add_argument("--horizon", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the claim is for a 2-core CPU)")
    args = ap.parse_args()
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint: no checkpoint at {args.checkpoint} (train one with `sfv-world train`)")
    torch.set_num_threads(args.threads)

    from sfv_world.apps.cli import compose
    from sfv_world.apps.rollout import run

    rows = []
    for name, extra in [("default sampler (configs/sampler/jacobi.yaml)", []), ("worst case: sampler.threshold=0", ["sampler.threshold=0"])]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose([f"checkpoint={args.checkpoint}", f"run_dir={tmp}", "device=cpu",
                           f"rollout.output={tmp}/rollout", f"rollout.episodes={args.episodes}",
                           f"rollout.context={args.context}", f"rollout.horizon={args.horizon}", *extra])
            s = run(cfg)
        sec = s["seconds"]
        rows.append({
            "run": name, "episodes": s["episodes"], "jacobi_it_per_frame": s["overall"]["jacobi_iterations"],
            "generate_s": sec["generate"], "teacher_forced_s": sec["teacher_forced"],
            "load_and_write_s": round(sec["load"] + sec["write_outputs"], 3), "total_s": sec["total"],
            "psnr_dream_db": s["overall"]["psnr_dream"], "psnr_copy_last_db": s["overall"]["psnr_copy_last"],
            "under_2_min": sec["total"] < CLAIM_SECONDS,
        })
    write_results(
        "rollout_timing", rows,
        title=f"sfv-world rollout: {args.episodes} held-out episodes, k={args.context}, H={args.horizon}",
        config={"checkpoint": args.checkpoint, "torch_threads": args.threads, "episodes": args.episodes,
                "context": args.context, "horizon": args.horizon},
        compares=f"Total wall time of the whole command against the claim of under {CLAIM_SECONDS:.0f} s on CPU "
                 "(issue 6); the worst case forces every Jacobi iteration.",
    )


if __name__ == "__main__":
    main()
