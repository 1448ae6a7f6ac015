"""Agents: SB3 learning inside a tiny dream, real-env evaluation with dream observations, the baseline."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest
from dream_fixtures import make_tiny_checkpoint
from sfv_world.agents.evaluation import (
    ObservationSpec,
    evaluate_real,
    make_real_pixel_env,
)
from sfv_world.agents.imagination import (
    AgentSettings,
    read_eval_csv,
    train_in_imagination,
)
from sfv_world.agents.policies import SmallCNN, policy_for

CARTPOLE = {"id": "CartPole-v1", "frame_source": "render", "kwargs": {}}


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    """A 6-episode random CartPole-pixels dataset at 32x32 and a random tiny 16x16 world model on it."""
    from sfv_world.datasets import RandomPolicy, collect
    from sfv_world.envs.sources import make_source_env

    root = tmp_path_factory.mktemp("agents")
    env = make_source_env(CARTPOLE)
    collect(env, root / "cartpole", RandomPolicy(env.action_space, seed=0), episodes=6, frame_size=32,
            progress=False)
    env.close()
    ckpt = make_tiny_checkpoint(root / "ckpt.pt", root / "cartpole", termination_bias=-3.0)
    return {"root": root, "dataset": root / "cartpole", "ckpt": ckpt}


def small(**kw) -> AgentSettings:
    base = dict(algo="ppo", obs_mode="pixels", n_envs=8, total_timesteps=256, horizon=16, frame_stack=2,
                eval_every=128, eval_episodes=2, algo_kwargs={"n_steps": 16, "batch_size": 64, "n_epochs": 2})
    base.update(kw)
    return AgentSettings(**base)


def test_ppo_learns_inside_the_dream_and_is_evaluated_in_the_real_env(cartpole, tmp_path):
    from stable_baselines3 import PPO

    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, small())
    assert result["dream_steps"] == 256
    assert np.isfinite(result["real_return_mean"]) and result["real_return_mean"] >= 8  # CartPole lasts >= 8 steps
    assert np.isfinite(result["imagined_return_mean"])
    assert (tmp_path / "policy.zip").is_file() and (tmp_path / "result.json").is_file()
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    rows = read_eval_csv(tmp_path / "eval.csv")
    np.testing.assert_array_equal(rows["timesteps"], [128, 256])
    assert np.isfinite(rows["real_return_mean"]).all()
    model = PPO.load(tmp_path / "policy.zip")
    assert isinstance(model.policy.features_extractor, SmallCNN)  # 16x16 frames: NatureCNN cannot read them
    # PPO really updated its networks (two rollouts of 8 envs x 16 steps, 2 epochs each)
    assert model.num_timesteps == 256 and model._n_updates > 0


def test_resume_after_interruption_continues_from_the_checkpoint(cartpole, tmp_path):
    train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, small(total_timesteps=128))
    (tmp_path / "result.json").unlink()  # as if the run had stopped after its last evaluation
    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, small(total_timesteps=256))
    assert result["dream_steps"] == 256
    np.testing.assert_array_equal(read_eval_csv(tmp_path / "eval.csv")["timesteps"], [128, 256])


def test_a2c_with_latent_observations(cartpole, tmp_path):
    """Latent policies standardize the features with stats measured on the dream, saved with the policy."""
    from sfv_world.agents.imagination import latent_feature_stats
    from sfv_world.agents.policies import StandardizedFeatures
    from sfv_world.envs.sb3 import DreamSB3VecEnv
    from stable_baselines3 import A2C

    settings = small(algo="a2c", obs_mode="latent", total_timesteps=160, eval_every=80, algo_kwargs={})
    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, settings)
    assert result["dream_steps"] == 160 and np.isfinite(result["real_return_mean"])
    venv = DreamSB3VecEnv(cartpole["ckpt"], num_envs=settings.n_envs, obs_mode="latent", horizon=settings.horizon,
                          context_frames=settings.context_frames, context_start=settings.context_start)
    venv.seed(settings.seed)
    mean, std = latent_feature_stats(venv, seed=settings.seed)
    assert mean.shape == std.shape == venv.observation_space.shape and (std >= 1e-3).all()
    extractor = A2C.load(tmp_path / "policy.zip", device="cpu").policy.features_extractor
    assert isinstance(extractor, StandardizedFeatures)  # the same stats, restored from the saved policy
    np.testing.assert_allclose(extractor.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extractor.std.numpy(), std, rtol=1e-5, atol=1e-6)


def test_linear_schedules_in_algo_kwargs(cartpole, tmp_path) -> None:
    from sfv_world.agents.policies import resolve_schedules

    kw = resolve_schedules({"learning_rate": "lin_1e-3", "clip_range": "lin_0.2", "gamma": 0.98, "n_steps": 16})
    assert kw["learning_rate"](1.0) == pytest.approx(1e-3) and kw["learning_rate"](0.25) == pytest.approx(2.5e-4)
    assert kw["clip_range"](0.5) == pytest.approx(0.1) and kw["gamma"] == 0.98 and kw["n_steps"] == 16
    assert resolve_schedules({"learning_rate": 3e-4}) == {"learning_rate": 3e-4}
    for bad in ("1e-3", "lin_fast", "cos_1e-3"):
        with pytest.raises(ValueError, match=r"agent.algo_kwargs.learning_rate=.*expected a number or 'lin_<number>'"):
            resolve_schedules({"learning_rate": bad})
    # PPO in the dream with both schedules: the learning rate decays as SB3 trains
    train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, small(
        total_timesteps=256, eval_every=256,
        algo_kwargs={"n_steps": 16, "batch_size": 64, "n_epochs": 1, "learning_rate": "lin_1e-3", "clip_range": "lin_0.2"}))
    from stable_baselines3 import PPO

    model = PPO.load(tmp_path / "policy.zip", device="cpu")
    assert model.lr_schedule(0.5) == pytest.approx(5e-4)
    assert model.policy.optimizer.param_groups[0]["lr"] < 1e-3  # decayed over the two rollouts


def test_termination_threshold_ends_imagined_episodes_earlier(cartpole, tmp_path):
    """agent.termination_threshold reaches the dream: a threshold below the head's probability
    (sigmoid(-3) ~ 0.05 on this checkpoint) ends every imagined episode after one step."""
    lengths = {}
    for thr in (0.5, 1e-3):
        train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path / str(thr),
                             small(total_timesteps=256, eval_every=256, termination_threshold=thr))
        lengths[thr] = read_eval_csv(tmp_path / str(thr) / "eval.csv")["imagined_length_mean"][-1]
    assert lengths[1e-3] == 1.0 and lengths[0.5] > 1.0
    with pytest.raises(ValueError, match="termination_threshold"):
        train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path / "bad", small(termination_threshold=1.5))


def test_context_window_reaches_the_dream(cartpole, tmp_path):
    """agent.context_window sizes the dream's KV cache: a window smaller than the context clip is refused,
    a small one runs (re-encoding every few steps)."""
    with pytest.raises(ValueError, match="context window of 3 frames"):
        train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path / "bad", small(context_window=3))
    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path / "ok",
                                  small(context_window=5, total_timesteps=128, eval_every=128))
    assert result["settings"]["context_window"] == 5 and np.isfinite(result["real_return_mean"])


def test_action_noise_replaces_a_fraction_of_the_dream_actions():
    """agent.action_noise: the dream executes random actions with that probability, seeded."""
    import gymnasium as gym
    from sfv_world.agents.imagination import RandomActionVecEnv
    from stable_baselines3.common.vec_env import DummyVecEnv

    executed = []

    class Recorder(gym.Wrapper):
        def step(self, action):
            executed.append(int(action))
            return self.env.step(action)

    def run(p, seed):
        executed.clear()
        venv = RandomActionVecEnv(DummyVecEnv([lambda: Recorder(gym.make("CartPole-v1"))] * 4), p, seed=seed)
        venv.reset()
        for _ in range(500):
            venv.step(np.ones(4, dtype=np.int64))  # the agent always chooses 1
        return np.array(executed)

    none, half, again = run(0.0, 0), run(0.5, 0), run(0.5, 0)
    assert (none == 1).all()
    assert 0.2 < (half == 0).mean() < 0.3  # half the actions are random, half of those are 0
    np.testing.assert_array_equal(half, again)
    with pytest.raises(ValueError, match="agent.action_noise"):
        small(action_noise=1.5).validate()


def test_obs_noise_perturbs_latent_observations_by_the_feature_std():
    """agent.obs_noise: N(0, (scale * std)^2) on every observation the agent sees, seeded; terminal
    observations too; only for latent observations."""
    import gymnasium as gym
    from sfv_world.agents.imagination import FeatureNoiseVecEnv
    from stable_baselines3.common.vec_env import DummyVecEnv

    std = np.array([0.1, 1.0, 10.0, 0.0], np.float32)

    def run(scale, seed):
        venv = FeatureNoiseVecEnv(DummyVecEnv([lambda: gym.make("CartPole-v1")] * 8), std, scale, seed=seed)
        venv.seed(3)
        clean = DummyVecEnv([lambda: gym.make("CartPole-v1")] * 8)
        clean.seed(3)
        diffs, terminal = [venv.reset() - clean.reset()], []
        for _ in range(300):
            a = np.zeros(8, np.int64)
            venv.step_async(a)
            clean.step_async(a)
            (o, _, d, info), (oc, _, _, infoc) = venv.step_wait(), clean.step_wait()
            diffs.append(o - oc)
            terminal += [i["terminal_observation"] - j["terminal_observation"] for i, j, done in zip(info, infoc, d)
                         if done]
        return np.concatenate(diffs), np.stack(terminal)

    diffs, terminal = run(0.5, 0)
    np.testing.assert_allclose(diffs.std(0)[:3], 0.5 * std[:3], rtol=0.1)
    assert (diffs[:, 3] == 0).all() and np.abs(diffs.mean(0)[:3] / std[:3]).max() < 0.1
    assert len(terminal) > 20 and (terminal[:, 2] != 0).all()
    np.testing.assert_array_equal(run(0.5, 0)[0], diffs)
    assert (run(0.0, 0)[0] == 0).all()
    with pytest.raises(ValueError, match="agent.obs_noise"):
        small(obs_noise=-0.1, obs_mode="latent").validate()
    with pytest.raises(ValueError, match="agent.obs_noise=0.5 .*obs_mode=latent"):
        small(obs_noise=0.5).validate()


def test_termination_penalty_subtracts_the_tempered_head_probability(cartpole):
    """agent.termination_penalty=c: each imagined reward loses c * sigmoid(logit / T) of that step's
    termination logit; the unwrapped env's rewards and everything else are unchanged."""
    from sfv_world.agents.imagination import TerminationPenaltyVecEnv
    from sfv_world.envs.sb3 import DreamSB3VecEnv

    def run(c, temperature):
        venv = DreamSB3VecEnv(cartpole["ckpt"], num_envs=4, obs_mode="latent", horizon=16)
        if c is not None:
            venv = TerminationPenaltyVecEnv(venv, c, temperature)
        venv.seed(5)
        obs, out = [venv.reset()], []
        for t in range(20):
            o, r, d, infos = venv.step(np.array([t % 2, 1, 0, (t // 3) % 2]))
            obs.append(o)
            out.append((r, d, np.array([i["termination_logit"] for i in infos])))
        return np.stack(obs), out

    obs_raw, raw = run(None, None)
    obs_pen, pen = run(0.7, 4.0)
    np.testing.assert_array_equal(obs_raw, obs_pen)
    for (r, d, logit), (rp, dp, logit_p) in zip(raw, pen, strict=True):
        np.testing.assert_array_equal(d, dp)
        np.testing.assert_array_equal(logit, logit_p)
        assert rp.dtype == np.float32
        np.testing.assert_allclose(rp, r - 0.7 / (1 + np.exp(-logit / 4.0)), rtol=1e-5, atol=1e-6)
    assert any((rp < r).all() for (r, _, _), (rp, _, _) in zip(raw, pen))
    for bad in (1.5, -0.1, True, "1"):
        with pytest.raises(ValueError, match="agent.termination_penalty must"):
            small(termination_penalty=bad).validate()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="agent.termination_penalty_temperature"):
            small(termination_penalty_temperature=bad).validate()


def test_the_learner_sees_the_penalty_and_the_monitor_logs_unshaped_returns(cartpole):
    """training_env: VecMonitor sits inside the termination penalty, so imagined returns are the dream's."""
    from sfv_world.agents.imagination import training_env
    from sfv_world.envs.sb3 import DreamSB3VecEnv

    settings = small(obs_mode="latent", termination_penalty=0.8, termination_penalty_temperature=6.0, horizon=5)
    venv = training_env(DreamSB3VecEnv(cartpole["ckpt"], num_envs=3, obs_mode="latent", horizon=5), settings)
    venv.seed(1)
    venv.reset()
    shaped, penalty, episodes = np.zeros(3), np.zeros(3), 0
    for t in range(12):
        _, r, d, infos = venv.step(np.array([t % 2, 0, 1]))
        shaped += r
        penalty += [0.8 / (1 + np.exp(-i["termination_logit"] / 6.0)) for i in infos]
        for i in np.flatnonzero(d):
            np.testing.assert_allclose(infos[i]["episode"]["r"], shaped[i] + penalty[i], rtol=1e-4, atol=1e-4)
            assert penalty[i] > 0
            shaped[i] = penalty[i] = 0
            episodes += 1
    assert episodes >= 3


def test_ppo_trains_with_a_termination_penalty(cartpole, tmp_path):
    settings = small(obs_mode="latent", termination_penalty=1.0, total_timesteps=128, eval_every=128, horizon=8)
    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, settings)
    assert result["settings"]["termination_penalty"] == 1.0 and result["dream_steps"] == 128
    assert np.isfinite(result["real_return_mean"]) and np.isfinite(result["imagined_return_mean"])


def test_ppo_trains_with_obs_noise_in_a_latent_dream(cartpole, tmp_path):
    """A latent agent trains with agent.obs_noise; a resumed run rebuilds the noise from its policy's stats."""
    settings = small(obs_mode="latent", obs_noise=0.5, total_timesteps=128, eval_every=128)
    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, settings)
    assert result["settings"]["obs_noise"] == 0.5 and np.isfinite(result["real_return_mean"])
    (tmp_path / "policy.zip").rename(tmp_path / "first.zip")
    more = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, small(obs_mode="latent", obs_noise=0.5,
                                                                             total_timesteps=256, eval_every=128))
    assert more["dream_steps"] == 256


