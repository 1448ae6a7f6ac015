"""Clip loading: random windows/s from RAM vs streaming from chunked, gzip-1 HDF5.

    .venv/bin/python benchmarks/clip_loading.py [--frames 8000] [--env breakout] [--clip-len 8]

Collects a dataset of real frames (random policy, 64x64) into a temporary folder, then measures
``ClipDataset`` item throughput (windows of ``clip-len`` frames, uint8 tensors) for
  * RAM: the whole dataset decoded into memory at construction (its load time is reported too);
  * streaming, random order: windows drawn uniformly; each decodes only the HDF5 chunks it covers,
    through an LRU cache of ``--cache-mb`` of decoded chunks (much smaller than the dataset);
  * streaming, episode order: the same windows read episode by episode (cache hits);
  * direct slices: ``DatasetReader.read_frames`` of each random window, no cache;
  * whole episodes: decoding the window's whole episode, as an episode cache does on every miss
    (the design streaming replaced).
Compares: each way's windows/s against RAM's, same dataset, same process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from sfv_world.datasets import DatasetReader, RandomPolicy, collect  # noqa: E402
from sfv_world.datasets.clips import ClipDataset  # noqa: E402
from sfv_world.envs.sources import make_source_env  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "env"


def rate(fn, indices) -> float:
    t = time.perf_counter()
    for i in indices:
        fn(int(i))
    return len(indices) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--env", default="breakout")
    ap.add_argument("--frames", type=int, default=8000)
    ap.add_argument("--clip-len", type=int, default=8)
    ap.add_argument("--windows", type=int, default=2000, help="windows per measurement (RAM)")
    ap.add_argument("--stream-windows", type=int, default=300, help="windows per streaming measurement")
    ap.add_argument("--cache-mb", type=float, default=16.0, help="streaming LRU cache of decoded chunks")
    args = ap.parse_args()
    cfg = OmegaConf.load(CONFIGS / f"{args.env}.yaml")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / args.env
        env = make_source_env(cfg)
        collect(env, path, RandomPolicy(env.action_space), episodes=None, max_frames=args.frames,
                frame_source=cfg.frame_source, seed=0, progress=False)
        env.close()
        reader = DatasetReader(path)
        raw_mb = reader.num_frames * int(np.prod(reader.frame_shape)) / 1e6
        disk_mb = reader.data_file.stat().st_size / 1e6

        t = time.perf_counter()
        ram = ClipDataset(reader, None, args.clip_len)
        load_s = time.perf_counter() - t
        stream = ClipDataset(reader, None, args.clip_len, memory_budget_gb=0.0,
                             cache_mb=args.cache_mb)
        assert ram.in_memory and not stream.in_memory
        n = len(ram)
        rand = rng.integers(0, n, args.windows)
        rand_s = rand[: args.stream_windows]
        ordered = np.sort(rand_s)
        ram_rate = rate(ram.__getitem__, rand)

        def direct(i: int) -> None:
            e, s = ram.index[i]
            reader.read_frames(int(e), int(s), int(s) + args.clip_len)

        def whole_episode(i: int) -> None:
            e, s = ram.index[i]
            reader.read_frames(int(e), 0, reader.episode_lengths[int(e)] + 1)[int(s) : int(s) + args.clip_len]

        rows = [
            {"way": "RAM, random", "windows/s": ram_rate, "vs RAM": 1.0,
             "note": f"load {load_s:.2f} s for {reader.num_frames} frames ({raw_mb:.0f} MB raw)"},
            {"way": "streaming, random (LRU)", "windows/s": rate(stream.__getitem__, rand_s),
             "note": f"LRU cache of chunks, {args.cache_mb:.0f} MB of {raw_mb:.0f} MB"},
            {"way": "streaming, episode order (LRU)", "windows/s": rate(stream.__getitem__, ordered),
             "note": "same windows sorted by (episode, start)"},
            {"way": "direct chunk slices, random", "windows/s": rate(direct, rand_s),
             "note": "read_frames(e, s, s+T): only the window's chunks"},
            {"way": "whole episode per window, random", "windows/s": rate(whole_episode, rand_s),
             "note": "an episode cache that always misses"},
        ]
        for row in rows[1:]:
            row["vs RAM"] = row["windows/s"] / ram_rate
    write_results("clip_loading", rows, title=f"Clip loading: {args.clip_len}-frame windows of {args.env} "
                  f"({reader.num_frames} frames, {reader.num_episodes} episodes, {disk_mb:.1f} MB on disk)",
                  config=vars(args), columns=["way", "windows/s", "vs RAM", "note"],
                  compares="windows/s of each reading strategy vs RAM, same dataset and random windows, "
                           "same process, no DataLoader workers.")


if __name__ == "__main__":
    main()
