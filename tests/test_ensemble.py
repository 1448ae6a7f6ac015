"""Snapshot ensembles of SB3 policies (agents/ensemble.py)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from sfv_world.agents.ensemble import MANIFEST, PolicyEnsemble, load_agent_policy, load_ensemble
from stable_baselines3 import DQN, PPO


def ppo(seed: int, env_id: str = "CartPole-v1") -> PPO:
    return PPO("MlpPolicy", gym.make(env_id), seed=seed, device="cpu")


def obs_batch(n: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32) * 2


def test_one_member_acts_like_the_member():
    m = ppo(0)
    obs = obs_batch()
    np.testing.assert_array_equal(PolicyEnsemble([m]).predict(obs)[0], m.predict(obs, deterministic=True)[0])


def test_members_vote_by_mean_action_probabilities():
    models = [ppo(s) for s in range(3)]
    obs = obs_batch(64)
    with torch.no_grad():
        t = torch.as_tensor(obs)
        probs = [m.policy.get_distribution(t).distribution.probs.numpy() for m in models]
    expected = np.mean(probs, axis=0).argmax(-1)
    ens = PolicyEnsemble(models)
    np.testing.assert_array_equal(ens.predict(obs)[0], expected)
    np.testing.assert_allclose(ens.action_probs(obs), np.mean(probs, axis=0), rtol=1e-6)
    assert ens.predict(obs[0])[0].shape == ()  # one observation -> one action
    sampled = ens.predict(obs, deterministic=False)[0]
    assert sampled.shape == (64,) and set(np.unique(sampled)) <= {0, 1}


def test_dqn_members_average_q_values():
    models = [DQN("MlpPolicy", gym.make("CartPole-v1"), seed=s, device="cpu", learning_starts=0) for s in range(2)]
    obs = obs_batch()
    with torch.no_grad():
        q = sum(m.policy.q_net(torch.as_tensor(obs)) for m in models).numpy() / 2
    np.testing.assert_array_equal(PolicyEnsemble(models).predict(obs)[0], q.argmax(-1))
    np.testing.assert_array_equal(PolicyEnsemble(models).predict(obs[3])[0], q[3].argmax())


def test_box_actions_are_averaged():
    models = [ppo(s, "Pendulum-v1") for s in range(2)]
    obs = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    mean = np.mean([m.predict(obs, deterministic=True)[0] for m in models], axis=0)
    np.testing.assert_allclose(PolicyEnsemble(models).predict(obs)[0], mean, rtol=1e-6)


def test_members_must_share_spaces():
    with pytest.raises(ValueError, match="member 1"):
        PolicyEnsemble([ppo(0), ppo(1, "Acrobot-v1")])
    with pytest.raises(ValueError, match="at least one"):
        PolicyEnsemble([])


def test_save_and_load_an_agent_folder(tmp_path):
    paths = []
    for s in range(2):
        paths.append(tmp_path / "snapshots" / f"{s}.zip")
        ppo(s).save(paths[-1])
    with pytest.raises(FileNotFoundError, match="no policy.zip"):
        load_agent_policy(tmp_path, PPO)
    ppo(5).save(tmp_path / "policy.zip")
    assert isinstance(load_agent_policy(tmp_path, PPO), PPO)  # no manifest: the single policy
    ens = load_ensemble(paths, PPO)
    manifest = ens.save(tmp_path)
    assert json.loads(manifest.read_text())["members"] == ["snapshots/0.zip", "snapshots/1.zip"]
    loaded = load_agent_policy(tmp_path, PPO)
    assert isinstance(loaded, PolicyEnsemble) and len(loaded) == 2
    obs = obs_batch()
    np.testing.assert_array_equal(loaded.predict(obs)[0], ens.predict(obs)[0])
    paths[1].unlink()
    with pytest.raises(FileNotFoundError, match="member files missing.*1.zip"):
        load_agent_policy(tmp_path, PPO)
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="not an ensemble manifest"):
        load_agent_policy(tmp_path, PPO)
