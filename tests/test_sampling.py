"""Sampler tests (STARFLOW_V.md §9.5 #7-#9): Jacobi = sequential, prefix property, per-row state."""
from __future__ import annotations

import pytest
import torch

from sfv_world.sampling import JacobiConfig
from test_model_helpers import random_clip, random_model

F, d = 16, 48


def noises(B, n, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, F, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


def rollout(m, x, a, vs, actions, method, jc=None, cfg=False, w=0.0):
    """Encode the context clip (x, a), then generate len(vs) frames."""
    state, _ = m.flow.encode_context(x, a, cfg=cfg)
    return [m.flow.generate_frame(state, act, noise=v, method=method, jacobi=jc, cfg_scale=w)
            for v, act in zip(vs, actions)]


@pytest.mark.parametrize("cfg,w", [(False, 0.0), (True, 2.0)])
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_jacobi_tau0_equals_sequential_fp32(cfg, w, warm, skip):
    m = random_model(torch.float32, temporal_skip=skip)
    x, a = random_clip(m.config, B=3, T=2, dtype=torch.float32)
    vs = noises(3, 2, torch.float32)
    acts = [torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])]
    jc = JacobiConfig(block_size_first=4, block_size=8, threshold=0.0, max_iter=9, warm_start=warm)
    seq = rollout(m, x, a, vs, acts, "sequential", cfg=cfg, w=w)
    jac = rollout(m, x, a, vs, acts, "jacobi", jc, cfg=cfg, w=w)
    for s, j in zip(seq, jac):
        # relative to the frame's scale: |x| reaches ~8 here (~12 with the skip's random gate), where one
        # fp32 ulp is 5e-7 (1e-6); the two solvers' different summation orders add a few ulps
        assert (s.x_tilde - j.x_tilde).abs().max() / s.x_tilde.abs().max().clamp(min=1) < 2e-6
        assert (s.nll - j.nll).abs().max() < 1e-3  # nats over 768 dims in fp32
        assert (s.features - j.features).abs().max() < 1e-5
        assert s.passes == F and j.passes <= 2 * 9


def test_jacobi_from_first_frame_uses_first_block_size():
    m = random_model()
    jc = JacobiConfig(block_size_first=4, block_size=16, threshold=0.0, max_iter=17, warm_start=True)
    z = torch.stack(noises(2, 2, torch.float64), 1)
    a = torch.tensor([[1], [2]])
    x_seq = m.flow.invert(z, a, "sequential")
    x_jac = m.flow.invert(z, a, "jacobi", jc)
    assert (x_seq - x_jac).abs().max() < 1e-10


def test_jacobi_threshold_uses_fewer_passes():
    m = random_model(torch.float32)
    x, a = random_clip(m.config, B=4, T=2, dtype=torch.float32)
    vs = noises(4, 2, torch.float32)
    acts = [torch.tensor([0, 1, 2, 0])] * 2
    jc = JacobiConfig(block_size_first=16, block_size=16, threshold=1e-3, max_iter=32, warm_start=True)
    seq = rollout(m, x, a, vs, acts, "sequential")
    jac = rollout(m, x, a, vs, acts, "jacobi", jc)
    for s, j in zip(seq, jac):
        assert j.passes < s.passes
        assert j.iterations.shape == (4,) and (j.iterations >= 1).all() and (j.iterations <= j.passes).all()
        # tau bounds the relative mean-squared change, not the error: on a random model the
        # difference stays well below the frame's scale (STARFLOW_V.md §5.3 reports 0.07-0.16)
        assert (s.x_tilde - j.x_tilde).abs().max() < 0.5


