"""Collector, policies, crash safety (killing a real collector process), source envs and the CLI."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from sfv_world.datasets import (
    DatasetReader,
    RandomPolicy,
    SB3EpsilonGreedyPolicy,
    StickyRandomPolicy,
    area_resize,
    collect,
    collect_batched,
    live_steps,
    partial_path_for,
)
from sfv_world.datasets.format import DATA_DIR, METADATA_FILE

TESTS = Path(__file__).parent


class CountingEnv(gym.Env):
    """Tiny image env: frame [20, 30, 3] encodes the step count; episodes last 3..8 steps (seeded).

    Reward = the action taken. ``step_delay`` slows it down for the crash-safety tests.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, render_mode: str | None = None, step_delay: float = 0.0, n_actions: int = 3):
        self.render_mode = render_mode
        self.step_delay = step_delay
        self.observation_space = spaces.Box(0, 255, (20, 30, 3), np.uint8)
        self.action_space = spaces.Discrete(n_actions)
        self._t = 0
        self._len = 0
        self._noise = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros((20, 30, 3), np.uint8)
        obs[:, :, 0] = 10 * self._t
        obs[:, :, 1] = self._noise
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._len = int(self.np_random.integers(3, 9))
        self._noise = int(self.np_random.integers(0, 256))
        return self._obs(), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        if self.step_delay:
            time.sleep(self.step_delay)
        self._t += 1
        self._noise = int(self.np_random.integers(0, 256))
        return self._obs(), float(action), self._t >= self._len, False, {}

    def render(self):
        return self._obs() if self.render_mode == "rgb_array" else None


def _arrays(path: Path) -> list[dict]:
    r = DatasetReader(path)
    return [vars(r.load_episode(e)) for e in r.episode_ids]


def test_collect_records_episodes(tmp_path: Path) -> None:
    env = CountingEnv()
    stats = collect(env, tmp_path / "ds", RandomPolicy(env.action_space), episodes=6, frame_size=10,
                    frame_source="obs", seed=3, progress=False)
    r = DatasetReader(tmp_path / "ds")
    assert r.complete and r.num_episodes == stats.episodes == 6
    assert r.frame_shape == (10, 10, 3) and r.action_space == spaces.Discrete(3)
    assert r.num_transitions == stats.transitions == sum(stats.lengths)
    meta = r.metadata["sfv_world"]
    assert meta["frame_source"] == "obs" and meta["seed"] == 3 and meta["policy"] == {"name": "random"}
    assert r.metadata["algorithm_name"] == "random"
    for e in r.episode_ids:
        ep = r.load_episode(e)
        assert ep.seed == 3 + e and ep.terminations[-1] and not ep.truncations.any()
        np.testing.assert_array_equal(ep.rewards, ep.actions.astype(np.float32))  # reward = action
        # frame t encodes step t: stored frames are the area-resized observations, in order
        np.testing.assert_array_equal(ep.observations[:, 0, 0, 0], 10 * np.arange(len(ep) + 1))
        assert stats.returns[e] == pytest.approx(float(ep.rewards.sum()))


def test_collect_is_reproducible(tmp_path: Path) -> None:
    def run(name: str, seed: int, policy_cls=RandomPolicy, **kw) -> list[dict]:
        env = CountingEnv()
        collect(env, tmp_path / name, policy_cls(env.action_space, **kw), episodes=5, frame_size=8,
                frame_source="obs", seed=seed, progress=False)
        return _arrays(tmp_path / name)

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    for x, y in zip(a, b, strict=True):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(x[field], y[field])
    assert any(len(x["actions"]) != len(y["actions"]) or not np.array_equal(x["actions"], y["actions"])
               for x, y in zip(a, c, strict=True))
    s1, s2 = run("s1", 5, StickyRandomPolicy, p=0.5), run("s2", 5, StickyRandomPolicy, p=0.5)
    assert all(np.array_equal(x["actions"], y["actions"]) for x, y in zip(s1, s2, strict=True))


