"""Likelihood OOD flags: metrics on hand-computed cases, code lengths, perturbation generators, the
action-exclusion filter, the calibration round trip through a checkpoint, the dream's info keys, and the
truncation wrappers (gymnasium and SB3: truncation, not termination, with SB3 bootstrapping)."""

from __future__ import annotations

import numpy as np
import pytest
from dream_fixtures import make_tiny_checkpoint, make_tiny_dataset

from sfv_world import ood as O
from sfv_world.checkpoint import load_checkpoint, save_checkpoint

SMALL = {"segment_len": 6, "min_context": 2, "noise_draws": 1, "max_segments": 8, "window": 2, "batch_size": 8,
         "env_score": "nll", "fpr": 0.1}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny random-init checkpoint (episodes end by truncation only), calibrated."""
    root = tmp_path_factory.mktemp("ood")
    ds = make_tiny_dataset(root / "ds", episodes=6, length=12)
    ck = make_tiny_checkpoint(root / "c.pt", ds, termination_bias=-20.0)
    payload = load_checkpoint(ck)
    ids = list(payload["dataset"]["splits"]["train"]) + list(payload["dataset"]["splits"]["val"])
    payload["dataset"]["splits"] = {"train": ids[:3], "val": ids[3:5], "test": ids[5:]}
    save_checkpoint(ck, payload)
    entry = O.calibrate_checkpoint(ck, SMALL)
    return {"ckpt": ck, "dataset": ds, "entry": entry, "root": root}


# -- metrics -----------------------------------------------------------------------------------------


def test_auroc_aupr_fpr95_on_a_hand_computed_case():
    neg = [0.1, 0.4, 0.35, 0.8]
    pos = [0.9, 0.35, 0.7]
    # pairs (pos > neg): 0.9 beats 4, 0.7 beats 3, 0.35 beats 1 and ties 1 -> 8.5 of 12
    assert O.auroc(neg, pos) == pytest.approx(8.5 / 12)
    # thresholds 0.9 (P=1, R=1/3), 0.7 (P=2/3, R=2/3), 0.35 (P=3/6, R=1)
    assert O.aupr(neg, pos) == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 0.5)
    # 95% TPR needs all 3 positives -> threshold 0.35 -> negatives 0.4, 0.35, 0.8 flagged
    assert O.fpr_at_tpr(neg, pos, 0.95) == pytest.approx(0.75)
    fpr, tpr, thr = O.roc_curve(neg, pos)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(thr) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(O.auroc(neg, pos))


def test_metrics_extremes_and_errors():
    assert O.auroc([0, 1], [2, 3]) == 1.0 and O.auroc([2, 3], [0, 1]) == 0.0
    assert O.auroc([1, 1], [1, 1]) == 0.5
    assert O.aupr([0, 1], [2, 3]) == 1.0 and O.fpr_at_tpr([0, 1], [2, 3]) == 0.0
    with pytest.raises(ValueError, match="at least one negative"):
        O.auroc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        O.auroc([np.nan], [1.0])


def test_detection_delay_and_windowed_mean():
    flags = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]], bool)
    delay, detected = O.detection_delay(flags, 1)
    assert delay.tolist() == [1, -1, 2] and detected.tolist() == [True, False, True]
    w = O.windowed_mean(np.arange(6.0), 3, np.array([0, 1, 1, 1, 1, 1], bool))
    assert np.isnan(w[0]) and w[1:].tolist() == [1.0, 1.5, 2.0, 3.0, 4.0]


def test_score_thresholds_hit_the_calibrated_rate():
    rng = np.random.default_rng(0)
    s = {"x": rng.normal(size=(200, 10))}
    thr = O.score_thresholds(s, np.arange(10), 2, 0.05)["x"]
    assert thr["count"] == 1600
    assert np.mean(s["x"][:, 2:] > thr["threshold"]) == pytest.approx(0.05, abs=0.002)


def test_code_lengths():
    rng = np.random.default_rng(0)
    flat = np.full((1, 2, 16, 16, 3), 77, np.uint8)
    noisy = rng.integers(0, 256, (1, 2, 16, 16, 3), dtype=np.uint8)
    own, diff = O.code_lengths(np.concatenate([flat, noisy]))
    assert own[0, 0] < 1.0 and own[1, 0] > 7.0
    assert diff[0, 1] < 1.0 and diff[0, 0] == own[0, 0]
    with pytest.raises(ValueError, match="uint8"):
        O.zlib_bits_per_dim(np.zeros((4, 4, 3), np.float32))


# -- perturbations ---------------------------------------------------------------------------------


def _frames(n=3, t=6, h=16):
    rng = np.random.default_rng(1)
    return rng.integers(40, 200, (n, t, h, h, 3), dtype=np.uint8)


def test_noise_perturbation():
    f = np.full((4, 6, 16, 16, 3), 128, np.uint8)
    out = O.perturb_noise(f, 3, 12.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out[:, :3], f[:, :3])
    d = out[:, 3:].astype(float) - 128
    assert d.std() == pytest.approx(12.0, rel=0.05) and abs(d.mean()) < 0.5
    with pytest.raises(ValueError, match="std"):
        O.perturb_noise(f, 3, 0.0, np.random.default_rng(0))


def test_occlusion_colour_flip_freeze_splice():
    f = _frames()
    rng = np.random.default_rng(0)
    occ = O.perturb_occlude(f, 2, 0.25, rng)
    np.testing.assert_array_equal(occ[:, :2], f[:, :2])
    grey = np.all(occ[:, 2:] == 128, axis=-1)  # [N, T-2, H, W]
    assert np.all(grey.sum((2, 3)) >= 16) and np.all(grey[:, 0] == grey[:, -1])  # 4x4 patch, fixed in time
    col = O.perturb_colour(f, 2, 30)
    np.testing.assert_array_equal(col[:, 2:, ..., 0], f[:, 2:, ..., 0] - 30)
    np.testing.assert_array_equal(col[:, 2:, ..., 1], f[:, 2:, ..., 1])
    np.testing.assert_array_equal(col[:, 2:, ..., 2], np.minimum(f[:, 2:, ..., 2].astype(int) + 30, 255))
    flip = O.perturb_flip(f, 2)
    np.testing.assert_array_equal(flip[:, 2:], f[:, 2:, :, ::-1])
    np.testing.assert_array_equal(O.perturb_flip(flip, 2), f)
    fr = O.perturb_freeze(f, 2)
    assert all(np.array_equal(fr[:, t], f[:, 1]) for t in range(2, 6))
    with pytest.raises(ValueError, match="onset >= 1"):
        O.perturb_freeze(f, 0)
    other = np.zeros((2, 4, 16, 16, 3), np.uint8)
    sp = O.splice(f, 2, other)
    np.testing.assert_array_equal(sp[:, :2], f[:, :2])
    assert not sp[:, 2:].any()
    with pytest.raises(ValueError, match="splice"):
        O.splice(f, 2, other[:, :3])
    allp = O.perturbations(f, 2, noise_levels=(4, 12, 32), patch_frac=0.25, colour_shift=48)
    assert set(allp) == {"noise_4", "noise_12", "noise_32", "occlude", "colour_shift", "hflip", "freeze"}
    for v in allp.values():
        assert v.shape == f.shape and v.dtype == np.uint8 and np.array_equal(v[:, :2], f[:, :2])
        assert not np.array_equal(v[:, 2:], f[:, 2:])


# -- action exclusion --------------------------------------------------------------------------------


def test_exclude_action_windows(calibrated):
    from sfv_world.datasets import ClipDataset
    from sfv_world.datasets.filters import exclude_action_windows

    clips = ClipDataset(calibrated["dataset"], None, clip_len=3, pad_start=True)
    n = len(clips)
    removed = exclude_action_windows(clips, [1])
    assert 0 < removed < n and len(clips) == n - removed
    for i in range(len(clips)):
        item = clips[i]
        real = item["mask"][1:].numpy()  # a transition is real when the frame it leads to is
        assert not np.any(item["actions"].numpy()[real] == 1)
    with pytest.raises(ValueError, match="not actions of"):
        exclude_action_windows(ClipDataset(calibrated["dataset"], None, clip_len=3), [5])
    with pytest.raises(ValueError, match="every one of"):
        exclude_action_windows(ClipDataset(calibrated["dataset"], None, clip_len=12), [0, 1])


# -- calibration round trip ---------------------------------------------------------------------------


def test_calibration_round_trip_through_the_checkpoint(calibrated):
    from sfv_world.world import WorldRuntime

    ck, entry = calibrated["ckpt"], calibrated["entry"]
    payload = load_checkpoint(ck)
    stored = O.calibration_entry(payload["calibration"])
    assert stored["env_id"] == entry["env_id"] == "TinySquare-v0"
    assert stored["scores"] == entry["scores"] and stored["bands"] == entry["bands"]
    P = payload["model_config"]["max_frames"]
    for band in ("real", "imagined"):
        b = stored["bands"][band]
        assert len(b["count"]) == P and len(b["quantiles"]) == P
        for q in b["quantiles"]:
            assert q is None or np.all(np.diff(q) >= 0)
    assert len(stored["bands"]["context"]["count"]) == P
    assert set(stored["scores"]["context"]) == {"typicality"}
    assert set(stored["scores"]["real"]) == set(O.SCORES)
    assert "action_ratio" not in stored["scores"]["imagined"]
    assert stored["bands"]["imagined"]["count"][0] == 0 and stored["bands"]["imagined"]["count"][2] > 0
    # a second environment's entry is kept when this one is rewritten
    other = {**entry, "env_id": "Other-v0"}
    O.write_calibration(ck, other)
    O.write_calibration(ck, entry)
    envs = load_checkpoint(ck)["calibration"]["envs"]
    assert set(envs) == {"TinySquare-v0", "Other-v0"}
    with pytest.raises(ValueError, match="several envs"):
        O.calibration_entry(load_checkpoint(ck)["calibration"])
    rt = WorldRuntime.from_checkpoint(ck, batch_size=2)
    mon = O.OODMonitor.from_runtime(rt, 2)
    assert mon.calibrated and mon.score == "nll"
    assert mon.threshold == pytest.approx(entry["scores"]["imagined"]["nll"]["threshold"])
    # window in the env: the running mean of the last `window` signed z values (imagined band) of each world
    win_mon = O.OODMonitor.from_runtime(rt, 2, score="window")
    rng = np.random.default_rng(0)
    h, w = rt.model.config.frame_size, rt.model.config.frame_size
    win_mon.reset_rows(np.arange(2), -np.ones((2, 3)), rng.integers(0, 256, (2, 3, h, w, 3), dtype=np.uint8))
    zs = []
    for t in range(win_mon.window + 2):
        frames, ll = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8), -rng.uniform(1, 3, 2)
        pos = np.array([3 + t] * 2)
        zs.append(O.band_z(-ll, pos, entry["bands"]["imagined"]))
        got = win_mon.step(ll, frames, pos)["ood_score"]
        assert np.allclose(got, np.mean(zs[-win_mon.window:], axis=0), atol=1e-5)


def test_clean_scoring_is_deterministic_and_noise_draws_are_not(calibrated):
    """noise_draws=0 scores x_tilde = x: the flow's NLL of the clean frame, the same for every seed."""
    import torch

    from sfv_world.checkpoint import load_world_model

    model, payload = load_world_model(calibrated["ckpt"])
    segs = O.read_segments(calibrated["dataset"], payload["dataset"]["splits"]["val"], 6, model.config.frame_size,
                           4, [], 0)
    clean0, _ = O.teacher_forced_nll(model, segs.frames, segs.actions, noise_draws=0, seed=0, null=False)
    clean1, _ = O.teacher_forced_nll(model, segs.frames, segs.actions, noise_draws=0, seed=1, null=False)
    np.testing.assert_array_equal(clean0, clean1)
    x = torch.from_numpy(segs.frames).movedim(-1, -3).float() / 127.5 - 1.0
    with torch.no_grad():
        direct = model.flow(x, torch.as_tensor(segs.actions).long(), heads=False).nll.double()
    np.testing.assert_allclose(clean0, (direct / (np.log(2.0) * model.config.frame_dims)).numpy(), rtol=1e-5)
    noisy0, _ = O.teacher_forced_nll(model, segs.frames, segs.actions, noise_draws=1, seed=0, null=False)
    noisy1, _ = O.teacher_forced_nll(model, segs.frames, segs.actions, noise_draws=1, seed=1, null=False)
    assert not np.allclose(noisy0, noisy1) and not np.allclose(noisy0, clean0)
    with pytest.raises(ValueError, match="noise_draws must be >= 0"):
        O.teacher_forced_nll(model, segs.frames, segs.actions, noise_draws=-1)
    with pytest.raises(ValueError, match="noise_draws must be >= 0"):
        O.CalibrationSettings.from_dict({"noise_draws": -1})
    assert O.CalibrationSettings().noise_draws == 0


