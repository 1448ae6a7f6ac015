"""World runtime: shapes, seeding, bounded window over long rollouts, per-row reset, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dream_fixtures import make_tiny_checkpoint, make_tiny_dataset

from sfv_world.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sfv_world.world import SamplerSettings, WorldRuntime


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    ds = make_tiny_dataset(root / "ds")
    return {
        "dataset": ds,
        "ckpt": make_tiny_checkpoint(root / "ckpt.pt", ds),
        "ckpt64": make_tiny_checkpoint(root / "ckpt64.pt", ds, dtype=torch.float64),
        # 8x8 frames (2x2 tokens), one shallow block: the 2,000-step rollout stays within seconds
        "micro": make_tiny_checkpoint(root / "micro.pt", ds, sampler={"block_size_first": 4},
                                      model_overrides={"frame_size": 8, "shallow_blocks": 1, "denoiser_layers": 1}),
        "root": root,
    }


def context(batch: int, k: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, k, size, size, 3), dtype=np.uint8), rng.integers(0, 2, (batch, k - 1))


def test_reset_and_step_shapes(tiny):
    rt = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=3, seed=0)
    assert rt.frame_shape == (16, 16, 3) and rt.feature_dim == 64
    frames, actions = context(3, 3)
    r = rt.reset(frames, actions)
    assert r.frames.shape == (3, 3, 16, 16, 3) and r.frames.dtype == np.uint8
    np.testing.assert_array_equal(r.frames, frames)  # already at the model size: unchanged
    assert r.log_likelihood.shape == (3, 3) and np.isfinite(r.log_likelihood).all()
    assert r.features.shape == (3, 64)
    s = rt.step(np.array([0, 1, 1]))
    assert s.frames.shape == (3, 16, 16, 3) and s.frames.dtype == np.uint8
    assert s.rewards.shape == (3,) and s.rewards.dtype == np.float32
    assert s.terminations.dtype == np.bool_ and s.terminations.shape == (3,)
    np.testing.assert_array_equal(s.terminations, s.termination_prob > 0.5)
    assert s.termination_logit.shape == (3,) and s.termination_logit.dtype == np.float32
    np.testing.assert_allclose(1 / (1 + np.exp(-s.termination_logit.astype(np.float64))), s.termination_prob, rtol=1e-5)
    assert s.log_likelihood.shape == (3,) and np.isfinite(s.log_likelihood).all()
    assert s.jacobi_iterations.dtype == np.int64 and (s.jacobi_iterations >= 1).all()
    assert s.features.shape == (3, 64)
    assert rt.num_frames == 4
    o = rt.observe(frames[:, -1], np.array([1, 0, 1]))
    np.testing.assert_allclose(1 / (1 + np.exp(-o.termination_logit.astype(np.float64))), o.termination_prob, rtol=1e-5)


def test_slot_features_are_the_mean_features_before_the_mean(tiny):
    """features="slots" observes every token slot [F * D]; their mean over slots is the "mean" feature, on
    reset (full and per-row), step and observe alike; sibling runtimes share model and features."""
    F, D = 16, 64  # 16x16 frames, patch 4
    mean = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, seed=0)
    slots = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, seed=0, features="slots")
    assert slots.feature_dim == F * D and slots.feature_dims == {"mean": D, "slots": F * D}
    frames, actions = context(2, 3)

    def as_mean(f: np.ndarray) -> np.ndarray:
        return f.reshape(len(f), F, D).mean(1)

    r_m, r_s = mean.reset(frames, actions), slots.reset(frames, actions)
    assert r_s.features.shape == (2, F * D) and r_m.features.shape == (2, D)
    np.testing.assert_allclose(as_mean(r_s.features), r_m.features, rtol=0, atol=1e-5)
    assert not np.allclose(r_s.features[:, :D], r_s.features[:, D:2 * D])  # the slots differ
    s_m, s_s = mean.step(np.array([0, 1])), slots.step(np.array([0, 1]))
    np.testing.assert_array_equal(s_m.frames, s_s.frames)  # the observation does not change the dream
    np.testing.assert_allclose(as_mean(s_s.features), s_m.features, rtol=0, atol=1e-5)
    o_m, o_s = mean.observe(frames[:, 0], np.array([1, 0])), slots.observe(frames[:, 0], np.array([1, 0]))
    np.testing.assert_allclose(as_mean(o_s.features), o_m.features, rtol=0, atol=1e-5)
    new_frames, new_actions = context(1, 2, seed=3)
    p_m = mean.reset(new_frames, new_actions, rows=[1])
    p_s = slots.reset(new_frames, new_actions, rows=[1])
    np.testing.assert_allclose(as_mean(p_s.features), p_m.features, rtol=0, atol=1e-5)

    sib = slots.sibling(5, seed=1)
    assert sib.model is slots.model and sib.batch_size == 5 and sib.features == "slots"
    assert sib.context_window == slots.context_window and sib.sampler == slots.sampler
    with pytest.raises(ValueError, match="features must be one of"):
        WorldRuntime.from_checkpoint(tiny["ckpt"], features="tokens")


def test_larger_frames_are_area_resized_to_the_model_size(tiny):
    from sfv_world.datasets import area_resize

    rt = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, seed=0)
    big, actions = context(2, 2, size=32)
    r = rt.reset(big, actions)
    np.testing.assert_array_equal(r.frames, area_resize(big, 16))


def rollout(rt: WorldRuntime, steps: int, seed: int) -> list[np.ndarray]:
    frames, actions = context(rt.batch_size, 2, seed=1)
    rt.seed(seed)
    rt.reset(frames, actions)
    rng = np.random.default_rng(2)
    out = []
    for _ in range(steps):
        s = rt.step(rng.integers(0, 2, rt.batch_size))
        out += [s.frames, s.log_likelihood, s.features, s.rewards]
    return out


def test_seeded_rollouts_reproduce_bit_for_bit(tiny):
    a = rollout(WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2), 12, seed=7)
    b = rollout(WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2), 12, seed=7)
    c = rollout(WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2), 12, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c)), "another seed gave the same rollout"


def test_step_without_frames_skips_only_the_pixels(tiny):
    """step(frames=False) returns no frames; newest_frames() gives the ones step would have returned, and
    the rollout (likelihood, features, heads, later frames) is the same as with frames, bit for bit."""
    frames, actions = context(2, 3)
    full = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, seed=5)
    lazy = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, seed=5)
    full.reset(frames, actions)
    lazy.reset(frames, actions)
    for t in range(18):  # past the bounded window (16 frames), so a re-encode happens in between
        act = np.array([t % 2, 1])
        a, b = full.step(act), lazy.step(act, frames=t % 3 == 0)
        for name in ("log_likelihood", "features", "rewards", "termination_prob", "jacobi_iterations"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        if t % 3:
            assert b.frames is None
        else:
            np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(lazy.newest_frames(), a.frames)
    assert full.reencodes == lazy.reencodes >= 1
    with pytest.raises(RuntimeError, match="before reset"):
        WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=1).newest_frames()


def test_long_rollout_has_flat_memory_and_no_nan(tiny):
    rt = WorldRuntime.from_checkpoint(tiny["micro"], batch_size=1, context_window=4, reencode_keep=2, seed=0)
    frames, actions = context(1, 2)  # 16x16, area-resized to the model's 8x8
    rt.reset(frames, actions)
    sizes = set()
    for t in range(2000):
        s = rt.step(np.array([t % 2]))
        assert rt.num_frames <= 4
        if t % 50 == 0:
            assert np.isfinite(s.log_likelihood).all() and np.isfinite(s.features).all()
            assert np.isfinite(s.rewards).all() and np.isfinite(s.termination_prob).all()
        sizes.add(rt.memory_bytes())
    assert len(sizes) == 1, f"state memory changed over the rollout: {sorted(sizes)}"
    assert rt.reencodes == 999  # 2 context frames, window 4, keep 2: a re-encode every second step from step 3


def test_per_row_reset_restarts_only_those_rows(tiny):
    rt = WorldRuntime.from_checkpoint(tiny["ckpt64"], batch_size=4, seed=0)
    frames, actions = context(4, 3)
    rt.reset(frames, actions)
    for t in range(3):
        rt.step(np.array([0, 1, 0, 1]))
    st = rt.state
    L = st.num_frames
    keep = [0, 2, 3]
    before = (st.cache.k[:, keep].clone(), st.cache.v[:, keep].clone(), st.history_x[keep, :L].clone())

    new_frames, new_actions = context(1, 2, seed=5)
    rt.seed(123)
    r = rt.reset(new_frames, new_actions, rows=[1])
    st = rt.state
    assert st.num_frames == L
    torch.testing.assert_close(st.cache.k[:, keep], before[0], rtol=0, atol=0)
    torch.testing.assert_close(st.cache.v[:, keep], before[1], rtol=0, atol=0)
    torch.testing.assert_close(st.history_x[keep, :L], before[2], rtol=0, atol=0)
    assert st.history_mask[1].sum() == 2 and not st.history_mask[1, : L - 2].any()

    # the restarted row's context likelihood equals a fresh world's on the same (noised) context
    fresh = WorldRuntime.from_checkpoint(tiny["ckpt64"], batch_size=1)
    fresh.seed(123)
    f = fresh.reset(new_frames, new_actions)
    np.testing.assert_allclose(r.log_likelihood, f.log_likelihood, rtol=0, atol=1e-5)
    np.testing.assert_allclose(r.features, f.features, rtol=0, atol=1e-6)

    # every row keeps running afterwards
    s = rt.step(np.array([1, 1, 0, 0]))
    assert np.isfinite(s.log_likelihood).all()


def test_per_row_reset_with_longer_context_than_history(tiny):
    rt = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=3, seed=0)
    frames, actions = context(3, 1)
    rt.reset(frames, np.zeros((3, 0), np.int64))  # image-to-world: one frame each
    long_frames, long_actions = context(1, 4, seed=3)
    r = rt.reset(long_frames, long_actions, rows=np.array([False, True, False]))
    assert r.log_likelihood.shape == (1, 4) and rt.num_frames == 4
    assert rt.state.history_mask[[0, 2]].sum(1).tolist() == [1, 1]
    s = rt.step(np.array([0, 1, 0]))
    assert np.isfinite(s.log_likelihood).all()


def test_observe_appends_real_frames_within_the_window(tiny):
    rt = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, context_window=4, seed=0)
    frames, _ = context(2, 12)
    rt.reset(frames[:, :1], np.zeros((2, 0), np.int64))
    for t in range(1, 12):
        o = rt.observe(frames[:, t], np.array([0, 1]))
        assert rt.num_frames <= 4
        np.testing.assert_array_equal(o.frames, frames[:, t])
        assert o.features.shape == (2, 64) and np.isfinite(o.log_likelihood).all()


def test_sequential_sampler_runs_one_pass_per_token(tiny):
    rt = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, sampler={"method": "sequential"}, seed=0)
    frames, actions = context(2, 2)
    rt.reset(frames, actions)
    s = rt.step(np.array([0, 1]))
    assert (s.jacobi_iterations == 16).all()  # 4x4 tokens, one pass each


def test_bad_inputs_raise_clear_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        WorldRuntime.from_checkpoint(tmp_path / "missing.pt")
    rt = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, seed=0)
    with pytest.raises(RuntimeError, match="before reset"):
        rt.step(np.array([0, 1]))
    frames, actions = context(2, 2)
    with pytest.raises(ValueError, match="context_frames must be uint8"):
        rt.reset(frames.astype(np.float32), actions)
    with pytest.raises(ValueError, match="context_actions must have shape"):
        rt.reset(frames, actions[:, :0])
    with pytest.raises(ValueError, match="smaller than the model"):
        rt.reset(frames[:, :, :8, :8], actions)
    with pytest.raises(ValueError, match="context_window"):
        rt.reset(*context(2, 9))
    rt.reset(frames, actions)
    with pytest.raises(ValueError, match="actions: action 2 is outside 0..1"):
        rt.step(np.array([0, 2]))
    with pytest.raises(ValueError, match=r"actions must have shape \(2,\)"):
        rt.step(np.array([0]))
    with pytest.raises(ValueError, match="rows must be distinct"):
        rt.reset(frames[:1], actions[:1], rows=[5])
    with pytest.raises(ValueError, match="sampler: unknown keys"):
        SamplerSettings.from_dict({"temprature": 1.0})

    # incompatible checkpoints: weights that do not fit the config, an action space the model lacks
    payload = load_checkpoint(tiny["ckpt"])
    payload["model_config"] = {**payload["model_config"], "deep_width": 128}
    save_checkpoint(tmp_path / "wide.pt", payload)
    with pytest.raises(CheckpointError, match="wide.pt"):
        WorldRuntime.from_checkpoint(tmp_path / "wide.pt")
    payload = load_checkpoint(tiny["ckpt"])
    payload["dataset"] = {**payload["dataset"], "action_space": '{"type": "Discrete", "dtype": "int64", "start": 0, "n": 6}'}
    save_checkpoint(tmp_path / "actions.pt", payload)
    with pytest.raises(CheckpointError, match="does not match the model's action embedding"):
        WorldRuntime.from_checkpoint(tmp_path / "actions.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        WorldRuntime.from_checkpoint(tmp_path / "garbage.pt")


def test_reset_rows_as_a_permutation_routes_each_context_to_its_row(tiny):
    frames, actions = context(3, 2)
    a = WorldRuntime.from_checkpoint(tiny["ckpt64"], batch_size=3, seed=4)
    b = WorldRuntime.from_checkpoint(tiny["ckpt64"], batch_size=3, seed=4)
    ra = a.reset(frames, actions)
    rb = b.reset(frames, actions, rows=[2, 0, 1])  # context i -> world rows[i]
    np.testing.assert_allclose(rb.log_likelihood, ra.log_likelihood, rtol=0, atol=1e-9)
    for i, row in enumerate([2, 0, 1]):
        torch.testing.assert_close(b.state.history_x[row], a.state.history_x[i], rtol=0, atol=0)


def test_integer_area_downsample_matches_the_datasets_resize():
    from sfv_world.datasets import area_resize

    from sfv_world.world import area_downsample

    x = np.random.default_rng(0).integers(0, 256, (3, 2, 64, 64, 3), dtype=np.uint8)
    for size in (32, 16, 8):
        np.testing.assert_array_equal(area_downsample(torch.from_numpy(x), size, size).numpy(), area_resize(x, size))


def test_the_runtime_imports_no_gymnasium_sb3_or_pygame(tiny):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from sfv_world.world import WorldRuntime\n"
        f"rt = WorldRuntime.from_checkpoint({str(tiny['ckpt'])!r}, batch_size=1, seed=0)\n"
        "rt.reset(np.zeros((1, 2, 32, 32, 3), np.uint8), np.zeros((1, 1), np.int64))\n"
        "rt.step(np.array([1]))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'gymnasium', 'stable_baselines3', 'pygame'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sampler_settings_carry_every_jacobi_key():
    s = SamplerSettings.from_dict({"criterion": "mean", "block_size_first": 1, "method": "jacobi"})
    assert s.jacobi.criterion == "mean" and s.jacobi.block_size_first == 1
    with pytest.raises(ValueError, match="criterion"):
        SamplerSettings.from_dict({"criterion": "median"})


def test_sampler_denoise_auto_follows_the_temperature():
    from sfv_world.world import SamplerSettings

    assert SamplerSettings.from_dict({"temperature": 0.0}).denoise is False  # the default is "auto"
    assert SamplerSettings.from_dict({"temperature": 0.7}).denoise is True
    assert SamplerSettings.from_dict({"temperature": 0.0, "denoise": True}).denoise is True
    assert SamplerSettings.from_dict({"temperature": 1.0, "denoise": False}).denoise is False
    with pytest.raises(ValueError, match="sampler.denoise must be true, false or 'auto'"):
        SamplerSettings.from_dict({"denoise": "sometimes"})


def test_quality_on_chosen_episodes(tiny, tmp_path):
    """``quality.episodes`` evaluates the given episodes instead of the checkpoint's (here empty) test split."""
    from sfv_world.apps.cli import compose
    from sfv_world.apps.quality import evaluate_quality

    def cfg(episodes):
        return compose(["preset=tiny", "device=cpu", f"checkpoint={tiny['ckpt']}", f"run_dir={tmp_path}",
                        f"quality.output={tmp_path / 'q.json'}", "quality.context=2", "quality.horizon=2",
                        "quality.max_windows=100", "quality.temperatures=[0]", f"quality.episodes={episodes}"])

    with pytest.raises(ValueError, match="split has no test episodes"):
        evaluate_quality(cfg("null"))
    one, two = evaluate_quality(cfg("[4]")), evaluate_quality(cfg("[1,4]"))
    assert one["test_episodes"] == 1 and two["test_episodes"] == 2
    assert one["windows"] == 12 + 1 - 4 + 1 and two["windows"] == 2 * one["windows"]  # 13 frames, 4 per window
    with pytest.raises(ValueError, match=r"quality.episodes: .* has no episode \[9\]"):
        evaluate_quality(cfg("[1,9]"))