def test_collect_stops_at_max_frames_and_max_episode_steps(tmp_path: Path) -> None:
    env = CountingEnv()
    stats = collect(env, tmp_path / "mf", RandomPolicy(env.action_space), episodes=None, max_frames=13,
                    frame_size=8, frame_source="obs", progress=False)
    r = DatasetReader(tmp_path / "mf")
    assert r.num_transitions == stats.transitions == 13
    last = r.load_episode(r.episode_ids[-1])
    assert last.terminations[-1] or last.truncations[-1]
    stats = collect(env, tmp_path / "ms", RandomPolicy(env.action_space), episodes=4, max_episode_steps=2,
                    frame_size=8, frame_source="obs", progress=False)
    r = DatasetReader(tmp_path / "ms")
    assert all(n <= 2 for n in r.episode_lengths.values()) and r.num_episodes == 4
    assert all(r.load_episode(e).truncations[-1] for e in r.episode_ids if r.episode_lengths[e] == 2
               and not r.load_episode(e).terminations[-1])


def test_collect_from_render_cartpole(tmp_path: Path) -> None:
    env = gym.make("CartPole-v1", render_mode="rgb_array")
    collect(env, tmp_path / "cp", RandomPolicy(env.action_space), episodes=2, frame_size=16, progress=False)
    r = DatasetReader(tmp_path / "cp")
    assert r.frame_shape == (16, 16, 3) and r.env_id == "CartPole-v1"
    ep = r.load_episode(0)
    env.reset(seed=0)  # episode 0 is reset with the collection seed: its first frame is reproducible
    np.testing.assert_array_equal(ep.observations[0], area_resize(env.render(), 16))
    assert ep.observations.std() > 0


def test_collect_argument_errors(tmp_path: Path) -> None:
    env = CountingEnv()
    pol = RandomPolicy(env.action_space)
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        collect(env, tmp_path / "x", pol, episodes=1, frame_source="render", progress=False)
    with pytest.raises(ValueError, match="episodes or max_frames"):
        collect(env, tmp_path / "x", pol, episodes=None, frame_source="obs", progress=False)
    with pytest.raises(ValueError, match="frame_source must be"):
        collect(env, tmp_path / "x", pol, episodes=1, frame_source="pixels", progress=False)
    with pytest.raises(ValueError, match="max_frames must be >= 1"):
        collect(env, tmp_path / "x", pol, episodes=1, max_frames=0, frame_source="obs", progress=False)
    cp = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match="image observations"):
        collect(cp, tmp_path / "x", RandomPolicy(cp.action_space), episodes=1, frame_source="obs", progress=False)
    assert not (tmp_path / "x").exists()


class RandomRows:
    """A BatchPolicy of per-row ``RandomPolicy`` copies re-seeded with each episode's seed: every episode
    is then the one sequential :func:`collect` records for that seed."""

    name = "random"

    def __init__(self, space: spaces.Space, n: int):
        self.rows = [RandomPolicy(space) for _ in range(n)]
        self.started: list[int] = []
        self.advanced = 0

    def start(self, rows, frames, seeds):
        assert frames.shape[0] == len(rows) == len(seeds) and frames.dtype == np.uint8
        for r, s in zip(rows.tolist(), seeds, strict=True):
            self.rows[r].reset(seed=s)
        self.started += list(seeds)

    def act(self):
        return np.asarray([p(None) for p in self.rows])

    def advance(self, frames, actions):
        assert frames.shape[0] == len(self.rows) == len(actions)
        self.advanced += 1

    def describe(self):
        return {"name": self.name}


def test_collect_batched_records_the_same_episodes_as_collect(tmp_path: Path) -> None:
    env = CountingEnv()
    collect(env, tmp_path / "seq", RandomPolicy(env.action_space), episodes=7, frame_size=10, frame_source="obs",
            seed=3, progress=False)
    envs = [CountingEnv() for _ in range(3)]
    policy = RandomRows(envs[0].action_space, 3)
    stats = collect_batched(envs, tmp_path / "bat", policy, episodes=7, frame_size=10, frame_source="obs", seed=3,
                            progress=False)
    assert policy.started == list(range(3, 10))  # episode k starts with seed + k, none beyond `episodes`
    seq = {ep["seed"]: ep for ep in _arrays(tmp_path / "seq")}
    bat = _arrays(tmp_path / "bat")
    assert sorted(ep["seed"] for ep in bat) == sorted(seq) and stats.episodes == 7
    assert stats.transitions == sum(len(ep["actions"]) for ep in bat) == sum(stats.lengths)
    for ep in bat:
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(ep[field], seq[ep["seed"]][field])
    r = DatasetReader(tmp_path / "bat")
    assert r.complete and r.metadata["sfv_world"]["collect_envs"] == 3
    assert [r.load_episode(e).seed for e in r.episode_ids] != sorted(seq)  # written in the order they end


