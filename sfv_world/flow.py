"""The STARFlow-V flow block (STARFLOW_V.md §1): an affine autoregressive causal-transformer block.

Data -> noise, on a token sequence u [B, N, d]:

    u_in = pi(u)                                   permutation (identity / flip-in-frame), an involution
    s    = [e_sos, u_in_0, ..., u_in_{N-2}]        SOS shift: slot j sees u_in_{<j} only
    h    = Transformer(W_in s + c)                 token-causal, RoPE, pre-norm; c = additive condition
    r    = kappa * tanh(W_out h / kappa)           W_out zero-initialised -> identity at init
    a    = softplus(r_a + ln(e-1)),  b = r_b       a = 1 at r_a = 0; fp32 (or fp64) math
    v    = (u_in - b) / a,  logdet = -ln a         per element; v un-permuted back to natural order

The inverse solves u_in_j = a_j(u_in_<j) * v_j + b_j(u_in_<j) token by token (or by Jacobi, see
sampling.py) using a per-layer KV cache (`KVCache`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfv_world.rope import apply_rope

LOG_E_MINUS_1 = math.log(math.e - 1.0)  # softplus(0 + ln(e-1)) = 1


def affine_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the affine math: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------------
# permutations


class Permutation(nn.Module):
    """Token order of one block (STARFLOW_V.md §1.4). Every permutation here is an involution.

    kind: "identity" or "flip_in_frame" (reverse the F tokens of each frame, keep the frame order;
    on a single frame this is the plain flip).
    """

    def __init__(self, kind: str, frame_len: int):
        super().__init__()
        if kind not in ("identity", "flip_in_frame"):
            raise ValueError(f"unknown permutation {kind!r} (identity | flip_in_frame)")
        self.kind, self.frame_len = kind, frame_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, ...] with N a multiple of frame_len -> same shape, permuted along dim 1."""
        if self.kind == "identity":
            return x
        B, N = x.shape[:2]
        T = N // self.frame_len
        return x.reshape(B, T, self.frame_len, *x.shape[2:]).flip(2).reshape(x.shape)

    def extra_repr(self) -> str:
        return self.kind