def test_standardized_features() -> None:
    import gymnasium as gym
    import torch
    from sfv_world.agents.policies import StandardizedFeatures

    space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    layer = StandardizedFeatures(space, mean=[1.0, 0.0, -2.0], std=[0.5, 2.0, 1e-3])
    out = layer(torch.tensor([[2.0, 4.0, -2.0], [1.0, 0.0, 5.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 10.0]]))  # clipped at 10
    assert layer.features_dim == 3
    with pytest.raises(ValueError, match="must match the flat observation space"):
        StandardizedFeatures(space, mean=[0.0, 0.0], std=[1.0, 1.0])
    with pytest.raises(ValueError, match="std must be > 0"):
        StandardizedFeatures(space, mean=[0.0] * 3, std=[1.0, 0.0, 1.0])


def test_dqn_in_the_dream(cartpole, tmp_path):
    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path,
                                  small(algo="dqn", total_timesteps=160, eval_every=160,
                                        algo_kwargs={"learning_starts": 32, "buffer_size": 1000}))
    assert result["dream_steps"] == 160


def test_real_env_sees_the_dream_observation_layout(cartpole):
    from sfv_world.envs.dream import DreamEnv

    dream = DreamEnv(checkpoint=cartpole["ckpt"], frame_stack=3)
    spec = ObservationSpec.from_runtime(dream.runtime, "pixels", 3)
    assert (spec.stored_frame_size, spec.model_frame_size) == (32, 16)
    real = make_real_pixel_env(CARTPOLE, spec)
    assert real.observation_space == dream.observation_space
    obs, _ = real.reset(seed=0)
    assert obs.shape == (16, 16, 9)
    real.close()