def test_collect_batched_frame_budget_and_episode_cap(tmp_path: Path) -> None:
    envs = [CountingEnv() for _ in range(4)]
    stats = collect_batched(envs, tmp_path / "mf", RandomRows(envs[0].action_space, 4), episodes=None,
                            max_frames=13, frame_size=8, frame_source="obs", progress=False)
    r = DatasetReader(tmp_path / "mf")
    assert r.num_transitions == stats.transitions == 13  # running episodes count: cut at exactly 13
    for e in r.episode_ids:
        ep = r.load_episode(e)
        assert ep.terminations[-1] != ep.truncations[-1]  # every stored episode ends, one way or the other
    stats = collect_batched(envs, tmp_path / "ms", RandomRows(envs[0].action_space, 4), episodes=5,
                            max_episode_steps=2, frame_size=8, frame_source="obs", progress=False)
    r = DatasetReader(tmp_path / "ms")
    assert r.num_episodes == 5 and all(n <= 2 for n in r.episode_lengths.values())
    with pytest.raises(ValueError, match="envs is empty"):
        collect_batched([], tmp_path / "x", RandomRows(envs[0].action_space, 1), episodes=1, progress=False)
    with pytest.raises(ValueError, match=r"envs\[0\] has render_mode=None"):
        collect_batched(envs, tmp_path / "x", RandomRows(envs[0].action_space, 4), episodes=1, progress=False)
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        collect_batched(envs, tmp_path / "x", RandomRows(envs[0].action_space, 4), episodes=0,
                        frame_source="obs", progress=False)
    with pytest.raises(ValueError, match="frame_size must be >= 1"):
        collect_batched(envs, tmp_path / "x", RandomRows(envs[0].action_space, 4), episodes=1, frame_size=0,
                        frame_source="obs", progress=False)
    assert not (tmp_path / "x").exists()


def test_live_steps_finds_the_real_end() -> None:
    assert live_steps(np.array([0, 0, 1], bool)) == 3
    assert live_steps(np.array([0, 1, 1, 1], bool)) == 2  # a terminal tail of two more steps
    assert live_steps(np.array([0, 0, 0], bool)) == 3  # truncated or cut: every step is live