# --------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Per-layer keys and values of one flow block, pre-allocated, for a batch of sequences.

    k, v:       [layers, B, heads, capacity, head_dim]  (RoPE already applied to k)
    key_valid:  bool [B, capacity]   False keys (start padding) are masked out of every query
    length:     int, number of committed slots. A pass over n new slots writes [length, length+n)
                without committing; `advance(n)` commits. Not advancing = KV rollback (Jacobi).
    """

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.k = torch.zeros(layers, batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.key_valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.all_valid = True  # python flag: no False key anywhere -> cheaper masks

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, n, hd] at [length, length+n); return all keys/values [B, H, length+n, hd]."""
        L, n = self.length, k.shape[2]
        if L + n > self.capacity:
            raise RuntimeError(f"KV cache full: {L} + {n} slots > capacity {self.capacity}")
        self.k[layer, :, :, L:L + n] = k
        self.v[layer, :, :, L:L + n] = v
        return self.k[layer, :, :, :L + n], self.v[layer, :, :, :L + n]

    def set_valid(self, valid: torch.Tensor, n: int) -> None:
        """Mark the validity of the next n slots: valid bool [B] or [B, n]."""
        L = self.length
        self.key_valid[:, L:L + n] = valid if valid.dim() == 2 else valid[:, None]
        self.all_valid = bool(self.key_valid[:, :L + n].all())

    def attn_mask(self, n: int) -> torch.Tensor | None:
        """Mask for n new query slots at [length, length+n): bool [B|1, 1, n, length+n] or None.

        Query i sees key j iff j <= length+i and (key j is valid or j is the query's own slot).
        """
        L = self.length
        if self.all_valid and n == 1:
            return None
        dev = self.k.device
        j = torch.arange(L + n, device=dev)
        i = torch.arange(L, L + n, device=dev)[:, None]
        mask = j <= i  # [n, L+n]
        if not self.all_valid:
            mask = mask & (self.key_valid[:, None, :L + n] | (j == i))  # [B, n, L+n]
            return mask[:, None]
        return mask

    def advance(self, n: int) -> None:
        self.length += n

    def gather_rows(self, rows: torch.Tensor, n: int) -> KVCache:
        """A working copy of ``rows`` (int64 [R]) holding the committed slots and room for n new ones.

        Its k, v are [layers, R, heads, length+n, head_dim] copies; a pass on it writes the n slots
        [length, length+n) that :meth:`scatter_rows` copies back. Used to run a pass on a subset of
        rows (Jacobi samples that have not converged) without touching the others.
        """
        L = self.length
        sub = KVCache.__new__(KVCache)
        sub.k = self.k[:, rows, :, :L + n]
        sub.v = self.v[:, rows, :, :L + n]
        sub.key_valid = self.key_valid[rows, :L + n]
        sub.length = L
        sub.all_valid = self.all_valid  # a subset of an all-valid cache is all-valid; otherwise mask
        return sub

    def scatter_rows(self, rows: torch.Tensor, sub: KVCache, n: int) -> None:
        """Copy the n uncommitted slots [length, length+n) of ``sub`` (from :meth:`gather_rows`) back."""
        L = self.length
        self.k[:, rows, :, L:L + n] = sub.k[:, :, :, L:L + n]
        self.v[:, rows, :, L:L + n] = sub.v[:, :, :, L:L + n]

    def replace_rows(self, rows: torch.Tensor, other: "KVCache", other_rows: torch.Tensor) -> None:
        """Overwrite rows of this cache with other's rows (same committed length required)."""
        if other.length != self.length:
            raise ValueError(f"replace_rows: cache lengths differ ({other.length} vs {self.length})")
        L = self.length
        self.k[:, rows, :, :L] = other.k[:, other_rows, :, :L]
        self.v[:, rows, :, :L] = other.v[:, other_rows, :, :L]
        self.key_valid[rows, :L] = other.key_valid[other_rows, :L]
        self.all_valid = bool(self.key_valid[:, :L].all())


def causal_key_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """Token-causal mask with masked keys, for a full pass: key_valid bool [B, N] -> [B, 1, N, N].

    A query always sees its own slot, so padding rows stay finite (their outputs are discarded).
    """
    N = key_valid.shape[1]
    idx = torch.arange(N, device=key_valid.device)
    causal = idx[None, :] <= idx[:, None]  # [N, N]
    return (causal & (key_valid[:, None, :] | torch.eye(N, dtype=torch.bool, device=key_valid.device)))[:, None]


# --------------------------------------------------------------------------------------------------
# transformer


class Attention(nn.Module):
    """Multi-head self-attention with qkv/out biases, RoPE on q and k, optional KV cache."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
        self.heads, self.head_dim = width // head_dim, head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, cache: KVCache | None = None, layer: int = 0,
                queries: slice | None = None) -> torch.Tensor:
        """x [B, n, D]; cos/sin [n, hd/2]; mask bool broadcastable to [B, H, n_q, keys] or None.

        queries: compute outputs only for these positions (keys/values still from all n); the
        mask must then already be restricted to those query rows. Returns [B, n_q, D].
        """
        B, n, D = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B,H,n,hd]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        k = apply_rope(k, cos, sin)
        if queries is not None:
            q, cos, sin = q[:, :, queries], cos[queries], sin[queries]
        q = apply_rope(q, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, H, L+n, hd]; callers pass causal only when L == 0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], D))


class MLP(nn.Module):
    """Linear(D, 4D), GELU (tanh form), Linear(4D, D).

    The tanh GELU, not the erf one: on CPU the erf kernel enters a parallel region even for one
    token, which costs milliseconds per call on a busy 2-core machine (measured); tanh does not.
    """

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerLayer(nn.Module):
    """Pre-norm layer: h += Attn(LN h); h += MLP(LN h)."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, head_dim)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, h, cos, sin, mask, causal, cache=None, layer=0, queries: slice | None = None):
        """h [B, n, D] -> [B, n, D], or [B, n_q, D] for the positions `queries` only."""
        a = self.attn(self.ln_1(h), cos, sin, mask, causal, cache, layer, queries)
        h = (h if queries is None else h[:, queries]) + a
        return h + self.mlp(self.ln_2(h))


