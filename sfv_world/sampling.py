"""Inverting flow blocks: exact sequential inversion and video-aware block Jacobi (STARFLOW_V.md §5).

Both solve, for the n slots of one frame (or chunk), the triangular system

    u_j = mu_j(u_<j) + sigma_j(u_<j) * v_j        (mu, sigma) = (b, a), or their CFG combination

with the block's per-layer KV cache holding every committed slot. Everything is batched over B; the
only Python loops are over tokens (sequential) or over chunks and Jacobi iterations.

Conventions: `first` [B, d] is the input of the first new slot (the previous token, or e_sos);
`v` [B, n, d] is the noise in slot (permuted) order; `add` [B2, 1, D] | None is the additive
condition of the new slots, with B2 = 2B for CFG ([cond; uncond] doubled batch) and B otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sfv_world.flow import FlowBlock, KVCache, guidance

JACOBI_KEYS = ("block_size_first", "block_size", "threshold", "max_iter", "warm_start")


@dataclass
class JacobiConfig:
    """Video-aware block Jacobi (STARFLOW_V.md §5.3); keys match configs/sampler/jacobi.yaml.

    block_size_first: chunk size (tokens) while generating the first frame of a sequence.
    block_size:       chunk size for later frames (4x block_size_first in the release).
    threshold:        tau; a sample's chunk has converged when its relative change <= tau.
    max_iter:         Jacobi passes per chunk at most; with threshold 0, max_iter >= chunk size makes
                      every chunk exact (the exact prefix grows by one slot per pass).
    warm_start:       start frame t's chunk from frame t-1's tokens at the same spatial positions.
    criterion:        "token" (default): the largest per-token change, max_j mean_d (new-old)^2, over
                      mean(new^2) of the chunk; "mean": mean((new-old)^2) / mean(new^2) over the chunk
                      (the release's rule, STARFLOW_V.md §5.3). With the warm start most tokens of a
                      chunk barely move, so the mean rule stops while a moving object is still wrong
                      (measured: max abs error 2.1 on a briefly trained 64x64 model at tau = 1e-3).
    compact:          once at most this fraction of the batch's samples is still iterating, a pass
                      runs on those rows only (their KV-cache rows gathered, the new slots scattered
                      back) instead of on the whole batch; 0 disables it. Converged samples are then
                      left at their last pass (values within tau of the fixed point) rather than
                      recomputed from the frozen values.
    """

    block_size_first: int = 16
    block_size: int = 64
    threshold: float = 1e-3
    max_iter: int = 32
    warm_start: bool = True
    criterion: str = "token"
    compact: float = 0.5

    def __post_init__(self):
        if self.criterion not in ("token", "mean"):
            raise ValueError(f"JacobiConfig.criterion={self.criterion!r}: expected 'token' or 'mean'")
        if not 0.0 <= float(self.compact) <= 1.0:
            raise ValueError(f"JacobiConfig.compact={self.compact!r}: expected a fraction in [0, 1]")
        if self.block_size_first < 1 or self.block_size < 1:
            raise ValueError("JacobiConfig: block sizes must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> "JacobiConfig":
        """Build from a sampler config (extra keys such as method/cfg/temperature are ignored)."""
        missing = [k for k in JACOBI_KEYS if k not in d]
        if missing:
            raise ValueError(f"JacobiConfig: missing keys {missing}")
        optional = {k: d[k] for k in ("criterion", "compact") if k in d}
        return cls(**{k: d[k] for k in JACOBI_KEYS}, **optional)


@dataclass
class Inversion:
    """Result of inverting n slots of one block.

    u [B, n, d] solution in slot order; a, b [B, n, d] (>= float32) conditional affine parameters
    of the last pass (exact for the committed u in the sequential sampler, and in Jacobi for every
    sample whose chunk converged before the chunk's last pass); h [B, n, D] conditional hidden
    states; passes: block forward calls; iterations [B] int64: Jacobi iterations per sample
    (summed over chunks; = n for sequential).
    """

    u: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    h: torch.Tensor
    passes: int
    iterations: torch.Tensor


def _affine_step(block: FlowBlock, s: torch.Tensor, add: torch.Tensor | None, cos, sin, cache: KVCache,
                 cfg: bool, cfg_scale: float, base: torch.Tensor | None = None):
    """One cached pass over slots s [B, n, d]; base [B, n, d] | None: the shifts' offset (``FlowBlock``),
    given to both CFG halves, each gating it with its own g(h). Returns (mu, sigma, a_c, b_c, h_c)."""
    B = s.shape[0]
    if cfg:
        s = torch.cat([s, s], dim=0)  # both halves follow the guided trajectory
        base = None if base is None else torch.cat([base, base], dim=0)
    a, b, h = block.step(s, add, cos, sin, cache, base)
    if not cfg:
        return b, a, a, b, h
    a_c, a_u, b_c, b_u = a[:B], a[B:], b[:B], b[B:]
    mu, sigma = guidance(b_c, a_c, b_u, a_u, cfg_scale) if cfg_scale != 0 else (b_c, a_c)
    return mu, sigma, a_c, b_c, h[:B]


def _affine_step_rows(block: FlowBlock, s: torch.Tensor, add: torch.Tensor | None, cos, sin, cache: KVCache,
                      cfg: bool, cfg_scale: float, rows: torch.Tensor, base: torch.Tensor | None = None):
    """`_affine_step` for the samples `rows` (int64 [R]) only: s [R, n, d] holds their slot inputs.

    Their cache rows ([cond; uncond] halves with CFG) are gathered into a working copy and the n new
    slots are scattered back; the other rows' cache entries are untouched. Returns [R, ...] tensors.
    """
    B = cache.batch // 2 if cfg else cache.batch
    cache_rows = torch.cat([rows, rows + B]) if cfg else rows
    if add is not None and add.shape[0] > 1:
        add = add[cache_rows]
    sub = cache.gather_rows(cache_rows, s.shape[1])
    out = _affine_step(block, s, add, cos, sin, sub, cfg, cfg_scale, base)
    cache.scatter_rows(cache_rows, sub, s.shape[1])
    return out


def _iterating_rows(active: torch.Tensor, compact: float) -> torch.Tensor | None:
    """Indices of the active samples if a compacted pass pays off (few enough of them), else None."""
    if compact <= 0:
        return None
    count = int(active.sum())
    if count == active.numel() or count > compact * active.numel():
        return None
    return torch.nonzero(active).squeeze(1)


def invert_sequential(block: FlowBlock, cache: KVCache, first: torch.Tensor, v: torch.Tensor,
                      add: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                      cfg: bool = False, cfg_scale: float = 0.0, base: torch.Tensor | None = None) -> Inversion:
    """Exact token-by-token inversion with the KV cache (the reference sampler). Commits n slots.

    base [B, n, d] | None: known offsets of the shifts b (slot order; ``FlowBlock.forward``)."""
    B, n, d = v.shape
    u = torch.empty_like(v)
    a_all = torch.empty(B, n, d, dtype=torch.promote_types(v.dtype, torch.float32), device=v.device)
    b_all = torch.empty_like(a_all)
    h_all = None
    s = first[:, None]  # [B, 1, d]
    for j in range(n):
        mu, sigma, a_c, b_c, h = _affine_step(block, s, add, cos[j:j + 1], sin[j:j + 1], cache, cfg, cfg_scale,
                                              None if base is None else base[:, j:j + 1])
        cache.advance(1)
        u[:, j:j + 1] = (mu + sigma * v[:, j:j + 1]).to(v.dtype)
        a_all[:, j:j + 1], b_all[:, j:j + 1] = a_c, b_c
        if h_all is None:
            h_all = torch.empty(B, n, h.shape[-1], dtype=h.dtype, device=h.device)
        h_all[:, j:j + 1] = h
        s = u[:, j:j + 1]
    iters = torch.full((B,), n, dtype=torch.long, device=v.device)
    return Inversion(u, a_all, b_all, h_all, n, iters)


def invert_jacobi(block: FlowBlock, cache: KVCache, first: torch.Tensor, v: torch.Tensor,
                  add: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, config: JacobiConfig,
                  chunk: int, init: torch.Tensor | None = None, cfg: bool = False,
                  cfg_scale: float = 0.0, base: torch.Tensor | None = None) -> Inversion:
    """Block Jacobi: Gauss-Seidel over chunks of `chunk` slots, Jacobi iterations inside a chunk.

    init [B, n, d] | None: the initial guess (warm start: the previous frame's tokens); default v.
    base [B, n, d] | None: known offsets of the shifts b (slot order; ``FlowBlock.forward``).

    - Exact prefix: after pass k of a chunk its first k+1 slots are exact (slot j only reads
      u_<j), so pass k recomputes only slots [k, m) and commits slot k's cache entry; after m
      passes the whole chunk is exact and the chunk ends whatever the threshold.
    - Per sample: once a sample's relative change (`JacobiConfig.criterion`) is <= threshold its
      chunk values are frozen (later whole-batch passes then recompute its cache entries from the
      committed values). The chunk ends when every sample has converged or after max_iter passes.
    - Compaction: once at most `JacobiConfig.compact` of the samples still iterate, passes run on
      those rows only; the converged ones keep the cache entries, a, b and h of their last pass.
    - KV rollback: uncommitted cache slots are simply overwritten by the next pass.
    Commits n slots.
    """
    B, n, d = v.shape
    if chunk == 1:  # one slot per chunk: a sequential step, without the convergence bookkeeping
        return invert_sequential(block, cache, first, v, add, cos, sin, cfg, cfg_scale, base)
    u = (v if init is None else init).clone()
    a_all = torch.empty(B, n, d, dtype=torch.promote_types(v.dtype, torch.float32), device=v.device)
    b_all = torch.empty_like(a_all)
    h_all = None
    iters = torch.zeros(B, dtype=torch.long, device=v.device)
    passes = 0
    start = 0
    while start < n:
        m = min(chunk, n - start)
        chunk_start = cache.length
        done = torch.zeros(B, dtype=torch.bool, device=v.device)
        for it in range(max(1, config.max_iter)):
            k = it  # slots [start, start+k) are exact and committed
            sl = slice(start + k, start + m)
            prev = first[:, None] if start + k == 0 else u[:, start + k - 1:start + k]  # [B, 1, d], exact
            old = u[:, sl]
            s = torch.cat([prev, old[:, :-1]], dim=1)  # [B, m-k, d]
            active = ~done
            rows = _iterating_rows(active, config.compact)
            if rows is None:  # every sample (converged ones recompute from their frozen values)
                r = slice(None)
                mu, sigma, a_c, b_c, h = _affine_step(block, s, add, cos[sl], sin[sl], cache, cfg, cfg_scale,
                                                      None if base is None else base[:, sl])
            else:  # only the R samples still iterating: [R, m-k, ...]
                r = rows
                mu, sigma, a_c, b_c, h = _affine_step_rows(block, s[rows], add, cos[sl], sin[sl], cache, cfg,
                                                           cfg_scale, rows, None if base is None else base[rows, sl])
            passes += 1
            old = old[r]
            new = mu + sigma * v[r, sl]  # (>= float32)
            if h_all is None:
                h_all = torch.empty(B, n, h.shape[-1], dtype=h.dtype, device=h.device)
            a_all[r, sl], b_all[r, sl], h_all[r, sl] = a_c, b_c, h
            iters += active
            change = (new - old.to(new.dtype)).square().mean(2)  # [R, m-k] per token
            u[r, sl] = torch.where(active[r, None, None], new.to(u.dtype), old)
            scale = u[r, start:start + m].to(new.dtype).square().mean((1, 2)).clamp_min(1e-30)  # [R]
            if config.criterion == "token":
                delta = change.amax(1) / scale
            else:  # mean over the whole chunk (its exact prefix has not changed)
                delta = change.sum(1) / m / scale
            done[r] = done[r] | (delta <= config.threshold)
            if k == m - 1 or bool(done.all()):
                break
            cache.advance(1)  # slot start+k is exact: commit its cache entry
        cache.length = chunk_start + m
        start += m
    return Inversion(u, a_all, b_all, h_all, passes, iters)


def invert_uncached(block: FlowBlock, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    add: torch.Tensor | None = None, sos_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference inversion with a full recompute per token and no cache (tests only; O(N^2) passes).

    v [B, N, d] natural order (the block's output); add [B, N, D] | None. Returns u [B, N, d].
    """
    v_in = block.permutation(v)
    u_in = torch.zeros_like(v_in)
    for j in range(v.shape[1]):
        s = block.shift(u_in[:, :j + 1], None if sos_mask is None else sos_mask[:, :j + 1])
        h = block.hidden(s, None if add is None else add[:, :j + 1], cos[:j + 1], sin[:j + 1])
        a, b = block.affine(h[:, j:j + 1])
        u_in[:, j:j + 1] = (b + a * v_in[:, j:j + 1]).to(u_in.dtype)
    return block.permutation(u_in)