def test_terminal_tail_steps_on_after_the_end(tmp_path: Path) -> None:
    env = CountingEnv()
    collect(env, tmp_path / "plain", RandomPolicy(env.action_space), episodes=6, frame_size=10, frame_source="obs",
            seed=3, progress=False)
    stats = collect(env, tmp_path / "tail", RandomPolicy(env.action_space), episodes=6, frame_size=10,
                    frame_source="obs", seed=3, progress=False, terminal_tail=3)
    plain, tail = _arrays(tmp_path / "plain"), _arrays(tmp_path / "tail")
    assert DatasetReader(tmp_path / "tail").metadata["sfv_world"]["terminal_tail"] == 3
    assert DatasetReader(tmp_path / "plain").metadata["sfv_world"]["terminal_tail"] == 0
    assert stats.transitions == sum(len(ep["actions"]) for ep in tail) == sum(len(ep["actions"]) for ep in plain) + 18
    for p, t in zip(plain, tail, strict=True):
        n = len(p["actions"])
        assert live_steps(t["terminations"]) == n and len(t["actions"]) == n + 3
        # the live part is the plain episode, step for step
        for field in ("actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(t[field][:n], p[field])
        np.testing.assert_array_equal(t["observations"][: n + 1], p["observations"])
        # the tail: the env stepped on (CountingEnv's frames count every step), every step terminal
        np.testing.assert_array_equal(t["observations"][:, 0, 0, 0], 10 * np.arange(n + 4))
        assert t["terminations"][n - 1 :].all() and not t["truncations"].any()
    # a step cap cuts the tail short; the episode still ends terminated, never truncated
    collect(env, tmp_path / "cap", RandomPolicy(env.action_space), episodes=6, frame_size=10, frame_source="obs",
            seed=3, progress=False, terminal_tail=50, max_episode_steps=9)
    for ep in _arrays(tmp_path / "cap"):
        assert len(ep["actions"]) == 9 and ep["terminations"][-1] and not ep["truncations"].any()


def test_terminal_tail_of_cartpole_falls_on_without_reward_or_warning(tmp_path: Path) -> None:
    env = gym.make("CartPole-v1", render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium's "step() after terminated" warning is silenced
        collect(env, tmp_path / "cp", RandomPolicy(env.action_space), episodes=3, frame_size=16, progress=False,
                terminal_tail=8)
    for ep in _arrays(tmp_path / "cp"):
        n = live_steps(ep["terminations"])
        assert len(ep["rewards"]) == n + 8
        assert ep["rewards"][:n].tolist() == [1.0] * n and ep["rewards"][n:].tolist() == [0.0] * 8
        assert np.abs(np.diff(ep["observations"][n:].astype(np.int16), axis=0)).sum() > 0  # the pole moves on


def test_collect_batched_terminal_tail_matches_collect(tmp_path: Path) -> None:
    env = CountingEnv()
    collect(env, tmp_path / "seq", RandomPolicy(env.action_space), episodes=7, frame_size=10, frame_source="obs",
            seed=3, progress=False, terminal_tail=2)
    envs = [CountingEnv() for _ in range(3)]
    collect_batched(envs, tmp_path / "bat", RandomRows(envs[0].action_space, 3), episodes=7, frame_size=10,
                    frame_source="obs", seed=3, progress=False, terminal_tail=2)
    seq = {ep["seed"]: ep for ep in _arrays(tmp_path / "seq")}
    bat = _arrays(tmp_path / "bat")
    assert sorted(ep["seed"] for ep in bat) == sorted(seq)
    for ep in bat:
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            np.testing.assert_array_equal(ep[field], seq[ep["seed"]][field])
        assert ep["terminations"][-3:].all() and not ep["terminations"][-4]
    assert DatasetReader(tmp_path / "bat").metadata["sfv_world"]["terminal_tail"] == 2


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8", 1001])
def test_terminal_tail_must_be_a_step_count(tmp_path: Path, bad) -> None:
    env = CountingEnv()
    with pytest.raises(ValueError, match="collect: terminal_tail must be an integer"):
        collect(env, tmp_path / "x", RandomPolicy(env.action_space), episodes=1, frame_source="obs", progress=False,
                terminal_tail=bad)
    with pytest.raises(ValueError, match="collect_batched: terminal_tail must be an integer"):
        collect_batched([env], tmp_path / "x", RandomRows(env.action_space, 1), episodes=1, frame_source="obs",
                        progress=False, terminal_tail=bad)
    assert not (tmp_path / "x").exists()


def test_sticky_policy_repeats_with_probability_p() -> None:
    pol = StickyRandomPolicy(spaces.Discrete(4), p=0.8, seed=0)
    pol.reset(seed=0)
    acts = np.array([pol(None) for _ in range(4000)])
    repeat = float(np.mean(acts[1:] == acts[:-1]))
    assert repeat == pytest.approx(0.8 + 0.2 / 4, abs=0.03)
    uniform = RandomPolicy(spaces.Discrete(4), seed=0)
    acts = np.array([uniform(None) for _ in range(4000)])
    assert float(np.mean(acts[1:] == acts[:-1])) == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ValueError, match="p must be in"):
        StickyRandomPolicy(spaces.Discrete(2), p=1.0)


class StackedImageEnv(CountingEnv):
    """Observation space of 2 stacked 16x16 frames, as a model trained with VecFrameStack(2) sees."""

    def __init__(self):
        super().__init__()
        self.observation_space = spaces.Box(0, 255, (16, 16, 6), np.uint8)


def test_sb3_epsilon_greedy_policy(tmp_path: Path) -> None:
    from stable_baselines3 import PPO

    model = PPO("MlpPolicy", StackedImageEnv(), n_steps=8, batch_size=8, device="cpu", seed=0)
    model.save(tmp_path / "ppo.zip")
    space = spaces.Discrete(3)
    greedy = SB3EpsilonGreedyPolicy(tmp_path / "ppo.zip", space, epsilon=0.0, frame_stack=2, seed=0)
    assert type(greedy.model).__name__ == "PPO"
    frames = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    greedy.reset(seed=0)
    stacked = [np.concatenate([np.zeros_like(frames[0]), frames[0]], -1)] + \
        [np.concatenate([frames[i - 1], frames[i]], -1) for i in range(1, 6)]
    for f, obs in zip(frames, stacked, strict=True):
        expected, _ = model.predict(obs, deterministic=True)
        assert greedy(f) == int(expected)
    always_random = SB3EpsilonGreedyPolicy(None, space, epsilon=1.0, frame_stack=2, seed=1, model=model)
    always_random.reset(seed=1)
    reference = RandomPolicy(space, seed=1)
    reference.reset(seed=1)
    assert [always_random(f) for f in frames] == [reference(f) for f in frames]
    # collecting with it (wrong frame size is an error that names frame_size and frame_stack)
    env = CountingEnv()
    collect(env, tmp_path / "ds", greedy, episodes=2, frame_size=16, frame_source="obs", progress=False)
    assert DatasetReader(tmp_path / "ds").metadata["sfv_world"]["policy"]["epsilon"] == 0.0
    with pytest.raises(ValueError, match="frame_size and frame_stack"):
        collect(env, tmp_path / "ds2", greedy, episodes=1, frame_size=8, frame_source="obs", progress=False)
    with pytest.raises(FileNotFoundError, match="no saved SB3 model"):
        SB3EpsilonGreedyPolicy(tmp_path / "missing.zip", space)


# ------------------------------------------------------------------------------------------------
# crash safety: a real collector process killed mid-run

COLLECTOR = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_collect import CountingEnv
    from sfv_world.datasets import collect, RandomPolicy
    env = CountingEnv(step_delay=0.01)
    collect(env, {path!r}, RandomPolicy(env.action_space), episodes=10_000, frame_size=8,
            frame_source="obs", seed=0, progress=False)
""")


def _default_sigint() -> None:
    """Child pre-exec: SIGINT back to its default, so Python installs its Ctrl-C handler.

    A shell without job control starts background commands with SIGINT ignored (`make test &`), and
    an ignored signal is inherited: the collector would then never see the test's Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_collector(path: Path) -> subprocess.Popen:
    code = COLLECTOR.format(tests=str(TESTS), path=str(path))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint)


