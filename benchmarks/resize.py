"""Area resize: numba kernel vs the obvious numpy version (two float64 matrix products).

    .venv/bin/python benchmarks/resize.py [--repeats 5]

Shapes are the real source frames: Atari 210x160, CartPole 400x600, MiniGrid 256x256, all to 64x64,
one frame at a time (what the collector does) and in batches of 64 (what ClipDataset does on load).
Compares: numpy ms/frame divided by numba ms/frame (speed-up), and checks both give identical output.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Same thread budget for both sides: the numpy reference's BLAS would otherwise spin several threads
# per matrix product (set --blas-threads 0 to keep the BLAS default).
_BLAS = next((a.split("=")[1] for a in sys.argv if a.startswith("--blas-threads=")), "1")
if _BLAS != "0":
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = _BLAS

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from sfv_world.datasets.preprocess import area_resize, area_resize_reference  # noqa: E402

CASES = [("Atari 210x160", (210, 160, 3)), ("CartPole 400x600", (400, 600, 3)),
         ("MiniGrid 256x256", (256, 256, 3))]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (numba compile / cache load)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--blas-threads", type=int, default=1, help="BLAS threads for numpy (0: library default); "
                    "pass as --blas-threads=N")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, shape in CASES:
        for batch in (1, 64):
            x = rng.integers(0, 256, (batch, *shape) if batch > 1 else shape, dtype=np.uint8)
            assert np.array_equal(area_resize(x, args.size), area_resize_reference(x, args.size))
            t_nb = best_time(lambda: area_resize(x, args.size), args.repeats) / batch
            t_np = best_time(lambda: area_resize_reference(x, args.size), args.repeats) / batch
            rows.append({"input": name, "batch": batch, "numba ms/frame": 1e3 * t_nb,
                         "numpy ms/frame": 1e3 * t_np, "numba frames/s": 1 / t_nb,
                         "speed-up (numpy/numba)": t_np / t_nb, "identical": True})
    write_results("resize", rows, title=f"Area resize to {args.size}x{args.size}: numba vs numpy",
                  config=vars(args),
                  compares="Speed-up = numpy reference time / numba kernel time (one thread), same inputs, "
                           "same process, best of N repeats after a warm-up; numpy's BLAS limited to "
                           "--blas-threads threads. Outputs are bit-identical.")


if __name__ == "__main__":
    main()