def test_monitor_scores_reset_contexts_against_the_context_band(calibrated):
    """Reset contexts come from the runtime's noisy pass: the monitor uses the "context" band and
    threshold, and falls back to the real ones for calibrations written before the context band."""
    entry = calibrated["entry"]
    mon = O.OODMonitor(entry, 1)
    assert mon.context_band is entry["bands"]["context"]
    assert mon.context_threshold == pytest.approx(entry["scores"]["context"]["typicality"]["threshold"])
    ctx = np.zeros((1, 3, 4, 4, 3), np.uint8)
    band = entry["bands"]["context"]
    med = [m if m is not None else 0.0 for m in band["median"][:3]]
    typical = mon.reset_rows(np.arange(1), -np.array([med]), ctx)  # exactly the per-position medians
    assert typical["ood_score"][0] == pytest.approx(0.0, abs=1e-6) and not typical["ood"][0]
    far = mon.reset_rows(np.arange(1), -np.array([med]) - 1e3, ctx)
    assert far["ood"][0]
    old = {**entry, "bands": {k: v for k, v in entry["bands"].items() if k != "context"},
           "scores": {k: v for k, v in entry["scores"].items() if k != "context"}}
    old_mon = O.OODMonitor(old, 1)
    assert old_mon.context_band is entry["bands"]["real"]
    assert old_mon.context_threshold == pytest.approx(entry["scores"]["real"]["typicality"]["threshold"])


