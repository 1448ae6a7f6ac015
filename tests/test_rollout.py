"""Offline rollouts: PSNR/SSIM on known inputs, an end-to-end replay writing every output, the
counterfactual identity (a real clip inverted to noise and regenerated under its own actions is the
clip again), free running from an image, and the error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dream_fixtures import make_tiny_checkpoint, make_tiny_dataset
from policy_fixtures import save_tiny_policy

from sfv_world import rollout as R


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    ds = make_tiny_dataset(root / "ds", episodes=6, length=12)
    return {"root": root, "dataset": ds, "ckpt": make_tiny_checkpoint(root / "ckpt.pt", ds),
}


# ----------------------------------------------------------------------------------------------
# metrics on known inputs


def ssim_bruteforce(x: np.ndarray, y: np.ndarray, sigma: float = 1.5) -> float:
    """Per-window loops over a 2-D Gaussian kernel: the definition, for one [H, W, C] pair."""
    g = R.gaussian_window(sigma)
    n = g.size
    if n > min(x.shape[:2]):
        g = R.gaussian_window(sigma, radius=(min(x.shape[:2]) - 1) // 2)
        n = g.size
    k = np.outer(g, g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for c in range(x.shape[2]):
        a, b = x[..., c].astype(float), y[..., c].astype(float)
        for i in range(a.shape[0] - n + 1):
            for j in range(a.shape[1] - n + 1):
                pa, pb = a[i : i + n, j : j + n], b[i : i + n, j : j + n]
                ma, mb = (k * pa).sum(), (k * pb).sum()
                va, vb = (k * (pa - ma) ** 2).sum(), (k * (pb - mb) ** 2).sum()
                cov = (k * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 20, 18, 3), dtype=np.uint8)
    np.testing.assert_allclose(R.ssim(x, x), 1.0)
    # constant images: the structure term is 1, SSIM is the luminance term
    a, b = np.full((16, 16, 1), 100, np.uint8), np.full((16, 16, 1), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert R.ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-12)
    # a photographic negative of a zero-mean-contrast pattern is anti-correlated
    assert R.ssim(x[0], 255 - x[0]) < -0.5
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    got = R.ssim(y, x)
    assert got.shape == (2,) and np.all((0 < got) & (got < 1))
    for i in range(2):
        assert got[i] == pytest.approx(ssim_bruteforce(y[i], x[i]), rel=1e-10)
    small = x[0, :8, :8]  # smaller than the 11-tap window: the window shrinks
    assert R.ssim(np.ascontiguousarray(small), np.ascontiguousarray(255 - small)) == pytest.approx(
        ssim_bruteforce(small, 255 - small), rel=1e-10)
    with pytest.raises(ValueError, match="ssim: shapes differ"):
        R.ssim(x[0], x[1, :10])


def test_psnr_known_values():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # MSE = 255^2 / 48 -> PSNR = 10 log10(48)
    assert R.psnr(b, a) == pytest.approx(10 * np.log10(48))
    assert R.psnr(a, a) == 100.0


# ----------------------------------------------------------------------------------------------
# end to end


def compose(tiny, *overrides):
    from sfv_world.apps.cli import compose as hydra_compose

    return hydra_compose([f"checkpoint={tiny['ckpt']}", f"run_dir={tiny['root'] / 'run'}", "device=cpu", *overrides])


def test_replay_end_to_end(tiny):
    """rollout.mode=replay on explicit episodes of different lengths writes every output, consistent with the arrays."""
    from sfv_world.datasets import DatasetReader

    from sfv_world.apps.rollout import run

    out = tiny["root"] / "replay"
    # start=6 leaves 7 frames per episode: k=3 context + 4 real steps of the horizon 6 -> 2 masked steps
    run(compose(tiny, f"rollout.output={out}", "rollout.episode_ids=[0,1,2]", "rollout.context=3",
                          "rollout.horizon=6", "rollout.start=6", "rollout.videos=2"))
    s = json.loads((out / "summary.json").read_text())
    assert s["episodes"] == 3 and s["horizon"] == 6 and s["per_step"]["episodes_running"] == [3, 3, 3, 3, 0, 0]
    ps = s["per_step"]
    for key in ("psnr_dream", "ssim_dream", "psnr_copy_last", "nll_real_teacher_forced_bpd", "nll_generated_bpd",
                "nll_copy_last_bpd", "termination_agreement_dream", "reward_abs_error_dream", "jacobi_iterations"):
        assert len(ps[key]) == 6 and all(np.isfinite(v) for v in ps[key][:4]) and ps[key][4:] == [None, None], key
    # the copy-last baseline is exact where the square does not move; SSIM stays in [-1, 1]
    assert all(-1 <= v <= 1 for v in ps["ssim_dream"][:4] + ps["ssim_copy_last"][:4])
    assert s["frames_compared"] == 12 and s["split"] == "explicit"
    # all logged rewards are 1 and the last transition terminates: copy-last never does
    assert ps["reward_abs_error_copy_last"][:4] == [0.0] * 4
    assert ps["termination_agreement_copy_last"][:4] == [1.0, 1.0, 1.0, 0.0]
    assert (out / "summary.md").read_text().count("\n| ") == 6 + 1
    for name in ("psnr", "ssim", "nll", "reward", "termination", "jacobi"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000
    assert len(list((out / "videos").glob("episode_*"))) == 2
    # the generated dataset: context + the dream up to each real episode's end, in the dataset format
    with DatasetReader(out / "generated") as gen, DatasetReader(tiny["dataset"]) as src:
        assert gen.episode_ids == [0, 1, 2] and gen.frame_shape == (16, 16, 3)
        for i, eid in enumerate([0, 1, 2]):
            ep, real = gen.load_episode(i), src.load_episode(eid)
            assert len(ep) <= 2 + 4
            np.testing.assert_array_equal(ep.observations[:3], real.observations[6:9])  # the context
            np.testing.assert_array_equal(ep.actions, real.actions[6 : 6 + len(ep)])  # the logged actions
            assert ep.terminations[-1] or ep.truncations[-1]


def test_replay_metrics_match_arrays(tiny):
    """summarize_replay's per-step numbers are the masked means of the returned per-frame arrays."""
    from sfv_world.world import WorldRuntime

    batch, skipped = R.load_replay_batch(tiny["dataset"], [0, 3, 4], 2, 5, 16)
    assert skipped == [] and batch.frames.shape == (3, 7, 16, 16, 3) and batch.valid.all()
    rt = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=3, seed=0)
    r = R.replay_open_loop(rt, batch, seed=3)
    s = R.summarize_replay(r)
    np.testing.assert_allclose(s["per_step"]["ssim_dream"], R.ssim(r.dream, r.real).mean(0), atol=1e-5)
    np.testing.assert_allclose(s["per_step"]["psnr_copy_last"],
                               R.psnr_from_mse(R.mse(np.broadcast_to(r.context[:, -1:], r.real.shape), r.real).mean(0)),
                               atol=1e-4)
    np.testing.assert_array_equal(r.real, batch.frames[:, 2:])
    # same seed, same dream; the teacher-forced NLL of real frames does not depend on the dream
    r2 = R.replay_open_loop(WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=3), batch, seed=3)
    np.testing.assert_array_equal(r.dream, r2.dream)
    np.testing.assert_allclose(r.nll_real, r2.nll_real, rtol=1e-5)
    # a window longer than the runtime's context window is teacher-forced frame by frame (observe):
    # the same likelihoods up to the augmentation noise
    r3 = R.replay_open_loop(WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=3, context_window=6), batch, seed=3)
    assert r3.nll_real.shape == r.nll_real.shape == (3, 5) and r3.nll_context.shape == (3, 2)
    assert abs(r3.nll_real.mean() - r.nll_real.mean()) < 0.1 and abs(r3.nll_copy.mean() - r.nll_copy.mean()) < 0.1
    with pytest.raises(ValueError, match="runtime.batch_size=1 != 3 episodes"):
        R.replay_open_loop(WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=1), batch)
    with pytest.raises(ValueError, match="rollout.context=20"):
        R.load_replay_batch(tiny["dataset"], [0], 20, 5, 16)