def test_jacobi_convergence_is_per_sample():
    """A sample's iterations and result do not depend on the other samples of the batch."""
    m = random_model()
    x, a = random_clip(m.config, B=3, T=2)
    (v,) = noises(3, 1, torch.float64)
    v[1] *= 3.0  # a harder sample
    act = torch.tensor([0, 1, 2])
    jc = JacobiConfig(block_size_first=16, block_size=16, threshold=1e-6, max_iter=32, warm_start=True)
    (batch,) = rollout(m, x, a, [v], [act], "jacobi", jc)
    for i in range(3):
        (alone,) = rollout(m, x[i:i + 1], a[i:i + 1], [v[i:i + 1]], [act[i:i + 1]], "jacobi", jc)
        assert int(alone.iterations[0]) == int(batch.iterations[i])
        assert (alone.x_tilde[0] - batch.x_tilde[i]).abs().max() < 1e-9
    assert batch.passes == int(batch.iterations.max())


@pytest.mark.parametrize("cfg,w", [(False, 0.0), (True, 1.5)])
def test_jacobi_compaction_runs_late_passes_on_iterating_rows_only(cfg, w, monkeypatch):
    """Compacted passes (only the rows still iterating) give the same frames and iterations as
    whole-batch passes, and a next frame that agrees to tau's level."""
    from sfv_world.flow import KVCache

    m = random_model()
    x, a = random_clip(m.config, B=4, T=2)
    vs = noises(4, 2, torch.float64)
    for v in vs:
        v *= torch.tensor([1.0, 3.0, 0.3, 2.0], dtype=v.dtype)[:, None, None]  # rows converge at different passes
    acts = [torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])]
    gathered = []
    real_gather = KVCache.gather_rows
    monkeypatch.setattr(KVCache, "gather_rows", lambda self, rows, n: gathered.append(len(rows)) or real_gather(self, rows, n))
    runs = {}
    for compact in (0.0, 1.0):
        jc = JacobiConfig(block_size_first=16, block_size=16, threshold=1e-6, max_iter=32, compact=compact)
        gathered.clear()
        runs[compact] = (rollout(m, x, a, vs, acts, "jacobi", jc, cfg=cfg, w=w), list(gathered))
    (whole, g0), (compacted, g1) = runs[0.0], runs[1.0]
    assert g0 == [] and g1 and all(n < (8 if cfg else 4) for n in g1)  # some passes ran on fewer rows
    first_w, first_c = whole[0], compacted[0]
    assert torch.equal(first_w.iterations, first_c.iterations)
    assert (first_w.x_tilde - first_c.x_tilde).abs().max() < 1e-9  # frozen values are the same either way
    assert (first_w.features - first_c.features).abs().max() < 1e-2
    # the second frame reads the KV entries the compacted passes left for converged rows
    scale = whole[1].x_tilde.abs().max()
    assert (whole[1].x_tilde - compacted[1].x_tilde).abs().max() / scale < 1e-3


def test_jacobi_compact_fraction_is_checked():
    with pytest.raises(ValueError, match="compact"):
        JacobiConfig(compact=1.5)
    d = {"block_size_first": 4, "block_size": 8, "threshold": 0.0, "max_iter": 9, "warm_start": True, "compact": 0.25}
    assert JacobiConfig.from_dict(d).compact == 0.25


@pytest.mark.parametrize("method", ["sequential", "jacobi"])
def test_sampling_prefix_property(method):
    m = random_model()
    jc = JacobiConfig(block_size_first=4, block_size=8, threshold=1e-4, max_iter=9, warm_start=True)
    z = torch.stack(noises(2, 4, torch.float64), 1)
    a = torch.tensor([[0, 1, 2], [2, 1, 0]])
    short = m.flow.invert(z[:, :3], a[:, :2], method, jc)
    long = m.flow.invert(z, a, method, jc)
    assert torch.equal(long[:, :3], short)
    z2 = z.clone()
    z2[:, 2] += 1.0
    other = m.flow.invert(z2, a, method, jc)
    assert torch.equal(other[:, :2], long[:, :2]) and not torch.equal(other[:, 2], long[:, 2])