def test_only_complexity_scores_need_the_step_frames(calibrated):
    """A latent env may step without frames (lazy decoding) unless its calibrated score reads pixels."""
    entry = calibrated["entry"]
    frames, pos = np.zeros((1, 4, 4, 3), np.uint8), np.array([3])
    for score in ("nll", "typicality", "window", "complexity", "complexity_diff"):
        mon = O.OODMonitor(entry, 1, score=score)
        assert mon.needs_frames == score.startswith("complexity")
        if mon.needs_frames:
            with pytest.raises(ValueError, match="needs the step's frames"):
                mon.step(-np.ones(1), None, pos)
        else:
            assert mon.step(-np.ones(1), None, pos)["ood_score"].shape == (1,)
        assert mon.step(-np.ones(1), frames, pos)["ood_score"].shape == (1,)
    assert not O.OODMonitor(None, 1, score="complexity").needs_frames  # uncalibrated: the raw NLL


def test_uncalibrated_monitor_and_bad_score():
    mon = O.OODMonitor(None, 2)
    r = mon.reset_rows(np.arange(2), -np.ones((2, 3)), np.zeros((2, 3, 4, 4, 3), np.uint8))
    assert r["ood"].tolist() == [False, False] and np.allclose(r["ood_score"], 1.0)
    s = mon.step(-2 * np.ones(2), np.zeros((2, 4, 4, 3), np.uint8), np.array([3, 3]))
    assert np.allclose(s["ood_score"], 2.0) and not s["ood"].any()
    with pytest.raises(ValueError, match="action_ratio"):
        O.OODMonitor(None, 2, score="action_ratio")