def _wait_for_episodes(proc: subprocess.Popen, path: Path, n: int, timeout: float = 60.0) -> None:
    meta = partial_path_for(path) / DATA_DIR / METADATA_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            import json

            if json.loads(meta.read_text())["total_episodes"] >= n:
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"collector wrote fewer than {n} episodes in {timeout} s")


def _check_recovered(path: Path, min_episodes: int) -> None:
    assert not path.exists(), "an interrupted dataset must not appear under its final name"
    r = DatasetReader(partial_path_for(path))
    assert not r.complete and r.num_episodes >= min_episodes
    r.validate()  # every finished episode is fully readable
    for e in r.episode_ids:
        ep = r.load_episode(e)
        assert ep.terminations[-1] and ep.seed == e
        np.testing.assert_array_equal(ep.observations[:, 0, 0, 0], 10 * np.arange(len(ep) + 1))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_collector_leaves_finished_episodes_readable(tmp_path: Path, sig) -> None:
    path = tmp_path / "ds"
    proc = _start_collector(path)
    try:
        _wait_for_episodes(proc, path, 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a collector running when the test fails
        proc.wait()
    assert proc.returncode != 0
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in err
        assert f"readable in {partial_path_for(path)}" in err  # the error says where the data is
    _check_recovered(path, 3)


# ------------------------------------------------------------------------------------------------
# source envs


@pytest.mark.parametrize("preset,n_actions", [("cartpole", 2), ("pong", 6), ("breakout", 4), ("minigrid", 3)])
def test_source_env_presets(preset, n_actions) -> None:
    from omegaconf import OmegaConf

    from sfv_world.envs.sources import make_pixel_env, make_source_env

    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "env" / f"{preset}.yaml")
    env = make_source_env(cfg)
    assert env.action_space == spaces.Discrete(n_actions)
    pix = make_pixel_env(cfg, frame_size=32)
    obs, _ = pix.reset(seed=0)
    assert obs.shape == (32, 32, 3) and obs.dtype == np.uint8 and pix.observation_space.contains(obs)
    obs2, *_ = pix.step(pix.action_space.sample())
    assert obs2.shape == (32, 32, 3)
    if preset in ("pong", "breakout"):
        assert env.unwrapped._frameskip == 4
    pix.close()
    env.close()