def test_frames_outside_the_data_range_are_clamped_and_teacher_forced(tiny):
    """sampler.bound_sigmas: a row whose inverted frame leaves [-1 - k sigma, 1 + k sigma] commits the clamped
    frame by teacher forcing: its likelihood and features are what a forward pass over its history gives, the
    next frame follows from it, and the other rows are bit for bit those of an unbounded run."""
    frames, actions = context(4, 2)
    act = np.array([0, 1, 0, 1])
    exact = {"method": "sequential"}  # exact inversion: the forward pass over the history must agree
    free = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=4, seed=3, sampler={**exact, "bound_sigmas": 0})
    assert free.frame_bound is None
    free.reset(frames, actions)
    a = free.step(act)
    peak = free.state.history_x[:, free.num_frames - 1].flatten(1).abs().amax(1).numpy()
    cut = float(np.sort(peak)[1:3].mean())  # two rows above the bound, two below
    sigma = float(free.config.sigma)
    bounded = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=4, seed=3,
                                           sampler={**exact, "bound_sigmas": (cut - 1) / sigma})
    assert bounded.frame_bound == pytest.approx(cut)
    bounded.reset(frames, actions)
    b = bounded.step(act)
    out = peak > cut
    assert out.sum() == 2 and out.dtype == np.bool_
    np.testing.assert_array_equal(b.out_of_range, out)
    np.testing.assert_array_equal(a.out_of_range, np.zeros(4, bool))
    np.testing.assert_array_equal(a.frame_peak, peak)  # before the clamp, in both runs
    np.testing.assert_array_equal(b.frame_peak, peak)
    for name in ("frames", "log_likelihood", "features", "rewards", "termination_logit"):
        np.testing.assert_array_equal(getattr(b, name)[~out], getattr(a, name)[~out])
    assert not np.array_equal(b.features[out], a.features[out])
    st = bounded.state
    newest = st.history_x[:, st.num_frames - 1]
    assert float(newest.abs().max()) <= cut
    for _ in range(2):  # the clamped frames carry on: later frames follow from them
        b = bounded.step(act)
    n = st.num_frames
    enc, ref = bounded.flow.encode_context(st.history_x[:, :n], st.history_a[:, :n - 1], st.history_mask[:, :n],
                                           capacity=bounded.context_window)
    np.testing.assert_allclose(bounded._bits(ref.nll[:, -1]), b.log_likelihood, atol=1e-4)
    np.testing.assert_allclose(ref.features[:, -1].numpy(), b.features, atol=1e-4)
    np.testing.assert_allclose(enc.prev_tokens.numpy(), st.prev_tokens.numpy(), atol=1e-4)


def test_sampler_bound_sigmas_is_checked():
    assert SamplerSettings.from_dict({}).bound_sigmas == 30.0
    for bad in (-1.0, True, "wide", float("inf")):
        with pytest.raises(ValueError, match="sampler.bound_sigmas must be a number >= 0"):
            SamplerSettings.from_dict({"bound_sigmas": bad})