def test_latent_evaluation_feeds_real_frames_through_the_world_model(cartpole):
    from sfv_world.world import WorldRuntime

    calls = []

    class Recorder:
        def predict(self, obs, deterministic=True):
            calls.append(obs.copy())
            return np.zeros(len(obs), dtype=np.int64), None

    def factory(batch):
        return WorldRuntime.from_checkpoint(cartpole["ckpt"], batch_size=batch, seed=0)

    spec = ObservationSpec("latent", 32, 16, 1)
    res = evaluate_real(Recorder(), CARTPOLE, spec, episodes=2, runtime_factory=factory,
                        describe_end=lambda env: float(env.unwrapped.state[2]))
    assert calls[0].shape == (2, 64) and calls[0].dtype == np.float32
    assert len(calls) == int(res.lengths.max())
    # always-left: each episode ends with the pole past 12 degrees, read off the env as it ends
    assert len(res.ends) == 2 and all(abs(theta) > 12 * np.pi / 180 for theta in res.ends)
    assert evaluate_real(Recorder(), CARTPOLE, spec, episodes=1, runtime_factory=factory).ends is None
    assert not np.allclose(calls[0], calls[-1])  # the features follow the real frames
    with pytest.raises(ValueError, match="needs runtime_factory"):
        evaluate_real(Recorder(), CARTPOLE, spec, episodes=1)


