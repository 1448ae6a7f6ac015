"""Offline rollouts of a world model on logged data: open-loop replay, counterfactuals, free running.

Everything here works on a :class:`~sfv_world.world.WorldRuntime` (or its ``WorldModel``) and on
numpy arrays; datasets are read and written through ``sfv_world.datasets``. Nothing imports
gymnasium, SB3 or pygame (DESIGN.md section 2); ``sfv_world.apps.rollout`` is the command around it.

- :func:`ssim`: structural similarity of uint8 images (Gaussian window, Wang et al. 2004).
- :func:`load_replay_batch` + :func:`replay_open_loop`: k real context frames, then the *logged*
  actions replayed open-loop for H steps, all episodes in one batch; per horizon step PSNR / SSIM
  against the real frames, the NLL of the real frames teacher-forced, the NLL of the generated frames,
  reward / termination agreement, and the same for the copy-last-frame baseline
  (:func:`summarize_replay`).
- :func:`invert_to_noise` + :func:`regenerate`: a real clip mapped to its prior noise z exactly (the
  flow is invertible) and regenerated from the same z, under the logged or altered actions
  (:func:`counterfactual`).
- :func:`free_run`: generation from one image or a context clip with a policy or random actions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfv_world.autoencoder import IdentityCodec
from sfv_world.model import nll_to_bits_per_dim
from sfv_world.quality import mse, psnr, psnr_from_mse
from sfv_world.video import difference, side_by_side, write_video

# ----------------------------------------------------------------------------------------------
# SSIM


def gaussian_window(sigma: float = 1.5, radius: int | None = None) -> np.ndarray:
    """Normalised 1-D Gaussian taps float64 [2r+1]; r defaults to int(3.5 sigma + 0.5) (11 taps at 1.5)."""
    if sigma <= 0:
        raise ValueError(f"gaussian_window: sigma must be > 0, got {sigma}")
    r = int(3.5 * sigma + 0.5) if radius is None else int(radius)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of float64 [..., H, W, C] over H and W with taps g."""
    n = g.shape[0]
    x = np.lib.stride_tricks.sliding_window_view(x, n, axis=-3) @ g  # [..., H-n+1, W, C]
    return np.lib.stride_tricks.sliding_window_view(x, n, axis=-2) @ g  # [..., H-n+1, W-n+1, C]


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) of uint8 images, one value per leading index.

    pred, target: uint8 [..., H, W, C] of the same shape -> float64 [...] in [-1, 1] (1 iff identical).
    Local means, variances and the covariance are Gaussian-weighted (sigma 1.5, 11 taps; the window
    shrinks to the image for frames under 11 pixels), population statistics, constants
    K1 = 0.01, K2 = 0.03, computed per channel over 'valid' window positions and averaged.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ, pred {pred.shape} vs target {target.shape}")
    if pred.ndim < 3:
        raise ValueError(f"ssim: images must be [..., H, W, C], got shape {pred.shape}")
    h, w = pred.shape[-3:-1]
    g = gaussian_window(sigma)
    if g.shape[0] > min(h, w):
        g = gaussian_window(sigma, radius=(min(h, w) - 1) // 2)
    x, y = pred.astype(np.float64), target.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    vx = _filter_valid(x * x, g) - mx * mx
    vy = _filter_valid(y * y, g) - my * my
    cxy = _filter_valid(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(axis=(-3, -2, -1))


# ----------------------------------------------------------------------------------------------
# held-out episodes


def held_out_ids(dataset_meta: dict[str, Any], split: str = "test") -> tuple[list[int], str]:
    """Episode ids of ``split`` in a checkpoint's dataset metadata (``payload["dataset"]["splits"]``).

    An empty test split falls back to the validation split. Returns (ids, split actually used).
    """
    splits = dataset_meta.get("splits") or {}
    if split not in ("train", "val", "test"):
        raise ValueError(f"rollout.split must be 'train', 'val' or 'test', got {split!r}")
    ids = list(splits.get(split) or [])
    if not ids and split == "test" and splits.get("val"):
        return [int(e) for e in splits["val"]], "val"
    if not ids:
        raise ValueError(f"the checkpoint's dataset split {split!r} is empty (splits: "
                         f"{ {k: len(v) for k, v in splits.items()} }); pick rollout.split=train|val|test")
    return [int(e) for e in ids], split


@dataclass
class ReplayBatch:
    """Windows of N logged episodes at the model's frame size (T = context + horizon frames).

    frames        uint8 [N, T, h, w, C]   frames past an episode's end repeat its last frame
    actions       [N, T-1]                int64 (Discrete) or float32 [N, T-1, A] (Box); 0 past the end
    rewards       float32 [N, T-1]
    terminations  bool [N, T-1]
    valid         bool [N, T]             True for real frames
    """

    episode_ids: list[int]
    start: int
    context: int
    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    valid: np.ndarray

    @property
    def horizon(self) -> int:
        return int(self.frames.shape[1] - self.context)

    def __len__(self) -> int:
        return len(self.episode_ids)


def load_replay_batch(dataset: str | Path, episode_ids: Sequence[int], context: int, horizon: int,
                      frame_size: int, start: int = 0) -> tuple[ReplayBatch, list[int]]:
    """Read frames ``start .. start+context+horizon`` of each episode, area-resized to ``frame_size``.

    Episodes without ``context + 1`` frames from ``start`` are skipped (returned as the second value);
    shorter ones are padded and masked (``valid``). Raises ValueError when none is long enough.
    """
    from sfv_world.datasets import DatasetReader, area_resize

    if context < 1 or horizon < 1 or start < 0:
        raise ValueError(f"rollout: context ({context}) and horizon ({horizon}) must be >= 1, start ({start}) >= 0")
    T = context + horizon
    frames, actions, rewards, terms, valid, kept, skipped = [], [], [], [], [], [], []
    with DatasetReader(dataset) as reader:
        for eid in episode_ids:
            eid = int(eid)
            n_frames = reader.episode_lengths[eid] + 1
            if n_frames - start < context + 1:
                skipped.append(eid)
                continue
            ep = reader.load_episode(eid, observations=False)
            stop = min(start + T, n_frames)
            f = area_resize(reader.read_frames(eid, start, stop), frame_size)
            n = f.shape[0]
            pad = T - n
            frames.append(np.concatenate([f, np.repeat(f[-1:], pad, 0)]) if pad else f)
            a = ep.actions[start : stop - 1]
            a_pad = np.zeros((pad, *a.shape[1:]), a.dtype)
            actions.append(np.concatenate([a, a_pad]))
            rewards.append(np.concatenate([ep.rewards[start : stop - 1], np.zeros(pad, np.float32)]))
            terms.append(np.concatenate([ep.terminations[start : stop - 1], np.zeros(pad, bool)]))
            valid.append(np.arange(T) < n)
            kept.append(eid)
    if not kept:
        raise ValueError(f"dataset {dataset}: no episode of {list(episode_ids)[:8]}... has {context + 1} frames "
                         f"from frame {start} (rollout.context={context}, rollout.start={start})")
    return ReplayBatch(kept, start, context, np.stack(frames), np.stack(actions), np.stack(rewards).astype(np.float32),
                       np.stack(terms).astype(bool), np.stack(valid)), skipped


# ----------------------------------------------------------------------------------------------
# open-loop replay


@dataclass
class ReplayResult:
    """Open-loop replay of a :class:`ReplayBatch` (H = horizon; per row and horizon step).

    dream [N, H, h, w, C] uint8; real [N, H, h, w, C] uint8; context [N, k, h, w, C] uint8;
    valid bool [N, H]; psnr_* / ssim_* float64 [N, H]; mse_* float64 [N, H];
    nll_generated / nll_real / nll_copy float32 [N, H] bits/dim (generated frames under the model
    while generating; real and copy-last frames teacher-forced); nll_context float32 [N, k];
    reward_* float32 [N, H]; termination_* bool [N, H] (prob > 0.5); jacobi_iterations int64 [N, H];
    seconds: wall time per phase.
    """

    batch: ReplayBatch
    context: np.ndarray
    dream: np.ndarray
    real: np.ndarray
    valid: np.ndarray
    mse_dream: np.ndarray
    mse_copy: np.ndarray
    psnr_dream: np.ndarray
    psnr_copy: np.ndarray
    ssim_dream: np.ndarray
    ssim_copy: np.ndarray
    nll_generated: np.ndarray
    nll_real: np.ndarray
    nll_copy: np.ndarray
    nll_context: np.ndarray
    reward_dream: np.ndarray
    reward_teacher: np.ndarray
    reward_copy: np.ndarray
    reward_real: np.ndarray
    termination_dream: np.ndarray
    termination_teacher: np.ndarray
    termination_copy: np.ndarray
    termination_real: np.ndarray
    jacobi_iterations: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)


def teacher_runtime(runtime, batch_size: int, seed: int | None = None):
    """A second :class:`~sfv_world.world.WorldRuntime` over the same model with another batch size."""
    return runtime.sibling(batch_size, seed)


@torch.no_grad()
def teacher_forced(model, frames: np.ndarray, actions: np.ndarray, generator: torch.Generator | None = None
                   ) -> dict[str, np.ndarray]:
    """One forward pass of the flow over real clips (noise-augmented like training and ``reset``).

    frames uint8 [B, T, h, w, C] at the model's size (T <= max_frames); actions [B, T-1(, A)].
    Returns ``nll`` float32 [B, T] bits/dim of each frame given the past, and the heads' ``rewards``
    float32 [B, T-1] and ``terminations`` bool [B, T-1] (logit > 0) for each transition.
    """
    p = next(model.parameters())
    x = IdentityCodec(p.dtype).encode(torch.from_numpy(np.ascontiguousarray(frames)).to(p.device).movedim(-1, -3))
    x = x + model.config.sigma * torch.randn(x.shape, generator=generator, dtype=p.dtype).to(p.device)
    out = model.flow(x, _actions_tensor(model, actions))
    return {
        "nll": nll_to_bits_per_dim(out.nll.float(), model.config).cpu().numpy(),
        "rewards": model.flow.reward_value(out.reward).float().cpu().numpy(),
        "terminations": (out.termination_logit > 0).cpu().numpy(),
    }


@torch.no_grad()
def replay_open_loop(runtime, batch: ReplayBatch, seed: int = 0) -> ReplayResult:
    """Replay ``batch``'s logged actions open-loop after its context; one batched step per horizon step.

    ``runtime`` must have ``batch_size == len(batch)``. The real and copy-last-frame videos are then
    teacher-forced as one batch of 2N clips (one forward pass; frame by frame through ``observe`` when
    context + horizon exceeds the runtime's window) for their NLL and the heads' reward / termination
    on real frames.
    """
    N, k, H = len(batch), batch.context, batch.horizon
    if runtime.batch_size != N:
        raise ValueError(f"replay_open_loop: runtime.batch_size={runtime.batch_size} != {N} episodes")
    t0 = time.perf_counter()
    runtime.seed(seed)
    res = runtime.reset(batch.frames[:, :k], batch.actions[:, : k - 1])
    dream, ll_gen, rew, term, iters = [], [], [], [], []
    for h in range(H):
        s = runtime.step(batch.actions[:, k - 1 + h])
        dream.append(s.frames)
        ll_gen.append(s.log_likelihood)
        rew.append(s.rewards)
        term.append(s.terminations)
        iters.append(s.jacobi_iterations)
    t1 = time.perf_counter()

    ctx = res.frames  # [N, k, h, w, C] at the model size
    copy = ctx[:, -1]
    T = k + H
    frames2 = np.concatenate([batch.frames, np.concatenate([ctx, np.repeat(copy[:, None], H, 1)], 1)])
    actions2 = np.concatenate([batch.actions, batch.actions])
    if T <= runtime.context_window:
        # the whole window in one forward pass (exact per-frame likelihoods: the flow is causal)
        tf = teacher_forced(runtime.model, frames2, actions2, torch.Generator().manual_seed(seed + 1))
        nll, rew_all, term_all = tf["nll"], tf["rewards"], tf["terminations"]
    else:  # longer than the model's window: observe frame by frame (the runtime re-encodes windows)
        tfr = teacher_runtime(runtime, 2 * N, seed=seed + 1)
        r0 = tfr.reset(frames2[:, :k], actions2[:, : k - 1])
        steps = [tfr.observe(frames2[:, k + h], actions2[:, k - 1 + h]) for h in range(H)]
        nll = np.concatenate([-r0.log_likelihood, -np.stack([o.log_likelihood for o in steps], 1)], 1)
        rew_all = np.concatenate([np.zeros((2 * N, k - 1), np.float32), np.stack([o.rewards for o in steps], 1)], 1)
        term_all = np.concatenate([np.zeros((2 * N, k - 1), bool), np.stack([o.terminations for o in steps], 1)], 1)
    nll_real, nll_copy = nll[:N, k:], nll[N:, k:]
    rew_tf, term_tf = rew_all[:N, k - 1 :], term_all[:N, k - 1 :]
    t2 = time.perf_counter()

    real = batch.frames[:, k:]
    dream_a = np.stack(dream, 1)
    copy_v = np.broadcast_to(copy[:, None], real.shape)
    mse_d, mse_c = mse(dream_a, real), mse(copy_v, real)
    out = ReplayResult(
        batch=batch, context=ctx, dream=dream_a, real=real, valid=batch.valid[:, k:],
        mse_dream=mse_d, mse_copy=mse_c,
        psnr_dream=np.minimum(psnr_from_mse(mse_d), 100.0), psnr_copy=np.minimum(psnr_from_mse(mse_c), 100.0),
        ssim_dream=ssim(dream_a, real), ssim_copy=ssim(np.ascontiguousarray(copy_v), real),
        nll_generated=-np.stack(ll_gen, 1), nll_real=nll_real, nll_copy=nll_copy, nll_context=nll[:N, :k],
        reward_dream=np.stack(rew, 1), reward_teacher=rew_tf,
        reward_copy=np.broadcast_to(batch.rewards[:, k - 2 : k - 1] if k >= 2 else np.zeros((N, 1), np.float32),
                                    (N, H)).astype(np.float32),
        reward_real=batch.rewards[:, k - 1 :],
        termination_dream=np.stack(term, 1), termination_teacher=term_tf,
        termination_copy=np.zeros((N, H), bool), termination_real=batch.terminations[:, k - 1 :],
        jacobi_iterations=np.stack(iters, 1),
    )
    out.seconds = {"generate": t1 - t0, "teacher_forced": t2 - t1, "metrics": time.perf_counter() - t2}
    return out


def _masked_mean(x: np.ndarray, valid: np.ndarray) -> list[float | None]:
    """Per-column mean of x [N, H] over rows where valid [N, H]; None for an empty column."""
    x = np.asarray(x, dtype=np.float64)
    cnt = valid.sum(0)
    tot = np.where(valid, x, 0.0).sum(0)
    return [round(float(t / c), 5) if c else None for t, c in zip(tot, cnt)]


def summarize_replay(r: ReplayResult) -> dict[str, Any]:
    """Per-horizon-step metrics (lists of length H, averaged over the episodes still running) and totals.

    PSNR per step is 10 log10(255^2 / MSE) of the MSE pooled over the valid episodes (the convention
    of ``sfv-world quality``); ``psnr_*_framewise`` is the mean of per-frame PSNRs capped at 100 dB.
    """
    v = r.valid

    def pooled_psnr(m):
        cnt = v.sum(0)
        pooled = np.where(v, m, 0.0).sum(0) / np.maximum(cnt, 1)
        return [round(float(p), 4) if c else None for p, c in zip(psnr_from_mse(pooled), cnt)]

    steps = {
        "episodes_running": v.sum(0).astype(int).tolist(),
        "psnr_dream": pooled_psnr(r.mse_dream),
        "psnr_copy_last": pooled_psnr(r.mse_copy),
        "psnr_dream_framewise": _masked_mean(r.psnr_dream, v),
        "psnr_copy_last_framewise": _masked_mean(r.psnr_copy, v),
        "ssim_dream": _masked_mean(r.ssim_dream, v),
        "ssim_copy_last": _masked_mean(r.ssim_copy, v),
        "nll_real_teacher_forced_bpd": _masked_mean(r.nll_real, v),
        "nll_generated_bpd": _masked_mean(r.nll_generated, v),
        "nll_copy_last_bpd": _masked_mean(r.nll_copy, v),
        "reward_abs_error_dream": _masked_mean(np.abs(r.reward_dream - r.reward_real), v),
        "reward_abs_error_teacher_forced": _masked_mean(np.abs(r.reward_teacher - r.reward_real), v),
        "reward_abs_error_copy_last": _masked_mean(np.abs(r.reward_copy - r.reward_real), v),
        "termination_agreement_dream": _masked_mean(r.termination_dream == r.termination_real, v),
        "termination_agreement_teacher_forced": _masked_mean(r.termination_teacher == r.termination_real, v),
        "termination_agreement_copy_last": _masked_mean(r.termination_copy == r.termination_real, v),
        "jacobi_iterations": _masked_mean(r.jacobi_iterations, v),
    }
    overall = {
        "ssim_dream": r.ssim_dream, "ssim_copy_last": r.ssim_copy,
        "nll_real_teacher_forced_bpd": r.nll_real, "nll_generated_bpd": r.nll_generated,
        "nll_copy_last_bpd": r.nll_copy,
        "termination_agreement_dream": r.termination_dream == r.termination_real,
        "termination_agreement_copy_last": r.termination_copy == r.termination_real,
        "jacobi_iterations": r.jacobi_iterations,
    }
    overall = {k: round(float(np.mean(np.asarray(x, dtype=np.float64)[v])), 5) for k, x in overall.items()}
    overall["psnr_dream"] = round(float(psnr_from_mse(r.mse_dream[v].mean())), 4)
    overall["psnr_copy_last"] = round(float(psnr_from_mse(r.mse_copy[v].mean())), 4)
    overall["nll_context_bpd"] = round(float(r.nll_context.mean()), 5)
    return {
        "episodes": len(r.batch), "episode_ids": r.batch.episode_ids, "context": r.batch.context,
        "horizon": r.batch.horizon, "start": r.batch.start, "frames_compared": int(v.sum()),
        "per_step": steps, "overall": overall,
        "seconds": {k: round(s, 3) for k, s in r.seconds.items()},
    }


def markdown_table(summary: dict[str, Any]) -> str:
    """The per-horizon-step table of :func:`summarize_replay` as markdown."""
    s = summary["per_step"]
    cols = [("episodes_running", "n"), ("psnr_dream", "PSNR dream"), ("psnr_copy_last", "PSNR copy"),
            ("ssim_dream", "SSIM dream"), ("ssim_copy_last", "SSIM copy"),
            ("nll_real_teacher_forced_bpd", "NLL real (TF)"), ("nll_generated_bpd", "NLL gen"),
            ("nll_copy_last_bpd", "NLL copy"), ("termination_agreement_dream", "term agree"),
            ("reward_abs_error_dream", "reward err"), ("jacobi_iterations", "Jacobi it")]
    lines = ["| step | " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for h in range(summary["horizon"]):
        vals = []
        for key, _ in cols:
            x = s[key][h]
            vals.append("–" if x is None else (str(x) if isinstance(x, int) else f"{x:.3f}"))
        lines.append(f"| {h + 1} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# outputs


def action_space_of(dataset_meta: dict[str, Any]):
    """The gymnasium action space of a checkpoint's dataset metadata (via the datasets API)."""
    from sfv_world.datasets import deserialize_space

    return deserialize_space(dataset_meta["action_space"])


def write_episodes(path: str | Path, dataset_meta: dict[str, Any], episodes: list[dict[str, np.ndarray]],
                   info: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write episodes (dicts of observations / actions / rewards / terminations / truncations, the
    dataset layout) as a new dataset at ``path`` with the checkpoint's action space."""
    from sfv_world.datasets import EpisodeWriter

    if not episodes:
        raise ValueError(f"write_episodes({path}): no episode to write")
    shape = episodes[0]["observations"].shape[1:]
    env_id = (dataset_meta.get("sfv_world") or {}).get("env_id")
    with EpisodeWriter(path, action_space=action_space_of(dataset_meta), frame_shape=shape,
                       env_id=env_id, info=info, overwrite=overwrite, algorithm_name="sfv-world") as w:
        for ep in episodes:
            w.add_episode(ep["observations"], ep["actions"], ep["rewards"], ep["terminations"], ep["truncations"])
    return Path(path)


def dream_episode(context: np.ndarray, context_actions: np.ndarray, context_rewards: np.ndarray,
                  frames: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                  terminations: np.ndarray) -> dict[str, np.ndarray]:
    """One episode in the dataset layout: the context clip then generated frames, cut at the first
    predicted termination (else truncated at the end).

    context uint8 [k, h, w, C]; context_actions / context_rewards [k-1]; frames uint8 [n, h, w, C];
    actions [n] (leading into frames); rewards float [n]; terminations bool [n].
    """
    n = int(frames.shape[0])
    hit = np.flatnonzero(terminations[:n])
    if hit.size:
        n = int(hit[0]) + 1
    T = context.shape[0] - 1 + n
    term = np.zeros(T, bool)
    trunc = np.zeros(T, bool)
    term[-1] = bool(hit.size)
    trunc[-1] = not hit.size
    return {
        "observations": np.concatenate([context, frames[:n]]),
        "actions": np.concatenate([context_actions, actions[:n]]),
        "rewards": np.concatenate([context_rewards, rewards[:n]]).astype(np.float32),
        "terminations": term, "truncations": trunc,
    }


def replay_episodes(r: ReplayResult) -> list[dict[str, np.ndarray]]:
    """The generated rollouts of a replay as dataset episodes (up to each real episode's end)."""
    b, k = r.batch, r.batch.context
    out = []
    for i in range(len(b)):
        n = int(r.valid[i].sum())
        out.append(dream_episode(r.context[i], b.actions[i, : k - 1], b.rewards[i, : k - 1], r.dream[i, :n],
                                 b.actions[i, k - 1 : k - 1 + n], r.reward_dream[i, :n], r.termination_dream[i, :n]))
    return out


def replay_videos(r: ReplayResult, out_dir: str | Path, count: int, fps: float = 8.0, scale: int = 4) -> list[Path]:
    """``real | dream | |difference|`` videos of the first ``count`` episodes (context shown in all panels)."""
    paths = []
    for i in range(min(count, len(r.batch))):
        n = int(r.valid[i].sum())
        real = np.concatenate([r.context[i], r.real[i, :n]])
        dream = np.concatenate([r.context[i], r.dream[i, :n]])
        strip = side_by_side(real, dream, difference(real, dream))
        paths.append(write_video(strip, Path(out_dir) / f"episode_{r.batch.episode_ids[i]}.mp4", fps, scale))
    return paths


PLOTS = {
    "psnr": ("PSNR (dB)", [("psnr_dream", "dream"), ("psnr_copy_last", "copy last frame")]),
    "ssim": ("SSIM", [("ssim_dream", "dream"), ("ssim_copy_last", "copy last frame")]),
    "nll": ("NLL (bits/dim)", [("nll_real_teacher_forced_bpd", "real frames, teacher-forced"),
                               ("nll_generated_bpd", "generated frames"), ("nll_copy_last_bpd", "copy last frame")]),
    "reward": ("|reward error|", [("reward_abs_error_dream", "dream (open loop)"),
                                  ("reward_abs_error_teacher_forced", "teacher-forced"),
                                  ("reward_abs_error_copy_last", "copy last")]),
    "termination": ("termination agreement", [("termination_agreement_dream", "dream (open loop)"),
                                              ("termination_agreement_teacher_forced", "teacher-forced"),
                                              ("termination_agreement_copy_last", "never terminates")]),
    "jacobi": ("Jacobi iterations / frame", [("jacobi_iterations", "dream")]),
}


def plot_metrics(summary: dict[str, Any], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """One PNG per metric of :func:`summarize_replay` against the horizon step; returns name -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = np.arange(1, summary["horizon"] + 1)
    paths = {}
    for name, (ylabel, series) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        for key, label in series:
            y = np.array([np.nan if v is None else v for v in summary["per_step"][key]], dtype=float)
            ax.plot(steps, y, marker="o", ms=3, label=label)
        ax.set_xlabel("horizon step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}{' — ' if title else ''}{summary['episodes']} held-out episodes, k={summary['context']}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name])
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------
# counterfactuals: real clip -> noise -> regenerated under other actions


def _actions_tensor(model, actions: np.ndarray) -> torch.Tensor:
    p = next(model.parameters())
    a = torch.as_tensor(np.asarray(actions), device=p.device)
    return a.long() if model.config.action_kind == "discrete" else a.to(p.dtype)


@torch.no_grad()
def invert_to_noise(model, frames: np.ndarray, actions: np.ndarray, generator: torch.Generator | None = None,
                    noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Map real clips to their prior noise with one forward pass of the flow.

    frames uint8 [B, T, h, w, C] at the model's frame size (T <= max_frames); actions [B, T-1(, A)].
    x_tilde = x + sigma * eps (``noise``; the training distribution) or x. Returns (z [B, T, F, d],
    x_tilde [B, T, C, h, w]) in the model's dtype.
    """
    c = model.config
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[2:] != (c.frame_size, c.frame_size, c.channels):
        raise ValueError(f"invert_to_noise: frames must be uint8 [B, T, {c.frame_size}, {c.frame_size}, {c.channels}], "
                         f"got {frames.dtype} {frames.shape}")
    if frames.shape[1] > c.max_frames:
        raise ValueError(f"invert_to_noise: {frames.shape[1]} frames > the model's max_frames={c.max_frames}")
    p = next(model.parameters())
    x = IdentityCodec(p.dtype).encode(torch.from_numpy(np.ascontiguousarray(frames)).to(p.device).movedim(-1, -3))
    if noise:
        x = x + c.sigma * torch.randn(x.shape, generator=generator, dtype=p.dtype, device="cpu").to(p.device)
    out = model.flow(x, _actions_tensor(model, actions))
    return out.z, x


@torch.no_grad()
def regenerate(model, z: torch.Tensor, actions: np.ndarray, method: str = "sequential",
               denoise: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """Generate clips from fixed noise z [B, T, F, d] under actions [B, T-1(, A)].

    Returns (x_tilde [B, T, C, h, w], frames uint8 [B, T, h, w, C]); frames are denoised with the
    flow-score-matching denoiser over the whole clip (``denoise``), else x_tilde rounded.
    """
    a = _actions_tensor(model, actions)
    x = model.flow.invert(z, a, method=method)
    x_hat = model.denoiser.denoise(x, a) if denoise else x
    return x, IdentityCodec().decode(x_hat).movedim(-3, -1).cpu().numpy()


def alter_actions(actions: np.ndarray, from_step: int, how: str, action_kind: str, action_dim: int,
                  seed: int = 0, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Copy of actions [..., T-1(, A)] with transitions ``from_step..`` replaced.

    how: ``flip`` (Discrete: a -> (a + 1) mod n; Box: -a), ``random`` (uniform), or ``constant:<v>``.
    """
    a = np.array(actions, copy=True)
    T1 = a.shape[1] if a.ndim >= 2 else a.shape[0]
    if not 0 <= from_step < T1:
        raise ValueError(f"rollout.cf_step={from_step} must be in [0, {T1 - 1}] (the clip has {T1} actions)")
    sl = (slice(None), slice(from_step, None)) if a.ndim >= 2 else (slice(from_step, None),)
    rng = np.random.default_rng(seed)
    if how == "flip":
        a[sl] = (a[sl] + 1) % action_dim if action_kind == "discrete" else -a[sl]
    elif how == "random":
        shape = a[sl].shape
        a[sl] = rng.integers(0, action_dim, shape) if action_kind == "discrete" else rng.uniform(low, high, shape)
    elif how.startswith("constant:"):
        v = float(how.split(":", 1)[1])
        if action_kind == "discrete" and not (v == int(v) and 0 <= v < action_dim):
            raise ValueError(f"rollout.cf_actions={how!r}: not an action of Discrete({action_dim})")
        a[sl] = v
    else:
        raise ValueError(f"rollout.cf_actions must be 'flip', 'random' or 'constant:<value>', got {how!r}")
    return a


@dataclass
class Counterfactual:
    """A real clip, its reconstruction from its own noise, and its regeneration under altered actions.

    real / reconstruction / counterfactual: uint8 [B, T, h, w, C]; actions / altered_actions [B, T-1(, A)];
    reconstruction_error: max |x_tilde_reconstructed - x_tilde| (model units) over the clip;
    denoised_real: uint8 [B, T, h, w, C], the denoiser applied to the real noisy clip (what an exact
    reconstruction must reproduce).
    """

    real: np.ndarray
    reconstruction: np.ndarray
    counterfactual: np.ndarray
    denoised_real: np.ndarray
    actions: np.ndarray
    altered_actions: np.ndarray
    from_step: int
    reconstruction_error: float
    seconds: float


@torch.no_grad()
def counterfactual(model, frames: np.ndarray, actions: np.ndarray, altered_actions: np.ndarray, from_step: int,
                   seed: int = 0, noise: bool = True, method: str = "sequential") -> Counterfactual:
    """Invert real clips (frames uint8 [B, T, h, w, C], actions [B, T-1]) to noise and regenerate them
    with the same noise under their own actions and under ``altered_actions`` (same shape)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    z, x_tilde = invert_to_noise(model, frames, actions, gen, noise=noise)
    a_t = _actions_tensor(model, actions)
    denoised_real = IdentityCodec().decode(model.denoiser.denoise(x_tilde, a_t)).movedim(-3, -1).cpu().numpy()
    x_rec, rec = regenerate(model, z, actions, method)
    _, cf = regenerate(model, z, altered_actions, method)
    err = float((x_rec - x_tilde).abs().max())
    return Counterfactual(frames, rec, cf, denoised_real, np.asarray(actions), np.asarray(altered_actions),
                          int(from_step), err, time.perf_counter() - t0)


def counterfactual_video(cf: Counterfactual, path: str | Path, row: int = 0, fps: float = 6.0, scale: int = 4) -> Path:
    """``real | reconstruction | counterfactual | |counterfactual - real|`` of one clip."""
    real, rec, alt = cf.real[row], cf.reconstruction[row], cf.counterfactual[row]
    return write_video(side_by_side(real, rec, alt, difference(alt, real)), path, fps, scale)


# ----------------------------------------------------------------------------------------------
# free-running generation


def load_image_frame(path: str | Path, frame_size: int, channels: int = 3) -> np.ndarray:
    """Read a picture file as a model frame: uint8 [frame_size, frame_size, channels].

    The picture is centre-cropped to a square, area-resized (bilinear-upscaled when it is smaller
    than ``frame_size``), and converted to RGB (3 channels) or grey (1 channel).
    """
    from PIL import Image

    from sfv_world.datasets import area_resize

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        img = Image.open(p)
        img = img.convert("L" if channels == 1 else "RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {p}: {e}") from e
    side = min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side < frame_size:
        img = img.resize((frame_size, frame_size), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    a = a[..., None] if a.ndim == 2 else a
    return area_resize(a, frame_size) if a.shape[0] != frame_size else a.copy()


class RandomActions:
    """Uniformly random actions for B worlds: int64 [B] (Discrete(n)) or float32 [B, A] in [low, high]."""

    def __init__(self, dataset_meta: dict[str, Any], batch_size: int, seed: int | None = None):
        d = dataset_meta["action_space"]
        d = json.loads(d) if isinstance(d, str) else dict(d)
        self.kind, self.batch_size = d["type"], int(batch_size)
        if self.kind == "Discrete":
            self.start, self.n = int(d.get("start", 0)), int(d["n"])
        elif self.kind == "Box":
            self.low = np.asarray(d["low"], np.float32).reshape(-1)
            self.high = np.asarray(d["high"], np.float32).reshape(-1)
        else:
            raise ValueError(f"random actions: unsupported action space {d}")
        self.rng = np.random.default_rng(seed)

    def __call__(self, frames: np.ndarray, features: np.ndarray) -> np.ndarray:
        if self.kind == "Discrete":
            return self.start + self.rng.integers(0, self.n, self.batch_size)
        return self.rng.uniform(self.low, self.high, (self.batch_size, self.low.size)).astype(np.float32)


@dataclass
class FreeRun:
    """Free-running generation of B worlds for H steps after a k-frame context.

    frames uint8 [B, k+H, h, w, C] (context first); actions [B, k-1+H(, A)]; rewards float32 [B, H];
    terminations bool [B, H]; log_likelihood float32 [B, H] bits/dim; jacobi_iterations int64 [B, H].
    """

    frames: np.ndarray
    context: int
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    log_likelihood: np.ndarray
    jacobi_iterations: np.ndarray
    seconds: float


@torch.no_grad()
def free_run(runtime, context_frames: np.ndarray, context_actions: np.ndarray, horizon: int,
             policy: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> FreeRun:
    """Generate ``horizon`` frames per world; ``policy(frames uint8 [B, h, w, C], features float32 [B, D])``
    returns the next actions (each world sees its newest frame)."""
    t0 = time.perf_counter()
    r = runtime.reset(context_frames, context_actions)
    frames, feats = r.frames[:, -1], r.features
    out_f, out_a, rew, term, ll, it = [r.frames], [np.asarray(context_actions)], [], [], [], []
    for _ in range(int(horizon)):
        a = np.asarray(policy(frames, feats))
        s = runtime.step(a)
        frames, feats = s.frames, s.features
        out_f.append(s.frames[:, None])
        out_a.append(a.reshape(a.shape[0], 1, *a.shape[1:]))
        rew.append(s.rewards)
        term.append(s.terminations)
        ll.append(s.log_likelihood)
        it.append(s.jacobi_iterations)
    actions = np.concatenate([x.astype(out_a[-1].dtype) for x in out_a], 1)
    return FreeRun(np.concatenate(out_f, 1), int(r.frames.shape[1]), actions, np.stack(rew, 1), np.stack(term, 1),
                   np.stack(ll, 1), np.stack(it, 1), time.perf_counter() - t0)


def free_run_episodes(run: FreeRun) -> list[dict[str, np.ndarray]]:
    """The worlds of a free run as dataset episodes (cut at each world's first predicted termination)."""
    k = run.context
    out = []
    for i in range(run.frames.shape[0]):
        out.append(dream_episode(run.frames[i, :k], run.actions[i, : k - 1], np.zeros(k - 1, np.float32),
                                 run.frames[i, k:], run.actions[i, k - 1 :], run.rewards[i], run.terminations[i]))
    return out


__all__ = [
    "Counterfactual",
    "FreeRun",
    "RandomActions",
    "ReplayBatch",
    "ReplayResult",
    "alter_actions",
    "counterfactual",
    "counterfactual_video",
    "dream_episode",
    "free_run",
    "free_run_episodes",
    "gaussian_window",
    "held_out_ids",
    "invert_to_noise",
    "load_image_frame",
    "load_replay_batch",
    "markdown_table",
    "plot_metrics",
    "psnr",
    "regenerate",
    "replay_episodes",
    "replay_open_loop",
    "replay_videos",
    "ssim",
    "summarize_replay",
    "teacher_forced",
    "teacher_runtime",
    "write_episodes",
]