@pytest.mark.parametrize("skip", [False, True])
def test_generated_frame_likelihood_features_and_heads_are_exact(skip):
    m = random_model(temporal_skip=skip)
    x, a = random_clip(m.config, B=2, T=2)
    (v,) = noises(2, 1, torch.float64)
    act = torch.tensor([1, 2])
    state, ctx = m.flow.encode_context(x, a)
    with torch.no_grad():
        ref_ctx = m.flow(x, a)
    assert torch.allclose(ctx.nll, ref_ctx.nll, atol=1e-10, rtol=0)
    s = m.flow.generate_frame(state, act, noise=v, method="sequential")
    assert state.num_frames == 3
    clip = torch.cat([x, s.x_tilde[:, None]], 1)
    with torch.no_grad():
        out = m.flow(clip, torch.cat([a, act[:, None]], 1))
    assert torch.allclose(out.z[:, 2], v, atol=1e-10, rtol=0)
    assert torch.allclose(s.nll, out.nll[:, 2], atol=1e-8, rtol=0)
    assert torch.allclose(s.features, out.features[:, 2], atol=1e-10, rtol=0)
    assert torch.allclose(s.reward, out.reward[:, 1], atol=1e-10, rtol=0)
    assert torch.allclose(s.termination_logit, out.termination_logit[:, 1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("skip", [False, True])
def test_replace_rows_matches_encoding_the_row_alone(skip):
    m = random_model(temporal_skip=skip)
    x, a = random_clip(m.config, B=3, T=3)
    state, _ = m.flow.encode_context(x, a)
    # row 1 resets to a new 2-frame context, left-padded to the state's 3 frames
    x_new, a_new = random_clip(m.config, B=1, T=2, seed=9)
    pad_x = torch.cat([torch.zeros_like(x_new[:, :1]), x_new], 1)
    pad_a = torch.cat([torch.zeros_like(a_new[:, :1]), a_new], 1)
    other, out_pad = m.flow.encode_context(pad_x, pad_a, frame_mask=torch.tensor([[False, True, True]]))
    state.replace_rows(torch.tensor([1]), other)
    alone, out_alone = m.flow.encode_context(x_new, a_new)
    assert torch.allclose(out_pad.nll[:, 1:], out_alone.nll, atol=1e-10, rtol=0)
    (v,) = noises(3, 1, torch.float64)
    act = torch.tensor([0, 1, 2])
    s = m.flow.generate_frame(state, act, noise=v, method="sequential")
    s1 = m.flow.generate_frame(alone, act[1:2], noise=v[1:2], method="sequential")
    assert (s.x_tilde[1] - s1.x_tilde[0]).abs().max() < 1e-10
    assert abs(float(s.nll[1] - s1.nll[0])) < 1e-8
    # untouched rows are as if nothing happened
    ref_state, _ = m.flow.encode_context(x, a)
    ref = m.flow.generate_frame(ref_state, act, noise=v, method="sequential")
    assert torch.equal(s.x_tilde[[0, 2]], ref.x_tilde[[0, 2]])
    # a second frame keeps working on the mixed (padded) cache
    (v2,) = noises(3, 1, torch.float64, seed=4)
    s_b = m.flow.generate_frame(state, act, noise=v2, method="sequential")
    s1_b = m.flow.generate_frame(alone, act[1:2], noise=v2[1:2], method="sequential")
    assert (s_b.x_tilde[1] - s1_b.x_tilde[0]).abs().max() < 1e-10


@pytest.mark.parametrize("cfg,w", [(False, 0.0), (True, 1.5)])
@pytest.mark.parametrize("skip", [False, True])
def test_pad_frames_equal_explicit_masked_padding(cfg, w, skip):
    """encode_context(pad_frames=P) skips the P padding frames yet gives the state of the padded clip."""
    m = random_model(temporal_skip=skip)
    x, a = random_clip(m.config, B=2, T=2, seed=5)
    P = 3
    pad_x = torch.cat([x[:, :1].expand(2, P, *x.shape[2:]), x], 1)
    pad_a = torch.cat([torch.zeros(2, P, dtype=a.dtype), a], 1)
    mask = torch.tensor([[False] * P + [True] * 2] * 2)
    padded, out_pad = m.flow.encode_context(pad_x, pad_a, frame_mask=mask, cfg=cfg)
    skipped, out_skip = m.flow.encode_context(x, a, cfg=cfg, pad_frames=P)
    assert skipped.num_frames == padded.num_frames == P + 2
    assert torch.equal(skipped.history_mask, padded.history_mask)
    assert torch.equal(skipped.history_x, padded.history_x)
    assert torch.allclose(out_skip.nll, out_pad.nll[:, P:], atol=1e-9, rtol=0)
    assert torch.allclose(out_skip.features, out_pad.features[:, P:], atol=1e-9, rtol=0)
    (v,) = noises(2, 1, torch.float64)
    act = torch.tensor([1, 2])
    g_pad = m.flow.generate_frame(padded, act, noise=v, method="sequential", cfg_scale=w)
    g_skip = m.flow.generate_frame(skipped, act, noise=v, method="sequential", cfg_scale=w)
    assert (g_pad.x_tilde - g_skip.x_tilde).abs().max() < 1e-9 and (g_pad.nll - g_skip.nll).abs().max() < 1e-7
    with pytest.raises(ValueError, match="must fit capacity"):
        m.flow.encode_context(x, a, pad_frames=m.config.max_frames - 1)


def test_replace_rows_rejects_mismatched_states():
    m = random_model()
    x, a = random_clip(m.config, B=2, T=3)
    state, _ = m.flow.encode_context(x, a)
    other, _ = m.flow.encode_context(x[:1, :2], a[:1, :1])
    with pytest.raises(ValueError, match="left-pad"):
        state.replace_rows(torch.tensor([0]), other)


@pytest.mark.parametrize("skip", [False, True])
def test_window_reencode(skip):
    m = random_model(max_frames=4, temporal_skip=skip)
    x, a = random_clip(m.config, B=2, T=3)
    state, _ = m.flow.encode_context(x, a)
    acts = torch.tensor([1, 0])
    (v, v2) = noises(2, 2, torch.float64)
    s = m.flow.generate_frame(state, acts, noise=v, method="sequential")
    assert state.full
    with pytest.raises(RuntimeError, match="reencode"):
        m.flow.generate_frame(state, acts, noise=v2)
    window, out = m.flow.reencode(state, keep=2)
    assert window.num_frames == 2 and not window.full
    # the re-encoded window equals encoding the last two frames directly (RoPE indices restart at 0)
    clip = torch.stack([x[:, 2], s.x_tilde], 1)
    direct, out_direct = m.flow.encode_context(clip, acts[:, None])
    assert torch.allclose(out.nll, out_direct.nll, atol=1e-10, rtol=0)
    lean, lean_out = m.flow.reencode(state, keep=2, heads=False)  # the runtime's: no transition heads
    assert lean_out.reward is None and lean_out.termination_logit is None and out.reward is not None
    assert torch.equal(lean.cache.k, window.cache.k) and torch.equal(lean_out.nll, out.nll)
    s_w = m.flow.generate_frame(window, acts, noise=v2, method="sequential")
    s_d = m.flow.generate_frame(direct, acts, noise=v2, method="sequential")
    assert torch.equal(s_w.x_tilde, s_d.x_tilde)


def test_cfg_needs_cfg_state_and_changes_samples():
    m = random_model()
    x, a = random_clip(m.config, B=2, T=2)
    (v,) = noises(2, 1, torch.float64)
    state, _ = m.flow.encode_context(x, a)
    with pytest.raises(ValueError, match="cfg=True"):
        m.flow.generate_frame(state, torch.tensor([0, 1]), noise=v, cfg_scale=1.0)
    plain = rollout(m, x, a, [v], [torch.tensor([0, 1])], "sequential")[0]
    w0 = rollout(m, x, a, [v], [torch.tensor([0, 1])], "sequential", cfg=True, w=0.0)[0]
    w2 = rollout(m, x, a, [v], [torch.tensor([0, 1])], "sequential", cfg=True, w=2.0)[0]
    assert (plain.x_tilde - w0.x_tilde).abs().max() < 1e-10
    assert (plain.x_tilde - w2.x_tilde).abs().max() > 1e-6


def test_generator_reproducible_and_temperature():
    m = random_model()
    x, a = random_clip(m.config, B=2, T=2)
    outs = []
    for temp in (1.0, 1.0, 0.0):
        state, _ = m.flow.encode_context(x, a)
        g = torch.Generator().manual_seed(0)
        outs.append(m.flow.generate_frame(state, torch.tensor([0, 1]), generator=g, temperature=temp,
                                          jacobi=JacobiConfig(threshold=0.0, max_iter=17, block_size=16)))
    assert torch.equal(outs[0].x_tilde, outs[1].x_tilde) and not torch.equal(outs[0].x_tilde, outs[2].x_tilde)
    # temperature 0 -> v = 0: the deep block returns its means; z of the frame is then ~0
    assert outs[2].x_tilde.isfinite().all()


def test_jacobi_config_from_sampler_dict_and_errors():
    d = {"method": "jacobi", "block_size_first": 4, "block_size": 8, "threshold": 0.0, "max_iter": 9,
         "warm_start": True, "cfg": 0.0, "temperature": 1.0, "denoise": True}
    jc = JacobiConfig.from_dict(d)
    assert (jc.block_size_first, jc.block_size, jc.max_iter, jc.criterion) == (4, 8, 9, "token")
    with pytest.raises(ValueError, match=r"missing keys \['threshold'\]"):
        JacobiConfig.from_dict({k: v for k, v in d.items() if k != "threshold"})
    with pytest.raises(ValueError, match="criterion"):
        JacobiConfig(criterion="median")


def test_mean_criterion_tau0_equals_sequential():
    m = random_model()
    z = torch.stack(noises(2, 2, torch.float64), 1)
    a = torch.tensor([[1], [2]])
    jc = JacobiConfig(block_size_first=4, block_size=8, threshold=0.0, max_iter=8, warm_start=True, criterion="mean")
    assert (m.flow.invert(z, a, "sequential") - m.flow.invert(z, a, "jacobi", jc)).abs().max() < 1e-10


def test_chunk_size_passes_suffice_for_the_exact_inverse():
    """The exact prefix grows by one slot per pass: with tau = 0, max_iter = chunk size (not chunk + 1)
    already gives the exact inverse."""
    m = random_model()
    z = torch.stack(noises(2, 2, torch.float64), 1)
    a = torch.tensor([[1], [2]])
    jc = JacobiConfig(block_size_first=4, block_size=8, threshold=0.0, max_iter=8, warm_start=False)
    assert (m.flow.invert(z, a, "sequential") - m.flow.invert(z, a, "jacobi", jc)).abs().max() < 1e-10


@pytest.mark.parametrize("cfg,w", [(False, 0.0), (True, 1.5)])
def test_one_slot_chunks_are_the_sequential_sampler(cfg, w):
    """Jacobi with chunks of one slot (block_size 1, the cpu-demo shallow setting) is the sequential
    sampler: the same frames, likelihoods and features bit for bit, one pass and one iteration per slot."""
    m = random_model(temporal_skip=True)
    x, a = random_clip(m.config, B=2, T=3)
    vs = noises(2, 2, torch.float64)
    acts = [torch.tensor([0, 2]), torch.tensor([1, 1])]
    jc = JacobiConfig(block_size_first=1, block_size=1, threshold=1e-3, max_iter=32, warm_start=True)
    seq = rollout(m, x, a, vs, acts, "sequential", cfg=cfg, w=w)
    jac = rollout(m, x, a, vs, acts, "jacobi", jc, cfg=cfg, w=w)
    for s, j in zip(seq, jac):
        assert torch.equal(s.x_tilde, j.x_tilde) and torch.equal(s.nll, j.nll) and torch.equal(s.features, j.features)
        assert j.passes == s.passes == F and (j.iterations == F).all()
        assert j.shallow_passes == s.shallow_passes == F * m.config.shallow_blocks


@pytest.mark.parametrize("cfg,w,pad", [(False, 0.0, 0), (True, 1.5, 0), (False, 0.0, 2)])
@pytest.mark.parametrize("skip", [False, True])
def test_append_frame_equals_encoding_the_whole_clip(cfg, w, pad, skip):
    """Teacher forcing one frame at a time (append_frame) = one forward pass over the whole clip."""
    m = random_model(temporal_skip=skip)
    x, a = random_clip(m.config, B=2, T=4, seed=7)
    whole, out = m.flow.encode_context(x, a, cfg=cfg, pad_frames=pad)
    state, _ = m.flow.encode_context(x[:, :1], a[:, :0], cfg=cfg, pad_frames=pad)
    for t in range(1, 4):
        s = m.flow.append_frame(state, x[:, t], a[:, t - 1])
        assert torch.allclose(s.nll, out.nll[:, t], atol=1e-8, rtol=0)
        assert torch.allclose(s.features, out.features[:, t], atol=1e-9, rtol=0)
        assert torch.allclose(s.reward, out.reward[:, t - 1], atol=1e-9, rtol=0)
        assert torch.allclose(s.termination_logit, out.termination_logit[:, t - 1], atol=1e-9, rtol=0)
    assert state.num_frames == whole.num_frames == pad + 4
    assert torch.equal(state.history_x, whole.history_x) and torch.equal(state.history_a, whole.history_a)
    (v,) = noises(2, 1, torch.float64)
    act = torch.tensor([2, 0])
    g_whole = m.flow.generate_frame(whole, act, noise=v, method="sequential", cfg_scale=w)
    g_step = m.flow.generate_frame(state, act, noise=v, method="sequential", cfg_scale=w)
    assert (g_whole.x_tilde - g_step.x_tilde).abs().max() < 1e-9  # the cache (both CFG halves) is the same
    with pytest.raises(ValueError, match="append_frame: x_tilde"):
        m.flow.append_frame(state, x[:1, 0], a[:1, 0])


@pytest.mark.parametrize("warm", [False, True])
def test_shallow_warm_start_from_newest_frame(warm):
    """A frame equal to the newest one: its shallow inputs are the warm start's guess, so each shallow
    block stops after one Jacobi pass; cold, the same frame takes more. Both reproduce the frame."""
    m = random_model()
    x, a = random_clip(m.config, B=2, T=3)
    x[:, 2] = x[:, 1]
    z = m.flow(x, a).z  # [B, T, F, d]
    state, _ = m.flow.encode_context(x[:, :2], a[:, :1])
    jc = JacobiConfig(block_size_first=16, block_size=16, threshold=1e-20, max_iter=32, warm_start=warm)
    s = m.flow.generate_frame(state, a[:, 1], noise=z[:, 2], method="jacobi", jacobi=jc)
    assert (s.x_tilde - x[:, 2]).abs().max() < 1e-6
    K = len(m.flow.shallow)
    assert (s.shallow_passes == K) if warm else (s.shallow_passes > 2 * K)


def test_shallow_inputs_chain_the_blocks():
    m = random_model()
    x, _ = random_clip(m.config, B=2, T=1)
    inputs = m.flow.shallow_inputs(x[:, 0])
    cos, sin = m.flow.rope(0, 1)
    assert len(inputs) == len(m.flow.shallow)
    for i in range(1, len(inputs)):
        assert torch.equal(inputs[i], m.flow.shallow[i - 1](inputs[i - 1], cos, sin)[0])
    u, _ = m.flow.shallow_forward(inputs[0][:, None])
    assert torch.allclose(m.flow.shallow[-1](inputs[-1], cos, sin)[0], u[:, 0])