def test_real_env_must_crop_like_the_dataset(cartpole):
    """A world model trained on cropped frames is evaluated only in an env that crops the same way; the
    box comes from the dataset's metadata, or for older datasets from the CropFrame in its env_spec."""
    from sfv_world.agents.evaluation import dataset_crop

    spec = ObservationSpec("pixels", 32, 16, 1, crop=(160, 320, 0, 600))
    with pytest.raises(ValueError, match=r"env.crop=None but the world model's dataset was collected with crop "
                                         r"\[160, 320, 0, 600\].*env.crop=\[160,320,0,600\]"):
        make_real_pixel_env(CARTPOLE, spec)
    with pytest.raises(ValueError, match="env.crop=None"):
        evaluate_real(None, CARTPOLE, spec, episodes=1)
    env = make_real_pixel_env({**CARTPOLE, "crop": [160, 320, 0, 600]}, spec)
    assert env.reset(seed=0)[0].shape == (16, 16, 3)
    with pytest.raises(ValueError, match=r"env.crop=\[160, 320, 0, 600\] but .* collected with crop None"):
        make_real_pixel_env({**CARTPOLE, "crop": [160, 320, 0, 600]}, ObservationSpec("pixels", 32, 16, 1))
    wrapped = '{"id": "CartPole-v1", "additional_wrappers": [{"name": "CropFrame", "kwargs": {"crop": [1, 2, 3, 4]}}]}'
    assert dataset_crop({"sfv_world": {"crop": [5, 6, 7, 8]}, "env_spec": wrapped}) == (5, 6, 7, 8)
    assert dataset_crop({"sfv_world": {}, "env_spec": wrapped}) == (1, 2, 3, 4)
    assert dataset_crop({"sfv_world": {"crop": None}, "env_spec": wrapped}) is None
    assert dataset_crop({"sfv_world": {}}) is None
    from sfv_world.datasets import DatasetReader

    with DatasetReader(cartpole["dataset"]) as reader:
        assert ObservationSpec.from_meta(reader.metadata, 16, "pixels", 1).crop is None


def test_real_env_must_cut_strips_like_the_dataset():
    """Strips (env.strips) are part of the view: the spec reads them from the dataset's metadata (or the
    CropFrame in its env_spec), and a real env that cuts otherwise is refused with the override to pass."""
    from sfv_world.agents.evaluation import dataset_strips

    crop, strips = [160, 320, 0, 600], [[0, 360], [240, 600]]
    meta = {"sfv_world": {"frame_shape": [32, 32, 3], "crop": crop, "strips": strips}}
    spec = ObservationSpec.from_meta(meta, 16, "pixels", 1)
    assert spec.strips == ((0, 360), (240, 600)) and spec.view_config() == {"crop": crop, "strips": strips}
    with pytest.raises(ValueError, match=r"env.strips=null but .* collected with strips \[\[0,360\],\[240,600\]\].*"
                                         r"pass env.strips=\[\[0,360\],\[240,600\]\]"):
        make_real_pixel_env({**CARTPOLE, "crop": crop}, spec)
    env = make_real_pixel_env({**CARTPOLE, **spec.view_config()}, spec)
    assert env.reset(seed=0)[0].shape == (16, 16, 3)
    with pytest.raises(ValueError, match=r"env.strips=\[\[0,360\],\[240,600\]\] but .* with strips null"):
        make_real_pixel_env({**CARTPOLE, "crop": crop, "strips": strips},
                            ObservationSpec("pixels", 32, 16, 1, crop=tuple(crop)))
    wrapped = ('{"id": "CartPole-v1", "additional_wrappers": [{"name": "CropFrame", "kwargs": '
               '{"crop": [1, 2, 3, 9], "strips": [[0, 3], [3, 6]]}}]}')
    assert dataset_strips({"sfv_world": {}, "env_spec": wrapped}) == ((0, 3), (3, 6))
    assert dataset_strips({"sfv_world": {"strips": None}, "env_spec": wrapped}) is None
    assert dataset_strips({"sfv_world": {}}) is None
    with pytest.raises(ValueError, match="the dataset's strips must be ranges of one width"):
        dataset_strips({"sfv_world": {"strips": [[0, 3], [3, 7]]}})


def test_agent_refuses_a_real_env_that_crops_otherwise_before_training(cartpole, tmp_path):
    """The crop check runs before the first PPO step, not at the first real evaluation (minutes in)."""
    with pytest.raises(ValueError, match=r"env.crop=\[160, 320, 0, 600\] but the world model's dataset was collected "
                                         r"with crop None"):
        train_in_imagination(cartpole["ckpt"], {**CARTPOLE, "crop": [160, 320, 0, 600]}, tmp_path, small())
    assert not (tmp_path / "tb").exists()  # SB3 never started learning


def test_model_free_baseline_uses_the_same_observations(cartpole, tmp_path):
    from sfv_world.agents.model_free import train_model_free

    spec = ObservationSpec("pixels", 32, 16, 2)
    result = train_model_free(CARTPOLE, spec, 64, tmp_path, small(algo="a2c", eval_every=32, algo_kwargs={}), n_envs=2)
    assert result["real_steps"] >= 64 and np.isfinite(result["real_return_mean"])
    assert json.loads((tmp_path / "result.json").read_text())["kind"] == "model_free"
    with pytest.raises(ValueError, match="pixel observations"):
        train_model_free(CARTPOLE, ObservationSpec("latent", 32, 16, 1), 64, tmp_path, small())


def test_agent_cli_entry_point(cartpole, tmp_path):
    from omegaconf import open_dict

    from sfv_world.apps import agent
    from sfv_world.apps.cli import compose

    cfg = compose(["preset=tiny", "device=cpu", f"run_dir={tmp_path}", f"checkpoint={cartpole['ckpt']}",
                   "agent.n_envs=4", "agent.total_timesteps=64", "agent.eval_every=64", "agent.eval_episodes=1",
                   "agent.horizon=8", "agent.frame_stack=1", "env.crop=null", "env.strips=null"])  # the fixture's data is uncropped
    with open_dict(cfg):
        cfg.agent.algo_kwargs = {"n_steps": 16, "batch_size": 32, "n_epochs": 1}
    results = agent.run(cfg)
    assert (tmp_path / "agent" / "ppo-pixels" / "policy.zip").is_file()
    assert results["imagination"]["dream_steps"] == 64
    cfg.env.id = "ALE/Pong-v5"
    with pytest.raises(SystemExit, match="trained on 'CartPole-v1' data"):
        agent.run(cfg)