# ----------------------------------------------------------------------------------------------
# counterfactuals


def test_counterfactual_identity_and_causality(tiny):
    """float64: inverting a real clip to z and regenerating it under the same actions gives x_tilde back
    (to 1e-9) and therefore the denoised real clip; altered actions from step s leave frames <= s alone."""
    from sfv_world.checkpoint import load_world_model

    model, _ = load_world_model(tiny["ckpt"])
    model = model.double()  # load_world_model builds float32 modules whatever the saved dtype
    batch, _ = R.load_replay_batch(tiny["dataset"], [1, 2], 1, 7, 16)  # 8 frames = the model's max_frames
    frames, actions = batch.frames, batch.actions
    step = 3
    altered = R.alter_actions(actions, step, "flip", "discrete", 2)
    assert (altered[:, :step] == actions[:, :step]).all() and (altered[:, step:] != actions[:, step:]).all()
    cf = R.counterfactual(model, frames, actions, altered, step, seed=0)
    assert cf.reconstruction_error < 1e-9
    np.testing.assert_array_equal(cf.reconstruction, cf.denoised_real)
    # within the denoiser's tolerance of the real frames: what the denoiser makes of the noisy real clip
    err = np.abs(cf.reconstruction.astype(int) - frames).mean()
    assert err == pytest.approx(np.abs(cf.denoised_real.astype(int) - frames).mean())
    # causality: transition `step` leads into frame step+1; with the denoiser's one-frame look-ahead,
    # frames < step are unchanged and later frames differ
    np.testing.assert_array_equal(cf.counterfactual[:, :step], cf.reconstruction[:, :step])
    assert (cf.counterfactual[:, step + 1 :] != cf.reconstruction[:, step + 1 :]).any()
    z, x_tilde = R.invert_to_noise(model, frames, actions, torch.Generator().manual_seed(0))
    assert z.dtype == x_tilde.dtype == torch.float64 and z.shape == (2, 8, 16, 48)
    path = R.counterfactual_video(cf, tiny["root"] / "cf" / "cf.mp4")
    assert path.exists() and path.stat().st_size > 0
    with pytest.raises(ValueError, match="cf_actions must be"):
        R.alter_actions(actions, 1, "mirror", "discrete", 2)
    with pytest.raises(ValueError, match="rollout.cf_step=9"):
        R.alter_actions(actions, 9, "flip", "discrete", 2)
    with pytest.raises(ValueError, match="max_frames=8"):
        R.invert_to_noise(model, np.zeros((1, 9, 16, 16, 3), np.uint8), np.zeros((1, 8), np.int64))