def test_pixel_observation_matches_collector(tmp_path: Path) -> None:
    from sfv_world.envs.sources import PixelObservation

    env = PixelObservation(CountingEnv(render_mode="rgb_array"), frame_size=8, frame_source="render")
    obs, _ = env.reset(seed=0)
    base = CountingEnv()
    collect(base, tmp_path / "ds", RandomPolicy(base.action_space), episodes=1, frame_size=8,
            frame_source="obs", progress=False)
    np.testing.assert_array_equal(obs, DatasetReader(tmp_path / "ds").load_episode(0).observations[0])
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        PixelObservation(CountingEnv(), frame_source="render")
    with pytest.raises(ValueError, match="uint8 image observations"):
        PixelObservation(gym.make("CartPole-v1"), frame_source="obs")


def test_minari_recovers_the_source_env(tmp_path: Path) -> None:
    """A collected dataset's env_spec (with the ActionSubset wrapper and its arguments) rebuilds the env."""
    minari = pytest.importorskip("minari", reason="minari (test extra) is needed to prove compatibility")
    from omegaconf import OmegaConf

    from sfv_world.envs.sources import make_source_env

    env = make_source_env(OmegaConf.load(Path(__file__).parents[1] / "configs" / "env" / "minigrid.yaml"))
    collect(env, tmp_path / "mg", RandomPolicy(env.action_space), episodes=None, max_frames=20, frame_size=16,
            progress=False)
    mds = minari.MinariDataset(tmp_path / "mg" / DATA_DIR)
    assert mds.total_steps == 20 and mds.env_spec.id == "MiniGrid-Empty-8x8-v0"
    rebuilt = mds.recover_environment()
    assert rebuilt.action_space == spaces.Discrete(3) and rebuilt.unwrapped.render_mode == "rgb_array"
    np.testing.assert_array_equal(mds[0].actions, DatasetReader(tmp_path / "mg").load_episode(0).actions)


def test_action_subset_wrapper() -> None:
    from sfv_world.envs.sources import ActionSubset

    env = ActionSubset(CountingEnv(n_actions=6), [4, 1])
    env.reset(seed=0)
    assert env.action_space == spaces.Discrete(2)
    _, reward, *_ = env.step(0)
    assert reward == 4.0
    with pytest.raises(ValueError, match="must be distinct actions"):
        ActionSubset(CountingEnv(), [0, 7])


def test_crop_frame_cuts_the_raw_frame_before_the_resize(tmp_path: Path) -> None:
    """env.crop cuts render() (and image observations) to [top, bottom, left, right]; the collector and
    PixelObservation then resize the cut frame, and the dataset records the box."""
    from sfv_world.envs.sources import CropFrame, make_pixel_env, make_source_env

    full = make_source_env({"id": "CartPole-v1"})
    full.reset(seed=3)
    raw = full.render()
    cfg = {"id": "CartPole-v1", "crop": [160, 320, 100, 500]}
    env = make_source_env(cfg)
    env.reset(seed=3)
    np.testing.assert_array_equal(env.render(), raw[160:320, 100:500])
    pix = make_pixel_env(cfg, frame_size=16)
    obs, _ = pix.reset(seed=3)
    np.testing.assert_array_equal(obs, area_resize(raw[160:320, 100:500], 16))
    # the box is recorded in the dataset's env_spec, so the env can be rebuilt with it
    collect(env, tmp_path / "cut", RandomPolicy(env.action_space), episodes=1, frame_size=16, progress=False)
    spec = DatasetReader(tmp_path / "cut").metadata["env_spec"]
    assert '"CropFrame"' in spec and "[160, 320, 100, 500]" in spec
    # image observations are cut too, with their space
    obs_env = CropFrame(CountingEnv(), [1, 5, 2, 8], frame_source="obs")
    o, _ = obs_env.reset(seed=0)
    assert o.shape == (4, 6, 3) and obs_env.observation_space.shape == (4, 6, 3) and obs_env.observation_space.contains(o)
    with pytest.raises(ValueError, match=r"env.crop \[0, 999, 0, 600\] lies outside the 400x600 frame"):
        bad = make_source_env({"id": "CartPole-v1", "crop": [0, 999, 0, 600]})
        bad.reset(seed=0)
        bad.render()
    for box in ([10, 5, 0, 600], [0, 10, 0], "top", [-1, 10, 0, 600]):
        with pytest.raises(ValueError, match="env.crop must be"):
            make_source_env({"id": "CartPole-v1", "crop": box})
    full.close(), env.close(), pix.close()