def test_agent_takes_dream_context_from_the_dataset_override(cartpole, tmp_path):
    """``dataset=`` reaches the dream (a checkpoint whose recorded dataset moved still trains an agent); a
    missing one falls back to the checkpoint's; neither existing is an error naming both."""
    import shutil

    from omegaconf import OmegaConf

    from sfv_world.apps.agent import context_dataset

    moved = shutil.copytree(cartpole["dataset"], tmp_path / "moved")
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt.pt", moved, termination_bias=-3.0)
    shutil.rmtree(moved)  # the checkpoint's recorded dataset is gone
    recorded = {"path": str(moved)}
    cfg = OmegaConf.create({"dataset": str(cartpole["dataset"])})
    assert context_dataset(cfg, recorded) == str(cartpole["dataset"])
    assert context_dataset(OmegaConf.create({"dataset": str(tmp_path / "nope")}), {"path": str(cartpole["dataset"])}) is None
    with pytest.raises(ValueError, match="nope.*does not exist, nor does the checkpoint's dataset.*moved"):
        context_dataset(OmegaConf.create({"dataset": str(tmp_path / "nope")}), recorded)
    result = train_in_imagination(ckpt, CARTPOLE, tmp_path / "run",
                                  small(dataset=str(cartpole["dataset"]), total_timesteps=128, eval_every=128))
    assert result["dream_steps"] == 128
    with pytest.raises(ValueError, match="no dataset to take dream context from"):
        train_in_imagination(ckpt, CARTPOLE, tmp_path / "run2", small(total_timesteps=128, eval_every=128))


def test_snapshots_are_saved_every_n_steps(cartpole, tmp_path):
    from stable_baselines3 import PPO

    from sfv_world.agents.imagination import list_snapshots

    train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, small(snapshot_every=64, total_timesteps=256))
    snaps = list_snapshots(tmp_path)
    assert [p.stem for p in snaps] == ["64", "128", "192", "256"]  # 8 envs: a multiple of 64 is reached exactly
    assert PPO.load(snaps[-1]).num_timesteps == 256
    assert list_snapshots(tmp_path / "none") == []
    (tmp_path / "checkpoint.zip").unlink()  # a fresh run in the same folder starts without the old snapshots
    train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, small(snapshot_every=128, total_timesteps=128))
    assert [p.stem for p in list_snapshots(tmp_path)] == ["128"]


def test_snapshot_ensemble_is_the_agent(cartpole, tmp_path):
    """ensemble_snapshots=K: the final evaluation and the saved agent are the ensemble of the last K snapshots."""
    from stable_baselines3 import PPO

    from sfv_world.agents.ensemble import PolicyEnsemble, load_agent_policy

    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path,
                                  small(snapshot_every=64, ensemble_snapshots=2, total_timesteps=256))
    assert result["ensemble_members"] == ["192.zip", "256.zip"]
    assert np.isfinite(result["real_return_mean"]) and np.isfinite(result["last_policy_real_return_mean"])
    agent = load_agent_policy(tmp_path, PPO)
    assert isinstance(agent, PolicyEnsemble) and len(agent) == 2
    # the same folder again without an ensemble: the stale manifest goes, the agent is policy.zip
    again = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, small(snapshot_every=64, total_timesteps=256))
    assert again["ensemble_members"] is None and isinstance(load_agent_policy(tmp_path, PPO), PPO)
    with pytest.raises(ValueError, match="ensemble_snapshots=2 needs"):
        small(ensemble_snapshots=2).validate()


def test_seed_ensemble_trains_independent_agents_and_acts_as_one(cartpole, tmp_path):
    """agent.seeds=N: N agents with seeds seed..seed+N-1 in seed<s>/, each a full run; the agent folder's
    policy is their ensemble, evaluated on the same real episodes; finished members are reused on a rerun."""
    from stable_baselines3 import PPO

    from sfv_world.agents.ensemble import PolicyEnsemble, load_agent_policy
    from sfv_world.agents.imagination import train_agent

    result = train_agent(cartpole["ckpt"], CARTPOLE, tmp_path, small(seeds=2, seed=3))
    assert result["ensemble_kind"] == "seeds" and result["ensemble_members"] == ["seed3/policy.zip", "seed4/policy.zip"]
    members = [json.loads((tmp_path / f"seed{s}" / "result.json").read_text()) for s in (3, 4)]
    assert [m["settings"]["seed"] for m in members] == [3, 4] and all(m["settings"]["seeds"] == 1 for m in members)
    a, b = (PPO.load(tmp_path / f"seed{s}" / "policy.zip") for s in (3, 4))
    pa, pb = (dict(m.policy.named_parameters()) for m in (a, b))
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)  # differently seeded, not one agent twice
    assert result["dream_steps"] == 2 * 256 and result["last_policy_real_return_mean"] == members[0]["real_return_mean"]
    assert np.isfinite(result["real_return_mean"]) and len(result["members"]) == 2
    agent = load_agent_policy(tmp_path, PPO)
    assert isinstance(agent, PolicyEnsemble) and len(agent) == 2
    assert (tmp_path / "policy.zip").read_bytes() == (tmp_path / "seed3" / "policy.zip").read_bytes()
    # a rerun reuses finished members instead of retraining them
    stamp = (tmp_path / "seed3" / "policy.zip").stat().st_mtime_ns
    again = train_agent(cartpole["ckpt"], CARTPOLE, tmp_path, small(seeds=2, seed=3))
    assert (tmp_path / "seed3" / "policy.zip").stat().st_mtime_ns == stamp
    assert again["members"] == result["members"]
    with pytest.raises(ValueError, match="agent.seeds must be an integer >= 1"):
        small(seeds=0).validate()
    with pytest.raises(ValueError, match="choose one kind of ensemble"):
        small(seeds=2, snapshot_every=64, ensemble_snapshots=2).validate()
    # agent.select=best from scratch: the members train as single agents, then compete
    fresh = train_agent(cartpole["ckpt"], CARTPOLE, tmp_path / "fresh", small(seeds=2, seed=5, select="best",
                                                                                total_timesteps=64, eval_every=64))
    assert fresh["selection"]["selected"] in {"seed5", "seed6", "ensemble"} and len(fresh["members"]) == 2
    assert [m["settings"]["select"] for m in fresh["members"]] == ["ensemble", "ensemble"]
    # agent.select=best: the same members (reused, not retrained) and their ensemble compete on real episodes
    best = train_agent(cartpole["ckpt"], CARTPOLE, tmp_path, small(seeds=2, seed=3, select="best"))
    sel = best["selection"]
    assert (tmp_path / "seed3" / "policy.zip").stat().st_mtime_ns == stamp
    assert set(sel["scores"]) == {"seed3", "seed4", "ensemble"} and sel["episodes"] == 2 and sel["seed"] == 10_003
    assert sel["selected"] == max(sel["scores"], key=sel["scores"].get)
    assert best["real_return_mean"] == sel["scores"][sel["selected"]] and 6 <= sel["real_frames"]
    chosen = load_agent_policy(tmp_path, PPO)
    if sel["selected"] == "ensemble":
        assert isinstance(chosen, PolicyEnsemble) and best["ensemble_kind"] == "seeds"
    else:
        assert not (tmp_path / "ensemble.json").exists() and best["ensemble_kind"] is None
        assert (tmp_path / "policy.zip").read_bytes() == (tmp_path / sel["selected"] / "policy.zip").read_bytes()