def test_counterfactual_and_image_modes(tiny, tmp_path):
    from PIL import Image
    from sfv_world.datasets import DatasetReader

    from sfv_world.apps.rollout import run

    s = run(compose(tiny, "rollout.mode=counterfactual", f"rollout.output={tmp_path / 'cf'}", "rollout.cf_step=2"))
    assert s["episode"] == 5 and s["frames"] == 8  # the val split (the test split is empty)
    assert s["reconstruction_max_abs_error_model_units"] < 1e-4 and s["reconstruction_vs_denoised_real_max_abs_u8"] <= 1
    with DatasetReader(tmp_path / "cf" / "counterfactual") as reader:
        assert reader.num_episodes == 1 and reader.episode_lengths[0] == 7
    picture = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(picture)
    s = run(compose(tiny, "rollout.mode=image", f"rollout.image={picture}", "rollout.episodes=2",
                    "rollout.horizon=5", f"rollout.output={tmp_path / 'img'}"))
    assert s["worlds"] == 2 and len(s["log_likelihood_bpd_per_step"]) == 5 and len(s["videos"]) == 2
    with DatasetReader(tmp_path / "img" / "generated") as reader:
        ep = reader.load_episode(0)
        np.testing.assert_array_equal(ep.observations[0], R.load_image_frame(picture, 16))
    with pytest.raises(ValueError, match="rollout.mode=image needs rollout.image"):
        run(compose(tiny, "rollout.mode=image", f"rollout.output={tmp_path / 'x'}"))
    with pytest.raises(ValueError, match="rollout.mode must be one of"):
        run(compose(tiny, "rollout.mode=nope", f"rollout.output={tmp_path / 'y'}"))
    with pytest.raises(FileNotFoundError, match="rollout.dataset"):
        run(compose(tiny, f"rollout.dataset={tmp_path / 'none'}", f"rollout.output={tmp_path / 'z'}"))


