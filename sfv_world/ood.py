"""Likelihood-based out-of-distribution (OOD) flags for sfv-world (issue 7; STARFLOW_V.md section 6).

The flow gives the exact conditional density of every frame, log p(x_tilde_t | x_tilde_<t, a_<t). Note the
convention: the density is that of the *noise-augmented* frame x_tilde = x + sigma * eps (sigma =
``model.config.sigma``, the training augmentation), not a discrete pixel likelihood. Teacher-forced scores
of real frames drawn that way depend on the noise draw. This module either scores the clean frame itself,
x_tilde = x (``noise_draws=0``, the default: deterministic, and measured better on CartPole's frozen frame,
AUROC 0.958 against 0.937 with 2 draws, see benchmarks/results/ood_findings.md), or averages ``noise_draws``
draws taken from a ``torch.Generator`` seeded with ``seed`` (the same draws for the given-action and
NULL-action passes), so scores are reproducible. NLLs are in bits/dim as
``sfv_world.model.nll_to_bits_per_dim`` defines them ([-1, 1] model units, no offset).

Scores, one per step (higher = more anomalous):

=================  ========================================================================================
``nll``            raw conditional NLL of the frame (bits/dim)
``typicality``     two-sided: |nll - median_p| / scale_p against the calibration band at context position p
                   (median and 1.4826 * MAD of in-distribution NLLs at that position)
``complexity``     nll + log2(127.5) - L(frame): NLL in 0..255 units minus the zlib code length of the raw
                   frame bytes (bits/dim); a generic-compressor correction for input complexity
``complexity_diff`` the same with the code length of the frame difference (frame - previous frame mod 256)
``action_ratio``   nll under the given action - nll under the learned NULL action (a log likelihood ratio
                   in bits/dim): positive when the action makes the observed frame *less* likely
``window``         mean of the signed robust z, (nll - median_p) / scale_p, over the last ``window`` steps
=================  ========================================================================================

Calibration (:func:`compute_calibration`) runs on held-out in-distribution episodes (the checkpoint's
val split): teacher-forced NLLs of real frames, and the sampling-time NLLs of the model's own imagined
frames (the "imagined" band, from a :class:`~sfv_world.world.WorldRuntime` replaying the logged actions),
plus the "context" band: real frames with one sigma-noise draw, as the runtime encodes a reset context.
All are stored per context position with quantiles, and every score gets a threshold: its calibrated
(1 - fpr) quantile over steps at positions >= ``min_context`` (default fpr 1%). :func:`write_calibration`
puts it into a checkpoint (atomically) under ``payload["calibration"]["envs"][env_id]``.

:class:`OODMonitor` applies a calibration online (numpy only): the dream env calls it on every reset and
step. This module imports nothing from gymnasium (DESIGN.md section 2).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfv_world.model import PIXEL_BITS_OFFSET, nll_to_bits_per_dim

CALIBRATION_VERSION = 1
SCORES = ("nll", "typicality", "complexity", "complexity_diff", "action_ratio", "window")
QUANTILE_LEVELS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999)
MAD_TO_STD = 1.4826


# --------------------------------------------------------------------------------------------------
# code lengths (complexity correction)


def zlib_bits_per_dim(frames: np.ndarray, level: int = 9) -> np.ndarray:
    """zlib code length of each frame's raw bytes in bits per dimension.

    frames: uint8 [..., H, W, C] -> float64 [...] (8 * len(zlib(bytes)) / (H*W*C)).
    """
    f = np.asarray(frames)
    if f.dtype != np.uint8 or f.ndim < 3:
        raise ValueError(f"zlib_bits_per_dim needs uint8 frames [..., H, W, C], got {f.dtype} {f.shape}")
    lead, dims = f.shape[:-3], int(np.prod(f.shape[-3:]))
    flat = f.reshape(-1, dims)
    out = np.array([8.0 * len(zlib.compress(np.ascontiguousarray(row).tobytes(), level)) for row in flat])
    return (out / dims).reshape(lead)


def frame_difference(frames: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """(frames - prev) mod 256 as uint8 (same shape): the residual a video codec would store."""
    return (np.asarray(frames, np.int16) - np.asarray(prev, np.int16)).astype(np.uint8)


def code_lengths(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Code lengths of a batch of sequences: frames uint8 [N, T, H, W, C] -> (frame_bpd, diff_bpd) float64 [N, T].

    diff_bpd[:, 0] is the frame's own code length (no previous frame).
    """
    frames = np.asarray(frames)
    if frames.ndim != 5:
        raise ValueError(f"code_lengths needs uint8 [N, T, H, W, C], got shape {frames.shape}")
    own = zlib_bits_per_dim(frames)
    diff = own.copy()
    if frames.shape[1] > 1:
        diff[:, 1:] = zlib_bits_per_dim(frame_difference(frames[:, 1:], frames[:, :-1]))
    return own, diff


# --------------------------------------------------------------------------------------------------
# detection metrics (no sklearn)


def _check_scores(neg, pos) -> tuple[np.ndarray, np.ndarray]:
    neg = np.asarray(neg, dtype=np.float64).ravel()
    pos = np.asarray(pos, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"need at least one negative and one positive score, got {neg.size} and {pos.size}")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("scores must be finite (NaN or inf found)")
    return neg, pos


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    n = len(x)
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    for end in [*boundaries.tolist(), n]:
        ranks[order[start:end]] = 0.5 * (start + 1 + end)
        start = end
    return ranks