def test_halving_chooses_among_seeds_snapshots_and_ensemble_within_the_budget(cartpole, tmp_path):
    """agent.select=halving: each seed's last policy, its snapshots from select_snapshots_from on and the seeds'
    ensemble compete on real episodes by successive halving; the winner's file becomes policy.zip and the real
    frames spent stay within select_max_frames."""
    from stable_baselines3 import PPO

    from sfv_world.agents.ensemble import PolicyEnsemble, load_agent_policy
    from sfv_world.agents.imagination import train_agent

    kw = dict(seeds=2, seed=0, snapshot_every=64, total_timesteps=128, eval_every=128, select="halving",
              select_snapshots_from=128, select_max_frames=400)
    result = train_agent(cartpole["ckpt"], CARTPOLE, tmp_path, small(**kw))
    sel = result["selection"]
    assert sel["rule"] == "successive halving" and sel["candidates"] == 5
    assert set(sel["scores"]) == {"seed0", "seed0@128", "seed1", "seed1@128", "ensemble"}
    assert sel["rounds"][0]["episodes"] == 2 and len(sel["rounds"][0]["candidates"]) == 5
    assert 0 < sel["real_frames"] <= 400 and sel["real_frames"] == sum(r["real_frames"] for r in sel["rounds"])
    assert sel["selected"] in sel["rounds"][-1]["candidates"]
    assert result["real_return_mean"] == sel["scores"][sel["selected"]]
    chosen = load_agent_policy(tmp_path, PPO)
    if sel["selected"] == "ensemble":
        assert isinstance(chosen, PolicyEnsemble)
    else:
        seed_dir, _, steps = sel["selected"].partition("@")
        source = tmp_path / seed_dir / ("snapshots/" + steps + ".zip" if steps else "policy.zip")
        assert (tmp_path / "policy.zip").read_bytes() == source.read_bytes()
    # one seed: its snapshots and last policy compete, no ensemble
    single = train_agent(cartpole["ckpt"], CARTPOLE, tmp_path / "one", small(**(kw | {"seeds": 1,
                                                                                       "select_snapshots_from": 64})))
    assert set(single["selection"]["scores"]) == {"seed0", "seed0@64", "seed0@128"}
    assert single["ensemble_kind"] is None and (tmp_path / "one" / "policy.zip").is_file()


def test_select_agent_plays_every_candidate_on_the_same_capped_episodes(cartpole):
    """agent.select=best: the candidate with the best mean real return wins on the same episodes; with
    select_max_frames every episode is cut so that all of them together stay within the budget."""
    from sfv_world.agents.imagination import select_agent
    from sfv_world.world import WorldRuntime

    class Constant:
        def __init__(self, action):
            self.action = action

        def predict(self, obs, deterministic=True):
            return np.full(len(obs), self.action, np.int64), None

    class Alternate:  # left, right, left, ...: the pole stays up longer than under a constant push
        def __init__(self):
            self.calls = 0

        def predict(self, obs, deterministic=True):
            self.calls += 1
            return np.full(len(obs), self.calls % 2, np.int64), None

    runtime = WorldRuntime.from_checkpoint(cartpole["ckpt"], batch_size=1, seed=0)
    candidates = {"left": Constant(0), "alternate": Alternate(), "right": Constant(1)}
    sel, ev = select_agent(candidates, runtime, CARTPOLE, small(seeds=2, eval_episodes=3))
    assert sel["selected"] == "alternate" and ev.mean == sel["scores"]["alternate"] > sel["scores"]["left"]
    assert sel["episodes"] == 3 and sel["max_episode_steps"] is None and sel["real_frames"] > 3 * 3 * 5
    capped, ev = select_agent(candidates, runtime, CARTPOLE, small(seeds=2, eval_episodes=3, select_max_frames=45))
    assert capped["max_episode_steps"] == 5 and ev.lengths.max() <= 5 and capped["real_frames"] <= 45
    with pytest.raises(ValueError, match="agent.select_max_frames=8 cannot give 3 candidates 3 real episodes"):
        select_agent(candidates, runtime, CARTPOLE, small(seeds=2, eval_episodes=3, select_max_frames=8))