def test_free_run_with_policy(tiny):
    """free_run hands every world its newest frame; a policy's actions are the ones replayed."""
    from sfv_world.world import WorldRuntime

    rt = WorldRuntime.from_checkpoint(tiny["ckpt"], batch_size=2, seed=0)
    seen = []

    def policy(frames, features):
        seen.append(frames.copy())
        return (frames.reshape(2, -1).mean(1) > 60).astype(np.int64)

    ctx = np.random.default_rng(0).integers(0, 255, (2, 2, 16, 16, 3), dtype=np.uint8)
    run = R.free_run(rt, ctx, np.zeros((2, 1), np.int64), 4, policy)
    assert run.frames.shape == (2, 6, 16, 16, 3) and run.actions.shape == (2, 5)
    np.testing.assert_array_equal(seen[0], ctx[:, -1])
    np.testing.assert_array_equal(seen[2], run.frames[:, 3])
    np.testing.assert_array_equal(run.actions[:, 2], (run.frames[:, 2].reshape(2, -1).mean(1) > 60))
    eps = R.free_run_episodes(run)
    assert len(eps) == 2 and eps[0]["observations"].shape[0] == eps[0]["actions"].shape[0] + 1


def test_free_mode_with_saved_policy(tiny, tmp_path):
    """`sfv-world rollout <ckpt> rollout.mode=free rollout.policy=<zip>`: the saved policy (2 stacked
    frames) picks every action, from the same stacked observations the dream env would give it."""
    from sfv_world.datasets import DatasetReader
    from stable_baselines3 import PPO

    from sfv_world.apps.cli import main
    from sfv_world.apps.policy_io import WorldPolicy

    zip_path = save_tiny_policy(tiny["ckpt"], tmp_path / "pi.zip", frame_stack=2)
    pol = WorldPolicy(zip_path, (16, 16, 3), {"mean": 64})
    assert (pol.obs_mode, pol.frame_stack) == ("pixels", 2)
    ctx = np.random.default_rng(0).integers(0, 255, (2, 3, 16, 16, 3), dtype=np.uint8)
    pol.reset(ctx)
    obs = pol.observation(ctx[:, -1], None)
    np.testing.assert_array_equal(obs, np.concatenate([ctx[:, 1], ctx[:, 2]], -1))
    new = ctx[:, 0]
    np.testing.assert_array_equal(pol.observation(new, None), np.concatenate([ctx[:, 2], new], -1))

    out = tmp_path / "free"
    assert main(["rollout", str(tiny["ckpt"]), f"run_dir={tmp_path}", "device=cpu", "rollout.mode=free",
                 f"rollout.policy={zip_path}", "rollout.episodes=2", "rollout.horizon=4", "rollout.context=3",
                 f"rollout.output={out}"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["policy"] == str(zip_path) and s["worlds"] == 2
    model = PPO.load(zip_path, device="cpu")
    with DatasetReader(out / "generated") as reader:
        ep = reader.load_episode(0)
    # replay the policy on the recorded frames: it chose each recorded action
    frames = ep.observations
    for t in range(2, len(ep)):
        o = np.concatenate([frames[t - 1], frames[t]], -1)
        assert ep.actions[t] == int(model.predict(o, deterministic=True)[0]), t


def test_write_video_gif_fallback_and_errors(tmp_path, monkeypatch):
    """Without an mp4 encoder a .mp4 request writes a GIF (every frame kept); bad input names the file."""
    import imageio.v3 as iio

    from sfv_world import video

    frames = np.random.default_rng(0).integers(0, 255, (5, 6, 7, 3), dtype=np.uint8)
    monkeypatch.setattr(video, "mp4_available", lambda: False)
    path = video.write_video(frames, tmp_path / "v.mp4", fps=5, scale=2)
    assert path.suffix == ".gif"
    back = iio.imread(path)
    assert back.shape[:3] == (5, 12, 14)
    gray = video.write_video(frames[..., :1], tmp_path / "g.gif")
    assert iio.imread(gray).shape[:3] == (5, 6, 7)
    strip = video.side_by_side(frames, frames, video.difference(frames, frames))
    assert strip.shape == (5, 6, 3 * 7 + 2, 3) and (strip[:, :, 7] == 255).all() and (strip[:, :, 15] == 255).all() and (strip[:, :, 16:] == 0).all()
    with pytest.raises(ValueError, match="bad.mp4.*uint8"):
        video.write_video(frames.astype(np.float32), tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="must end in .mp4 or .gif"):
        video.write_video(frames, tmp_path / "x.avi")


def test_rollout_library_imports_no_ui_or_rl():
    """DESIGN.md layering: the rollout library and the video writer import neither pygame nor SB3."""
    import subprocess
    import sys

    code = ("import sys, sfv_world.rollout, sfv_world.video; "
            "print(sorted(m for m in ('pygame', 'stable_baselines3', 'sfv_world.envs', 'sfv_world.apps') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_write_video_mp4_when_encoder_installed(tmp_path):
    import imageio.v3 as iio

    from sfv_world import video

    if not video.mp4_available():
        pytest.skip("imageio-ffmpeg (the `video` extra) is not installed: .mp4 requests fall back to GIF, "
                    "tested in test_write_video_gif_fallback_and_errors")
    frames = np.random.default_rng(0).integers(0, 255, (9, 7, 5, 3), dtype=np.uint8)
    path = video.write_video(frames, tmp_path / "v.mp4", fps=8, scale=3)
    assert path.suffix == ".mp4"
    assert iio.imread(path, plugin="FFMPEG").shape == (9, 22, 16, 3)  # odd sizes padded to even for x264


def test_policy_input_reads_obs_mode_stack_and_latent_features_off_the_saved_space():
    """A saved policy's observation space says what it sees: stacked frames (HWC or CHW), the slot-mean
    features [D] or every slot [F * D]; anything else is refused with both expectations named."""
    from types import SimpleNamespace

    import gymnasium as gym

    from sfv_world.apps.policy_io import policy_input

    dims = {"mean": 64, "slots": 16 * 64}

    def saved(shape, dtype=np.float32):
        return SimpleNamespace(observation_space=gym.spaces.Box(0, 1, shape, dtype))

    assert policy_input(saved((64,)), (16, 16, 3), dims) == ("latent", 1, "mean")
    assert policy_input(saved((1024,)), (16, 16, 3), dims) == ("latent", 1, "slots")
    assert policy_input(saved((16, 16, 6), np.uint8), (16, 16, 3), dims) == ("pixels", 2, "mean")
    assert policy_input(saved((9, 16, 16), np.uint8), (16, 16, 3), dims) == ("pixels", 3, "mean")
    with pytest.raises(ValueError, match=r"nor its features \(64,\) \(mean\) or \(1024,\) \(slots\)"):
        policy_input(saved((100,)), (16, 16, 3), dims)
