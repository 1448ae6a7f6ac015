"""STARFlow-V model tests (STARFLOW_V.md §9.5 #2-#6, #11, #13): invertibility, likelihood, causality."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from sfv_world.autoencoder import IdentityCodec
from sfv_world.denoiser import score_target
from sfv_world.model import HALF_LOG_2PI, StarFlowV, StarFlowVConfig, WorldModel, nll_to_bits_per_dim
from sfv_world.sampling import JacobiConfig
from sfv_world.tokens import patchify, unpatchify
from test_model_helpers import CONFIGS, random_clip, random_model, tiny_config


# -- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "cpu-demo", "gpu-64"])
def test_configs_build(name):
    d = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg = StarFlowVConfig.from_dict(d, action_kind="discrete", action_dim=4)
    assert cfg.to_dict()["action_dim"] == 4
    if name == "cpu-demo":
        assert (cfg.tokens_per_frame, cfg.token_dim, cfg.temporal_skip) == (16, 432, True)


def test_config_rejects_unknown_and_missing_keys():
    d = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\].*missing keys \['action_kind', 'action_dim'\]"):
        StarFlowVConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="head_dim=16"):
        StarFlowVConfig.from_dict(d, action_kind="discrete", action_dim=3, head_dim=16)
    with pytest.raises(ValueError, match="reward_mode"):
        StarFlowVConfig.from_dict(d, action_kind="discrete", action_dim=3, reward_mode="huber")


def test_temporal_skip_defaults_off_and_is_checked():
    """Model configs written before the option (no key) load without the skip; a non-bool is refused."""
    d = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    d.pop("temporal_skip", None)
    assert StarFlowVConfig.from_dict(d, action_kind="discrete", action_dim=3).temporal_skip is False
    with pytest.raises(ValueError, match="temporal_skip='yes'"):
        StarFlowVConfig.from_dict(d, action_kind="discrete", action_dim=3, temporal_skip="yes")


def test_temporal_skip_makes_copying_the_previous_frame_free():
    """Zero output heads and identity shallow blocks, the skip's gate set to 1: D's noise is u_t - u_{t-1},
    so a clip that repeats its first frame maps every later frame to z = 0; without the skip, and with
    the gate at its initial 0, z_t = u_t."""
    torch.manual_seed(0)
    x, a = random_clip(tiny_config(), T=3)
    still = x[:, :1].expand(-1, 3, -1, -1, -1).clone()
    skip = StarFlowV(tiny_config(temporal_skip=True)).double()
    with torch.no_grad():
        assert torch.equal(skip(still, a).z, patchify(still, 4))  # gate 0 at init: no offset yet
        skip.deep.proj_out_skip.bias.fill_(skip.config.soft_clip * math.atanh(1.0 / skip.config.soft_clip))
        on = skip(still, a)
        off = StarFlowV(tiny_config()).double()(still, a)
        moving = skip(x, a)
    assert torch.allclose(on.z[:, 0], patchify(still, 4)[:, 0], atol=1e-12, rtol=0)  # a sequence start: no copy
    assert on.z[:, 1:].abs().max() < 1e-12
    assert torch.equal(off.z, patchify(still, 4))
    assert torch.allclose(moving.z[:, 1:], patchify(x[:, 1:] - x[:, :-1], 4), atol=1e-12, rtol=0)
    # start padding: the first real frame after it is a sequence start again
    pad = torch.cat([torch.zeros_like(x[:, :1]), x], 1)
    mask = torch.tensor([[False, True, True, True]] * 2)
    with torch.no_grad():
        padded = skip(pad, torch.cat([a[:, :1], a], 1), frame_mask=mask)
    assert torch.allclose(padded.z[:, 1:], moving.z, atol=1e-12, rtol=0)


def test_patchify_roundtrip_and_codec():
    x = torch.randn(2, 3, 3, 16, 16)
    t = patchify(x, 4)
    assert t.shape == (2, 3, 16, 48)
    assert torch.equal(t[0, 0, 1, :3], x[0, 0, :, 0, 4])  # token (0,1), pixel (0,0): channels last
    assert torch.equal(unpatchify(t, 4, 3, 16, 16), x)
    codec = IdentityCodec()
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(codec.decode(codec.encode(u8)), u8)
    assert codec.encode(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


# -- forward pass, likelihood ----------------------------------------------------------------------

def test_forward_shapes():
    m = random_model()
    cfg = m.config
    x, a = random_clip(cfg, B=2, T=3)
    out = m.flow(x, a)
    assert out.z.shape == (2, 3, 16, 48) and out.logdet.shape == (2, 3) and out.nll.shape == (2, 3)
    assert out.features.shape == (2, 3, 64) and out.reward.shape == (2, 2) and out.termination_logit.shape == (2, 2)
    bpd = nll_to_bits_per_dim(out.nll, cfg)
    assert torch.allclose(bpd, out.nll / (math.log(2) * 3 * 16 * 16))


def test_identity_at_init():
    torch.manual_seed(0)
    flow = StarFlowV(tiny_config()).double()
    x, a = random_clip(flow.config)
    out = flow(x, a)
    assert torch.equal(out.z, patchify(x, 4)) and torch.equal(out.logdet, torch.zeros_like(out.logdet))
    assert torch.allclose(flow.flow_loss(out), 0.5 * x.square().mean(), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("method", ["sequential", "jacobi"])
@pytest.mark.parametrize("skip", [False, True])
def test_whole_model_invertibility(dtype, tol, method, skip):
    m = random_model(dtype, temporal_skip=skip)
    x, a = random_clip(m.config, dtype=dtype)
    with torch.no_grad():
        out = m.flow(x, a)
    jc = JacobiConfig(block_size_first=4, block_size=8, threshold=0.0, max_iter=17, warm_start=True)
    x_rec = m.flow.invert(out.z, a, method=method, jacobi=jc)
    assert (x_rec - x).abs().max() < tol


@pytest.mark.parametrize("skip", [False, True])
def test_logdet_matches_autograd_slogdet(skip):
    """2 frames x 4x4 x 3 channels (96 dims): sum of all logdets = slogdet of the model Jacobian."""
    cfg = tiny_config(frame_size=4, patch_size=1, temporal_skip=skip)
    torch.manual_seed(0)
    flow = StarFlowV(cfg).double()
    for blk in [*flow.shallow, flow.deep]:
        torch.nn.init.normal_(blk.proj_out.weight, std=0.1)
    a = torch.tensor([[1]])
    x = 0.5 * torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda y: flow(y.view(1, 2, 3, 4, 4), a).z.reshape(-1), x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(J)
    out = flow(x, a)
    assert sign > 0
    assert abs(float(out.logdet.detach().sum()) - float(logabs)) < 1e-8
    # exact likelihood: -log N(z; 0, I) - log|det J|
    ref = 0.5 * out.z.square().sum() + HALF_LOG_2PI * 96 - logabs
    assert abs(float(out.nll.detach().sum()) - float(ref.detach())) < 1e-8


@pytest.mark.parametrize("skip", [False, True])
def test_per_frame_nll_is_the_conditional(skip):
    """nll[:, t] = -log p(x_t | x_<t, a_<t): it equals the last frame's nll of the prefix clip, and the
    per-frame terms sum to the total."""
    m = random_model(temporal_skip=skip)
    x, a = random_clip(m.config, T=4)
    with torch.no_grad():
        full = m.flow(x, a).nll
        for t in range(1, 4):
            prefix = m.flow(x[:, :t + 1], a[:, :t]).nll
            assert torch.allclose(prefix, full[:, :t + 1], atol=1e-10, rtol=0)
        out = m.flow(x, a)
    total = 0.5 * out.z.square().sum((1, 2, 3)) + HALF_LOG_2PI * 4 * 768 - out.logdet.sum(1)
    assert torch.allclose(out.nll.sum(1), total, atol=1e-9, rtol=0)


# -- causality ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True])
def test_frame_causality(skip):
    m = random_model(temporal_skip=skip)
    x, a = random_clip(m.config, T=4)
    with torch.no_grad():
        out = m.flow(x, a)
        for t in range(3):
            x2 = x.clone()
            x2[:, t + 1] += 0.3 * torch.randn_like(x2[:, t + 1])
            out2 = m.flow(x2, a)
            for f in ("z", "logdet", "nll", "features"):
                assert torch.equal(getattr(out2, f)[:, :t + 1], getattr(out, f)[:, :t + 1]), (t, f)
            assert not torch.equal(out2.z[:, t + 1], out.z[:, t + 1])


@pytest.mark.parametrize("skip", [False, True])
def test_action_causality(skip):
    m = random_model(temporal_skip=skip)
    x, a = random_clip(m.config, T=4)
    with torch.no_grad():
        out = m.flow(x, a)
        for t in range(3):
            a2 = a.clone()
            a2[:, t] = (a2[:, t] + 1) % 3
            out2 = m.flow(x, a2)
            for f in ("z", "logdet", "nll", "features"):
                assert torch.equal(getattr(out2, f)[:, :t + 1], getattr(out, f)[:, :t + 1]), (t, f)
            assert not torch.equal(out2.z[:, t + 1], out.z[:, t + 1])  # the action is used
            assert torch.equal(out2.reward[:, :t], out.reward[:, :t])


def test_shallow_locality():
    m = random_model()
    x, _ = random_clip(m.config, T=3)
    with torch.no_grad():
        u, ld = m.flow.shallow_forward(patchify(x, 4))
        x2 = x.clone()
        x2[:, 1] += 0.5
        u2, ld2 = m.flow.shallow_forward(patchify(x2, 4))
    for t in (0, 2):
        assert torch.equal(u2[:, t], u[:, t]) and torch.equal(ld2[:, t], ld[:, t])
    assert not torch.equal(u2[:, 1], u[:, 1])


# -- padding, heads, losses --------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True])
def test_frame_mask_padding_matches_unpadded(skip):
    m = random_model(temporal_skip=skip)
    x, a = random_clip(m.config, B=2, T=3)
    g = torch.Generator().manual_seed(5)
    pad_x = torch.cat([torch.randn(2, 2, 3, 16, 16, generator=g, dtype=torch.float64), x], 1)  # 2 garbage frames
    pad_x[0, 0] = float("nan")  # even NaN padding is harmless
    pad_a = torch.cat([torch.randint(0, 3, (2, 2), generator=g), a], 1)
    mask = torch.tensor([[False, False, True, True, True]] * 2)
    with torch.no_grad():
        ref = m.flow(x, a)
        out = m.flow(pad_x, pad_a, frame_mask=mask)
    assert torch.allclose(out.nll[:, 2:], ref.nll, atol=1e-10, rtol=0)
    assert torch.equal(out.nll[:, :2], torch.zeros(2, 2, dtype=out.nll.dtype))
    assert torch.allclose(out.features[:, 2:], ref.features, atol=1e-10, rtol=0)
    assert torch.isfinite(out.z).all()
    # flow_loss averages over real frames only
    assert torch.allclose(m.flow.flow_loss(out, mask), m.flow.flow_loss(ref), atol=1e-12)


@pytest.mark.parametrize("mode", ["regression", "sign"])
def test_head_loss_does_not_change_score_target(mode):
    m = random_model(reward_mode=mode)
    x, a = random_clip(m.config, T=3)
    rewards = torch.tensor([[1.0, -1.0], [0.0, 2.0]], dtype=torch.float64)
    terms = torch.tensor([[False, True], [False, False]])
    grads = []
    for with_head in (False, True):
        xt = x.clone().requires_grad_(True)
        out = m.flow(xt, a)
        loss = m.flow.flow_loss(out)
        if with_head:
            h, metrics = m.flow.head_loss(out, rewards, terms, torch.ones(2, 3, dtype=torch.bool))
            assert h.requires_grad and all(math.isfinite(v) for v in metrics.values())
            loss = loss + h
        loss.backward()
        grads.append(xt.grad)
    assert torch.equal(grads[0], grads[1])
    shape = (2, 2, 3) if mode == "sign" else (2, 2)
    assert out.reward.shape == shape and m.flow.reward_value(out.reward).shape == (2, 2)


def test_score_target_identity():
    """x_tilde.grad * numel * sigma = sigma * grad NLL from an independent autograd.grad."""
    m = random_model()
    sigma = m.config.sigma
    x, a = random_clip(m.config)
    xt = x.clone().requires_grad_(True)
    out = m.flow(xt, a)
    m.flow.flow_loss(out).backward()
    g = score_target(xt.grad, sigma, m.flow.loss_numel(out))
    x2 = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(m.flow(x2, a).nll.sum(), x2)
    assert torch.allclose(g, sigma * ref, atol=1e-12, rtol=1e-9)
    # identity flow, N(0, I) prior: the target is sigma * x_tilde and Tweedie gives (1 - sigma^2) x_tilde
    flow0 = StarFlowV(m.config).double()
    x3 = x.clone().requires_grad_(True)
    out0 = flow0(x3, a)
    flow0.flow_loss(out0).backward()
    g0 = score_target(x3.grad, sigma, x3.numel())
    assert torch.allclose(g0, sigma * x, atol=1e-12)
    assert torch.allclose(x - sigma * g0, (1 - sigma**2) * x, atol=1e-12)


def test_box_actions():
    m = random_model(action_kind="box", action_dim=2)
    x, _ = random_clip(m.config, T=3)
    a = torch.randn(2, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        out = m.flow(x, a)
        a2 = a.clone()
        a2[:, 1] += 1
        out2 = m.flow(x, a2)
    assert torch.equal(out.z[:, :2], out2.z[:, :2]) and not torch.equal(out.z[:, 2], out2.z[:, 2])
    x_rec = m.flow.invert(out.z, a)
    assert (x_rec - x).abs().max() < 1e-10


def test_bad_inputs_raise():
    m = random_model()
    x, a = random_clip(m.config, T=3)
    with pytest.raises(ValueError, match="actions"):
        m.flow(x, a[:, :1])
    with pytest.raises(ValueError, match="x_tilde frames"):
        m.flow(x[..., :8, :8], a)


def test_world_model_parameter_groups():
    m = WorldModel(tiny_config())
    flow_ids = {id(p) for p in m.flow_parameters()}
    den_ids = {id(p) for p in m.denoiser_parameters()}
    assert flow_ids and den_ids and not flow_ids & den_ids
    assert flow_ids | den_ids == {id(p) for p in m.parameters()}


# -- fitting ---------------------------------------------------------------------------------------

def test_gaussian_toy_reaches_analytic_nll():
    """Data x ~ N(mu, s^2 I): the trained NLL per dim approaches 0.5 ln(2 pi e (s^2 + sigma^2))."""
    torch.manual_seed(0)
    cfg = tiny_config(frame_size=8, shallow_blocks=1, deep_layers=1, max_frames=2)
    flow = StarFlowV(cfg)
    mu, s, sigma = 0.3, 0.4, cfg.sigma
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    a = torch.zeros(32, 1, dtype=torch.long)
    for _ in range(300):
        x = mu + math.sqrt(s**2 + sigma**2) * torch.randn(32, 2, 3, 8, 8)
        loss = flow.flow_loss(flow(x, a))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = mu + math.sqrt(s**2 + sigma**2) * torch.randn(256, 2, 3, 8, 8)
        nll_per_dim = float(flow(x, a.new_zeros(256, 1)).nll.mean()) / cfg.frame_dims
    analytic = 0.5 * math.log(2 * math.pi * math.e * (s**2 + sigma**2))
    assert abs(nll_per_dim - analytic) < 0.02, (nll_per_dim, analytic)


def test_action_conditioning_is_learned():
    """A toy whose next frame is set by the action (level a - 1/2, plus sigma noise): after a short
    training the likelihood depends strongly on the action, and generation follows it."""
    torch.manual_seed(0)
    cfg = tiny_config(frame_size=8, shallow_blocks=1, deep_layers=2, max_frames=2, action_dim=2)
    flow = StarFlowV(cfg)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)

    def batch(B):
        a = torch.randint(0, 2, (B, 1))
        level = torch.cat([torch.randint(0, 2, (B, 1)) - 0.5, a - 0.5], 1)  # [B, 2]
        return level[:, :, None, None, None] + cfg.sigma * torch.randn(B, 2, 3, 8, 8), a

    for _ in range(250):
        x, a = batch(32)
        loss = flow.flow_loss(flow(x, a, drop_actions=torch.rand(32) < 0.1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, a = batch(64)
        right = float(flow(x, a).nll[:, 1].mean()) / cfg.frame_dims
        wrong = float(flow(x, 1 - a).nll[:, 1].mean()) / cfg.frame_dims
        assert wrong - right > 1.0, (right, wrong)  # nats per dim
        state, _ = flow.encode_context(x[:, :1], a[:, :0])
        s = flow.generate_frame(state, a[:, 0], generator=torch.Generator().manual_seed(0), method="sequential")
        follows = ((s.x_tilde.mean((1, 2, 3)) > 0) == (a[:, 0] == 1)).float().mean()
        assert follows > 0.9, float(follows)
