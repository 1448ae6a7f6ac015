"""Flow-block tests (STARFLOW_V.md §9.5 #1, #3, #8, #10, #14): invertibility, log-det, cache, CFG rule."""
from __future__ import annotations

import math

import pytest
import torch

from sfv_world.flow import FlowBlock, Permutation, guidance
from sfv_world.rope import rope_cos_sin, token_positions
from sfv_world.sampling import invert_sequential, invert_uncached

F, T, d, D = 16, 2, 12, 64  # 4x4 tokens per frame, 2 frames


def make_block(kind: str, dtype=torch.float64, seed=0) -> FlowBlock:
    torch.manual_seed(seed)
    blk = FlowBlock(d, D, 2, 32, 4.0, kind, F).to(dtype)
    with torch.no_grad():
        blk.proj_out.weight.normal_(0, 0.05)
    return blk


def rope(dtype):
    cos, sin = rope_cos_sin(token_positions(4, 4, torch.arange(T, dtype=torch.float64)), 32)
    return cos.to(dtype), sin.to(dtype)


def invert_cached(blk: FlowBlock, v: torch.Tensor, add_frames: torch.Tensor | None, dtype) -> torch.Tensor:
    """Frame-by-frame cached sequential inverse of a block over T frames (add per frame [B,T,D])."""
    B = v.shape[0]
    cos, sin = rope(dtype)
    cache = blk.new_cache(B, T * F, dtype, "cpu")
    v_in = blk.permutation(v)
    first = blk.sos.expand(B, -1)
    out = []
    for t in range(T):
        sl = slice(t * F, (t + 1) * F)
        add = None if add_frames is None else add_frames[:, t:t + 1]
        inv = invert_sequential(blk, cache, first, v_in[:, sl], add, cos[sl], sin[sl])
        out.append(inv.u)
        first = inv.u[:, -1]
    return blk.permutation(torch.cat(out, 1))