# -- the dream env and the truncation wrappers ----------------------------------------------------


def test_dream_env_reports_ood_every_step(calibrated):
    from sfv_world.envs.dream import DreamEnv
    from sfv_world.envs.ood import OODTruncation

    env = DreamEnv(checkpoint=calibrated["ckpt"], context_frames=2, horizon=20, ood_score="typicality")
    _, info = env.reset(seed=0)
    assert np.isfinite(info["ood_score"]) and isinstance(bool(info["ood"]), bool)
    for a in (0, 1, 0):
        _, _, term, trunc, info = env.step(a)
        assert np.isfinite(info["ood_score"]) and isinstance(info["ood"], bool)
    env.core.ood.threshold = -np.inf  # every imagined step flags
    w = OODTruncation(env)
    w.reset(seed=1)
    _, _, term, trunc, info = w.step(1)
    assert trunc and not term and info["ood"] and info["ood_truncated"] and w.truncations == 1
    env.core.ood.threshold = np.inf
    w.reset(seed=2)
    _, _, term, trunc, info = w.step(1)
    assert not trunc and not info["ood_truncated"]


def test_sb3_truncation_wrapper_truncates_and_sb3_bootstraps(calibrated):
    from sfv_world.envs.ood import OODTruncationVecEnv
    from sfv_world.envs.sb3 import DreamSB3VecEnv
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecEnvWrapper, VecMonitor

    venv = DreamSB3VecEnv(calibrated["ckpt"], num_envs=2, obs_mode="latent", horizon=50, context_frames=2)
    venv.seed(0)
    wrapped = OODTruncationVecEnv(venv, min_steps=2)
    wrapped.reset()
    venv.core.ood.threshold = -np.inf
    wrapped.step_async(np.array([0, 1]))
    _, _, dones, infos = wrapped.step_wait()  # step 1 < min_steps: not cut
    assert not dones.any() and not any(i["ood_truncated"] for i in infos) and all(i["ood"] for i in infos)
    before = venv.core.observations()
    wrapped.step_async(np.array([1, 0]))
    obs, _, dones, infos = wrapped.step_wait()
    assert dones.all() and wrapped.truncations == 2
    for i in range(2):
        assert infos[i]["TimeLimit.truncated"] is True and infos[i]["ood_truncated"]
        assert "terminal_observation" in infos[i] and not np.array_equal(infos[i]["terminal_observation"], obs[i])
        assert "ood_score" in venv.reset_infos[i]
    assert not np.array_equal(obs, before) and np.array_equal(obs, venv.core.observations())
    assert (venv.core.steps == 0).all()
    with pytest.raises(TypeError, match="DreamSB3VecEnv"):
        OODTruncationVecEnv(VecMonitor(venv))

    # SB3 bootstraps truncated steps: buffer reward = env reward + gamma * V(terminal_observation)
    class Record(VecEnvWrapper):
        def reset(self):
            self.rewards = []
            return self.venv.reset()

        def step_wait(self):
            obs, rew, dones, infos = self.venv.step_wait()
            self.rewards.append(rew.copy())
            return obs, rew, dones, infos

    wrapped = OODTruncationVecEnv(venv)
    rec = Record(wrapped)
    model = PPO("MlpPolicy", VecMonitor(rec), n_steps=4, batch_size=8, n_epochs=1, seed=0, device="cpu",
                policy_kwargs={"net_arch": [8]})
    model.learn(8)
    raw = np.stack(rec.rewards[-4:])  # the last rollout
    buffered = model.rollout_buffer.rewards
    assert buffered.shape == raw.shape
    assert not np.allclose(buffered, raw)  # every step was cut: every reward got gamma * V(s_T) added
    assert wrapped.truncations >= 8


