"""FSM denoiser tests (STARFLOW_V.md §9.5 #11, #12): receptive field across all layers, Tweedie step."""
from __future__ import annotations

import pytest
import torch

from sfv_world.denoiser import FlowScoreDenoiser, flow_score_matching_loss
from test_model_helpers import random_clip, random_model, tiny_config


@pytest.mark.parametrize("lookahead", [0, 1])
def test_receptive_field_across_all_layers(lookahead):
    m = random_model(denoiser_lookahead=lookahead, denoiser_layers=3, std=0.2)
    den = m.denoiser
    den.window = 2  # G < T - 1 so the past bound is measured too
    T = 5
    x, a = random_clip(m.config, B=1, T=T)
    with torch.no_grad():
        s = den(x, a)
        for k in range(T):  # perturb input frame k
            x2 = x.clone()
            x2[:, k] += 1.0
            s2 = den(x2, a)
            for n in range(T):
                changed = not torch.equal(s2[:, n], s[:, n])
                # frame n sees exactly frames n-G+1 .. n+lookahead
                assert changed == (n - den.window < k <= n + lookahead), (k, n)


def test_denoiser_action_causality():
    m = random_model(denoiser_lookahead=0)
    x, a = random_clip(m.config, B=1, T=4)
    with torch.no_grad():
        s = m.denoiser(x, a)
        a2 = a.clone()
        a2[:, 2] = (a2[:, 2] + 1) % 3
        s2 = m.denoiser(x, a2)
    assert torch.equal(s[:, :3], s2[:, :3]) and not torch.equal(s[:, 3], s2[:, 3])


def test_denoise_is_one_tweedie_step():
    m = random_model()
    x, a = random_clip(m.config, T=3)
    den = m.denoiser
    with torch.no_grad():
        assert torch.allclose(den.denoise(x, a), x - m.config.sigma * den(x, a))
        latest = den.denoise_latest(x, a)
        assert torch.allclose(latest, den.denoise(x, a)[:, -1]) and latest.shape == (2, 3, 16, 16)
    fresh = FlowScoreDenoiser(tiny_config()).double()
    assert torch.equal(fresh.denoise(x, a), x)  # zero head: identity at init
    assert den.window >= 2


def test_fsm_loss_trains_only_the_denoiser():
    m = random_model()
    x, a = random_clip(m.config, T=3)
    g = torch.randn_like(x)
    xt = x.clone().requires_grad_(True)
    loss = flow_score_matching_loss(m.denoiser, xt, g, a, drop_actions=torch.tensor([True, False]))
    loss.backward()
    assert xt.grad is None
    assert all(p.grad is None for p in m.flow.parameters())
    assert m.denoiser.proj_out.weight.grad is not None
    # a few steps fit a fixed target
    opt = torch.optim.Adam(m.denoiser_parameters(), lr=1e-2)
    first = float(loss.detach())
    for _ in range(30):
        opt.zero_grad()
        loss = flow_score_matching_loss(m.denoiser, x, 0.5 * x, a)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first


def test_denoise_latest_matches_full_pass_and_padding_is_masked():
    m = random_model(denoiser_lookahead=0, std=0.2)
    den = m.denoiser
    x, a = random_clip(m.config, B=2, T=4)
    with torch.no_grad():
        full = den.denoise(x, a)
        assert (den.denoise_latest(x, a) - full[:, -1]).abs().max() < 1e-12
        # frames before the window do not matter
        x_old = x.clone()
        x_old[:, 0] += 1.0
        den.window = 3
        assert torch.equal(den.denoise_latest(x_old, a), den.denoise_latest(x, a))
        den.window = 4
        # left padding: garbage frames masked out give the same result as the short window
        pad = torch.cat([torch.randn_like(x[:, :2]), x[:, 2:]], 1)
        pad[1, 0] = float("nan")
        mask = torch.tensor([[False, False, True, True]] * 2)
        short = den.denoise_latest(x[:, 2:], a[:, 2:])
        padded = den.denoise_latest(pad, a, frame_mask=mask)
        assert (short - padded).abs().max() < 1e-10
