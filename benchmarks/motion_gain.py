"""Motion gain on CartPole: how much of the real motion does the dream reproduce, horizon by horizon?

    python benchmarks/motion_gain.py --checkpoint runs/a/checkpoints/last.pt [runs/b/checkpoints/last.pt ...] \
        --dataset runs/cpu-demo/data/cartpole [--samplers 'default;method=sequential'] [--name motion_gain]

The dream's pole falls about half as fast as the real one (``dream_fidelity.py``, ``dream_physics.py``).
This tells the two causes apart. Windows of held-out (test-split) episodes start at frames 0, 4, 8, ...;
the dream gets ``--context`` real frames, then replays the logged actions open-loop for ``--horizon``
steps. At each horizon h the change from the last context frame is compared, dream against real:

- ``theta_gain``: the least-squares slope of the dreamed pole-angle change on the true one,
  sum(d_dream * d_true) / sum(d_true^2). The true angles come from replaying each episode's seed and
  actions; the dreamed ones are read off frames by the ridge probe of ``dream_physics.py`` (fitted on
  the train split's real frames and true states), and divided by the same slope of the probe on the
  real frames (``probe_gain_real``), so the probe's shrinkage cancels;
- ``pixel_gain``: the same slope on whole frames (float pixels), so it mixes cart and pole.

A gain of 1 means the dream moves as far as reality on average; below 1, it lags. If the gain is
already low at h = 1, the one-step model under-predicts motion (under-fitting); if it starts near 1 and
decays with h, the error compounds in the rollout (exposure bias). Writes
``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from dream_physics import StateProbe, cartpole_probe, parse_sampler, true_states


def slope(pred: np.ndarray, real: np.ndarray, valid: np.ndarray) -> float:
    """Least-squares gain of pred on real over valid rows: float arrays [N, ...], valid bool [N]."""
    p = pred[valid].reshape(int(valid.sum()), -1).astype(np.float64)
    r = real[valid].reshape(int(valid.sum()), -1).astype(np.float64)
    den = float((r * r).sum())
    return float((p * r).sum() / den) if den > 0 else float("nan")


def gains(runtime, dataset: str, ids: list[int], probe: StateProbe, context: int, horizon: int, starts: list[int],
          batch: int, seed: int) -> list[dict]:
    """Per horizon h = 1..H: theta / pixel gains and the counts behind them.

    The real angle change comes from the true states (replayed episodes); the dream's is read by the
    probe and divided by the probe's own gain on real frames, so the probe's shrinkage cancels.
    """
    import gymnasium as gym
    from sfv_world.datasets import DatasetReader
    from sfv_world.rollout import load_replay_batch, replay_open_loop

    env = gym.make("CartPole-v1")
    with DatasetReader(dataset) as reader:
        states = {e: true_states(env, reader.load_episode(e, observations=False)) for e in ids}
    dt_dream, dt_probe_real, dt_true, d_pix_dream, d_pix_real, valid = [], [], [], [], [], []
    for start in starts:
        try:
            rb, _ = load_replay_batch(dataset, ids, context, horizon, runtime.frame_shape[0], start=start)
        except ValueError:
            continue  # no episode is that long
        for lo in range(0, len(rb), batch):
            sub = _rows(rb, slice(lo, lo + batch))
            rt = runtime.sibling(len(sub), seed=seed + lo + 1000 * start)
            r = replay_open_loop(rt, sub, seed=seed + lo + 1000 * start)
            n, H = r.dream.shape[:2]
            last = r.context[:, -1].astype(np.float32)  # [n, h, w, C]
            th_last = probe(r.context[:, -1])[:, 2]
            dt_dream.append(probe(r.dream.reshape(n * H, *r.dream.shape[2:]))[:, 2].reshape(n, H) - th_last[:, None])
            dt_probe_real.append(probe(r.real.reshape(n * H, *r.real.shape[2:]))[:, 2].reshape(n, H) - th_last[:, None])
            true = np.zeros((n, H))
            for i, e in enumerate(sub.episode_ids):
                s = states[e][:, 2]
                t0 = start + context - 1
                idx = np.minimum(np.arange(t0 + 1, t0 + 1 + H), len(s) - 1)  # past the end: masked by valid
                true[i] = s[idx] - s[t0]
            dt_true.append(true)
            d_pix_dream.append(r.dream.astype(np.float32) - last[:, None])
            d_pix_real.append(r.real.astype(np.float32) - last[:, None])
            valid.append(r.valid)
    if not valid:
        raise SystemExit(f"no held-out episode has {context + 1} frames")
    dtd, dtp, dtt = np.concatenate(dt_dream), np.concatenate(dt_probe_real), np.concatenate(dt_true)
    dpd, dpr, v = np.concatenate(d_pix_dream), np.concatenate(d_pix_real), np.concatenate(valid)
    rows = []
    for h in range(dtd.shape[1]):
        m = v[:, h]
        probe_gain = slope(dtp[:, h], dtt[:, h], m)  # the probe's own slope on real frames
        rows.append({
            "horizon": h + 1, "windows": int(m.sum()),
            "theta_gain": round(slope(dtd[:, h], dtt[:, h], m) / probe_gain, 3),
            "probe_gain_real": round(probe_gain, 3),
            "pixel_gain": round(slope(dpd[:, h], dpr[:, h], m), 3),
            "real_abs_dtheta_deg": round(float(np.degrees(np.abs(dtt[m, h]).mean())), 3) if m.any() else float("nan"),
        })
    return rows


def _rows(rb, sl: slice):
    """The rows ``sl`` of a ReplayBatch."""
    from dataclasses import replace

    return replace(rb, episode_ids=rb.episode_ids[sl], frames=rb.frames[sl], actions=rb.actions[sl],
                   rewards=rb.rewards[sl], terminations=rb.terminations[sl], valid=rb.valid[sl])


def main() -> None:
    from sfv_world.checkpoint import load_checkpoint
    from sfv_world.rollout import held_out_ids
    from sfv_world.world import WorldRuntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="one or more checkpoints trained on --dataset (with one frame size and one split)")
    p.add_argument("--dataset", required=True, help="the checkpoints' CartPole dataset folder")
    p.add_argument("--samplers", default="default;temperature=0.0",
                   help="semicolon-separated sampler variants: 'default' (the checkpoint's) or key=value,... overrides")
    p.add_argument("--context", type=int, default=4)
    p.add_argument("--horizon", type=int, default=6)
    p.add_argument("--starts", default="0,4,8,12", help="comma-separated window start frames")
    p.add_argument("--episodes", type=int, default=100, help="held-out episodes used")
    p.add_argument("--probe-episodes", type=int, default=400, help="train-split episodes to fit the probe on")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="motion_gain")
    args = p.parse_args()
    for path in args.checkpoint:
        if not Path(path).is_file():
            raise SystemExit(f"--checkpoint {path}: no such file")
    if not Path(args.dataset).is_dir():
        raise SystemExit(f"--dataset {args.dataset}: no such folder")
    if args.context < 2 or args.horizon < 1:
        raise SystemExit(f"--context must be >= 2 and --horizon >= 1 (got {args.context}, {args.horizon})")

    metas = []
    for path in args.checkpoint:
        payload = load_checkpoint(path, map_location="cpu")
        metas.append((int(payload["model_config"]["frame_size"]), payload.get("dataset") or {}))
    if len({m[0] for m in metas}) > 1 or any(m[1].get("splits") != metas[0][1].get("splits") for m in metas):
        raise SystemExit("--checkpoint: the checkpoints differ in frame size or dataset split; compare them in "
                         "separate runs")
    frame_size, meta = metas[0]
    test_ids, split = held_out_ids(meta, "test")
    train_ids = [int(e) for e in (meta.get("splits") or {}).get("train", [])][: args.probe_episodes]
    if not train_ids:
        raise SystemExit(f"--checkpoint {args.checkpoint[0]}: its dataset metadata has no train split for the probe")
    probe = cartpole_probe(args.dataset, train_ids, frame_size)
    print(f"probe held-out R^2: x {probe.r2[0]:.3f}, theta {probe.r2[2]:.3f}", flush=True)

    starts = [int(s) for s in args.starts.split(",")]
    rows = []
    for path in args.checkpoint:
        for text in args.samplers.split(";"):
            runtime = WorldRuntime.from_checkpoint(path, batch_size=1, sampler=parse_sampler(text), seed=args.seed)
            for row in gains(runtime, args.dataset, test_ids[: args.episodes], probe, args.context, args.horizon,
                             starts, args.batch, args.seed):
                rows.append({"checkpoint": path, "sampler": text.strip(), **row})
                print(rows[-1], flush=True)
    write_results(
        args.name, rows, title="Motion gain: the dream's change from the last context frame against the real change",
        config={**vars(args), "split": split, "probe_r2_theta": round(float(probe.r2[2]), 4)},
        compares=(f"open-loop replay of held-out ({split}) windows with the logged actions after {args.context} real "
                  f"frames; gain = least-squares slope of the dreamed change on the real change since the last context "
                  f"frame (1: as far as reality; < 1: the dream lags). theta read by a pixel ridge probe (held-out "
                  f"R^2 {probe.r2[2]:.3f}), divided by the probe's own gain on real frames."),
    )


if __name__ == "__main__":
    main()
