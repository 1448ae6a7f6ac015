"""STARFlow-V for action-conditioned video (STARFLOW_V.md §2, §3, §6, §9).

x_tilde [B, T, C, H, W] --patchify--> u [B, T, F, d]
  --S_1 .. S_K (shallow, per frame, unconditional, alternating identity / flip)-->
  --D (deep, token-causal over the whole clip in natural order, + c_t = E(a_{t-1}))--> z [B, T, F, d]

log p(x_tilde) = sum_t [ log N(z_t; 0, I) + sum(logdet of frame t over all blocks) ], and each frame's
term is exactly log p(x_tilde_t | x_tilde_<t, a_<t): the Jacobian is block lower-triangular over frames.

Constant convention: `nll` is the full negative log-density of the continuous x_tilde in model units
([-1, 1] pixels), including the Gaussian constant (d/2) ln 2 pi. `nll_to_bits_per_dim` divides by
ln2 * C*H*W and adds nothing; to express it per 0..255 pixel unit add log2(127.5) = PIXEL_BITS_OFFSET.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.nn as nn

from sfv_world.denoiser import FlowScoreDenoiser
from sfv_world.flow import FlowBlock, KVCache
from sfv_world.heads import REWARD_MODES, RewardTerminationHead
from sfv_world.rope import check_head_dim, rope_cos_sin, token_positions
from sfv_world.sampling import JacobiConfig, invert_jacobi, invert_sequential
from sfv_world.tokens import ActionEmbedding, patchify, start_flags, unpatchify

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
PIXEL_BITS_OFFSET = math.log2(127.5)  # bits/dim between [-1, 1] units and 0..255 units


# --------------------------------------------------------------------------------------------------
# config


@dataclass
class StarFlowVConfig:
    """Model hyper-parameters; keys match configs/model/*.yaml plus action_kind/action_dim."""

    frame_size: int
    channels: int
    patch_size: int
    max_frames: int
    shallow_blocks: int
    shallow_layers: int
    shallow_width: int
    deep_layers: int
    deep_width: int
    head_dim: int
    soft_clip: float
    sigma: float
    cond_drop: float
    denoiser_layers: int
    denoiser_width: int
    denoiser_lookahead: int
    reward_mode: str
    action_kind: str  # "discrete" | "box" (from the dataset)
    action_dim: int  # number of actions (discrete) or Box dimension
    # Temporal skip: D's shift b of slot (t, j) is b_net + g * u_{t-1, j}, with u_{t-1, j} the same
    # token of the previous frame (0 for a sequence start) and g a learned gate per dimension (0 at
    # init), so copying what persists costs no capacity. An ungated skip (g = 1) also copies the previous
    # frame's sigma-noise, which D must then learn to cancel: it trained worse. Checkpoints written
    # before this option load with False.
    temporal_skip: bool = False

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "StarFlowVConfig":
        """Build from a mapping (e.g. a hydra model config plus action_kind/action_dim).

        Unknown or missing keys raise ValueError naming them (keys with a default may be missing).
        """
        d = {**dict(d), **overrides}
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]
        unknown = sorted(set(d) - set(names))
        missing = [n for n in required if n not in d]
        if unknown or missing:
            raise ValueError(f"StarFlowVConfig: unknown keys {unknown}, missing keys {missing}")
        cfg = cls(**{n: d[n] for n in names if n in d})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.frame_size % self.patch_size:
            raise ValueError(f"frame_size {self.frame_size} is not a multiple of patch_size {self.patch_size}")
        check_head_dim(self.head_dim)
        for name in ("shallow_width", "deep_width", "denoiser_width"):
            if getattr(self, name) % self.head_dim:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of head_dim={self.head_dim}")
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode={self.reward_mode!r}: expected one of {REWARD_MODES}")
        if self.action_kind not in ("discrete", "box"):
            raise ValueError(f"action_kind={self.action_kind!r}: expected 'discrete' or 'box'")
        if self.denoiser_lookahead not in (0, 1):
            raise ValueError(f"denoiser_lookahead={self.denoiser_lookahead}: expected 0 or 1")
        if not isinstance(self.temporal_skip, bool):
            raise ValueError(f"temporal_skip={self.temporal_skip!r}: expected true or false")
        if self.action_dim < 1 or self.max_frames < 1 or self.shallow_blocks < 0:
            raise ValueError("action_dim and max_frames must be >= 1, shallow_blocks >= 0")

    @property
    def grid(self) -> int:
        """Tokens per side of a frame."""
        return self.frame_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        """F."""
        return self.grid ** 2

    @property
    def token_dim(self) -> int:
        """d = p*p*C."""
        return self.patch_size ** 2 * self.channels

    @property
    def frame_dims(self) -> int:
        """C*H*W."""
        return self.channels * self.frame_size ** 2


def nll_to_bits_per_dim(nll: torch.Tensor, config: StarFlowVConfig | int) -> torch.Tensor:
    """nats per frame -> bits per dimension: nll / (ln 2 * C*H*W). No offset is added (see module doc).

    config: a StarFlowVConfig or the number of dimensions of a frame.
    """
    dims = config.frame_dims if isinstance(config, StarFlowVConfig) else int(config)
    return nll / (math.log(2.0) * dims)


# --------------------------------------------------------------------------------------------------
# outputs and generation state


@dataclass
class FlowOutput:
    """Output of `StarFlowV.forward` (float tensors; nll/logdet at least float32).

    z [B, T, F, d]            prior-space tokens
    logdet [B, T]             sum of log|det| of all blocks, per frame (nats)
    nll [B, T]                -log p(x_tilde_t | x_tilde_<t, a_<t) (nats; 0 on padding frames)
    features [B, T, D]        per-frame causal deep features (see StarFlowV.forward)
    slot_features [B, T, F, D]  the same before the mean over frame t's F slots
    reward [B, T-1]           transition t: regression value, or sign logits [B, T-1, 3] (None: heads=False)
    termination_logit [B, T-1]  calibrated: > 0 means terminated (None: heads=False)
    """

    z: torch.Tensor
    logdet: torch.Tensor
    nll: torch.Tensor
    features: torch.Tensor
    reward: torch.Tensor
    termination_logit: torch.Tensor
    slot_features: torch.Tensor


@dataclass
class FrameSample:
    """One generated frame per row (`StarFlowV.generate_frame`).

    x_tilde [B, C, H, W] (pre-denoise); nll [B] nats of the frame under the (conditional) model;
    features [B, D]; reward [B] (or sign logits [B, 3]) and termination_logit [B] for the transition
    (previous frame, action) -> this frame; iterations [B] int64 deep-block Jacobi iterations per
    sample; passes: deep-block forward calls; shallow_passes: shallow-block forward calls;
    slot_features [B, F, D]: the features before the mean over the frame's F slots; clamped bool [B]:
    rows whose inverted frame left the ``bound`` of `StarFlowV.generate_frame` and was clamped (None:
    no bound was given, or the frame was teacher-forced); peak [B]: the largest |value| of each inverted
    frame before any clamp (None: teacher-forced).
    """

    x_tilde: torch.Tensor
    nll: torch.Tensor
    features: torch.Tensor
    reward: torch.Tensor
    termination_logit: torch.Tensor
    iterations: torch.Tensor
    passes: int
    shallow_passes: int
    slot_features: torch.Tensor
    clamped: torch.Tensor | None = None
    peak: torch.Tensor | None = None


class GenerationState:
    """Deep-block KV cache plus the bookkeeping of frame-by-frame generation.

    cache           KVCache of the deep block; B rows, or 2B ([cond; uncond]) when cfg
    last_token      [B, d] deep-space token u of the newest frame's last slot, not yet fed
    last_valid      bool [B]: the row has a real newest frame (False: empty or all padding)
    prev_tokens     [B, F, d] deep-space tokens of the newest frame (Jacobi warm start) | None
    num_frames      frames held (padding included); the next frame gets RoPE frame index num_frames
    capacity        frames the cache can hold
    history_x       [B, capacity, C, H, W] x_tilde of the held frames (for re-encoding a window)
    history_a       [B, capacity, ...] action taken after each held frame (last one unset)
    history_mask    bool [B, capacity]: real frames
    """

    def __init__(self, cache: KVCache, last_token, last_valid, prev_tokens, num_frames: int, capacity: int,
                 cfg: bool, history_x, history_a, history_mask):
        self.cache, self.last_token, self.last_valid, self.prev_tokens = cache, last_token, last_valid, prev_tokens
        self.num_frames, self.capacity, self.cfg = num_frames, capacity, cfg
        self.history_x, self.history_a, self.history_mask = history_x, history_a, history_mask

    @property
    def batch(self) -> int:
        return self.last_token.shape[0]

    @property
    def full(self) -> bool:
        return self.num_frames >= self.capacity

    def select_rows(self, rows: torch.Tensor) -> "GenerationState":
        """A copy of the rows int64 [R] as a state of R rows (cache, tokens and history; cfg: both halves)."""
        cache_rows = torch.cat([rows, rows + self.batch]) if self.cfg else rows
        cache = self.cache.gather_rows(cache_rows, 0)  # the committed slots, copied
        prev = None if self.prev_tokens is None else self.prev_tokens[rows]
        return GenerationState(cache, self.last_token[rows], self.last_valid[rows], prev, self.num_frames, self.capacity,
                               self.cfg, self.history_x[rows], self.history_a[rows], self.history_mask[rows])

    def replace_rows(self, rows: torch.Tensor, other: "GenerationState", other_rows: torch.Tensor | None = None) -> None:
        """Overwrite rows (int64 [R]) with other's rows (default 0..R-1), e.g. after a per-row reset.

        Both states must hold the same number of frames; encode a shorter context for `other` with
        left padding (frame_mask False first) to match. Both must agree on cfg.
        """
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.last_token.device)
        if other_rows is None:
            other_rows = torch.arange(len(rows), device=rows.device)
        other_rows = torch.as_tensor(other_rows, dtype=torch.long, device=rows.device)
        if other.num_frames != self.num_frames or other.cfg != self.cfg:
            raise ValueError(
                f"replace_rows: states differ (num_frames {other.num_frames} vs {self.num_frames}, "
                f"cfg {other.cfg} vs {self.cfg}); left-pad the new context to {self.num_frames} frames"
            )
        if self.cfg:
            B, Bo = self.batch, other.batch
            self.cache.replace_rows(torch.cat([rows, rows + B]), other.cache, torch.cat([other_rows, other_rows + Bo]))
        else:
            self.cache.replace_rows(rows, other.cache, other_rows)
        self.last_token[rows] = other.last_token[other_rows]
        self.last_valid[rows] = other.last_valid[other_rows]
        if self.prev_tokens is not None and other.prev_tokens is not None:
            self.prev_tokens[rows] = other.prev_tokens[other_rows]
        n = self.num_frames
        self.history_x[rows, :n] = other.history_x[other_rows, :n]
        self.history_a[rows, :n] = other.history_a[other_rows, :n]
        self.history_mask[rows, :n] = other.history_mask[other_rows, :n]


# --------------------------------------------------------------------------------------------------
# the model


class StarFlowV(nn.Module):
    """Global-local STARFlow-V with frame-aligned action conditioning and reward/termination heads."""

    def __init__(self, config: StarFlowVConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        F, d = c.tokens_per_frame, c.token_dim
        # shallow S_1..S_K in data->noise order; the one next to D is flipped, then alternate
        self.shallow = nn.ModuleList([
            FlowBlock(d, c.shallow_width, c.shallow_layers, c.head_dim, c.soft_clip,
                      "flip_in_frame" if (c.shallow_blocks - 1 - i) % 2 == 0 else "identity", F)
            for i in range(c.shallow_blocks)
        ])
        self.deep = FlowBlock(d, c.deep_width, c.deep_layers, c.head_dim, c.soft_clip, "identity", F,
                              skip_gate=c.temporal_skip)
        self.action_embed = ActionEmbedding(c.action_kind, c.action_dim, c.deep_width)
        self.heads = RewardTerminationHead(c.channels, c.frame_size, c.action_kind, c.action_dim, c.reward_mode)

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.deep.sos.dtype

    @property
    def device(self) -> torch.device:
        return self.deep.sos.device

    def rope(self, first_frame: int, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for whole frames [first_frame, first_frame + num_frames): each [T*F, hd/2]."""
        g = self.config.grid
        frames = torch.arange(first_frame, first_frame + num_frames, dtype=torch.float64, device=self.device)
        cos, sin = rope_cos_sin(token_positions(g, g, frames), self.config.head_dim)
        return cos.to(self.dtype), sin.to(self.dtype)

    def shallow_forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shallow blocks on each frame independently: u [B, T, F, d] -> (u', logdet [B, T])."""
        B, T, F, d = u.shape
        cos, sin = self.rope(0, 1)  # every frame is time 0: time-invariant
        x = u.reshape(B * T, F, d)
        logdet = torch.zeros(B * T, dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
        for block in self.shallow:
            x, ld, _ = block(x, cos, sin)
            logdet = logdet + ld.sum((1, 2))
        return x.reshape(B, T, F, d), logdet.reshape(B, T)

    def reward_value(self, reward: torch.Tensor) -> torch.Tensor:
        """Head output -> reward value (regression value, or argmax sign in {-1, 0, 1})."""
        return self.heads.reward_value(reward)

    # -- data -> noise ----------------------------------------------------------------------------

    def skip_base(self, u: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Temporal skip offsets (before D's gate) for a clip: u [B, T, F, d] -> [B, T*F, d] | None.

        Slot (t, j) gets u[:, t-1, j], the same token of the previous frame; a frame that starts a
        sequence (t = 0, or after start padding) gets 0. None when the config has no temporal skip.
        """
        if not self.config.temporal_skip:
            return None
        B, T, F, d = u.shape
        prev = torch.cat([torch.zeros_like(u[:, :1]), u[:, :-1]], dim=1)  # [B, T, F, d]
        if frame_mask is not None:
            prev = torch.where(start_flags(frame_mask)[:, :, None, None], torch.zeros_like(prev), prev)
        return prev.reshape(B, T * F, d)

    def step_base(self, state: "GenerationState") -> torch.Tensor | None:
        """Temporal skip offsets for the next frame of `state`: [B, F, d] (0 for rows that start a
        sequence) | None when the config has no temporal skip."""
        if not self.config.temporal_skip:
            return None
        c = self.config
        if state.prev_tokens is None:
            return torch.zeros(state.batch, c.tokens_per_frame, c.token_dim, dtype=self.dtype, device=self.device)
        return torch.where(state.last_valid[:, None, None], state.prev_tokens, torch.zeros_like(state.prev_tokens))

    def _deep_inputs(self, actions, T, drop_actions, frame_mask, B):
        """Deep-block conditioning for a clip: add [B, N, D], key_valid [B, N] | None, sos_mask [B, N] | None."""
        F = self.config.tokens_per_frame
        c = self.action_embed.frame_conditioning(actions, T, drop_actions, frame_mask)  # [B, T, D]
        add = c.repeat_interleave(F, dim=1)  # [B, N, D]
        if frame_mask is None:
            return add, None, None
        key_valid = frame_mask.repeat_interleave(F, dim=1)  # [B, N]
        sos_mask = torch.zeros_like(key_valid)
        sos_mask[:, ::F] = start_flags(frame_mask)  # the first slot of a sequence-starting frame
        return add, key_valid, sos_mask

    def _forward(self, x_tilde, actions, drop_actions=None, frame_mask=None, cache=None, cfg=False, heads=True,
                 first_frame=0):
        """Shared by forward and encode_context. Returns (FlowOutput of the conditional rows, u).

        first_frame: RoPE frame index of x_tilde's first frame (encode_context behind masked padding).
        """
        c = self.config
        B, T = x_tilde.shape[:2]
        F, d = c.tokens_per_frame, c.token_dim
        if x_tilde.shape[2:] != (c.channels, c.frame_size, c.frame_size):
            raise ValueError(f"x_tilde frames {tuple(x_tilde.shape[2:])} != "
                             f"{(c.channels, c.frame_size, c.frame_size)} of the model config")
        if actions.shape[:2] != (B, T - 1):
            raise ValueError(f"actions {tuple(actions.shape)} do not match {T} frames (expected [B, T-1, ...])")
        if frame_mask is not None and bool(frame_mask.all()):
            frame_mask = None  # the common case: no padding, fast causal attention
        if frame_mask is not None:  # padding content never matters, even NaN (0 * NaN would leak)
            x_tilde = torch.where(frame_mask[:, :, None, None, None], x_tilde, torch.zeros_like(x_tilde))

        u, logdet_s = self.shallow_forward(patchify(x_tilde, c.patch_size))  # [B,T,F,d], [B,T]
        add, key_valid, sos_mask = self._deep_inputs(actions, T, drop_actions, frame_mask, B)
        tokens = u.reshape(B, T * F, d)
        if cfg:  # [cond; uncond] for the cache of guided generation
            null = torch.ones(B, dtype=torch.bool, device=x_tilde.device)
            add_u, _, _ = self._deep_inputs(actions, T, null, frame_mask, B)
            tokens, add = torch.cat([tokens, tokens]), torch.cat([add, add_u])
            key_valid = None if key_valid is None else torch.cat([key_valid, key_valid])
            sos_mask = None if sos_mask is None else torch.cat([sos_mask, sos_mask])
        base = self.skip_base(u, frame_mask)
        if cfg and base is not None:
            base = torch.cat([base, base])
        cos, sin = self.rope(first_frame, T)
        z, logdet_d, h = self.deep(tokens, cos, sin, add, key_valid, sos_mask, cache, base)
        z, logdet_d, h = z[:B], logdet_d[:B], h[:B]

        z = z.reshape(B, T, F, d)
        logdet = logdet_s + logdet_d.reshape(B, T, F * d).sum(-1)  # [B, T]
        nll = 0.5 * z.to(logdet.dtype).square().sum((2, 3)) + HALF_LOG_2PI * F * d - logdet
        if frame_mask is not None:
            nll = torch.where(frame_mask, nll, torch.zeros_like(nll))  # padding: exactly 0 (even if not finite)
        slot_features = h.reshape(B, T, F, -1)  # [B, T, F, D]
        reward, term = self.heads.transitions(x_tilde.detach(), actions, frame_mask) if heads else (None, None)
        return FlowOutput(z, logdet, nll, slot_features.mean(2), reward, term, slot_features), u

    def forward(self, x_tilde: torch.Tensor, actions: torch.Tensor, drop_actions: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None, heads: bool = True) -> FlowOutput:
        """Data -> noise with exact per-frame likelihood, plus the reward/termination heads.

        x_tilde float [B, T, C, H, W] (~[-1, 1], noise-augmented); actions int64 [B, T-1] or float
        [B, T-1, k] (a_t leads from frame t to t+1); drop_actions bool [B] | None: rows whose actions
        are replaced by NULL (CFG dropout); frame_mask bool [B, T] | None: False = start padding
        (masked keys in D, zero nll; the first real frame is treated as a sequence start).

        features[:, t] = mean over frame t's F slots of D's final hidden states (slot_features[:, t]
        keeps them apart: [F, D], the finer latent observation). Slot j's input is
        token j-1, so features_t depends on frames < t, on frame t except its last token in raster
        order, and on actions a_<t (via c_t) -- nothing later (the latent observation of the dream).
        reward/termination_logit[:, t] (the transition frame t --a_t--> frame t+1) come from the
        pixel transition model `heads` on x_tilde frames t-1, t, t+1 and a_t, detached (calibrated
        logits); heads=False leaves both None (the trainer fits the heads on its own transition batches).
        """
        return self._forward(x_tilde, actions, drop_actions, frame_mask, heads=heads)[0]

    def flow_loss(self, out: FlowOutput, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean NLL in nats per dimension minus (1/2) ln 2 pi (STARFLOW_V.md §3), over real frames.

        At init (identity flow) this is 0.5 * mean(x_tilde^2). Its gradient wrt x_tilde is
        grad(sum NLL) / loss_numel(out, frame_mask).
        """
        return out.nll.sum() / self.loss_numel(out, frame_mask) - HALF_LOG_2PI

    def loss_numel(self, out: FlowOutput, frame_mask: torch.Tensor | None = None) -> float | torch.Tensor:
        """The number of dimensions `flow_loss` averages over: real frames * C*H*W."""
        dims = self.config.frame_dims
        if frame_mask is None:
            return out.nll.numel() * dims
        return frame_mask.sum().clamp(min=1) * dims

    def head_loss(self, out: FlowOutput, rewards: torch.Tensor, terminations: torch.Tensor,
                  mask: torch.Tensor | None = None,
                  termination_pos_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Reward + termination loss over valid transitions.

        rewards float [B, T-1]; terminations bool [B, T-1]; mask bool [B, T] (frame mask: a
        transition counts when both its frames are real) or [B, T-1] (transition mask) or None.
        """
        if mask is not None and mask.shape[1] == out.nll.shape[1]:
            mask = mask[:, :-1] & mask[:, 1:]
        return self.heads.loss(out.reward, out.termination_logit, rewards, terminations, mask,
                               termination_pos_weight)

    # -- frame-by-frame generation ------------------------------------------------------------------

    def empty_state(self, batch: int, capacity: int | None = None, cfg: bool = False) -> GenerationState:
        """A state with no frames (the next frame is a sequence start)."""
        c = self.config
        capacity = capacity or c.max_frames
        B2 = 2 * batch if cfg else batch
        cache = self.deep.new_cache(B2, capacity * c.tokens_per_frame, self.dtype, self.device)
        a_shape = (batch, capacity) if c.action_kind == "discrete" else (batch, capacity, c.action_dim)
        return GenerationState(
            cache,
            last_token=torch.zeros(batch, c.token_dim, dtype=self.dtype, device=self.device),
            last_valid=torch.zeros(batch, dtype=torch.bool, device=self.device),
            prev_tokens=None, num_frames=0, capacity=capacity, cfg=cfg,
            history_x=torch.zeros(batch, capacity, c.channels, c.frame_size, c.frame_size, dtype=self.dtype,
                                  device=self.device),
            history_a=torch.zeros(a_shape, dtype=torch.long if c.action_kind == "discrete" else self.dtype,
                                  device=self.device),
            history_mask=torch.zeros(batch, capacity, dtype=torch.bool, device=self.device),
        )

    @torch.no_grad()
    def encode_context(self, x_tilde: torch.Tensor, actions: torch.Tensor, frame_mask: torch.Tensor | None = None,
                       cfg: bool = False, capacity: int | None = None, pad_frames: int = 0, heads: bool = True
                       ) -> tuple[GenerationState, FlowOutput]:
        """One forward pass over a context clip that fills D's per-layer KV caches.

        x_tilde [B, T0, C, H, W]; actions [B, T0-1(, k)]; frame_mask bool [B, T0] | None (left
        padding); cfg: also encode the unconditional (NULL-action) half for guided generation;
        capacity: frames the state can hold (default max_frames). Returns (state, FlowOutput of the
        context, conditional half). The state's frame indices restart at 0 (RoPE is relative).

        pad_frames P: the state starts with P masked padding frames that are never computed (their
        cache slots are masked keys; their history repeats the first frame), so it holds P + T0
        frames -- the same state as encoding the clip left-padded with P masked frames, at the cost
        of T0 frames (a per-row reset that must match the other rows' length).

        heads=False skips the reward/termination heads of the context's transitions (the output's reward
        and termination_logit are None), e.g. when re-encoding a window.
        """
        B, T0 = x_tilde.shape[:2]
        P = int(pad_frames)
        capacity = capacity or self.config.max_frames
        if P < 0 or P + T0 > capacity:
            raise ValueError(f"encode_context: {P} padding + {T0} context frames must fit capacity {capacity}")
        state = self.empty_state(B, capacity, cfg)
        if P:  # masked keys that no query will see: nothing to compute
            cache, n_pad = state.cache, P * self.config.tokens_per_frame
            cache.set_valid(torch.zeros(cache.batch, dtype=torch.bool, device=x_tilde.device), n_pad)
            cache.advance(n_pad)
        out, u = self._forward(x_tilde, actions, None, frame_mask, state.cache, cfg, heads=heads, first_frame=P)
        fm = torch.ones(B, T0, dtype=torch.bool, device=x_tilde.device) if frame_mask is None else frame_mask
        state.last_token = u[:, -1, -1].clone()
        state.last_valid = fm[:, -1].clone()
        state.prev_tokens = u[:, -1].clone()
        state.num_frames = P + T0
        state.history_x[:, :P] = x_tilde[:, :1]
        state.history_x[:, P:P + T0] = x_tilde
        if T0 > 1:
            state.history_a[:, P:P + T0 - 1] = actions.to(state.history_a.dtype)
        state.history_mask[:, P:P + T0] = fm
        return state, out

    @torch.no_grad()
    def reencode(self, state: GenerationState, keep: int, heads: bool = True) -> tuple[GenerationState, FlowOutput]:
        """Bounded window: re-encode the last `keep` frames of a state into a fresh state (exact).
        heads=False: no reward/termination of the kept transitions (see `encode_context`)."""
        n = state.num_frames
        keep = min(keep, n)
        x = state.history_x[:, n - keep:n]
        a = state.history_a[:, n - keep:n - 1]
        m = state.history_mask[:, n - keep:n]
        return self.encode_context(x, a, m, cfg=state.cfg, capacity=state.capacity, heads=heads)

    def invert_shallow(self, u: torch.Tensor, method: str = "jacobi", jacobi: JacobiConfig | None = None,
                       init: list[torch.Tensor] | None = None, init_valid: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """S_1^-1 .. S_K^-1 on single frames: u [B, F, d] (D-input space) -> (x tokens [B, F, d],
        logdet [B] of the shallow blocks at the solution, passes).

        init: Jacobi warm start, one [B, F, d] guess of each block's *input* (natural order, indexed
        like ``self.shallow``; see `shallow_inputs`); None starts every block from its output.
        init_valid bool [B] | None: rows that take `init` (the others start from the block's output).
        Jacobi chunks hold ``jacobi.block_size_first`` tokens (the whole frame by default)."""
        B, F, d = u.shape
        cos, sin = self.rope(0, 1)
        logdet = torch.zeros(B, dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
        passes = 0
        jc = jacobi or JacobiConfig()
        for i in reversed(range(len(self.shallow))):
            block = self.shallow[i]
            cache = block.new_cache(B, F, u.dtype, u.device)
            v_in = block.permutation(u)
            first = block.sos.to(u.dtype).expand(B, -1)
            if method == "sequential":
                inv = invert_sequential(block, cache, first, v_in, None, cos, sin)
            else:
                guess = None
                if init is not None:
                    guess = block.permutation(init[i].to(u.dtype))
                    if init_valid is not None:
                        guess = torch.where(init_valid[:, None, None], guess, v_in)
                inv = invert_jacobi(block, cache, first, v_in, None, cos, sin, jc, jc.block_size_first, guess)
            passes += inv.passes
            logdet = logdet - torch.log(inv.a).sum((1, 2))
            u = block.permutation(inv.u)
        return u, logdet, passes

    def shallow_inputs(self, x_tilde: torch.Tensor) -> list[torch.Tensor]:
        """The input tokens of every shallow block for frames x_tilde [B, C, H, W]: K tensors [B, F, d]
        (natural order, indexed like ``self.shallow``): patchify(x_tilde), S_1(...), .., S_{K-1}(...)."""
        x = patchify(x_tilde[:, None], self.config.patch_size)[:, 0]  # [B, F, d]
        cos, sin = self.rope(0, 1)
        inputs = [x]
        for block in self.shallow[:-1]:
            x = block(x, cos, sin)[0]
            inputs.append(x)
        return inputs

    @torch.no_grad()
    def generate_frame(self, state: GenerationState, action: torch.Tensor | None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, method: str = "jacobi",
                       jacobi: JacobiConfig | None = None, cfg_scale: float = 0.0,
                       temperature: float = 1.0, bound: float | None = None) -> FrameSample:
        """Generate the next frame of every row and append it to `state`.

        action int64 [B] | float [B, k] (a_{t-1}, leading from the newest frame; ignored for rows
        without a real frame, which start a sequence; None = the NULL action, i.e. unconditional);
        noise [B, F, d] | None (v; drawn from
        `generator` when None), scaled by temperature; method "jacobi" | "sequential"; cfg_scale w
        needs a state encoded with cfg=True.

        bound: if given, a row whose frame has any value outside [-bound, bound] (or not finite) gets the
        frame clamped to it, committed by teacher forcing (`_teacher_forced_rows`: its tokens, cache
        slots, nll, features and heads are the clamped frame's); ``FrameSample.clamped`` names the rows.
        The inverse can leave the data's range and stay out: the temporal skip adds the previous frame's
        tokens to the shifts, gated by up to ``soft_clip``, so a blown-up frame feeds the next one.
        """
        c = self.config
        F, d, B = c.tokens_per_frame, c.token_dim, state.batch
        if state.full:
            raise RuntimeError(f"generation state is full ({state.capacity} frames): re-encode a window "
                               f"with StarFlowV.reencode(state, keep) first")
        if cfg_scale != 0 and not state.cfg:
            raise ValueError("cfg_scale != 0 needs a state encoded with cfg=True")
        if method not in ("jacobi", "sequential"):
            raise ValueError(f"method={method!r}: expected 'jacobi' or 'sequential'")
        if noise is None:
            noise = torch.randn(B, F, d, generator=generator, device=self.device, dtype=self.dtype)
        v = noise.to(self.dtype) * temperature
        has_prev = state.last_valid
        add = self.action_embed.step_conditioning(action, has_prev)  # [B, D]
        if state.cfg:
            add = torch.cat([add, self.action_embed.step_conditioning(None, has_prev, null=True)])
        add = add[:, None].to(self.dtype)  # [B2, 1, D]
        first = torch.where(has_prev[:, None], state.last_token, self.deep.sos.to(self.dtype))
        base = self.step_base(state)
        cos, sin = self.rope(state.num_frames, 1)
        cache = state.cache
        cache.set_valid(torch.ones(cache.batch, dtype=torch.bool, device=self.device), F)
        if method == "sequential":
            inv = invert_sequential(self.deep, cache, first, v, add, cos, sin, state.cfg, cfg_scale, base)
        else:
            jc = jacobi or JacobiConfig()
            init = None
            if jc.warm_start and state.prev_tokens is not None:
                init = torch.where(has_prev[:, None, None], state.prev_tokens, v)
            chunk = jc.block_size_first if state.num_frames == 0 else jc.block_size
            inv = invert_jacobi(self.deep, cache, first, v, add, cos, sin, jc, chunk, init, state.cfg, cfg_scale,
                                base)
        u = inv.u  # [B, F, d] deep-input space (D uses the identity permutation)
        z = (u.to(inv.a.dtype) - inv.b) / inv.a
        init = self._shallow_warm_start(state, jacobi) if method == "jacobi" else None
        x_tokens, logdet_s, shallow_passes = self.invert_shallow(u, method, jacobi, init, state.last_valid)
        nll = 0.5 * z.square().sum((1, 2)) + HALF_LOG_2PI * F * d + torch.log(inv.a).sum((1, 2)) - logdet_s
        x_tilde = unpatchify(x_tokens, c.patch_size, c.channels, c.frame_size, c.frame_size)
        h = inv.h
        peak = x_tilde.flatten(1).abs().amax(1)  # [B]; NaN if the frame has one
        clamped = fix_state = None
        if bound is not None:
            clamped = ~(peak <= bound)  # NaN counts as outside
            if bool(clamped.any()):
                rows = torch.nonzero(clamped).squeeze(1)
                x_tilde = x_tilde.nan_to_num(0.0).clamp(-bound, bound)  # the identity on the other rows
                fix_state, fix = self._teacher_forced_rows(state, rows, x_tilde[rows],
                                                           None if action is None else action[rows])
                nll, h = nll.clone(), h.clone()
                nll[rows], h[rows] = fix.nll.to(nll.dtype), fix.slot_features.to(h.dtype)

        reward, term = self._commit_frame(state, x_tilde, u, action)
        if fix_state is not None:
            state.replace_rows(rows, fix_state)
        return FrameSample(x_tilde, nll, h.mean(1), reward, term, inv.iterations, inv.passes, shallow_passes, h, clamped,
                           peak)

    def _teacher_forced_rows(self, state: GenerationState, rows: torch.Tensor, x_tilde: torch.Tensor,
                             action: torch.Tensor | None) -> tuple[GenerationState, FrameSample]:
        """The rows int64 [R] of `state` with frames x_tilde [R, C, H, W] appended by teacher forcing, in
        place of the frame that was just inverted for them (its F cache slots are committed; nothing
        else is). Returns (an R-row state holding the new frame, to splice in with `replace_rows` once
        `state` has committed its own frame; the `append_frame` sample). One cached pass over R rows.
        """
        sub = state.select_rows(rows)
        sub.cache.length -= self.config.tokens_per_frame  # drop the inverted frame's slots
        return sub, self.append_frame(sub, x_tilde, action)

    def _shallow_warm_start(self, state: GenerationState, jacobi: JacobiConfig | None) -> list[torch.Tensor] | None:
        """Jacobi warm start for `invert_shallow` of the next frame of `state` (before it is committed).

        Video-aware, like the deep block: with ``warm_start``, a frame after the first starts each shallow
        block's iteration from the newest frame's input tokens of that block (`shallow_inputs`; rows
        without a real newest frame, ``state.last_valid`` False, start from the block's output). None:
        cold starts. The shallow chunk stays ``block_size_first``: with chunks of one token (the CPU
        presets) the inversion is sequential and the guess unused: on one CPU thread at batch 64 a warm
        whole-frame chunk took 2.5 passes per block and cost more than 16 one-token passes (session 24).
        """
        jc = jacobi or JacobiConfig()
        if not jc.warm_start or jc.block_size_first == 1 or state.num_frames == 0 or not bool(state.last_valid.any()):
            return None
        return self.shallow_inputs(state.history_x[:, state.num_frames - 1].to(self.dtype))

    def _commit_frame(self, state: GenerationState, x_tilde: torch.Tensor, u: torch.Tensor,
                      action: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append frame x_tilde [B, C, H, W] (deep-input tokens u [B, F, d], cache slots already
        committed) to the state's history; returns the transition's (reward, termination_logit)."""
        t = state.num_frames
        reward, term = self.transition_heads(state, x_tilde, action)
        if t > 0 and action is not None:
            state.history_a[:, t - 1] = action.to(state.history_a.dtype)
        state.history_x[:, t] = x_tilde
        state.history_mask[:, t] = True
        state.last_token, state.prev_tokens = u[:, -1].clone(), u
        state.last_valid = torch.ones_like(state.last_valid)
        state.num_frames = t + 1
        return reward, term

    @torch.no_grad()
    def append_frame(self, state: GenerationState, x_tilde: torch.Tensor, action: torch.Tensor | None) -> FrameSample:
        """Teacher forcing: append a *given* frame to `state` with one cached forward pass.

        x_tilde [B, C, H, W] (noise-augmented, like training data); action int64 [B] | float [B, k]
        (a_{t-1}, leading from the newest frame to x_tilde; None = NULL). The deep block runs its F new
        slots against the KV cache -- the forward (data -> noise) direction needs no inversion -- so
        nll, features, reward and termination equal those of `encode_context` over the whole history
        plus x_tilde, at the cost of one frame. iterations are 0 (nothing was solved).
        """
        c = self.config
        F, B = c.tokens_per_frame, state.batch
        if state.full:
            raise RuntimeError(f"generation state is full ({state.capacity} frames): re-encode a window "
                               f"with StarFlowV.reencode(state, keep) first")
        if x_tilde.shape != (B, c.channels, c.frame_size, c.frame_size):
            raise ValueError(f"append_frame: x_tilde {tuple(x_tilde.shape)} != {(B, c.channels, c.frame_size, c.frame_size)}")
        x_tilde = x_tilde.to(self.dtype)
        u, logdet_s = self.shallow_forward(patchify(x_tilde[:, None], c.patch_size))  # [B, 1, F, d], [B, 1]
        u, logdet_s = u[:, 0], logdet_s[:, 0]
        has_prev = state.last_valid
        add = self.action_embed.step_conditioning(action, has_prev)  # [B, D]
        first = torch.where(has_prev[:, None], state.last_token, self.deep.sos.to(self.dtype))
        s = torch.cat([first[:, None], u[:, :-1]], 1)  # slot j reads token j-1 (identity permutation)
        if state.cfg:  # the unconditional half of the cache gets its NULL-action slots too
            add = torch.cat([add, self.action_embed.step_conditioning(None, has_prev, null=True)])
            s = torch.cat([s, s])
        cache = state.cache
        cache.set_valid(torch.ones(cache.batch, dtype=torch.bool, device=self.device), F)
        cos, sin = self.rope(state.num_frames, 1)
        base = self.step_base(state)
        a, b, h = self.deep.step(s, add[:, None].to(self.dtype), cos, sin, cache,
                                 None if base is None else (torch.cat([base, base]) if state.cfg else base))
        cache.advance(F)
        a, b, h = a[:B], b[:B], h[:B]
        z = (u.to(a.dtype) - b) / a
        nll = 0.5 * z.square().sum((1, 2)) + HALF_LOG_2PI * F * c.token_dim + torch.log(a).sum((1, 2)) - logdet_s
        reward, term = self._commit_frame(state, x_tilde, u, action)
        iters = torch.zeros(B, dtype=torch.long, device=self.device)
        return FrameSample(x_tilde, nll, h.mean(1), reward, term, iters, 1, 0, h)

    def transition_heads(self, state: GenerationState, x_new: torch.Tensor,
                         action: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward/termination of the transition into the frame being appended (before appending).

        x_new [B, C, H, W]; the window is (x_{t-1}, x_t, x_new) from the state's history, with the
        same stand-ins as `RewardTerminationHead.transitions` where a frame is missing. Rows that
        start a sequence (no previous frame or no action) get values that mean nothing.
        """
        t = state.num_frames
        B = x_new.shape[0]
        rows = torch.arange(B, device=x_new.device)
        i_cur, i_prev = max(t - 1, 0), max(t - 2, 0)
        cur_ok = state.history_mask[rows, i_cur] if t > 0 else torch.zeros(B, dtype=torch.bool, device=x_new.device)
        prev_ok = state.history_mask[rows, i_prev] & cur_ok if t > 1 else torch.zeros_like(cur_ok)
        cur = torch.where(cur_ok[:, None, None, None], state.history_x[:, i_cur], x_new)
        prev = torch.where(prev_ok[:, None, None, None], state.history_x[:, i_prev], cur)
        if action is None:
            action = state.history_a[:, 0]  # any valid action: the values are meaningless here
        return self.heads(torch.stack([prev, cur, x_new], 1), action)

    @torch.no_grad()
    def invert(self, z: torch.Tensor, actions: torch.Tensor, method: str = "sequential",
               jacobi: JacobiConfig | None = None) -> torch.Tensor:
        """Whole-model inverse: z [B, T, F, d] and actions [B, T-1(, k)] -> x_tilde [B, T, C, H, W]."""
        B, T = z.shape[:2]
        state = self.empty_state(B, capacity=max(T, 1))
        frames = []
        for t in range(T):
            a = actions[:, t - 1] if t > 0 else None
            frames.append(self.generate_frame(state, a, noise=z[:, t], method=method, jacobi=jacobi).x_tilde)
        return torch.stack(frames, 1)


class WorldModel(nn.Module):
    """The flow (with heads) and its flow-score-matching denoiser, built from one config."""

    def __init__(self, config: StarFlowVConfig):
        super().__init__()
        self.config = config
        self.flow = StarFlowV(config)
        self.denoiser = FlowScoreDenoiser(config)

    def flow_parameters(self):
        """Parameters of the flow and the heads (the main optimiser)."""
        return self.flow.parameters()

    def denoiser_parameters(self):
        """Parameters of the denoiser (its own optimiser; no gradient reaches the flow)."""
        return self.denoiser.parameters()