def test_strips_stack_column_ranges_of_the_crop_top_to_bottom(tmp_path: Path) -> None:
    """env.strips cuts the cropped frame into column ranges stacked top to bottom (before the resize);
    the dataset's env_spec records them; bad strips are errors that name env.strips."""
    from sfv_world.envs.sources import CropFrame, make_pixel_env, make_source_env

    full = make_source_env({"id": "CartPole-v1"})
    full.reset(seed=3)
    raw = full.render()[160:320]
    cfg = {"id": "CartPole-v1", "crop": [160, 320, 0, 600], "strips": [[0, 360], [240, 600]]}
    env = make_source_env(cfg)
    env.reset(seed=3)
    frame = env.render()
    assert frame.shape == (320, 360, 3)
    np.testing.assert_array_equal(frame[:160], raw[:, 0:360])
    np.testing.assert_array_equal(frame[160:], raw[:, 240:600])
    pix = make_pixel_env(cfg, frame_size=16)
    obs, _ = pix.reset(seed=3)
    np.testing.assert_array_equal(obs, area_resize(np.concatenate([raw[:, :360], raw[:, 240:]], 0), 16))
    collect(env, tmp_path / "cut", RandomPolicy(env.action_space), episodes=1, frame_size=16, progress=False)
    assert "[[0, 360], [240, 600]]" in DatasetReader(tmp_path / "cut").metadata["env_spec"]
    obs_env = CropFrame(CountingEnv(), [1, 5, 0, 8], frame_source="obs", strips=[[0, 4], [4, 8]])
    o, _ = obs_env.reset(seed=0)
    assert o.shape == (8, 4, 3) and obs_env.observation_space.shape == (8, 4, 3)
    for strips, msg in (([[0, 360]], "two or more"), ([[0, 300], [200, 600]], "one width"),
                        ([[0, 360], [260, 620]], "reaches past the 600 columns"), ("wide", "column ranges"),
                        ([[10, 5], [0, 5]], "two or more")):
        with pytest.raises(ValueError, match=rf"env.strips.*{msg}"):
            make_source_env({**cfg, "strips": strips})
    with pytest.raises(ValueError, match=r"env.strips=.* needs env.crop"):
        make_source_env({"id": "CartPole-v1", "strips": [[0, 300], [300, 600]]})
    full.close(), env.close(), pix.close()


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_collect_and_inspect(tmp_path: Path, capsys) -> None:
    from sfv_world.apps.cli import main

    ds = tmp_path / "cp"
    args = ["collect", "env=cartpole", "collect.episodes=2", "collect.frame_size=16", "collect.progress=false",
            f"dataset={ds}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "episodes     2" in out and "16x16x3" in out
    with pytest.raises(SystemExit, match="already exists; pass collect.overwrite=true"):
        main(args)
    assert DatasetReader(ds).metadata["sfv_world"]["crop"] == [160, 320, 0, 600]  # CartPole's default
    assert main(args + ["collect.overwrite=true", "seed=1", "env.crop=null"]) == 0
    meta = DatasetReader(ds).metadata["sfv_world"]
    assert meta["seed"] == 1 and meta["crop"] is None and meta["strips"] is None
    assert main(args + ["collect.overwrite=true", "env=cartpole_strips"]) == 0
    assert DatasetReader(ds).metadata["sfv_world"]["strips"] == [[0, 360], [240, 600]]
    assert main(args + ["collect.overwrite=true", "collect.terminal_tail=4"]) == 0
    r = DatasetReader(ds)
    assert r.metadata["sfv_world"]["terminal_tail"] == 4
    assert all(r.load_episode(e).terminations[-5:].all() for e in r.episode_ids)
    with pytest.raises((ValueError, SystemExit), match="collect.terminal_tail must be an integer"):
        main(args + ["collect.overwrite=true", "collect.terminal_tail=2.5"])
    assert main(args + ["collect.overwrite=true"]) == 0
    sheet = tmp_path / "sheet.png"
    assert main(["inspect", str(ds), f"inspect.contact_sheet={sheet}", "inspect.samples=5"]) == 0
    out = capsys.readouterr().out
    for word in ("episodes", "transitions", "frames", "actions", "Discrete(2)", "returns", "frame size"):
        assert word in out
    from PIL import Image

    assert Image.open(sheet).size == (3 * (32 + 2) + 2, 2 * (32 + 2) + 2)
    with pytest.raises(SystemExit, match="dataset folder does not exist"):
        main(["inspect", str(tmp_path / "nothing")])


class StackedCnnEnv(CountingEnv):
    """HWC observations of 2 stacked 36x36 frames: SB3 wraps it in VecTransposeImage (CHW model input)."""

    def __init__(self):
        super().__init__()
        self.observation_space = spaces.Box(0, 255, (36, 36, 6), np.uint8)


def test_sb3_cnn_policy_on_stacked_hwc_frames(tmp_path: Path) -> None:
    from stable_baselines3 import PPO

    model = PPO("CnnPolicy", StackedCnnEnv(), n_steps=8, batch_size=8, device="cpu", seed=0)
    assert model.observation_space.shape == (6, 36, 36)  # transposed by SB3
    model.save(tmp_path / "cnn.zip")
    pol = SB3EpsilonGreedyPolicy(tmp_path / "cnn.zip", spaces.Discrete(3), epsilon=0.0, frame_stack=2)
    pol.reset(seed=0)
    frames = np.random.default_rng(0).integers(0, 256, (4, 36, 36, 3), dtype=np.uint8)
    prev = np.zeros_like(frames[0])
    for f in frames:
        expected, _ = model.predict(np.concatenate([prev, f], -1), deterministic=True)
        assert pol(f) == int(expected)
        prev = f


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt, on purpose
def test_cli_collect_stops_when_the_interrupt_lands_in_a_weakref_callback(tmp_path: Path, monkeypatch, capsys) -> None:
    """A signal handled while Python runs a weakref callback has its KeyboardInterrupt dropped ("Exception
    ignored"); the collector must still stop at its next env step (CI once hung here for 120 s)."""
    import os
    import weakref

    from sfv_world.apps import collect as collect_app
    from sfv_world.apps.cli import main

    class Dropper:
        pass

    calls = {"n": 0}
    real_make_policy = collect_app.make_policy

    def make_policy(ccfg, action_space, seed):
        policy = real_make_policy(ccfg, action_space, seed)
        act = policy.__call__

        class Interrupting(type(policy)):
            def __call__(self, frame):
                calls["n"] += 1
                if calls["n"] == 30:  # mid-episode: the interrupt fires inside a weakref callback and is dropped
                    obj = Dropper()
                    weakref.finalize(obj, lambda: (os.kill(os.getpid(), signal.SIGINT), sum(range(1000))))
                    del obj
                return act(frame)

        policy.__class__ = Interrupting
        return policy

    monkeypatch.setattr(collect_app, "make_policy", make_policy)
    ds = tmp_path / "cp"
    # a run started with SIGINT ignored (`bash .ci/run &` in a shell without job control) keeps it ignored, as
    # `nohup` wants; this test is about a live Ctrl-C, so it makes SIGINT live for its run
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["collect", "env=cartpole", "collect.episodes=1000", "collect.frame_size=8",
                     "collect.progress=false", f"dataset={ds}"])
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)
    err = capsys.readouterr().err
    assert code == 130, err
    assert calls["n"] == 30  # stopped at the very next step
    assert "interrupted" in err and not ds.exists() and partial_path_for(ds).exists()
    assert restored is signal.default_int_handler  # handlers restored


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_collect_interrupt_says_where_the_data_is(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C, and `kill` (SIGTERM, which SDL would otherwise swallow), stop a rendering collector: exit 130,
    the episodes so far readable in the partial file, the final path not created."""
    exe = Path(sys.executable).parent / "sfv-world"
    path = tmp_path / "cp"
    proc = subprocess.Popen([str(exe), "collect", "env=cartpole", "collect.episodes=100000", "collect.frame_size=8",
                             "collect.progress=false", f"dataset={path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        _wait_for_episodes(proc, path, 2, timeout=180)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a collector running when the test fails
        proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert f"readable in {partial_path_for(path)}" in err and "was not created" in err
    assert not path.exists() and DatasetReader(partial_path_for(path)).num_episodes >= 2