def test_bad_agent_settings():
    with pytest.raises(ValueError, match="agent.algo must be one of"):
        small(algo="sac").validate()
    with pytest.raises(ValueError, match=r"agent.select must be one of \('ensemble', 'best', 'halving'\), got 'top'"):
        small(seeds=2, select="top").validate()
    with pytest.raises(ValueError, match="select=halving with agent.seeds=1 needs agent.select_snapshots_from"):
        small(select="halving").validate()
    with pytest.raises(ValueError, match="select_snapshots_from=64 needs agent.snapshot_every"):
        small(seeds=2, select="halving", select_snapshots_from=64).validate()
    with pytest.raises(ValueError, match="agent.select_keep must be an integer >= 2, got 1"):
        small(seeds=2, select="halving", select_keep=1).validate()
    with pytest.raises(ValueError, match="agent.select_first_episodes must be an integer >= 1, got 0"):
        small(seeds=2, select="halving", select_first_episodes=0).validate()
    with pytest.raises(ValueError, match="agent.select=best picks among agent.seeds > 1 agents"):
        small(select="best").validate()
    with pytest.raises(ValueError, match="agent.select_max_frames must be a positive integer or null, got 0"):
        small(seeds=2, select="best", select_max_frames=0).validate()
    with pytest.raises(ValueError, match=r"agent.latent_features must be one of \('mean', 'slots'\), got 'all'"):
        small(obs_mode="latent", latent_features="all").validate()
    with pytest.raises(ValueError, match="does not fit obs_mode='latent'"):
        small(obs_mode="latent", policy="CnnPolicy").validate()
    name, kwargs = policy_for("pixels", __import__("gymnasium").spaces.Box(0, 255, (64, 64, 12), np.uint8))
    assert name == "CnnPolicy" and kwargs == {}  # large frames keep SB3's NatureCNN
    assert policy_for("latent", __import__("gymnasium").spaces.Box(-1, 1, (8,)), "auto")[0] == "MlpPolicy"


def test_batched_imagination_policy_collects_in_lock_step(cartpole, tmp_path):
    from sfv_world.agents.collection import BatchedImaginationAgentPolicy, merge_datasets
    from sfv_world.datasets import DatasetReader, collect_batched
    from sfv_world.envs.sources import make_source_env

    from sfv_world.world import WorldRuntime

    seen = []

    class Recorder:  # one call per lock-step for all 3 rows; action 1, so epsilon alone makes the 0s
        def predict(self, obs, deterministic=True):
            seen.append(obs.shape)
            return np.ones(len(obs), np.int64), None

    envs = [make_source_env(CARTPOLE) for _ in range(3)]
    runtime = WorldRuntime.from_checkpoint(cartpole["ckpt"], batch_size=3, seed=0)
    runs = {}
    for name, mode, shape, eps in (("pixels", "pixels", (3, 16, 16, 6), 0.0), ("latent", "latent", (3, 64), 0.0),
                                   ("eps_a", "pixels", (3, 16, 16, 6), 0.5), ("eps_b", "pixels", (3, 16, 16, 6), 0.5)):
        seen.clear()
        policy = BatchedImaginationAgentPolicy(Recorder(), envs[0].action_space, ObservationSpec(mode, 32, 16, 2), 3,
                                               epsilon=eps, runtime=runtime if mode == "latent" else None)
        stats = collect_batched(envs, tmp_path / name, policy, episodes=4, frame_size=32, seed=7, progress=False)
        assert set(seen) == {shape} and stats.episodes == 4
        assert max(stats.lengths) <= len(seen) < stats.transitions  # one call per lock-step, not per frame
        with DatasetReader(tmp_path / name) as r:
            runs[name] = {r.load_episode(e).seed: r.load_episode(e).actions for e in r.episode_ids}
    assert all((a == 1).all() for a in runs["pixels"].values())  # epsilon 0: the model's actions only
    assert sorted(runs["eps_a"]) == list(range(7, 11))
    assert any((a == 0).any() for a in runs["eps_a"].values())  # epsilon 0.5 mixes in random actions ...
    for seed, a in runs["eps_a"].items():  # ... drawn from each episode's seed: reproducible
        np.testing.assert_array_equal(a, runs["eps_b"][seed])
    for env in envs:
        env.close()
    merged = merge_datasets([cartpole["dataset"], tmp_path / "pixels"], tmp_path / "merged")
    with DatasetReader(merged) as r, DatasetReader(cartpole["dataset"]) as a:
        assert r.num_episodes == a.num_episodes + 4
        np.testing.assert_array_equal(r.load_episode(0).observations, a.load_episode(0).observations)
    with pytest.raises(ValueError, match="batch size n_envs=2"):
        BatchedImaginationAgentPolicy(Recorder(), envs[0].action_space, ObservationSpec("latent", 32, 16, 1), 2,
                                      runtime=runtime)


def test_merge_keeps_the_view_and_refuses_mixed_views(tmp_path):
    """merge_datasets carries the sources' crop and strips into the merged metadata (the later agent
    evaluations read them there), keeps terminal tails, and refuses sources cut with different views."""
    from sfv_world.agents.collection import merge_datasets
    from sfv_world.datasets import DatasetReader, RandomPolicy, collect
    from sfv_world.envs.sources import make_source_env

    crop, strips = [160, 320, 0, 600], [[0, 360], [240, 600]]
    for name, view in (("a", {"crop": crop, "strips": strips}), ("b", {"crop": crop, "strips": strips}),
                       ("plain", {"crop": crop, "strips": None})):
        env = make_source_env({**CARTPOLE, **view})
        collect(env, tmp_path / name, RandomPolicy(env.action_space), episodes=1, frame_size=16, seed=1,
                progress=False, info=view, terminal_tail=3 if name == "b" else 0)
        env.close()
    merged = merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    with DatasetReader(merged) as r:
        assert r.num_episodes == 2
        assert r.metadata["sfv_world"]["merged_terminal_tails"] == [0, 3]
        assert r.load_episode(1).terminations[-4:].all()  # the tail is data: it survives the merge
        spec = ObservationSpec.from_meta(r.metadata, 16, "pixels", 1)
    assert spec.view_config() == {"crop": crop, "strips": strips}
    with pytest.raises(ValueError, match=r"merge_datasets: .*plain was cut with crop / strips .*different views"):
        merge_datasets([tmp_path / "a", tmp_path / "plain"], tmp_path / "mixed")