@pytest.mark.parametrize("kind", ["identity", "flip_in_frame"])
@pytest.mark.parametrize("cond", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_block_invertibility(kind, cond, dtype, tol):
    blk = make_block(kind, dtype)
    u = torch.randn(2, T * F, d, dtype=dtype)
    add_frames = 0.5 * torch.randn(2, T, D, dtype=dtype) if cond else None
    add = None if add_frames is None else add_frames.repeat_interleave(F, 1)
    cos, sin = rope(dtype)
    v, logdet, _ = blk(u, cos, sin, add)
    assert logdet.shape == u.shape
    u_rec = invert_cached(blk, v, add_frames, dtype)
    assert (u_rec - u).abs().max() < tol


@pytest.mark.parametrize("kind", ["identity", "flip_in_frame"])
def test_cached_inversion_equals_uncached(kind):
    blk = make_block(kind)
    v = torch.randn(2, T * F, d, dtype=torch.float64)
    add_frames = 0.5 * torch.randn(2, T, D, dtype=torch.float64)
    cos, sin = rope(torch.float64)
    cached = invert_cached(blk, v, add_frames, torch.float64)
    uncached = invert_uncached(blk, v, cos, sin, add_frames.repeat_interleave(F, 1))
    assert (cached - uncached).abs().max() < 1e-10


@pytest.mark.parametrize("kind", ["identity", "flip_in_frame"])
def test_block_logdet_matches_autograd_jacobian(kind):
    """Each block's Jacobian is triangular in permuted order with diagonal 1/a: sum(logdet) = slogdet."""
    torch.manual_seed(0)
    blk = FlowBlock(3, D, 1, 32, 4.0, kind, F).double()  # 2 frames x 16 tokens x 3 = 96 dims
    with torch.no_grad():
        blk.proj_out.weight.normal_(0, 0.1)
    cos, sin = rope(torch.float64)
    u = torch.randn(1, T * F, 3, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda x: blk(x.view(1, T * F, 3), cos, sin)[0].reshape(-1), u.reshape(-1))
    sign, logabs = torch.linalg.slogdet(J)
    _, logdet, _ = blk(u, cos, sin)
    assert sign > 0
    assert abs(float(logdet.detach().sum()) - float(logabs)) < 1e-8
    # triangular in permuted order: permute rows and columns, the upper triangle is zero
    perm = blk.permutation(torch.arange(T * F)[None, :, None]).reshape(-1)
    idx = (perm[:, None] * 3 + torch.arange(3)).reshape(-1)
    Jp = J[idx][:, idx]
    assert Jp.triu(1).abs().max() == 0


def test_block_identity_at_init():
    torch.manual_seed(0)
    blk = FlowBlock(d, D, 2, 32, 4.0, "flip_in_frame", F).double()
    u = torch.randn(2, T * F, d, dtype=torch.float64)
    cos, sin = rope(torch.float64)
    v, logdet, _ = blk(u, cos, sin)
    assert torch.equal(v, u) and torch.equal(logdet, torch.zeros_like(logdet))


def test_token_causality_of_block():
    blk = make_block("identity")
    cos, sin = rope(torch.float64)
    u = torch.randn(1, T * F, d, dtype=torch.float64)
    v, ld, _ = blk(u, cos, sin)
    for j in (0, 5, F, T * F - 1):
        u2 = u.clone()
        u2[:, j] += 1.0
        v2, ld2, _ = blk(u2, cos, sin)
        assert torch.equal(v2[:, :j], v[:, :j]) and torch.equal(ld2[:, :j], ld[:, :j])
        if j + 1 < T * F:
            assert not torch.equal(v2[:, j + 1:], v[:, j + 1:])


@pytest.mark.parametrize("kind", ["identity", "flip_in_frame"])
def test_permutations_are_involutions(kind):
    p = Permutation(kind, 4)
    x = torch.arange(2 * 3 * 4).reshape(2, 12, 1)
    assert torch.equal(p(p(x)), x)
    if kind == "flip_in_frame":
        y = p(x).reshape(2, 3, 4)
        assert torch.equal(y.flip(2), x.reshape(2, 3, 4))  # frames keep their order
        assert (y // 4 == x.reshape(2, 3, 4) // 4).all()


def test_unknown_permutation_rejected():
    with pytest.raises(ValueError, match="unknown permutation"):
        Permutation("flip", 4)


def test_guidance_rule():
    g = torch.Generator().manual_seed(0)
    mu_c, mu_u = torch.randn(100, generator=g), torch.randn(100, generator=g)
    s_c, s_u = torch.rand(100, generator=g) * 4 + 0.03, torch.rand(100, generator=g) * 4 + 0.03
    mu, sig = guidance(mu_c, s_c, mu_u, s_u, 0.0)
    assert torch.allclose(mu, mu_c) and torch.allclose(sig, s_c)
    mu, sig = guidance(mu_c, s_c, mu_c, s_c, 3.0)  # identical branches: the conditional back
    assert torch.allclose(mu, mu_c) and torch.allclose(sig, s_c)
    for w in (0.5, 1.0, 3.5, 100.0):
        mu, sig = guidance(mu_c, s_c, mu_u, s_u, w)
        assert torch.isfinite(mu).all() and torch.isfinite(sig).all() and (sig > 0).all()
    # the Gaussian p_c^{1+w}/p_u^w where it is normalisable (sigma_c < sigma_u)
    w, mc, sc, mu_, su = 2.0, 0.3, 0.5, -0.4, 1.2
    prec = (1 + w) / sc**2 - w / su**2
    mean = ((1 + w) * mc / sc**2 - w * mu_ / su**2) / prec
    m, s = guidance(torch.tensor(mc), torch.tensor(sc), torch.tensor(mu_), torch.tensor(su), w)
    assert math.isclose(float(m), mean, rel_tol=1e-6) and math.isclose(float(s), prec**-0.5, rel_tol=1e-6)


def test_shift_offset_is_gated_and_needs_the_gate():
    """b = b_net(h) + g(h) * base: with the gate at 0 (init) the offset changes nothing; with g = 1 the noise
    is shifted by exactly -base / a; a block built without the gate refuses an offset."""
    F, d, D = 4, 6, 32
    blk = FlowBlock(d, D, 1, 32, 4.0, "identity", F, skip_gate=True).double()
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, F, d, generator=g, dtype=torch.float64)
    base = torch.randn(2, F, d, generator=g, dtype=torch.float64)
    cos, sin = rope_cos_sin(token_positions(2, 2, torch.zeros(1, dtype=torch.float64)), 32)
    with torch.no_grad():
        v0, ld0, _ = blk(u, cos, sin)
        assert torch.equal(blk(u, cos, sin, base=base)[0], v0)
        blk.proj_out_skip.bias.fill_(4.0 * math.atanh(0.25))  # g = 1
        v1, ld1, _ = blk(u, cos, sin, base=base)
    a = torch.exp(-ld0)
    assert torch.allclose(v1, v0 - base / a, atol=1e-12, rtol=0) and torch.equal(ld1, ld0)
    plain = FlowBlock(d, D, 1, 32, 4.0, "identity", F).double()
    with pytest.raises(ValueError, match="skip_gate=True"):
        plain(u, cos, sin, base=base)