# --------------------------------------------------------------------------------------------------
# the flow block


class FlowBlock(nn.Module):
    """One affine autoregressive flow block (a MetaBlock) over sequences of d-dim tokens.

    token_dim d, width D; `permutation` acts within frames of `frame_len` tokens. Conditioning (if
    any) is an additive [B, n, D] tensor `add` on the input embedding of each slot.

    skip_gate: the block takes a known offset `base` [B, n, d] of its shifts, gated per slot and
    dimension by g(h) = soft_clip * tanh(W_g h / soft_clip): b = b_net(h) + g(h) * base. W_g starts at
    zero, so the block starts as one without the offset.
    """

    def __init__(self, token_dim: int, width: int, num_layers: int, head_dim: int, soft_clip: float,
                 permutation: str, frame_len: int, skip_gate: bool = False):
        super().__init__()
        self.token_dim, self.width, self.soft_clip = token_dim, width, soft_clip
        self.permutation = Permutation(permutation, frame_len)
        self.sos = nn.Parameter(torch.randn(token_dim))  # e_sos ~ N(0, 1)
        self.proj_in = nn.Linear(token_dim, width)
        self.layers = nn.ModuleList([TransformerLayer(width, head_dim) for _ in range(num_layers)])
        self.norm = nn.RMSNorm(width)
        self.proj_out = nn.Linear(width, 2 * token_dim)
        nn.init.zeros_(self.proj_out.weight)  # zero head: identity at init
        nn.init.zeros_(self.proj_out.bias)
        self.proj_out_skip = nn.Linear(width, token_dim) if skip_gate else None
        if self.proj_out_skip is not None:
            nn.init.zeros_(self.proj_out_skip.weight)  # gate 0: the offset is off at init
            nn.init.zeros_(self.proj_out_skip.bias)

    @property
    def heads(self) -> int:
        return self.layers[0].attn.heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].attn.head_dim

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(len(self.layers), batch, self.heads, self.head_dim, capacity, dtype, device)

    def shift(self, u_in: torch.Tensor, sos_mask: torch.Tensor | None = None) -> torch.Tensor:
        """SOS shift: u_in [B, N, d] -> slot inputs s [B, N, d], s_0 = e_sos, s_j = u_in_{j-1}.

        sos_mask bool [B, N]: slots that take e_sos instead (the first slot after start padding).
        """
        B, N, d = u_in.shape
        s = torch.cat([self.sos.to(u_in.dtype).expand(B, 1, d), u_in[:, :-1]], dim=1)
        if sos_mask is not None:
            s = torch.where(sos_mask[..., None], self.sos.to(u_in.dtype), s)
        return s

    def hidden(self, s: torch.Tensor, add: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None = None, causal: bool = True, cache: KVCache | None = None) -> torch.Tensor:
        """Slot inputs s [B, n, d] -> final hidden states h [B, n, D] (after the final RMSNorm)."""
        h = self.proj_in(s)
        if add is not None:
            h = h + add
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, causal, cache, i)
        return self.norm(h)

    def affine(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, n, D] -> (a, b), each [B, n, d] in at least float32: scale a > 0 and shift b."""
        r = self.proj_out(h)
        r = r.to(affine_dtype(r.dtype))
        r = self.soft_clip * torch.tanh(r / self.soft_clip)
        r_a, r_b = r.chunk(2, dim=-1)
        return F.softplus(r_a + LOG_E_MINUS_1), r_b

    def offset(self, h: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor | float:
        """The gated offset g(h) * base of the shifts: h [B, n, D], base [B, n, d] (slot order) | None -> 0."""
        if base is None:
            return 0.0
        if self.proj_out_skip is None:
            raise ValueError("FlowBlock: a shift offset `base` needs a block built with skip_gate=True")
        g = self.proj_out_skip(h)
        g = g.to(affine_dtype(g.dtype))
        return self.soft_clip * torch.tanh(g / self.soft_clip) * base.to(g.dtype)

    def step(self, s: torch.Tensor, add: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
             cache: KVCache, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse-direction pass over n new slots with a KV cache (writes, does not commit).

        s [B, n, d] slot inputs in permuted order; add [B, n, D] | None; cos/sin [n, hd/2];
        base [B, n, d] | None: gated offset of the shift b (slot order; see `forward`).
        Returns (a, b) [B, n, d] (>= float32) and h [B, n, D].
        """
        h = self.hidden(s, add, cos, sin, cache.attn_mask(s.shape[1]), False, cache)
        a, b = self.affine(h)
        return a, b + self.offset(h, base), h

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, add: torch.Tensor | None = None,
                key_valid: torch.Tensor | None = None, sos_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, base: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Data -> noise. u [B, N, d] natural order; cos/sin [N, hd/2] for the N slots.

        base [B, N, d] | None (natural order): a known offset of each slot's shift, b = b_net(h) +
        g(h) * base (skip_gate); it must depend only on what precedes the slot (the temporal skip passes
        the previous frame's tokens), so the block stays autoregressive and its Jacobian is unchanged.

        key_valid bool [B, N] | None: False slots are masked keys (start padding).
        cache: if given, the keys/values of all N slots are written into it at [length, length+N) and
        committed. It must be empty or hold only masked slots (start padding that was never computed:
        cos/sin must then be the tables of positions [length, length+N)).
        Returns v [B, N, d] (u's dtype, natural order), logdet [B, N, d] (>= float32, natural order,
        = -ln a), h [B, N, D] final hidden states in slot order.
        """
        u_in = self.permutation(u)
        s = self.shift(u_in, sos_mask)
        mask = None if key_valid is None else causal_key_mask(key_valid)
        if cache is not None:
            if cache.length and bool(cache.key_valid[:, :cache.length].any()):
                raise ValueError("FlowBlock.forward: the cache must be empty or hold masked slots only")
            if key_valid is not None:
                cache.set_valid(key_valid, u.shape[1])
            mask = None if cache.all_valid else cache.attn_mask(u.shape[1])  # empty cache: plain causal
        h = self.hidden(s, add, cos, sin, mask, mask is None, cache)
        if cache is not None:
            cache.advance(u.shape[1])
        a, b = self.affine(h)
        b = b + self.offset(h, None if base is None else self.permutation(base))
        v = (u_in.to(a.dtype) - b) / a
        logdet = -torch.log(a)
        return self.permutation(v).to(u.dtype), self.permutation(logdet), h


# --------------------------------------------------------------------------------------------------
# classifier-free guidance


def guidance(mu_c: torch.Tensor, sigma_c: torch.Tensor, mu_u: torch.Tensor, sigma_u: torch.Tensor,
             w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian CFG rule (STARFLOW_V.md §1.5): p_c^{1+w} / p_u^w with the precision kept positive.

    s = min(sigma_c/sigma_u, 1)^2;  sigma* = sigma_c / sqrt(1 + w - w s);
    mu* = ((1+w) mu_c - w s mu_u) / (1 + w - w s). All tensors broadcastable; w >= 0.
    """
    s = torch.clamp(sigma_c / sigma_u, max=1.0) ** 2
    denom = 1.0 + w - w * s  # >= 1
    return ((1.0 + w) * mu_c - w * s * mu_u) / denom, sigma_c / torch.sqrt(denom)
