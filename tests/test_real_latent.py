"""RealLatentVecEnv (the real env seen through the world model's features) and the latent-oracle benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cartpole_checkpoint(tmp_path_factory):
    """A random CartPole-pixels dataset (3 episodes) and a tiny world model on it."""
    from dream_fixtures import make_tiny_checkpoint

    from sfv_world.datasets import RandomPolicy, collect
    from sfv_world.envs.sources import make_source_env

    root = tmp_path_factory.mktemp("real_latent")
    env = make_source_env({"id": "CartPole-v1", "frame_source": "render", "kwargs": {}})
    collect(env, root / "cartpole", RandomPolicy(env.action_space, seed=0), episodes=3, frame_size=32, progress=False)
    env.close()
    return make_tiny_checkpoint(root / "ckpt.pt", root / "cartpole", termination_bias=-3.0)


def real_latent_env(checkpoint: Path, n: int = 2, horizon: int | None = 3, termination_threshold: float | None = None):
    """(RealLatentVecEnv of n rows on the checkpoint's CartPole view, its real env config)."""
    from sfv_world.agents.real_latent import RealLatentVecEnv
    from sfv_world.world import WorldRuntime

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import cartpole_view

    runtime = WorldRuntime.from_checkpoint(checkpoint, batch_size=n, seed=0)
    env_cfg = cartpole_view(runtime, str(checkpoint), "the test")[1]
    return RealLatentVecEnv(env_cfg, runtime, horizon=horizon, termination_threshold=termination_threshold), env_cfg


def test_observations_are_the_features_of_the_real_frames_and_rows_restart_alone(cartpole_checkpoint):
    """reset: float32 [N, D], the runtime's features of the real first frames; the horizon truncates with SB3's
    infos; a finished row restarts from its next seed's real frame; the same seed replays the same observations."""
    from sfv_world.agents.evaluation import ObservationSpec, make_real_pixel_env

    venv, env_cfg = real_latent_env(cartpole_checkpoint, horizon=3)
    venv.seed(5)
    obs = venv.reset()
    assert obs.shape == (2, venv.runtime.feature_dim) and obs.dtype == np.float32
    assert venv.observation_space.contains(obs[0])
    expected = venv.runtime.sibling(2, seed=5).reset(venv.frames[:, None], np.zeros((2, 0), np.int64)).features
    np.testing.assert_array_equal(obs, expected)
    trace = [obs]
    for step in range(3):
        obs, rewards, dones, infos = venv.step(np.array([0, 1]))
        trace.append(obs)
        assert rewards.dtype == np.float32 and rewards.tolist() == [1.0, 1.0]
        if step < 2:
            assert not dones.any()
            assert [sorted(i) for i in infos] == [["head_terminated", "termination_logit"]] * 2
            assert not any(i["head_terminated"] for i in infos)
    assert dones.all()  # the horizon, not the pole: 3 steps from upright
    for i in range(2):
        assert infos[i]["TimeLimit.truncated"] is True and infos[i]["terminal_observation"].shape == obs[i].shape
        assert not np.array_equal(infos[i]["terminal_observation"], obs[i])
    spec = ObservationSpec.from_runtime(venv.runtime, "latent", 1)
    real = make_real_pixel_env(env_cfg, spec)
    np.testing.assert_array_equal(venv.frames[1], real.reset(seed=5 + 1 + 2 * 1)[0])  # row 1's second episode
    real.close()
    assert venv.episodes.tolist() == [2, 2] and venv.lengths.tolist() == [0, 0]

    again, _ = real_latent_env(cartpole_checkpoint, horizon=3)
    again.seed(5)
    replay = [again.reset()] + [again.step(np.array([0, 1]))[0] for _ in range(3)]
    for x, y in zip(trace, replay):
        np.testing.assert_array_equal(x, y)
    venv.close(), again.close()


def test_infos_carry_the_heads_logit_and_the_head_can_end_episodes(cartpole_checkpoint):
    """infos[i]["termination_logit"] is the world model's logit on the real frame (a runtime fed the same frames
    agrees); with termination_threshold below the head's probability (the tiny model's bias gives ~0.05) every
    episode ends at its first step as terminated (not truncated), and above it none does."""
    from sfv_world.agents.evaluation import ObservationSpec, make_real_pixel_env

    venv, env_cfg = real_latent_env(cartpole_checkpoint, horizon=None, termination_threshold=0.01)
    venv.seed(3)
    venv.reset()
    twin = venv.runtime.sibling(2, seed=3)
    twin.reset(venv.frames[:, None], np.zeros((2, 0), np.int64))
    obs, _, dones, infos = venv.step(np.array([1, 0]))
    replay = [make_real_pixel_env(env_cfg, ObservationSpec.from_runtime(venv.runtime, "latent", 1)) for _ in range(2)]
    for i, env in enumerate(replay):
        env.reset(seed=3 + i)  # row i's first episode
    seen = np.stack([env.step(a)[0] for env, a in zip(replay, (1, 0))])
    expected = twin.observe(seen, np.array([1, 0])).termination_logit
    assert [i["termination_logit"] for i in infos] == pytest.approx(expected.tolist(), abs=1e-5)
    assert 1 / (1 + np.exp(-expected.max())) > 0.01
    assert dones.all() and all(i["head_terminated"] and not i["TimeLimit.truncated"] for i in infos)
    assert all(i["terminal_observation"].shape == obs[0].shape for i in infos)
    assert venv.episodes.tolist() == [2, 2]
    venv.close()

    lenient, _ = real_latent_env(cartpole_checkpoint, horizon=None, termination_threshold=0.99)
    lenient.reset()
    _, _, dones, infos = lenient.step(np.array([1, 0]))
    assert not dones.any() and not any(i["head_terminated"] for i in infos)
    lenient.close()


def test_bad_input_is_named(cartpole_checkpoint):
    venv, _ = real_latent_env(cartpole_checkpoint)
    with pytest.raises(RuntimeError, match="before reset"):
        venv.step(np.array([0, 1]))
    venv.reset()
    with pytest.raises(ValueError, match=r"actions\[1\] = 2"):
        venv.step_async(np.array([0, 2]))
    with pytest.raises(ValueError, match="horizon"):
        real_latent_env(cartpole_checkpoint, horizon=0)
    with pytest.raises(ValueError, match="termination_threshold must be in"):
        real_latent_env(cartpole_checkpoint, termination_threshold=1.5)
    venv.close()


def test_ppo_learns_on_it_and_the_oracle_benchmark_pairs_seeds(cartpole_checkpoint, tmp_path, monkeypatch):
    """SB3 PPO runs on the env; latent_oracle trains the preset's recipe (overridden small) for each seed and
    evaluates on real episodes, one row per seed plus their mean; bad overrides are named."""
    from stable_baselines3 import PPO

    venv, _ = real_latent_env(cartpole_checkpoint, horizon=20)
    PPO("MlpPolicy", venv, n_steps=8, batch_size=8, seed=0, device="cpu").learn(32)
    venv.close()

    spec = importlib.util.spec_from_file_location("bench_latent_oracle", REPO / "benchmarks" / "latent_oracle.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path / "results")
    small = ["--set", "n_envs=2", "--set", "horizon=10", "--set", "algo_kwargs.n_steps=8",
             "--set", "algo_kwargs.batch_size=8"]
    bench.main(["--checkpoint", str(cartpole_checkpoint), "--seeds", "2", "--timesteps", "16", "--eval-every", "16",
                "--episodes", "1", *small, "--name", "oracle"])
    out = json.loads((tmp_path / "results" / "oracle.json").read_text())
    rows = out["rows"]
    assert [r["seed"] for r in rows] == [0, 1, "mean"]
    for r in rows[:2]:
        assert r["real_16"] >= 1 and r["real_frames"] == 16
    assert rows[2]["real_16"] == pytest.approx((rows[0]["real_16"] + rows[1]["real_16"]) / 2, abs=0.05)
    assert out["config"]["set"][0] == "n_envs=2"
    bench.main(["--checkpoint", str(cartpole_checkpoint), "--seeds", "1", "--timesteps", "16", "--eval-every", "16",
                "--episodes", "1", *small, "--dream-rules", "--save-dir", str(tmp_path / "saved"), "--name", "rules"])
    out = json.loads((tmp_path / "results" / "rules.json").read_text())
    assert out["config"]["dream_rules"] is True and "dream rules: episodes also end" in out["compares"]
    assert PPO.load(tmp_path / "saved" / "seed0" / "policy.zip", device="cpu").num_timesteps == 16
    with pytest.raises(SystemExit, match="--set 'nenvs=2'"):
        bench.main(["--checkpoint", str(cartpole_checkpoint), "--set", "nenvs=2"])
    with pytest.raises(SystemExit, match="--dream-run .*none: 0 seed folders with eval.csv, 2 needed"):
        bench.main(["--checkpoint", str(cartpole_checkpoint), "--seeds", "2", "--dream-run", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="--checkpoint .*absent.pt: no such file"):
        bench.main(["--checkpoint", str(tmp_path / "absent.pt")])


def test_dream_endings_compares_how_episodes_end_in_both_worlds(cartpole_checkpoint, tmp_path, monkeypatch):
    """dream_endings plays one latent policy in the dream and in the real env (per_row episodes per world row):
    at a head threshold below the tiny model's ~0.05 every dream episode ends at its first step by the head,
    while real episodes run to the horizon and the head, on the real frames, would have ended each of them
    early; above it the dream runs to the horizon too. A missing agent file is named."""
    from stable_baselines3 import PPO

    venv, _ = real_latent_env(cartpole_checkpoint, horizon=5)
    PPO("MlpPolicy", venv, n_steps=8, batch_size=8, seed=0, device="cpu").learn(8).save(tmp_path / "agent.zip")
    venv.close()
    spec = importlib.util.spec_from_file_location("bench_dream_endings", REPO / "benchmarks" / "dream_endings.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path / "results")
    dataset = cartpole_checkpoint.parent / "cartpole"
    common = ["--checkpoint", str(cartpole_checkpoint), "--dataset", str(dataset), "--agent",
              f"a=b={tmp_path / 'agent.zip'}", "--set", "n_envs=2", "--set", "horizon=5", "--set", "action_noise=0.5",
              "--per-row", "2", "--probe-episodes", "3"]
    bench.main([*common, "--set", "termination_threshold=0.01", "--name", "strict"])
    rows = json.loads((tmp_path / "results" / "strict.json").read_text())["rows"]
    dream, real = rows
    assert (dream["agent"], dream["world"], real["world"]) == ("a=b", "dream", "real")
    assert dream["episodes"] == real["episodes"] == 4
    assert dream["length_mean"] == 1 and dream["terminated"] == 1.0 and 0 <= dream["upright_ends"] <= 1
    assert real["length_mean"] == 5 and real["terminated"] == 0.0 and real["by_angle"] == 0.0
    assert real["head_early"] == 1.0 and real["head_early_steps"] == 4
    bench.main([*common, "--set", "termination_threshold=0.9", "--worlds", "dream", "--name", "lenient"])
    rows = json.loads((tmp_path / "results" / "lenient.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["length_mean"] == 5 and rows[0]["terminated"] == 0.0
    bench.main([*common, "--set", "termination_threshold=0.9", "--worlds", "dream", "--name", "again"])
    assert json.loads((tmp_path / "results" / "again.json").read_text())["rows"] == rows  # seeded: the same dreams
    with pytest.raises(SystemExit, match="--agent .*absent.zip: no such file"):
        bench.main([*common[:4], "--agent", str(tmp_path / "absent.zip")])
    with pytest.raises(SystemExit, match="--worlds dreams"):
        bench.main([*common, "--worlds", "dreams"])


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_dream_head_drift_analysis_bins_fires_by_angle_and_drops_steps_after_a_fall():
    """analyse: two worlds, three steps. World 0 stays upright and its head fires at steps 2 and 3; world 1 falls
    (probe 13 degrees) at step 2, so its later steps are left out even where it fires."""
    bench = _bench("dream_head_drift")
    rec = {"dream_logit": np.array([[-5.0, -5.0], [0.0, 5.0], [1.0, 5.0]]),
           "twin_logit": np.array([[-5.0, -5.0], [0.0, -5.0], [-5.0, 5.0]]),
           "theta_deg": np.array([[1.0, 3.0], [1.5, 13.0], [2.5, 1.0]]),
           "x": np.zeros((3, 2)), "clamped": np.array([[False, False], [True, False], [False, False]])}
    rows, summary = bench.analyse(rec, threshold=0.1, upright_deg=6.0)
    assert [r["theta_deg"] for r in rows] == ["0-2", "2-4"]
    assert rows[0]["steps"] == 2 and rows[0]["dream_fire"] == 0.5 and rows[0]["twin_fire"] == 0.5
    assert rows[1]["steps"] == 2 and rows[1]["dream_fire"] == 0.5 and rows[1]["twin_fire"] == 0.0
    assert summary["upright_steps"] == 4 and summary["upright_fire"] == 0.5
    assert summary["upright_fire_clamped"] == 1.0 and summary["upright_fire_unclamped"] == pytest.approx(1 / 3, abs=1e-3)
    assert summary["fire_again_next_step"] == 1.0 and summary["worlds_with_upright_fire"] == "1 of 2"
    assert summary["first_upright_fire_step_median"] == 2 and summary["first_upright_fire_theta_median"] == 1.5
    assert summary["first_upright_fire_after_a_clamp"] == "1 of 1"
    assert summary["worlds_fallen"] == "1 of 2" and summary["first_fall_step_median"] == 2
    assert bench.correlation(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])) == 1.0
    assert bench.correlation(np.array([1.0, 2.0]), np.array([3.0, 3.0])) is None


def test_dream_head_drift_runs_a_policy_in_an_unending_dream(cartpole_checkpoint, tmp_path, monkeypatch):
    """With a threshold below the tiny model's ~0.05 every step fires in the dream and in the twin; no world ends."""
    from stable_baselines3 import PPO

    venv, _ = real_latent_env(cartpole_checkpoint, horizon=5)
    PPO("MlpPolicy", venv, n_steps=8, batch_size=8, seed=0, device="cpu").learn(8).save(tmp_path / "agent.zip")
    venv.close()
    bench = _bench("dream_head_drift")
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path / "results")
    args = ["--checkpoint", str(cartpole_checkpoint), "--dataset", str(cartpole_checkpoint.parent / "cartpole"),
            "--agent", str(tmp_path / "agent.zip"), "--set", "n_envs=2", "--steps", "4", "--probe-episodes", "3"]
    bench.main([*args, "--set", "termination_threshold=0.01", "--name", "drift"])
    out = json.loads((tmp_path / "results" / "drift.json").read_text())
    assert sum(r["steps"] for r in out["rows"]) <= 8
    assert all(r["dream_fire"] == 1.0 and r["twin_fire"] == 1.0 for r in out["rows"])
    bench.main([*args, "--set", "action_noise=0", "--name", "once"])
    bench.main([*args, "--set", "action_noise=0", "--name", "twice"])  # sampled actions: seeded, so the same
    once, twice = (json.loads((tmp_path / "results" / f"{n}.json").read_text()) for n in ("once", "twice"))
    assert once["rows"] == twice["rows"] and once["config"]["summary"] == twice["config"]["summary"]
    with pytest.raises(SystemExit, match="--agent .*absent.zip: not found"):
        bench.main([*args[:4], "--agent", str(tmp_path / "absent.zip")])


def test_cartpole_probe_takes_episode_ids_or_a_count(cartpole_checkpoint):
    """dream_physics.cartpole_probe (shared by dream_physics, motion_gain, dream_endings, dream_head_drift): an int
    N fits on the dataset's first N episodes, the same as passing their ids."""
    from sfv_world.datasets import DatasetReader

    sys.path.insert(0, str(REPO / "benchmarks"))
    from dream_physics import cartpole_probe

    dataset = str(cartpole_checkpoint.parent / "cartpole")
    with DatasetReader(dataset) as reader:
        first_two = [int(e) for e in reader.episode_ids][:2]
    by_count, by_ids = cartpole_probe(dataset, 2, 32), cartpole_probe(dataset, first_two, 32)
    np.testing.assert_array_equal(by_count.weights, by_ids.weights)
    assert not np.array_equal(cartpole_probe(dataset, None, 32).weights, by_ids.weights)  # None: all three
