"""Collection throughput per env preset: frames/s of the whole collector vs the bare env.

    .venv/bin/python benchmarks/collect_throughput.py [--frames 1000] [--envs cartpole pong breakout minigrid]

For each preset (configs/env/<name>.yaml, random policy, 64x64 frames) it measures
  * env only: ``step`` + frame grab (render or obs) with random actions, nothing else;
  * collector: ``sfv_world.datasets.collect`` end to end (step, frame grab, area resize, HDF5 gzip-1
    writes, metadata commits) into a temporary folder.
Compares: collector frames/s against env-only frames/s of the same env in the same process (the ratio
is the share of time the env itself takes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from sfv_world.datasets import DatasetReader, RandomPolicy, collect, get_frame  # noqa: E402
from sfv_world.envs.sources import make_source_env  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "env"


def env_only_fps(cfg, frames: int) -> float:
    env = make_source_env(cfg)
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    get_frame(env, obs, cfg.frame_source)
    t = time.perf_counter()
    for _ in range(frames):
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        get_frame(env, obs, cfg.frame_source)
        if term or trunc:
            obs, _ = env.reset()
            get_frame(env, obs, cfg.frame_source)
    dt = time.perf_counter() - t
    env.close()
    return frames / dt


def collector_fps(cfg, frames: int, frame_size: int) -> tuple[float, int, float]:
    env = make_source_env(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / cfg.name
        t = time.perf_counter()
        stats = collect(env, path, RandomPolicy(env.action_space), episodes=None, max_frames=frames,
                        frame_size=frame_size, frame_source=cfg.frame_source, seed=0, progress=False)
        dt = time.perf_counter() - t
        r = DatasetReader(path)
        raw = r.num_frames * frame_size * frame_size * r.frame_shape[2]
        ratio = raw / r.data_file.stat().st_size
    env.close()
    return stats.transitions / dt, stats.episodes, ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--frame-size", type=int, default=64)
    ap.add_argument("--envs", nargs="+", default=["cartpole", "pong", "breakout", "minigrid"])
    args = ap.parse_args()
    rows = []
    for name in args.envs:
        cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
        collector_fps(cfg, min(50, args.frames), args.frame_size)  # warm-up: imports, numba cache
        bare = env_only_fps(cfg, args.frames)
        fps, episodes, ratio = collector_fps(cfg, args.frames, args.frame_size)
        rows.append({"env": name, "id": cfg.id, "source": cfg.frame_source, "env-only frames/s": bare,
                     "collector frames/s": fps, "collector / env-only": fps / bare,
                     "episodes": episodes, "compression (raw/hdf5)": ratio})
    write_results("collect_throughput", rows, title="Collection throughput (random policy, "
                  f"{args.frame_size}x{args.frame_size} frames)", config=vars(args),
                  compares="collector frames/s (step + frame grab + area resize + gzip-1 HDF5 + metadata "
                           "commits) vs env-only frames/s (step + frame grab) of the same env, same process.")


if __name__ == "__main__":
    main()