def test_dream_fidelity_measures_first_episodes_of_every_world(cartpole):
    """agents.fidelity: one policy per action plus random; real lengths from seeded resets (always-left
    CartPole ends within ~8-11 steps); dream lengths are each world's first episode, within the horizon;
    the gate compares the worst |log ratio| with log(max_ratio)."""
    import math

    from gymnasium import spaces

    from sfv_world.agents import fidelity

    assert fidelity.policy_names(spaces.Discrete(3)) == ["random", "always_0", "always_1", "always_2"]
    with pytest.raises(ValueError, match="needs a Discrete action space"):
        fidelity.policy_names(spaces.Box(-1, 1, (2,)))
    with pytest.raises(ValueError, match="unknown fidelity policy 'sideways'"):
        fidelity.policy_actions("sideways", 2, np.random.default_rng(0), 2)
    real = fidelity.real_lengths(CARTPOLE, "always_0", 5, 200, seed=0)
    assert real.shape == (5,) and 7 <= real.min() and real.max() <= 12
    np.testing.assert_array_equal(real, fidelity.real_lengths(CARTPOLE, "always_0", 5, 200, seed=0))
    assert fidelity.real_lengths(CARTPOLE, "random", 4, 3, seed=0).max() <= 3  # the horizon truncates
    result = fidelity.measure(cartpole["ckpt"], CARTPOLE, dataset=cartpole["dataset"], episodes=5, horizon=7,
                              progress=False)
    assert set(result["policies"]) == {"random", "always_0", "always_1"}
    for r in result["policies"].values():
        assert 1 <= r["dream_mean"] <= 7 and 0 <= r["dream_at_horizon"] <= 1
        assert r["log_ratio"] == pytest.approx(math.log(r["dream_mean"] / r["real_mean"]))
    worst = max(abs(r["log_ratio"]) for r in result["policies"].values())
    assert result["worst"] == pytest.approx(worst)
    gate = {"worst": math.log(2.5)}  # the gate on a worst factor of 2.5
    assert fidelity.passes(gate, 2.6) and not fidelity.passes(gate, 2.4)
    with pytest.raises(ValueError, match="max_ratio must be > 1"):
        fidelity.passes(result, 1.0)
    assert "always_0" in fidelity.summary(result)


def test_ppo_trains_in_a_time_scaled_dream(cartpole, tmp_path):
    """agent.time_scale reaches the dream (frames per agent step); bad values name the key."""
    settings = small(obs_mode="latent", time_scale=1.5, total_timesteps=128, eval_every=128)
    result = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path, settings)
    assert result["settings"]["time_scale"] == 1.5 and np.isfinite(result["real_return_mean"])
    for bad in (0.9, True, "fast"):
        with pytest.raises(ValueError, match="agent.time_scale must be a number in"):
            small(time_scale=bad).validate()


def test_seed_members_train_in_parallel_worker_processes(cartpole, tmp_path, capsys):
    """agent.workers=2: the seeds train at once in spawned processes, each writing its own seed<s>/ as the serial
    path does, under one progress bar fed by the workers' step counters; a rerun reuses them; bad values name
    the key."""
    from sfv_world.agents.imagination import train_agent, train_members_in_parallel

    kw = dict(obs_mode="latent", seeds=2, seed=7, workers=2, total_timesteps=64, eval_every=64)
    result = train_agent(cartpole["ckpt"], CARTPOLE, tmp_path, small(**kw))
    members = [json.loads((tmp_path / f"seed{s}" / "result.json").read_text()) for s in (7, 8)]
    assert [m["settings"]["seed"] for m in members] == [7, 8]
    assert all(m["settings"]["workers"] == 1 and m["dream_steps"] >= 64 for m in members)
    assert result["members"] == members and np.isfinite(result["real_return_mean"])
    stamp = (tmp_path / "seed8" / "policy.zip").stat().st_mtime_ns
    assert train_agent(cartpole["ckpt"], CARTPOLE, tmp_path, small(**kw))["members"] == members
    assert (tmp_path / "seed8" / "policy.zip").stat().st_mtime_ns == stamp
    capsys.readouterr()
    train_members_in_parallel(cartpole["ckpt"], CARTPOLE, tmp_path / "bar", [small(**{**kw, "seed": s, "seeds": 1, "workers": 1})
                                                                          for s in (1, 2)], 2, progress=True)
    err = capsys.readouterr().err
    assert "agents: 100%" in err and "128/128" in err
    assert (tmp_path / "bar" / "seed2" / "policy.zip").exists()
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="agent.workers must be an integer >= 1"):
            small(workers=bad).validate()


def test_final_evaluation_is_reused_when_the_last_update_left_the_policy_unchanged(cartpole, tmp_path):
    """A linear schedule's last update has learning rate 0: the final policy is the one the periodic evaluation at
    96 of 128 steps already scored, so eval.csv gets no second, identical row; a constant rate does change it."""
    from sfv_world.agents.imagination import read_eval_csv

    kw = dict(obs_mode="latent", total_timesteps=128, eval_every=96)
    lin = train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path / "lin", small(**kw, algo_kwargs={
        "n_steps": 16, "batch_size": 64, "n_epochs": 2, "learning_rate": "lin_1e-3"}))
    rows = read_eval_csv(tmp_path / "lin" / "eval.csv")
    assert list(rows["timesteps"]) == [96] and lin["real_return_mean"] == rows["real_return_mean"][0]
    train_in_imagination(cartpole["ckpt"], CARTPOLE, tmp_path / "const", small(**kw))
    assert list(read_eval_csv(tmp_path / "const" / "eval.csv")["timesteps"]) == [96, 128]
