"""The world runtime: a trained STARFlow-V served as a batched, seeded, bounded-memory simulator.

One :class:`WorldRuntime` holds B independent worlds (batch rows) on one device. Per step, for all
rows at once (no Python loop over rows):

    action a_{t-1} [B] --> deep-block Jacobi inversion of D (KV cache of the past, warm start)
                       --> shallow inversion S_1^-1..S_K^-1 (per frame)      x_tilde_t [B, C, h, w]
                       --> one-step FSM denoiser on the last few frames       x_hat_t
                       --> uint8 frames [B, h, w, C]
    + reward and termination (heads on the deep features), exact log p(x_tilde_t | past) in bits/dim,
      Jacobi iterations per row, and the causal feature vector [B, D] (``obs_mode=latent``).

Context. ``reset(frames, actions)`` noise-augments real frames (x_tilde = x + sigma * eps, the training
distribution) and encodes them with one forward pass that fills the deep block's KV cache; the
per-frame log-likelihood of the context comes out of the same pass. ``reset(..., rows=...)`` restarts
only some rows: their context is left-padded to the other rows' length (masked keys) and spliced in.

Bounded window. The cache holds at most ``context_window`` frames (default: the model's
``max_frames``, the training clip length bound). When it is full, the last ``reencode_keep`` frames are
re-encoded into a fresh cache (STARFLOW_V.md §5.4), so memory is flat for any rollout length and
RoPE frame indices stay inside the trained range.

Frame sizes. Datasets store frames at their frame size (e.g. 64); the model may work smaller (e.g.
32). The runtime's frames are at the **model's** frame size; larger uint8 inputs are area-resized with
the datasets' ``area_resize`` rule (the same preprocessing the trainer applies; integer factors are done
here in torch, bit-identically, so that the runtime never imports the datasets layer or Gymnasium).

This module knows nothing of Gymnasium, SB3 or pygame (DESIGN.md section 2).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfv_world.autoencoder import IdentityCodec
from sfv_world.checkpoint import CheckpointError, build_world_model, load_checkpoint
from sfv_world.model import nll_to_bits_per_dim
from sfv_world.sampling import JacobiConfig

FEATURES = ("mean", "slots")  # the latent observation of a frame: slot-mean [D] | slots side by side [F * D]

SAMPLER_DEFAULTS: dict[str, Any] = {
    "method": "jacobi",
    "block_size_first": 16,
    "block_size": 64,
    "threshold": 1.0e-3,
    "max_iter": 32,
    "warm_start": True,
    "criterion": "token",
    "compact": 0.5,
    "cfg": 0.0,
    "temperature": 1.0,
    "denoise": "auto",
    "bound_sigmas": 30.0,
}


def denoise_enabled(denoise: bool | str, temperature: float) -> bool:
    """Whether to apply the FSM Tweedie step: ``"auto"`` means only for stochastic samples (temperature > 0).

    The denoiser removes the sigma-noise that a sample x_tilde carries. A temperature-0 frame is the flow's
    noise-free mean path (v = 0), with no such noise to remove; measured on the cpu-demo CartPole model,
    the step costs 0.8 dB of PSNR at temperature 0 and gains 0.8 dB at temperature 1.
    """
    if isinstance(denoise, str):
        if denoise != "auto":
            raise ValueError(f"sampler.denoise must be true, false or 'auto', got {denoise!r}")
        return float(temperature) > 0
    return bool(denoise)


@dataclass
class SamplerSettings:
    """How frames are generated (keys of ``configs/sampler/*.yaml``).

    bound_sigmas: k >= 0. A generated frame x_tilde with any value outside the data's range widened by k
    noise levels, [-1 - k * sigma, 1 + k * sigma], is clamped to it and committed by teacher forcing
    (``WorldStep.out_of_range``); 0 turns the check off. Real frames lie in [-1, 1] plus sigma-noise. Measured
    on session 24's cpu-demo model (sigma 0.03) under one of its agents (64 worlds x 300 steps): unbounded, the
    per-frame maximum |x_tilde| had quantiles 1.34 / 1.82 / 5.2 / 25.9 (50 / 90 / 99 / 99.9%); a world whose
    frame passed 3 was past 3 again on the next step 96% of the time (up to 2e5, rewards up to 340; a 100-episode
    mean imagined return of -3.6e4 in an agent's training). k = 30 (1.9) clamped 7-8% of the frames and kept every
    frame's raw maximum below 3 (benchmarks/results/dream_range_s25.md); k = 10 (1.3) clamped half of them.
    """

    method: str = "jacobi"
    jacobi: JacobiConfig = field(default_factory=JacobiConfig)
    cfg: float = 0.0
    temperature: float = 1.0
    denoise: bool = True  # resolved: "auto" in a config becomes temperature > 0
    bound_sigmas: float = 30.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplerSettings:
        """Build from a sampler config; missing keys take ``SAMPLER_DEFAULTS``, unknown keys are errors."""
        d = dict(d or {})
        unknown = sorted(set(d) - set(SAMPLER_DEFAULTS))
        if unknown:
            raise ValueError(f"sampler: unknown keys {unknown} (known: {sorted(SAMPLER_DEFAULTS)})")
        d = {**SAMPLER_DEFAULTS, **d}
        if d["method"] not in ("jacobi", "sequential"):
            raise ValueError(f"sampler.method must be 'jacobi' or 'sequential', got {d['method']!r}")
        if float(d["temperature"]) < 0 or float(d["cfg"]) < 0:
            raise ValueError(f"sampler.temperature and sampler.cfg must be >= 0, got {d['temperature']}, {d['cfg']}")
        bound = d["bound_sigmas"]
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 <= float(bound) < math.inf:
            raise ValueError(f"sampler.bound_sigmas must be a number >= 0 (0: no bound), got {bound!r}")
        return cls(
            method=str(d["method"]),
            jacobi=JacobiConfig.from_dict(d),
            cfg=float(d["cfg"]),
            temperature=float(d["temperature"]),
            denoise=denoise_enabled(d["denoise"], float(d["temperature"])),
            bound_sigmas=float(bound),
        )


@dataclass
class WorldReset:
    """Result of :meth:`WorldRuntime.reset` for the R rows reset.

    frames          uint8 [R, k, h, w, C]  the context at the model's frame size
    log_likelihood  float32 [R, k]         log2 p(x_tilde_t | x_tilde_<t, a_<t) / (C*h*w), bits/dim
    features        float32 [R, D]         causal features of the newest context frame ([R, F * D]: slots)
    """

    frames: np.ndarray
    log_likelihood: np.ndarray
    features: np.ndarray


@dataclass
class WorldStep:
    """Result of :meth:`WorldRuntime.step` (or :meth:`WorldRuntime.observe`) for all B rows.

    frames            uint8 [B, h, w, C]  the new frame (denoised), at the model's frame size; None from
                                          ``step(..., frames=False)`` (see :meth:`WorldRuntime.newest_frames`)
    rewards           float32 [B]         predicted reward of the transition
    termination_prob  float32 [B]         sigmoid of the termination head
    termination_logit float32 [B]         the termination head's logit (log-odds; informative far below
                                          the decision threshold, where termination_prob is ~0)
    terminations      bool [B]            termination_prob > 0.5
    log_likelihood    float32 [B]         log-likelihood of the new frame, bits/dim (see WorldReset)
    jacobi_iterations int64 [B]           deep-block Jacobi iterations (0 for observe)
    features          float32 [B, D]      causal features of the new frame ([B, F * D]: slots)
    out_of_range      bool [B]            the inverted frame left the data's range and was clamped
                                          (``SamplerSettings.bound_sigmas``); False for observe
    frame_peak        float32 [B]         the largest |value| of the inverted frame in model space, before
                                          any clamp (~1 + 5 sigma for a frame like the data); that of the
                                          given frame for observe
    """

    frames: np.ndarray | None
    rewards: np.ndarray
    termination_prob: np.ndarray
    termination_logit: np.ndarray
    terminations: np.ndarray
    log_likelihood: np.ndarray
    jacobi_iterations: np.ndarray
    features: np.ndarray
    out_of_range: np.ndarray
    frame_peak: np.ndarray


def area_downsample(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area (box-filter) resize by integer factors: uint8 [..., H, W, C] -> uint8 [..., h, w, C].

    Each output pixel is the mean of its fy x fx input block, rounded half up in exact integer
    arithmetic: bit-identical to ``sfv_world.datasets.area_resize`` for integer ratios, without importing
    the datasets layer (and with it gymnasium) into the runtime.
    """
    *lead, H, W, C = frames.shape
    fy, fx = H // h, W // w
    if fy * h != H or fx * w != W:
        raise ValueError(f"area_downsample: {H}x{W} -> {h}x{w} is not an integer factor")
    blocks = frames.to(torch.int32).reshape(*lead, h, fy, w, fx, C).sum(dim=(-4, -2))
    n = fy * fx
    return torch.div(2 * blocks + n, 2 * n, rounding_mode="floor").to(torch.uint8)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class WorldRuntime:
    """B worlds of one world model (see the module docstring).

    Args:
        model: a ``WorldModel`` (eval mode; its parameters' device and dtype are used).
        dataset_meta: the checkpoint's dataset metadata (``payload["dataset"]``).
        batch_size: number of worlds B.
        sampler: sampler settings (dict of ``configs/sampler`` keys, or :class:`SamplerSettings`).
        context_window: frames the KV cache holds at most (2 .. model ``max_frames``; default max_frames).
        reencode_keep: frames kept when the window is full (1 .. context_window-1; default
            min(window-1, max(4, window//4)): re-encoding costs ~keep frames every window-keep steps,
            and 4 frames still carry velocities and a dream context clip).
        seed: seed of the sampling ``torch.Generator`` (None: nondeterministic).
        features: the latent observation of a frame (``FEATURES``): ``"mean"``, the deep block's final
            hidden states averaged over the frame's F token slots (float32 [D]); ``"slots"``, the F slots
            side by side (float32 [F * D]), which keep where in the frame a detail is.
    """

    def __init__(
        self,
        model,
        dataset_meta: dict[str, Any],
        batch_size: int = 1,
        sampler: dict[str, Any] | SamplerSettings | None = None,
        context_window: int | None = None,
        reencode_keep: int | None = None,
        seed: int | None = None,
        features: str = "mean",
    ):
        self.model = model.eval()
        self.flow, self.denoiser = model.flow, model.denoiser
        self.config = model.config
        self.dataset_meta = dict(dataset_meta)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.sampler = sampler if isinstance(sampler, SamplerSettings) else SamplerSettings.from_dict(sampler)
        max_frames = int(self.config.max_frames)
        self.context_window = max_frames if context_window is None else int(context_window)
        if not 2 <= self.context_window <= max_frames:
            raise ValueError(f"context_window must be in [2, {max_frames}] (model max_frames), got {context_window}")
        self.reencode_keep = (min(self.context_window - 1, max(4, self.context_window // 4)) if reencode_keep is None
                              else int(reencode_keep))
        if not 1 <= self.reencode_keep < self.context_window:
            raise ValueError(f"reencode_keep must be in [1, {self.context_window - 1}], got {reencode_keep}")
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        self.features = features
        p = next(self.flow.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.codec = IdentityCodec(self.dtype)
        # frames in model space lie in [-1, 1] (IdentityCodec) plus sigma-noise
        k = self.sampler.bound_sigmas
        self.frame_bound = 1.0 + k * float(self.config.sigma) if k > 0 else None
        self.generator = torch.Generator(device=self.device)
        self.seed(seed)
        self.state = None  # GenerationState once reset
        self.reencodes = 0

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        batch_size: int = 1,
        device: str | torch.device = "cpu",
        sampler: dict[str, Any] | None = None,
        context_window: int | None = None,
        reencode_keep: int | None = None,
        seed: int | None = None,
        features: str = "mean",
    ) -> WorldRuntime:
        """Load a checkpoint (``sfv_world.checkpoint``) and build B worlds on ``device``.

        ``sampler`` overrides the run config's sampler settings key by key. Raises
        :class:`~sfv_world.checkpoint.CheckpointError` for a missing, unreadable or incompatible file.
        """
        path = Path(path)
        payload = load_checkpoint(path, map_location="cpu")
        meta = payload.get("dataset") or {}
        if "action_space" not in meta:
            raise CheckpointError(f"checkpoint {path}: dataset metadata has no 'action_space'; cannot serve it as an env")
        mc = payload["model_config"]
        if not isinstance(mc, dict) or "frame_size" not in mc:
            raise CheckpointError(f"checkpoint {path}: model_config is not a StarFlowVConfig dict")
        try:
            model = build_world_model(payload, device=device, path=str(path))
        except CheckpointError:
            raise
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path} is incompatible with this sfv-world model: {e}") from e
        _check_action_space(path, meta["action_space"], model.config)
        run_sampler = dict((payload.get("config") or {}).get("sampler") or {})
        run_sampler = {k: v for k, v in run_sampler.items() if k in SAMPLER_DEFAULTS}
        runtime = cls(
            model, meta, batch_size=batch_size, sampler={**run_sampler, **dict(sampler or {})},
            context_window=context_window, reencode_keep=reencode_keep, seed=seed, features=features,
        )
        runtime.checkpoint_path = path
        runtime.calibration = payload.get("calibration")
        return runtime

    def sibling(self, batch_size: int, seed: int | None = None) -> WorldRuntime:
        """Another runtime over the same model (shared weights, no copy) with ``batch_size`` worlds and
        this one's sampler, window and features; its own state, seeded with ``seed``."""
        rt = WorldRuntime(self.model, self.dataset_meta, batch_size=batch_size, sampler=self.sampler,
                          context_window=self.context_window, reencode_keep=self.reencode_keep, seed=seed,
                          features=self.features)
        for name in ("checkpoint_path", "calibration"):
            if hasattr(self, name):
                setattr(rt, name, getattr(self, name))
        return rt

    # -- properties ---------------------------------------------------------------------------------

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of the frames the runtime takes and returns: the model's frame size."""
        c = self.config
        return (c.frame_size, c.frame_size, c.channels)

    @property
    def feature_dim(self) -> int:
        """Width of the causal feature vectors: D (``features="mean"``) or F * D (``"slots"``)."""
        return self.feature_dims[self.features]

    @property
    def feature_dims(self) -> dict[str, int]:
        """Width of the feature vector per ``features`` kind: {"mean": D, "slots": F * D}."""
        c = self.config
        return {"mean": int(c.deep_width), "slots": int(c.deep_width) * int(c.tokens_per_frame)}

    def _pool(self, features: torch.Tensor, slot_features: torch.Tensor) -> torch.Tensor:
        """The observation of each frame: features [..., D] or slot_features [..., F, D] flattened to [..., F * D]."""
        return slot_features.flatten(-2) if self.features == "slots" else features

    @property
    def num_frames(self) -> int:
        """Frames currently in the KV cache (padding included), 0 before the first reset."""
        return 0 if self.state is None else int(self.state.num_frames)

    def seed(self, seed: int | None) -> None:
        """Re-seed the sampling generator (None: a fresh nondeterministic seed)."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed) % (2**63))

    # -- input conversion ---------------------------------------------------------------------------

    def _frames_to_model(self, frames: Any, name: str) -> torch.Tensor:
        """uint8 [..., H, W, C] -> model-space float [..., C, h, w] (area-resized when H != h)."""
        f = _to_numpy(frames)
        if f.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 images [..., H, W, C], got dtype {f.dtype}")
        h, w, c = self.frame_shape
        if f.ndim < 3 or f.shape[-1] != c:
            raise ValueError(f"{name} must be uint8 [..., H, W, {c}], got shape {f.shape}")
        t = torch.from_numpy(np.array(f, copy=not f.flags.writeable or not f.flags.c_contiguous)).to(self.device)
        if tuple(f.shape[-3:-1]) != (h, w):
            H, W = f.shape[-3:-1]
            if H < h or W < w:
                raise ValueError(f"{name}: frames of {H}x{W} are smaller than the model's {h}x{w}")
            if H % h == 0 and W % w == 0:
                t = area_downsample(t, h, w)
            else:  # fractional ratio: the datasets' general kernel (imports the datasets layer)
                from sfv_world.datasets.preprocess import area_resize

                t = torch.from_numpy(area_resize(f, (h, w))).to(self.device)
        return self.codec.encode(t.movedim(-1, -3))

    def _actions_to_model(self, actions: Any, lead: tuple[int, ...], name: str) -> torch.Tensor:
        """Validate actions of shape lead (+ (k,) for Box) and return them as a tensor on the device."""
        c = self.config
        a = torch.as_tensor(np.array(_to_numpy(actions)), device=self.device)
        if c.action_kind == "discrete":
            if tuple(a.shape) != lead:
                raise ValueError(f"{name} must have shape {lead}, got {tuple(a.shape)}")
            if a.is_floating_point():
                if not bool(torch.all(a == a.round())):
                    raise ValueError(f"{name} must be integer actions, got {a}")
            a = a.long()
            bad = (a < 0) | (a >= c.action_dim)
            if bool(bad.any()):
                raise ValueError(f"{name}: action {int(a[bad][0])} is outside 0..{c.action_dim - 1}")
            return a
        want = (*lead, c.action_dim)
        if tuple(a.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
        a = a.to(self.dtype)
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"{name} must be finite")
        return a

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        """x_tilde = x + sigma * eps: real frames enter the flow as the noise-augmented training data."""
        eps = torch.randn(x.shape, generator=self.generator, device=self.device, dtype=self.dtype)
        return x + self.config.sigma * eps

    def _bits(self, nll: torch.Tensor) -> np.ndarray:
        """Per-frame nll (nats) -> log-likelihood in bits/dim (float32 numpy)."""
        return (-nll_to_bits_per_dim(nll.float(), self.config)).cpu().numpy().astype(np.float32)

    # -- reset ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self, context_frames: Any, context_actions: Any, rows: Any = None) -> WorldReset:
        """Start worlds from real context; encode it with one forward pass that fills the KV caches.

        context_frames: uint8 [R, k, H, W, C] (1 <= k <= context_window; H, W >= the model's size);
        context_actions: [R, k-1] int (Discrete) or [R, k-1, A] float (Box); a_t leads from frame t to t+1;
        rows: None (R == B: every world restarts) or int [R] / bool [B] (only those worlds restart; the
        others continue unchanged).
        """
        B = self.batch_size
        if rows is None:
            row_idx = None
        else:
            r = _to_numpy(rows)
            row_idx = np.flatnonzero(r) if r.dtype == np.bool_ else r.astype(np.int64).reshape(-1)
            if r.dtype == np.bool_ and r.shape != (B,):
                raise ValueError(f"rows as a mask must have shape ({B},), got {r.shape}")
            if row_idx.size == 0:
                raise ValueError("rows selects no world")
            if row_idx.min() < 0 or row_idx.max() >= B or len(set(row_idx.tolist())) != row_idx.size:
                raise ValueError(f"rows must be distinct indices in 0..{B - 1}, got {row_idx.tolist()}")
            if self.state is None and row_idx.size != B:
                raise ValueError("the first reset must restart every world (rows=None)")
        R = B if row_idx is None else int(row_idx.size)
        x = self._frames_to_model(context_frames, "context_frames")
        if x.dim() != 5 or x.shape[0] != R:
            raise ValueError(
                f"context_frames must be uint8 [{R}, k, H, W, C] for {R} worlds, got {tuple(_to_numpy(context_frames).shape)}"
            )
        k = int(x.shape[1])
        if not 1 <= k <= self.context_window:
            raise ValueError(f"context_frames holds {k} frames; between 1 and context_window={self.context_window} allowed")
        a = self._actions_to_model(context_actions, (R, k - 1), "context_actions")
        x_tilde = self._noisy(x)
        cfg = self.sampler.cfg != 0

        if row_idx is None or row_idx.size == B:
            # every world restarts; context i goes to world row_idx[i]
            if row_idx is not None:
                order = torch.as_tensor(row_idx, device=self.device)
                x_tilde = torch.empty_like(x_tilde).index_copy_(0, order, x_tilde)
                a = torch.empty_like(a).index_copy_(0, order, a)
            self.state, out = self.flow.encode_context(x_tilde, a, cfg=cfg, capacity=self.context_window)
            nll, feats = out.nll, self._pool(out.features[:, -1], out.slot_features[:, -1])
            if row_idx is not None:
                nll, feats = nll[order], feats[order]
        else:
            nll, feats = self._reset_rows(torch.as_tensor(row_idx, device=self.device), x_tilde, a, cfg)
        return WorldReset(
            frames=self.codec.decode(x).movedim(-3, -1).cpu().numpy(),
            log_likelihood=self._bits(nll),
            features=feats.float().cpu().numpy(),
        )

    def _reset_rows(self, rows: torch.Tensor, x_tilde: torch.Tensor, a: torch.Tensor, cfg: bool):
        """Restart ``rows`` with context (x_tilde [R, k], a [R, k-1]); returns (nll [R, k], features [R, D])."""
        state = self.state
        L, k = state.num_frames, x_tilde.shape[1]
        if k > L:
            # the new context is longer than the others' history: bring every row to k frames
            # (others left-padded), one forward pass over the whole batch
            B = self.batch_size
            hx, ha, hm = state.history_x[:, :L], state.history_a[:, : max(L - 1, 0)], state.history_mask[:, :L]
            x_all = torch.cat([hx[:, :1].expand(B, k - L, *hx.shape[2:]), hx], 1)
            a_all = torch.zeros((B, k - 1, *ha.shape[2:]), dtype=ha.dtype, device=self.device)
            a_all[:, k - L :] = ha
            m_all = torch.cat([torch.zeros(B, k - L, dtype=torch.bool, device=self.device), hm], 1)
            x_all[rows], a_all[rows], m_all[rows] = x_tilde, a.to(a_all.dtype), True
            self.state, out = self.flow.encode_context(x_all, a_all, m_all, cfg=cfg, capacity=self.context_window)
            return out.nll[rows], self._pool(out.features[rows, -1], out.slot_features[rows, -1])
        # left-pad the new context to the others' length L with masked frames that are never computed
        # (their history repeats the first real frame, so the denoiser's window never sees an empty
        # frame) and splice the rows in
        new, out = self.flow.encode_context(x_tilde, a, cfg=cfg, capacity=self.context_window, pad_frames=L - k)
        state.replace_rows(rows, new)
        return out.nll, self._pool(out.features[:, -1], out.slot_features[:, -1])

    # -- step -----------------------------------------------------------------------------------------

    def _ensure_room(self) -> None:
        if self.state is None:
            raise RuntimeError("WorldRuntime.step/observe called before reset()")
        if self.state.full:
            self.state, _ = self.flow.reencode(self.state, self.reencode_keep, heads=False)
            self.reencodes += 1

    def _denoised_newest(self) -> torch.Tensor:
        """One FSM Tweedie step on the newest frame given the last few frames: [B, C, h, w]."""
        st = self.state
        n = st.num_frames
        if not self.sampler.denoise:
            return st.history_x[:, n - 1]
        w = min(n, int(getattr(self.denoiser, "window", 2)))
        xw = st.history_x[:, n - w : n]
        aw = st.history_a[:, n - w : n - 1]
        mw = st.history_mask[:, n - w : n]
        return self.denoiser.denoise_latest(xw, aw, frame_mask=None if bool(mw.all()) else mw)

    @torch.no_grad()
    def newest_frames(self) -> np.ndarray:
        """The newest frame of every world as served: denoised (when the sampler denoises), uint8 [B, h, w, C].

        The same pixels :meth:`step` returns, computed from the generation state, so a caller that does
        not look at every frame (a latent-observation agent) can skip the denoiser with
        ``step(..., frames=False)`` and still render the current frame. For a world whose newest frame is
        reset context this is that context frame after the sigma-noise and the denoiser, not the input.
        """
        if self.state is None:
            raise RuntimeError("WorldRuntime.newest_frames called before reset()")
        return self.codec.decode(self._denoised_newest()).movedim(-3, -1).cpu().numpy()

    @torch.no_grad()
    def step(self, actions: Any, frames: bool = True) -> WorldStep:
        """Generate the next frame of every world given ``actions`` (int [B] or float [B, A]).

        Deep-block inversion (``sampler.method``: block Jacobi or exact sequential), shallow inversion,
        the one-step denoiser, then uint8. One batched call for all B worlds. ``frames=False`` skips the
        denoiser and the uint8 frames (``WorldStep.frames`` is None; :meth:`newest_frames` gives them
        until the next step); everything else, the generation state included, is unchanged. A frame
        outside the data's range is clamped to it and committed in place of the inverted one
        (``SamplerSettings.bound_sigmas``, ``WorldStep.out_of_range``).
        """
        a = self._actions_to_model(actions, (self.batch_size,), "actions")
        self._ensure_room()
        s = self.sampler
        sample = self.flow.generate_frame(
            self.state, a, generator=self.generator, method=s.method, jacobi=s.jacobi,
            cfg_scale=s.cfg, temperature=s.temperature, bound=self.frame_bound,
        )
        clamped = sample.clamped
        term = torch.sigmoid(sample.termination_logit.float())
        return WorldStep(
            frames=self.newest_frames() if frames else None,
            rewards=self.flow.reward_value(sample.reward).float().cpu().numpy(),
            termination_prob=term.cpu().numpy(),
            termination_logit=sample.termination_logit.float().cpu().numpy(),
            terminations=(term > 0.5).cpu().numpy(),
            log_likelihood=self._bits(sample.nll),
            jacobi_iterations=sample.iterations.to(torch.int64).cpu().numpy(),
            features=self._pool(sample.features, sample.slot_features).float().cpu().numpy(),
            out_of_range=(np.zeros(self.batch_size, dtype=bool) if clamped is None else clamped.cpu().numpy()),
            frame_peak=sample.peak.float().cpu().numpy(),
        )

    @torch.no_grad()
    def observe(self, frames: Any, actions: Any) -> WorldStep:
        """Teacher forcing: append *real* frames (uint8 [B, H, W, C]) reached by ``actions``.

        The new frame is appended with one cached forward pass (``StarFlowV.append_frame``: the data ->
        noise direction needs no inversion), so features, reward, termination and log-likelihood are
        those the model assigns to the real history, at the cost of one frame. The window is bounded
        exactly as in :meth:`step`. Returned frames are the inputs at the model's size.
        """
        B = self.batch_size
        a = self._actions_to_model(actions, (B,), "actions")
        x = self._frames_to_model(frames, "frames")
        if x.dim() != 4 or x.shape[0] != B:
            raise ValueError(f"frames must be uint8 [{B}, H, W, C], got {tuple(_to_numpy(frames).shape)}")
        self._ensure_room()
        x_tilde = self._noisy(x)
        out = self.flow.append_frame(self.state, x_tilde, a)
        term = torch.sigmoid(out.termination_logit.float())
        return WorldStep(
            frames=self.codec.decode(x).movedim(-3, -1).cpu().numpy(),
            rewards=self.flow.reward_value(out.reward).float().cpu().numpy(),
            termination_prob=term.cpu().numpy(),
            termination_logit=out.termination_logit.float().cpu().numpy(),
            terminations=(term > 0.5).cpu().numpy(),
            log_likelihood=self._bits(out.nll),
            jacobi_iterations=np.zeros(B, dtype=np.int64),
            features=self._pool(out.features, out.slot_features).float().cpu().numpy(),
            out_of_range=np.zeros(B, dtype=bool),
            frame_peak=x_tilde.flatten(1).abs().amax(1).float().cpu().numpy(),
        )

    def memory_bytes(self) -> int:
        """Bytes held by the generation state's tensors (KV cache and frame history)."""
        st = self.state
        if st is None:
            return 0
        tensors = [st.cache.k, st.cache.v, st.cache.key_valid, st.history_x, st.history_a, st.history_mask,
                   st.last_token, st.last_valid]
        if st.prev_tokens is not None:
            tensors.append(st.prev_tokens)
        return int(sum(t.numel() * t.element_size() for t in tensors))


def _check_action_space(path: Path, serialized: Any, config) -> None:
    """The dataset's action space must match the model's action embedding (kind and size)."""
    import json

    try:
        d = json.loads(serialized) if isinstance(serialized, str) else dict(serialized)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable dataset action_space {serialized!r}: {e}") from e
    kind = d.get("type")
    if kind == "Discrete":
        ok = config.action_kind == "discrete" and int(d.get("n", -1)) == config.action_dim
        want = f"Discrete({config.action_dim})" if config.action_kind == "discrete" else f"Box({config.action_dim},)"
    elif kind == "Box":
        shape = d.get("shape") or []
        ok = config.action_kind == "box" and math.prod(shape) == config.action_dim and len(shape) == 1
        want = f"Box({config.action_dim},)" if config.action_kind == "box" else f"Discrete({config.action_dim})"
    else:
        ok, want = False, config.action_kind
    if not ok:
        raise CheckpointError(
            f"checkpoint {path}: dataset action space {d} does not match the model's action embedding ({want})"
        )