def test_evaluate_ood_runs_every_case(calibrated, tmp_path):
    from sfv_world.apps.ood import evaluate_ood
    from sfv_world.checkpoint import load_world_model

    other = make_tiny_dataset(tmp_path / "other", episodes=2, length=12, seed=5)
    model, payload = load_world_model(calibrated["ckpt"])
    settings = O.CalibrationSettings.from_dict(SMALL)
    entry = calibrated["entry"]
    ocfg = {"noise_levels": [4, 12, 32], "patch_frac": 0.25, "colour_shift": 48, "splice_dataset": str(other),
            "drift_psnr": [30.0, 60.0]}
    res = evaluate_ood(model, payload, entry, ocfg, settings, progress=False)
    assert set(res["cases"]) == {"b_noise_4", "b_noise_12", "b_noise_32", "b_occlude",
                                 "b_colour_shift", "b_hflip", "b_freeze", "c_splice", "d_imagination_drift_psnr<30",
                                 "d_imagination_drift_psnr<60"}
    m = res["cases"]["b_noise_32"]["typicality"]
    assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["fpr95"] <= 1.0 and m["n_pos"] > 0 and m["n_neg"] > 0
    assert set(res["id_false_flag_rate"]) == set(O.SCORES)
    assert "gen:nll" in res["cases"]["d_imagination_drift_psnr<60"]
    assert res["drift"]["drifted_steps"]["60"] >= res["drift"]["drifted_steps"]["30"]
    only_d = evaluate_ood(model, payload, entry, {**ocfg, "cases": ["d"]}, settings, progress=False)
    assert set(only_d["cases"]) == {"d_imagination_drift_psnr<30", "d_imagination_drift_psnr<60"}
    with pytest.raises(ValueError, match="unknown cases"):
        evaluate_ood(model, payload, entry, {**ocfg, "cases": ["e"]}, settings, progress=False)