def auroc(neg: Sequence[float], pos: Sequence[float]) -> float:
    """Area under the ROC curve of "positive scores higher": P(s_pos > s_neg) + 0.5 P(tie) (Mann-Whitney U)."""
    neg, pos = _check_scores(neg, pos)
    r = _rankdata(np.concatenate([neg, pos]))
    u = r[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(neg) * len(pos)))


def roc_curve(neg: Sequence[float], pos: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; a step is flagged when score >= threshold.

    Starts at (0, 0) with threshold +inf and ends at (1, 1).
    """
    neg, pos = _check_scores(neg, pos)
    thr = np.unique(np.concatenate([neg, pos]))[::-1]
    neg_s, pos_s = np.sort(neg), np.sort(pos)
    fp = len(neg) - np.searchsorted(neg_s, thr, side="left")
    tp = len(pos) - np.searchsorted(pos_s, thr, side="left")
    fpr = np.concatenate([[0.0], fp / len(neg)])
    tpr = np.concatenate([[0.0], tp / len(pos)])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def aupr(neg: Sequence[float], pos: Sequence[float]) -> float:
    """Average precision (area under precision-recall, positives = OOD): sum_k (R_k - R_{k-1}) P_k over
    descending distinct thresholds (tied scores enter together)."""
    neg, pos = _check_scores(neg, pos)
    fpr, tpr, _ = roc_curve(neg, pos)
    tp, fp = tpr[1:] * len(pos), fpr[1:] * len(neg)
    precision = tp / np.maximum(tp + fp, 1e-300)
    recall = tpr[1:]
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def fpr_at_tpr(neg: Sequence[float], pos: Sequence[float], tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold that flags at least ``tpr`` of the positives."""
    neg, pos = _check_scores(neg, pos)
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    need = math.ceil(tpr * len(pos) - 1e-9)
    thr = np.sort(pos)[::-1][need - 1]
    return float(np.mean(neg >= thr))


def detection_delay(flags: np.ndarray, onset: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Steps from onset to the first flag at or after it, per sequence.

    flags: bool [N, T]; onset: int [N] (or one int). Returns (delay int64 [N] (-1 when never flagged),
    detected bool [N]).
    """
    flags = np.asarray(flags, dtype=bool)
    onset = np.broadcast_to(np.asarray(onset, dtype=np.int64), (flags.shape[0],))
    t = np.arange(flags.shape[1])[None]
    after = flags & (t >= onset[:, None])
    detected = after.any(1)
    first = np.where(detected, after.argmax(1), -1)
    return np.where(detected, first - onset, -1).astype(np.int64), detected


# --------------------------------------------------------------------------------------------------
# teacher-forced likelihood of real (or any given) frames


@dataclass
class FrameScores:
    """Per-frame raw quantities of N sequences of T frames (float64 [N, T]; positions int64 [T]).

    nll / nll_null   teacher-forced NLL in bits/dim under the given actions / under the NULL action
                     (NaN when not computed)
    code / code_diff zlib code length of the frame / of its difference to the previous frame (bits/dim)
    positions        context position of each frame (= frames before it in the window)
    """

    nll: np.ndarray
    nll_null: np.ndarray
    code: np.ndarray
    code_diff: np.ndarray
    positions: np.ndarray

    def take(self, rows) -> FrameScores:
        return FrameScores(self.nll[rows], self.nll_null[rows], self.code[rows], self.code_diff[rows], self.positions)


@torch.no_grad()
def teacher_forced_nll(model, frames: np.ndarray, actions: np.ndarray, *, noise_draws: int = 0, seed: int = 0,
                       batch_size: int = 32, null: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-frame conditional NLL (bits/dim) of real frames, one forward pass per batch and draw.

    model: a WorldModel (its flow is used; eval mode); frames: uint8 [N, T, h, w, C] at the model's frame
    size; actions: [N, T-1] int (Discrete) or [N, T-1, k] float (Box). The frames enter as
    x_tilde = x (``noise_draws`` 0: the density at the clean frame, one deterministic pass) or as
    x_tilde = x + sigma * eps averaged over ``noise_draws`` draws from a generator seeded with ``seed`` (the
    NULL-action pass, when ``null``, reuses the same draws). Returns (nll, nll_null) float64 [N, T]; nll_null is
    NaN when ``null`` is False.
    """
    flow = model.flow
    c = flow.config
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[2:] != (c.frame_size, c.frame_size, c.channels):
        raise ValueError(f"frames must be uint8 [N, T, {c.frame_size}, {c.frame_size}, {c.channels}] at the model's "
                         f"frame size, got {frames.dtype} {frames.shape}")
    N, T = frames.shape[:2]
    actions = np.asarray(actions)
    if actions.shape[:2] != (N, T - 1):
        raise ValueError(f"actions must be [N={N}, T-1={T - 1}, ...], got shape {actions.shape}")
    if int(noise_draws) < 0:
        raise ValueError(f"noise_draws must be >= 0 (0: score the clean frame), got {noise_draws}")
    passes, scale = max(int(noise_draws), 1), (c.sigma if int(noise_draws) > 0 else 0.0)
    device, dtype = flow.device, flow.dtype
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    nll = np.zeros((N, T))
    nll_null = np.full((N, T), np.nan)
    a_dtype = torch.long if c.action_kind == "discrete" else dtype
    for s in range(0, N, int(batch_size)):
        x = torch.from_numpy(np.ascontiguousarray(frames[s:s + batch_size])).to(device)
        x = x.movedim(-1, -3).to(dtype) / 127.5 - 1.0  # IdentityCodec
        a = torch.as_tensor(np.ascontiguousarray(actions[s:s + batch_size])).to(device=device, dtype=a_dtype)
        B = x.shape[0]
        acc, acc_null = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
        for _ in range(passes):
            if scale:
                eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
                xt = x + scale * eps
            else:  # the clean frame
                xt = x
            acc += nll_to_bits_per_dim(flow(xt, a).nll.double().cpu(), c)
            if null:
                drop = torch.ones(B, dtype=torch.bool, device=device)
                acc_null += nll_to_bits_per_dim(flow(xt, a, drop_actions=drop).nll.double().cpu(), c)
        nll[s:s + B] = (acc / passes).numpy()
        if null:
            nll_null[s:s + B] = (acc_null / passes).numpy()
    return nll, nll_null


def score_frames(model, frames: np.ndarray, actions: np.ndarray, *, noise_draws: int = 0, seed: int = 0,
                 batch_size: int = 32, null: bool = True) -> FrameScores:
    """:func:`teacher_forced_nll` plus code lengths: the raw inputs of every score (see :class:`FrameScores`)."""
    nll, nll_null = teacher_forced_nll(model, frames, actions, noise_draws=noise_draws, seed=seed,
                                       batch_size=batch_size, null=null)
    code, code_diff = code_lengths(frames)
    return FrameScores(nll, nll_null, code, code_diff, np.arange(frames.shape[1], dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# bands and scores


def band_stats(nll: np.ndarray, positions: np.ndarray, num_positions: int) -> dict[str, Any]:
    """Per-position statistics of NLLs (bits/dim). nll float [N, T] (NaN = missing), positions int [T].

    Returns lists of length ``num_positions`` (count, mean, std, median, scale = 1.4826*MAD (floored at
    1e-6), quantiles [P][Q] at QUANTILE_LEVELS); positions without data hold None (count 0).
    """
    out: dict[str, Any] = {"count": [], "mean": [], "std": [], "median": [], "scale": [], "quantiles": []}
    for p in range(num_positions):
        cols = np.flatnonzero(positions == p)
        v = nll[:, cols].ravel() if cols.size else np.zeros(0)
        v = v[np.isfinite(v)]
        out["count"].append(int(v.size))
        if v.size == 0:
            for k in ("mean", "std", "median", "scale", "quantiles"):
                out[k].append(None)
            continue
        med = float(np.median(v))
        out["mean"].append(float(v.mean()))
        out["std"].append(float(v.std()))
        out["median"].append(med)
        out["scale"].append(max(float(MAD_TO_STD * np.median(np.abs(v - med))), 1e-6))
        out["quantiles"].append(np.quantile(v, QUANTILE_LEVELS).tolist())
    out["quantile_levels"] = list(QUANTILE_LEVELS)
    return out


def _band_arrays(band: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(median [P], scale [P]) with positions lacking data filled from the nearest position that has it."""
    med = np.array([np.nan if v is None else v for v in band["median"]], dtype=np.float64)
    scl = np.array([np.nan if v is None else v for v in band["scale"]], dtype=np.float64)
    have = np.flatnonzero(np.isfinite(med))
    if have.size == 0:
        raise ValueError("calibration band holds no data")
    idx = np.arange(len(med))
    nearest = have[np.abs(idx[:, None] - have[None]).argmin(1)]
    return med[nearest], scl[nearest]


def band_z(nll: np.ndarray, positions: np.ndarray, band: dict[str, Any]) -> np.ndarray:
    """Signed robust z of NLLs against a band: (nll - median_p) / scale_p; positions beyond the band's
    last position use its last row. nll float [..., T], positions int [T] (or broadcastable)."""
    med, scl = _band_arrays(band)
    p = np.clip(np.asarray(positions), 0, len(med) - 1)
    return (np.asarray(nll, dtype=np.float64) - med[p]) / scl[p]


def windowed_mean(x: np.ndarray, k: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Mean over the last ``k`` steps (fewer at the start) along the last axis: float [..., T] -> [..., T].

    ``valid`` bool [T] (optional): steps outside it are not averaged in (and get NaN themselves).
    """
    if int(k) < 1:
        raise ValueError(f"window must be >= 1, got {k}")
    x = np.asarray(x, dtype=np.float64)
    v = np.ones(x.shape[-1], bool) if valid is None else np.asarray(valid, bool)
    xv = np.where(v, x, 0.0)
    cs = np.concatenate([np.zeros((*x.shape[:-1], 1)), np.cumsum(xv, -1)], -1)
    cn = np.concatenate([[0], np.cumsum(v)])
    T = x.shape[-1]
    hi = np.arange(1, T + 1)
    lo = np.maximum(hi - int(k), 0)
    n = cn[hi] - cn[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (cs[..., hi] - cs[..., lo]) / n
    return np.where(v & (n > 0), out, np.nan)


def derive_scores(fs: FrameScores, band: dict[str, Any], window: int = 4, min_position: int = 0) -> dict[str, np.ndarray]:
    """All scores (see the module docstring) of frames: dict score -> float64 [N, T].

    band: the per-position NLL statistics (``calibration["bands"]["real"]`` or ``["imagined"]``) used by
    typicality and window; min_position: steps before it (reset context) do not enter the window mean.
    """
    z = band_z(fs.nll, fs.positions, band)
    nll_px = fs.nll + PIXEL_BITS_OFFSET
    return {
        "nll": fs.nll,
        "typicality": np.abs(z),
        "complexity": nll_px - fs.code,
        "complexity_diff": nll_px - fs.code_diff,
        "action_ratio": fs.nll - fs.nll_null,
        "window": windowed_mean(z, window, fs.positions >= min_position),
    }


def score_thresholds(scores: dict[str, np.ndarray], positions: np.ndarray, min_context: int, fpr: float
                     ) -> dict[str, dict[str, Any]]:
    """Calibrated thresholds: the (1 - fpr) quantile of each score over steps at positions >= min_context.

    Returns score -> {threshold, count, quantiles (at QUANTILE_LEVELS)}; scores without finite values
    (e.g. action_ratio on imagined steps) are left out.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    cols = np.flatnonzero(np.asarray(positions) >= min_context)
    out = {}
    for name, s in scores.items():
        v = s[:, cols].ravel()
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        out[name] = {"threshold": float(np.quantile(v, 1.0 - fpr)), "count": int(v.size),
                     "quantiles": np.quantile(v, QUANTILE_LEVELS).tolist()}
    return out


# --------------------------------------------------------------------------------------------------
# segments of held-out episodes


@dataclass
class Segments:
    """Fixed-length pieces of episodes at the model's frame size.

    frames uint8 [N, L, h, w, C]; actions [N, L-1] (int64 Discrete / float32 [N, L-1, k] Box);
    episodes int64 [N]; starts int64 [N] (first frame of each piece in its episode).
    """

    frames: np.ndarray
    actions: np.ndarray
    episodes: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def take(self, rows) -> Segments:
        return Segments(self.frames[rows], self.actions[rows], self.episodes[rows], self.starts[rows])


def segment_starts(dataset: str | os.PathLike, episode_ids: Sequence[int] | None, length: int,
                   exclude_actions: Sequence[int] = (), stride: int | None = None) -> list[tuple[int, int]]:
    """(episode, start) of every piece of ``length`` frames, starting every ``stride`` frames (default
    ``length``), whose actions avoid ``exclude_actions``."""
    from sfv_world.datasets import DatasetReader

    if length < 2:
        raise ValueError(f"segment length must be >= 2, got {length}")
    stride = int(stride or length)
    excl = np.asarray(list(exclude_actions), dtype=np.int64)
    cands = []
    with DatasetReader(dataset) as reader:
        ids = list(reader.episode_ids) if episode_ids is None else [int(e) for e in episode_ids]
        for e in ids:
            acts = reader.load_episode(e, observations=False).actions
            for s in range(0, reader.episode_lengths[e] + 1 - length + 1, stride):
                a = acts[s:s + length - 1]
                if excl.size and a.ndim == 1 and np.isin(a, excl).any():
                    continue
                cands.append((e, s))
    if not cands:
        raise ValueError(f"dataset {dataset}: no piece of {length} frames in episodes {ids[:8]}"
                         f"{'...' if len(ids) > 8 else ''}" + (f" without actions {excl.tolist()}" if excl.size else ""))
    return cands


def subsample(items: list, k: int | None, seed: int = 0) -> list:
    """At most ``k`` items, chosen uniformly without replacement (deterministic in ``seed``), order kept."""
    if k is None or len(items) <= k:
        return list(items)
    pick = np.sort(np.random.default_rng(seed).choice(len(items), size=int(k), replace=False))
    return [items[i] for i in pick]


def load_segments(dataset: str | os.PathLike, picks: Sequence[tuple[int, int]], length: int, frame_size: int
                  ) -> Segments:
    """Read the pieces ``picks`` [(episode, start)] of ``length`` frames, area-resized to ``frame_size``."""
    from sfv_world.datasets import DatasetReader, area_resize

    if not picks:
        raise ValueError("load_segments: no pieces to read")
    frames, actions, cache = [], [], {}
    with DatasetReader(dataset) as reader:
        for e, s in picks:
            if e not in cache:
                cache = {e: reader.load_episode(e, observations=False).actions}
            f = reader.read_frames(e, s, s + length)
            if f.shape[0] != length:
                raise ValueError(f"dataset {dataset}: episode {e} has no {length} frames from {s}")
            if f.shape[1] != frame_size or f.shape[2] != frame_size:
                f = area_resize(f, frame_size)
            frames.append(f)
            actions.append(cache[e][s:s + length - 1])
    return Segments(np.stack(frames).astype(np.uint8), np.stack(actions),
                    np.array([e for e, _ in picks], np.int64), np.array([s for _, s in picks], np.int64))


def read_segments(dataset: str | os.PathLike, episode_ids: Sequence[int] | None, length: int, frame_size: int,
                  max_segments: int | None = None, exclude_actions: Sequence[int] = (), seed: int = 0,
                  stride: int | None = None) -> Segments:
    """Pieces of ``length`` frames from ``episode_ids`` (all episodes when None) of a dataset.

    Pieces start every ``stride`` frames (default ``length``: non-overlapping); pieces whose actions use
    ``exclude_actions`` are skipped; if more than ``max_segments`` remain, a uniform subset (deterministic
    given ``seed``) is kept. Frames are area-resized to ``frame_size``.
    """
    picks = subsample(segment_starts(dataset, episode_ids, length, exclude_actions, stride), max_segments, seed)
    return load_segments(dataset, picks, length, frame_size)


# --------------------------------------------------------------------------------------------------
# imagined steps


@dataclass
class Imagined:
    """Open-loop imagination from real context replaying logged actions (a WorldRuntime per batch).

    frames uint8 [N, L, h, w, C]: the context (real) then the generated, denoised frames (as served);
    nll float64 [N, L]: sampling-time NLL (bits/dim) of generated frames, NaN on context positions;
    context: number of real context frames.
    """

    frames: np.ndarray
    nll: np.ndarray
    context: int


def imagine(model, dataset_meta: dict[str, Any], segments: Segments, context: int, sampler: dict | None = None,
            seed: int = 0, batch_size: int = 32) -> Imagined:
    """Reset a :class:`~sfv_world.world.WorldRuntime` on each segment's first ``context`` frames and step it
    with the segment's logged actions to its end (the dream env's computation)."""
    from sfv_world.world import WorldRuntime

    N, L = segments.frames.shape[:2]
    if not 1 <= context < L:
        raise ValueError(f"imagination context must be in [1, {L - 1}] for segments of {L} frames, got {context}")
    frames = segments.frames.copy()
    nll = np.full((N, L), np.nan)
    for s in range(0, N, int(batch_size)):
        seg = segments.take(slice(s, s + batch_size))
        B = len(seg)
        rt = WorldRuntime(model, dataset_meta, batch_size=B, sampler=sampler, seed=seed + s)
        rt.reset(seg.frames[:, :context], seg.actions[:, :context - 1])
        for t in range(context, L):
            out = rt.step(seg.actions[:, t - 1])
            frames[s:s + B, t] = out.frames
            nll[s:s + B, t] = -out.log_likelihood.astype(np.float64)
    return Imagined(frames, nll, int(context))


def run_sampler_settings(payload: dict[str, Any]) -> dict[str, Any]:
    """The sampler settings stored in a checkpoint's run config (keys the runtime knows)."""
    from sfv_world.world import SAMPLER_DEFAULTS

    s = dict((payload.get("config") or {}).get("sampler") or {})
    return {k: v for k, v in s.items() if k in SAMPLER_DEFAULTS}


# --------------------------------------------------------------------------------------------------
# calibration


@dataclass
class CalibrationSettings:
    """How a calibration is computed (keys of the ``ood`` config section)."""

    fpr: float = 0.01
    segment_len: int = 16
    min_context: int = 4
    noise_draws: int = 0  # 0: score the clean frame (deterministic); k >= 1: mean over k sigma-noise draws
    seed: int = 0
    window: int = 4
    max_segments: int = 256
    stride: int | None = None  # start a piece every `stride` frames (default segment_len // 2)
    batch_size: int = 32
    env_score: str = "nll"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CalibrationSettings:
        d = dict(d or {})
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        s = cls(**known)
        s.validate()
        return s

    def validate(self) -> None:
        if not 0.0 < self.fpr < 1.0:
            raise ValueError(f"ood.fpr must be in (0, 1), got {self.fpr}")
        if self.segment_len < 2 or not 1 <= self.min_context < self.segment_len:
            raise ValueError(f"ood: need segment_len >= 2 and 1 <= min_context < segment_len, got "
                             f"{self.segment_len}, {self.min_context}")
        if self.noise_draws < 0:
            raise ValueError(f"ood.noise_draws must be >= 0 (0: score the clean frame), got {self.noise_draws}")
        if self.window < 1 or self.max_segments < 1 or self.batch_size < 1:
            raise ValueError("ood.window, max_segments, batch_size must be >= 1")
        if self.env_score not in SCORES or self.env_score == "action_ratio":
            raise ValueError(f"ood.env_score must be one of {[s for s in SCORES if s != 'action_ratio']} "
                             f"(action_ratio needs a second forward pass and is offline only), got {self.env_score!r}")


def effective_segment_len(settings: CalibrationSettings, payload: dict[str, Any]) -> int:
    """Segment length actually used: at most the model's max_frames and the clip length it was trained on."""
    cap = int(payload["model_config"]["max_frames"])
    clip = ((payload.get("config") or {}).get("train") or {}).get("clip_len")
    if clip:
        cap = min(cap, int(clip))
    return min(int(settings.segment_len), cap)


def env_id_of(meta: dict[str, Any]) -> str | None:
    """The env id recorded in a checkpoint's dataset metadata (``sfv_world.env_id``, ``env_spec.id`` or
    ``dataset_id``), None when none is recorded."""
    import json

    meta = meta or {}
    if meta.get("env_id"):
        return str(meta["env_id"])
    sub = meta.get("sfv_world")
    if isinstance(sub, str):
        try:
            sub = json.loads(sub)
        except ValueError:
            import ast

            try:
                sub = ast.literal_eval(sub)
            except (ValueError, SyntaxError):
                sub = None
    if isinstance(sub, dict) and sub.get("env_id"):
        return str(sub["env_id"])
    spec = meta.get("env_spec")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            spec = None
    if isinstance(spec, dict) and spec.get("id"):
        return str(spec["id"])
    return str(meta["dataset_id"]) if meta.get("dataset_id") else None


def excluded_actions(payload: dict[str, Any]) -> list[int]:
    """``train.exclude_actions`` of the run that produced a checkpoint (actions it never trained on)."""
    return [int(a) for a in (((payload.get("config") or {}).get("train") or {}).get("exclude_actions") or [])]


def compute_calibration(model, payload: dict[str, Any], settings: CalibrationSettings | dict | None = None,
                        dataset: str | os.PathLike | None = None, episode_ids: Sequence[int] | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Calibrate OOD scores of a world model on held-out in-distribution episodes.

    model: the checkpoint's WorldModel; payload: its loaded checkpoint dict (dataset metadata, splits and
    run config are read from it); dataset / episode_ids: default the checkpoint's dataset and its **val**
    split (windows using ``train.exclude_actions`` are skipped). Returns the calibration entry of one
    environment (a plain dict of lists/floats, see the module docstring and :func:`write_calibration`).
    """
    s = settings if isinstance(settings, CalibrationSettings) else CalibrationSettings.from_dict(settings)
    s.validate()
    meta = payload.get("dataset") or {}
    dataset = dataset or meta.get("path")
    if dataset is None:
        raise ValueError("calibration needs a dataset: the checkpoint's metadata has no path")
    if episode_ids is None:
        episode_ids = (meta.get("splits") or {}).get("val")
        if not episode_ids:
            raise ValueError("the checkpoint's dataset split has no val episodes to calibrate on; pass episode_ids")
    L = effective_segment_len(s, payload)
    if not s.min_context < L:
        raise ValueError(f"ood.min_context={s.min_context} must be below the segment length {L}")
    excl = excluded_actions(payload)
    segs = read_segments(dataset, episode_ids, L, model.config.frame_size, s.max_segments, excl, s.seed,
                         stride=s.stride or max(L // 2, 1))
    fs = score_frames(model, segs.frames, segs.actions, noise_draws=s.noise_draws, seed=s.seed,
                      batch_size=s.batch_size)
    P = int(model.config.max_frames)
    real_band = band_stats(fs.nll, fs.positions, P)
    real_scores = derive_scores(fs, real_band, s.window, s.min_context)
    # the env scores reset contexts from the runtime's own pass: one sigma-noise draw per frame
    ctx_nll, _ = teacher_forced_nll(model, segs.frames, segs.actions, noise_draws=1, seed=s.seed,
                                    batch_size=s.batch_size, null=False)
    context_band = band_stats(ctx_nll, fs.positions, P)
    context_typ = {"typicality": np.abs(band_z(ctx_nll, fs.positions, context_band))}
    ctx = s.min_context
    im = imagine(model, meta, segs, ctx, run_sampler_settings(payload), seed=s.seed, batch_size=s.batch_size)
    im_fs = imagined_frame_scores(im)
    im_band = band_stats(im.nll, im_fs.positions, P)
    im_scores = derive_scores(im_fs, im_band, s.window, ctx)
    return {
        "version": CALIBRATION_VERSION,
        "env_id": env_id_of(meta),
        "dataset": str(dataset),
        "episodes": [int(e) for e in episode_ids],
        "segments": len(segs),
        "segment_len": L,
        "exclude_actions": excl,
        "settings": {**s.__dict__, "sigma": float(model.config.sigma)},
        "bands": {"real": real_band, "context": context_band, "imagined": im_band},
        "scores": {
            "real": score_thresholds(real_scores, fs.positions, s.min_context, s.fpr),
            "context": score_thresholds(context_typ, fs.positions, s.min_context, s.fpr),
            "imagined": score_thresholds(im_scores, im_fs.positions, ctx, s.fpr),
        },
    }


def imagined_frame_scores(im: Imagined) -> FrameScores:
    """FrameScores of imagined steps: sampling-time NLL, code lengths of the served frames, no NULL pass."""
    code, code_diff = code_lengths(im.frames)
    T = im.frames.shape[1]
    return FrameScores(im.nll, np.full_like(im.nll, np.nan), code, code_diff, np.arange(T, dtype=np.int64))


def calibration_entry(calibration: dict[str, Any] | None, env_id: str | None = None) -> dict[str, Any] | None:
    """The entry of one environment from a checkpoint's ``calibration`` slot (None when absent).

    With ``env_id`` None the only entry is returned (ValueError when several exist).
    """
    if not calibration:
        return None
    envs = calibration.get("envs") if isinstance(calibration, dict) else None
    if envs is None:
        raise ValueError("checkpoint calibration has no 'envs' mapping: not written by sfv_world.ood.write_calibration")
    if env_id is None:
        if len(envs) > 1:
            raise ValueError(f"checkpoint holds calibrations of several envs {sorted(envs)}: name one")
        return next(iter(envs.values()), None)
    return envs.get(str(env_id))


def write_calibration(path: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """Store a calibration entry in a checkpoint file, atomically (temp file + ``os.replace``).

    ``payload["calibration"] = {"version": 1, "envs": {env_id: entry, ...}}``; other environments' entries
    are kept, this environment's is replaced.
    """
    from sfv_world.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(path)
    cal = payload.get("calibration") or {"version": CALIBRATION_VERSION, "envs": {}}
    cal.setdefault("envs", {})[str(entry.get("env_id"))] = entry
    cal["version"] = CALIBRATION_VERSION
    payload["calibration"] = cal
    return save_checkpoint(path, payload)


def calibrate_checkpoint(path: str | os.PathLike, settings: CalibrationSettings | dict | None = None,
                         device: str = "cpu", dataset: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load a checkpoint, compute its calibration (:func:`compute_calibration`) and write it back."""
    from sfv_world.checkpoint import load_world_model

    model, payload = load_world_model(path, device=device)
    entry = compute_calibration(model, payload, settings, dataset=dataset)
    write_calibration(path, entry)
    return entry


# --------------------------------------------------------------------------------------------------
# online monitor (used by the dream env)


def frame_positions(runtime) -> np.ndarray:
    """Context position of each world's newest frame: real frames held before it (int64 [B])."""
    st = runtime.state
    if st is None:
        raise RuntimeError("frame_positions: the runtime has not been reset")
    return (st.history_mask[:, :st.num_frames].sum(1) - 1).clamp(min=0).cpu().numpy().astype(np.int64)


class OODMonitor:
    """Per-step OOD scores and flags for N worlds, from a calibration entry (numpy only).

    Imagined steps are scored against the calibration's *imagined* band and thresholds; reset contexts
    (real frames) against the *real* band: the context score is the largest typicality over its frames,
    flagged above the real typicality threshold. ``score`` is one of ``nll``, ``typicality``,
    ``complexity``, ``complexity_diff``, ``window`` (``action_ratio`` needs a NULL-action pass: offline
    only). Without a calibration (``entry`` None) the score is the raw NLL (bits/dim) and nothing is
    flagged.
    """

    def __init__(self, entry: dict[str, Any] | None, num_envs: int, score: str | None = None,
                 window: int | None = None):
        self.entry = entry
        self.num_envs = int(num_envs)
        settings = (entry or {}).get("settings", {})
        self.score = str(score or settings.get("env_score", "nll"))
        if self.score not in SCORES or self.score == "action_ratio":
            raise ValueError(f"OOD score for the env must be one of {[s for s in SCORES if s != 'action_ratio']}, "
                             f"got {self.score!r}")
        self.window = int(window or settings.get("window", 4))
        self.min_context = int(settings.get("min_context", 1))
        self.calibrated = entry is not None
        if self.calibrated:
            self.threshold = float(entry["scores"]["imagined"][self.score]["threshold"])
            # reset contexts are scored from one noise draw (the runtime's pass): the "context" band when
            # the calibration has one (older calibrations: the real band)
            self.context_band = entry["bands"].get("context") or entry["bands"]["real"]
            ctx_scores = entry["scores"].get("context") or entry["scores"]["real"]
            self.context_threshold = float(ctx_scores["typicality"]["threshold"])
        else:
            self.threshold = self.context_threshold = math.inf
        self.recent = np.full((self.num_envs, self.window), np.nan)
        self.prev: np.ndarray | None = None

    @property
    def needs_frames(self) -> bool:
        """Whether :meth:`step` reads the frames (the complexity scores of a calibrated monitor)."""
        return self.calibrated and self.score in ("complexity", "complexity_diff")

    @classmethod
    def from_runtime(cls, runtime, num_envs: int, score: str | None = None, env_id: str | None = None
                     ) -> OODMonitor:
        """Use the calibration loaded with the runtime's checkpoint (``runtime.calibration``)."""
        cal = getattr(runtime, "calibration", None)
        if env_id is None and cal:
            env_id = env_id_of(getattr(runtime, "dataset_meta", {}) or {})
            envs = cal.get("envs", {})
            if env_id not in envs:
                env_id = None if len(envs) == 1 else env_id
        return cls(calibration_entry(cal, env_id), num_envs, score)

    def reset_rows(self, rows: np.ndarray, context_log_likelihood: np.ndarray, context_frames: np.ndarray
                   ) -> dict[str, np.ndarray]:
        """Score reset contexts. rows int [n]; context_log_likelihood float [n, k] (bits/dim, as the runtime
        returns it); context_frames uint8 [n, k, h, w, C]. Returns ood_score float32 [n], ood bool [n]."""
        rows = np.asarray(rows, dtype=np.int64)
        ll = np.asarray(context_log_likelihood, dtype=np.float64)
        frames = np.asarray(context_frames)
        if self.prev is None:
            self.prev = np.zeros((self.num_envs, *frames.shape[2:]), dtype=np.uint8)
        self.prev[rows] = frames[:, -1]
        self.recent[rows] = np.nan
        if not self.calibrated:
            return {"ood_score": (-ll[:, -1]).astype(np.float32), "ood": np.zeros(len(rows), bool)}
        typ = np.abs(band_z(-ll, np.arange(ll.shape[1]), self.context_band))
        score = typ.max(1)
        return {"ood_score": score.astype(np.float32), "ood": score > self.context_threshold}

    def step(self, log_likelihood: np.ndarray, frames: np.ndarray | None, positions: np.ndarray
             ) -> dict[str, np.ndarray]:
        """Score one imagined step of every world. log_likelihood float [N] (bits/dim); frames uint8
        [N, h, w, C] (as served; None is allowed when not :attr:`needs_frames`); positions int [N] (see
        :func:`frame_positions`). Returns ood_score float32 [N], ood bool [N]."""
        nll = -np.asarray(log_likelihood, dtype=np.float64)
        if frames is None:
            if self.needs_frames:
                raise ValueError(f"OOD score {self.score!r} needs the step's frames, got None")
            prev = self.prev = None
        else:
            frames = np.asarray(frames)
            prev, self.prev = self.prev, frames.copy()
        if not self.calibrated:
            return {"ood_score": nll.astype(np.float32), "ood": np.zeros(len(nll), bool)}
        band = self.entry["bands"]["imagined"]
        z = band_z(nll, np.asarray(positions, dtype=np.int64), band)  # elementwise per world
        self.recent = np.roll(self.recent, -1, axis=1)
        self.recent[:, -1] = z
        if self.score == "nll":
            s = nll
        elif self.score == "typicality":
            s = np.abs(z)
        elif self.score == "window":
            s = np.nanmean(self.recent, axis=1)
        elif self.score == "complexity":
            s = nll + PIXEL_BITS_OFFSET - zlib_bits_per_dim(frames)
        else:  # complexity_diff
            ref = prev if prev is not None else frames
            s = nll + PIXEL_BITS_OFFSET - zlib_bits_per_dim(frame_difference(frames, ref))
        return {"ood_score": s.astype(np.float32), "ood": s > self.threshold}


# --------------------------------------------------------------------------------------------------
# perturbations (evaluation case b) and splicing (case c)
#
# Each takes frames uint8 [N, T, H, W, C] and perturbs the steps t >= onset (the frames before stay
# untouched), returning a new uint8 array of the same shape. ``rng`` is a numpy Generator.


def _check_seq(frames: np.ndarray, onset: int) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 5:
        raise ValueError(f"perturbations take uint8 frames [N, T, H, W, C], got {frames.dtype} {frames.shape}")
    if not 0 <= int(onset) < frames.shape[1]:
        raise ValueError(f"onset {onset} must be in [0, {frames.shape[1] - 1}]")
    return frames


def perturb_noise(frames: np.ndarray, onset: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, std^2) noise (std in 0..255 gray levels), round and clip."""
    f = _check_seq(frames, onset)
    if std <= 0:
        raise ValueError(f"noise std must be > 0, got {std}")
    out = f.copy()
    tail = f[:, onset:].astype(np.float64) + rng.normal(0.0, float(std), size=f[:, onset:].shape)
    out[:, onset:] = np.clip(np.rint(tail), 0, 255).astype(np.uint8)
    return out


def perturb_occlude(frames: np.ndarray, onset: int, frac: float, rng: np.random.Generator,
                    value: tuple[int, int, int] = (128, 128, 128)) -> np.ndarray:
    """Paint a grey square of side round(frac * H) at one random place per sequence (fixed over time)."""
    f = _check_seq(frames, onset)
    N, _, H, W, C = f.shape
    side = round(float(frac) * H)
    if not 1 <= side <= min(H, W):
        raise ValueError(f"patch fraction {frac} gives a {side}-pixel patch on {H}x{W} frames")
    out = f.copy()
    ys = rng.integers(0, H - side + 1, size=N)
    xs = rng.integers(0, W - side + 1, size=N)
    val = np.asarray(value, dtype=np.uint8)[:C]
    for i in range(N):
        out[i, onset:, ys[i]:ys[i] + side, xs[i]:xs[i] + side] = val
    return out


def perturb_colour(frames: np.ndarray, onset: int, shift: float) -> np.ndarray:
    """Add (-shift, 0, +shift) to (R, G, B), clipped: a colour cast (needs 3 channels)."""
    f = _check_seq(frames, onset)
    if f.shape[-1] != 3:
        raise ValueError(f"colour shift needs RGB frames, got {f.shape[-1]} channels")
    out = f.copy()
    off = np.array([-shift, 0.0, shift])
    out[:, onset:] = np.clip(f[:, onset:].astype(np.float64) + off, 0, 255).astype(np.uint8)
    return out


def perturb_flip(frames: np.ndarray, onset: int) -> np.ndarray:
    """Mirror the frames left-right."""
    f = _check_seq(frames, onset)
    out = f.copy()
    out[:, onset:] = f[:, onset:, :, ::-1]
    return out


def perturb_freeze(frames: np.ndarray, onset: int) -> np.ndarray:
    """Repeat the last frame before onset (a frozen video); needs onset >= 1."""
    f = _check_seq(frames, onset)
    if onset < 1:
        raise ValueError("a frozen frame needs onset >= 1 (a frame to repeat)")
    out = f.copy()
    out[:, onset:] = f[:, onset - 1:onset]
    return out


def splice(frames: np.ndarray, onset: int, other: np.ndarray) -> np.ndarray:
    """Replace steps t >= onset by frames of another environment: other uint8 [M, >= T-onset, H, W, C]
    (sequence i takes other[i % M])."""
    f = _check_seq(frames, onset)
    other = np.asarray(other)
    N, T = f.shape[:2]
    if other.dtype != np.uint8 or other.ndim != 5 or other.shape[2:] != f.shape[2:] or other.shape[1] < T - onset:
        raise ValueError(f"splice: other frames must be uint8 [M, >= {T - onset}, {f.shape[2]}, {f.shape[3]}, "
                         f"{f.shape[4]}], got {other.dtype} {other.shape}")
    out = f.copy()
    out[:, onset:] = other[np.arange(N) % other.shape[0], :T - onset]
    return out


def perturbations(frames: np.ndarray, onset: int, noise_levels: Sequence[float] = (4, 12, 32),
                  patch_frac: float = 0.33, colour_shift: float = 48, seed: int = 0) -> dict[str, np.ndarray]:
    """Every case-(b) perturbation of ``frames`` from ``onset``: name -> uint8 [N, T, H, W, C]."""
    rng = np.random.default_rng(seed)
    out = {f"noise_{float(s):g}": perturb_noise(frames, onset, s, rng) for s in noise_levels}
    out["occlude"] = perturb_occlude(frames, onset, patch_frac, rng)
    out["colour_shift"] = perturb_colour(frames, onset, colour_shift)
    out["hflip"] = perturb_flip(frames, onset)
    out["freeze"] = perturb_freeze(frames, onset)
    return out