def test_held_out_action_picks(calibrated):
    from sfv_world.datasets import DatasetReader

    from sfv_world.apps.ood import held_out_action_picks

    picks = held_out_action_picks(calibrated["dataset"], [0, 1, 2], length=5, onset=3, exclude=[1])
    assert picks
    with DatasetReader(calibrated["dataset"]) as r:
        for e, s in picks:
            acts = r.load_episode(e, observations=False).actions
            assert acts[s + 2] == 1 and not np.any(acts[s:s + 2] == 1)  # action into frame 3 is the first 1
            assert s >= 0 and s + 5 <= r.episode_lengths[e] + 1


def test_agent_config_switch():
    from sfv_world.agents.imagination import AgentSettings

    assert AgentSettings.from_config({"ood_truncate": True}).ood_truncate is True
    assert AgentSettings.from_config({}).ood_truncate is False


def test_ood_command_writes_reports_and_merges_a_case_subset(calibrated, tmp_path):
    import json

    from sfv_world.apps.cli import compose
    from sfv_world.apps.ood import run

    out = tmp_path / "res" / "ood.json"
    common = [f"checkpoint={calibrated['ckpt']}", "device=cpu", f"run_dir={tmp_path / 'run'}", f"ood.output={out}",
              "ood.segment_len=6", "ood.min_context=2", "ood.noise_draws=1", "ood.max_segments=6", "ood.batch_size=8",
              "ood.calibrate=false", "ood.label=tiny", "ood.drift_psnr=[60]"]
    res = run(compose(common))
    assert res["label"] == "tiny" and "b_hflip" in res["evaluation"]["cases"]
    saved = json.loads(out.read_text())["runs"]["tiny"]
    assert "roc" not in saved["evaluation"] and "b_freeze" in saved["evaluation"]["cases"]
    assert (tmp_path / "run" / "report" / "ood.md").exists() and out.with_suffix(".md").exists()
    run(compose(common + ["ood.cases=[d]", "ood.drift_psnr=[50]"]))
    merged = json.loads(out.read_text())["runs"]["tiny"]["evaluation"]
    assert "b_freeze" in merged["cases"] and "d_imagination_drift" in merged["cases"]  # b kept, d re-run
    assert merged["drift"]["psnr_thresholds"] == [50.0] and saved["evaluation"]["drift"]["psnr_thresholds"] == [60.0]
