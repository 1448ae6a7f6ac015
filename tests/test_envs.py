"""The dream as Gymnasium Env / VectorEnv / SB3 VecEnv: the checkers, batching, seeding, autoreset, errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import sfv_world.envs  # noqa: F401  (registers sfv_world/Dream-v0)
from dream_fixtures import make_tiny_checkpoint, make_tiny_dataset
from gymnasium.utils.env_checker import check_env as gym_check_env
from sfv_world.envs.dream import DreamEnv, DreamVectorEnv
from sfv_world.envs.sb3 import DreamSB3VecEnv
from sfv_world.envs.wrappers import FrameStack, stack_frames
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from sfv_world.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ENV_ID = "sfv_world/Dream-v0"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("envs")
    ds = make_tiny_dataset(root / "ds")
    ds32 = make_tiny_dataset(root / "ds32", frame_size=32)
    return {
        "plain": make_tiny_checkpoint(root / "plain.pt", ds),
        "never_ends": make_tiny_checkpoint(root / "never.pt", ds, termination_bias=-20.0),
        "always_ends": make_tiny_checkpoint(root / "always.pt", ds, termination_bias=20.0),
        "stored32": make_tiny_checkpoint(root / "stored32.pt", ds32),  # 32x32 stored, 16x16 model
        "root": root,
    }


def test_gymnasium_check_env_pixels_and_latent(ckpts):
    env = gym.make(ENV_ID, checkpoint=str(ckpts["plain"]), frame_stack=3, render_mode="rgb_array")
    assert env.observation_space == gym.spaces.Box(0, 255, (16, 16, 9), np.uint8)
    assert env.action_space == gym.spaces.Discrete(2)
    gym_check_env(env.unwrapped)
    latent = gym.make(ENV_ID, checkpoint=str(ckpts["plain"]), obs_mode="latent")
    assert latent.observation_space.shape == (64,) and latent.observation_space.dtype == np.float32
    with pytest.warns(UserWarning):  # gymnasium warns about the unbounded Box of a feature vector
        gym_check_env(latent.unwrapped)


def test_sb3_check_env_pixels_and_latent(ckpts):
    with pytest.warns(UserWarning, match="minimal resolution"):  # 16x16 < NatureCNN's 36x36
        sb3_check_env(DreamEnv(checkpoint=ckpts["plain"], frame_stack=2), warn=True)
    sb3_check_env(DreamEnv(checkpoint=ckpts["plain"], obs_mode="latent"), warn=True)
    slots = DreamEnv(checkpoint=ckpts["plain"], obs_mode="latent", latent_features="slots")
    assert slots.observation_space.shape == (16 * 64,)  # 16 token slots of 64 channels
    sb3_check_env(slots, warn=True)


def test_latent_features_must_agree_with_a_given_runtime(ckpts):
    from sfv_world.world import WorldRuntime

    rt = WorldRuntime.from_checkpoint(ckpts["plain"], batch_size=2, features="slots")
    venv = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", runtime=rt, obs_mode="latent")
    obs, _ = venv.reset(seed=0)
    assert obs.shape == (2, 16 * 64) and obs.dtype == np.float32
    venv.close()
    with pytest.raises(ValueError, match="latent_features='mean' differs from the runtime's features='slots'"):
        DreamEnv(runtime=WorldRuntime.from_checkpoint(ckpts["plain"], features="slots"), obs_mode="latent",
                 latent_features="mean")


def test_latent_mode_decodes_frames_only_when_looked_at(ckpts):
    """A latent env skips the denoiser on its steps (lazy_frames); frames() and render() still show the
    newest frame, the same pixels a pixel env with the same seed serves, and a reset row shows its context."""
    lat = DreamVectorEnv(num_envs=3, checkpoint=ckpts["plain"], obs_mode="latent", render_mode="rgb_array")
    pix = DreamVectorEnv(num_envs=3, checkpoint=ckpts["plain"], obs_mode="pixels")
    assert lat.core.lazy_frames and not pix.core.lazy_frames
    lat.reset(seed=4)
    pix.reset(seed=4)
    np.testing.assert_array_equal(lat.core.frames(), pix.core.frames())
    for t in range(5):
        act = np.array([0, 1, t % 2])
        lat.step(act)
        pixel_obs, *_ = pix.step(act)
        assert lat.core.stale.all()
        if t in (1, 4):  # looked at after some unlooked-at steps
            np.testing.assert_array_equal(lat.core.frames(), pixel_obs)
            assert not lat.core.stale.any()
    np.testing.assert_array_equal(np.stack(lat.render()), pixel_obs)
    lat.step(np.zeros(3, np.int64))
    pix.step(np.zeros(3, np.int64))
    info_l, info_p = lat.core.reset_rows(np.array([1])), pix.core.reset_rows(np.array([1]))
    assert lat.core.stale.tolist() == [True, False, True]
    np.testing.assert_array_equal(lat.core.frames(), pix.core.frames())
    np.testing.assert_array_equal(info_l["log_likelihood"], info_p["log_likelihood"])


def test_observations_are_at_the_model_frame_size(ckpts):
    env = DreamEnv(checkpoint=ckpts["stored32"], render_mode="rgb_array")
    obs, info = env.reset(seed=0)
    assert obs.shape == (16, 16, 3) and obs.dtype == np.uint8
    assert env.render().shape == (16, 16, 3)
    assert np.isfinite(info["log_likelihood"]) and info["context_log_likelihood"].shape == (4,)
    obs, reward, terminated, truncated, info = env.step(1)
    assert obs.shape == (16, 16, 3)
    assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
    assert set(info) == {"log_likelihood", "jacobi_iterations", "termination_logit", "out_of_range", "ood_score",
                         "ood"}
    np.testing.assert_array_equal(env.render(), obs)


def test_image_to_world_from_options(ckpts):
    from sfv_world.datasets import area_resize

    env = DreamEnv(checkpoint=ckpts["stored32"], frame_stack=2)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    obs, info = env.reset(seed=0, options={"frames": image})
    small = area_resize(image, 16)
    np.testing.assert_array_equal(obs, stack_frames(np.stack([small, small])))
    assert info["context_log_likelihood"].shape == (1,)
    frames = np.stack([image, image[::-1]])
    obs, _ = env.reset(options={"frames": frames, "actions": np.array([1])})
    np.testing.assert_array_equal(obs[..., 3:], area_resize(image[::-1], 16))
    with pytest.raises(ValueError, match=r"options\['actions'\] is required"):
        env.reset(options={"frames": frames})
    with pytest.raises(ValueError, match=r"options\['actions'\].*not in the action space"):
        env.reset(options={"frames": frames, "actions": np.array([7])})
    with pytest.raises(ValueError, match=r"options\['frames'\] must be uint8"):
        env.reset(options={"frames": image.astype(np.float32)})


def test_seeded_reset_reproduces_rollouts_bit_for_bit(ckpts):
    def run(seed):
        env = DreamEnv(checkpoint=ckpts["plain"], frame_stack=2, horizon=50)
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for t in range(8):
            obs, r, term, trunc, info = env.step(t % 2)
            out += [obs, np.float64(r), np.float64(info["log_likelihood"])]
            if term or trunc:
                obs, _ = env.reset()
                out.append(obs)
        return out

    a, b, c = run(11), run(11), run(12)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_make_vec_returns_the_natively_batched_env(ckpts):
    envs = gym.make_vec(ENV_ID, num_envs=5, vectorization_mode="vector_entry_point",
                        checkpoint=str(ckpts["plain"]), frame_stack=2)
    assert isinstance(envs.unwrapped, DreamVectorEnv)
    assert envs.unwrapped.runtime.batch_size == 5  # one world model call for all five
    assert envs.observation_space.shape == (5, 16, 16, 6)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, info = envs.reset(seed=3)
    assert obs.shape == (5, 16, 16, 6) and info["log_likelihood"].shape == (5,) and info["_log_likelihood"].all()
    obs, rew, term, trunc, info = envs.step(np.array([0, 1, 0, 1, 1]))
    assert obs.shape == (5, 16, 16, 6) and rew.shape == term.shape == trunc.shape == (5,)
    assert info["jacobi_iterations"].shape == (5,)
    with pytest.raises(ValueError, match="not in the action space"):
        envs.step(np.array([0, 1, 2, 1, 1]))
    # the default mode (no vectorization_mode) also picks the vector entry point
    assert isinstance(gym.make_vec(ENV_ID, num_envs=2, checkpoint=str(ckpts["plain"])).unwrapped, DreamVectorEnv)


def test_vector_env_next_step_autoreset(ckpts):
    envs = DreamVectorEnv(num_envs=3, checkpoint=ckpts["never_ends"], horizon=3)
    envs.reset(seed=0)
    for t in range(3):
        obs, rew, term, trunc, _ = envs.step(np.array([0, 1, 0]))
        assert not term.any()
    assert trunc.all()  # the horizon
    obs, rew, term, trunc, info = envs.step(np.array([1, 1, 1]))  # this step resets them
    assert (rew == 0).all() and not term.any() and not trunc.all()
    np.testing.assert_array_equal(envs.unwrapped.core.steps, 0)
    obs, rew, term, trunc, info = envs.step(np.array([1, 1, 1]))
    assert (rew != 0).all() and (envs.core.steps == 1).all()


def test_vector_env_same_step_autoreset_and_partial_reset(ckpts):
    envs = DreamVectorEnv(num_envs=2, checkpoint=ckpts["always_ends"], autoreset_mode="SameStep")
    envs.reset(seed=0)
    obs, rew, term, trunc, info = envs.step(np.array([0, 1]))
    assert term.all() and info["_final_obs"].all()
    assert info["final_obs"][0].shape == (16, 16, 3)
    assert (envs.core.steps == 0).all()  # already restarted
    before = envs.core.stack.copy()
    obs, _ = envs.reset(options={"reset_mask": np.array([False, True])})
    np.testing.assert_array_equal(envs.core.stack[0], before[0])


def test_sb3_vec_env_truncation_and_termination_semantics(ckpts):
    venv = DreamSB3VecEnv(checkpoint=ckpts["never_ends"], num_envs=3, horizon=4)
    venv.seed(5)
    obs = venv.reset()
    assert obs.shape == (3, 16, 16, 3) and len(venv.reset_infos) == 3
    for t in range(4):
        obs, rewards, dones, infos = venv.step(np.array([0, 1, 1]))
    assert dones.all() and rewards.dtype == np.float32
    for i, info in enumerate(infos):
        assert info["TimeLimit.truncated"] is True
        assert info["terminal_observation"].shape == (16, 16, 3)
    assert (venv.core.steps == 0).all()

    venv = DreamSB3VecEnv(checkpoint=ckpts["always_ends"], num_envs=2, horizon=4)
    venv.reset()
    obs, rewards, dones, infos = venv.step(np.array([0, 1]))
    assert dones.all() and all(info["TimeLimit.truncated"] is False for info in infos)
    assert all("terminal_observation" in info and "log_likelihood" in info for info in infos)
    with pytest.raises(ValueError, match="not in the action space"):
        venv.step(np.array([0, 5]))


def test_frame_stack_wrapper_matches_the_dream_layout(ckpts):
    from sfv_world.envs.wrappers import ResizeObservation

    class Frames(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            self.t = 0
            return np.full((32, 32, 3), 0, np.uint8), {}

        def step(self, action):
            self.t += 1
            return np.full((32, 32, 3), self.t, np.uint8), 0.0, False, False, {}

    env = FrameStack(ResizeObservation(Frames(), 16), 3)
    obs, _ = env.reset()
    assert obs.shape == (16, 16, 9) and (obs == 0).all()
    obs, *_ = env.step(0)
    obs, *_ = env.step(0)
    assert obs[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # oldest first, as DreamEnv


def test_missing_and_incompatible_checkpoints(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        gym.make(ENV_ID, checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="needs checkpoint="):
        DreamEnv()
    payload = load_checkpoint(ckpts["plain"])
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith("denoiser.")}
    save_checkpoint(tmp_path / "nodenoiser.pt", payload)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        DreamEnv(checkpoint=tmp_path / "nodenoiser.pt")
    payload = load_checkpoint(ckpts["plain"])
    del payload["dataset"]["action_space"]
    save_checkpoint(tmp_path / "noactions.pt", payload)
    with pytest.raises(CheckpointError, match="no 'action_space'"):
        DreamEnv(checkpoint=tmp_path / "noactions.pt")


def test_invalid_actions_and_arguments(ckpts):
    env = DreamEnv(checkpoint=ckpts["plain"])
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"DreamEnv.step: action.*2.*not in the action space Discrete\(2\)"):
        env.step(2)
    with pytest.raises(ValueError, match="must be integers"):
        env.step(0.5)
    with pytest.raises(ValueError, match="obs_mode must be one of"):
        DreamEnv(checkpoint=ckpts["plain"], obs_mode="rgb")
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        DreamEnv(checkpoint=ckpts["plain"], horizon=0)


def test_context_sources_and_their_errors(ckpts, tmp_path):
    from sfv_world.datasets import DatasetReader

    env = DreamEnv(checkpoint=ckpts["plain"], context_start="episode_start", context_frames=2)
    with DatasetReader(load_checkpoint(ckpts["plain"])["dataset"]["path"]) as r:
        firsts = {r.read_frames(e, 0, 1)[0].tobytes() for e in r.episode_ids}
    assert all(f.tobytes() in firsts for f in env.core.pool.frames[:, 0])
    with pytest.raises(ValueError, match="does not exist"):
        DreamEnv(checkpoint=ckpts["plain"], dataset=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="context_start must be one of"):
        DreamEnv(checkpoint=ckpts["plain"], context_start="middle")
    with pytest.raises(ValueError, match="exceeds the world's context window"):
        DreamEnv(checkpoint=ckpts["plain"], context_frames=9)
    payload = load_checkpoint(ckpts["plain"])
    payload["dataset"]["path"] = str(tmp_path / "moved")
    save_checkpoint(tmp_path / "moved.pt", payload)
    env = DreamEnv(checkpoint=tmp_path / "moved.pt")
    with pytest.raises(ValueError, match="no dataset to take dream context from"):
        env.reset(seed=0)
    obs, _ = env.reset(seed=0, options={"frames": np.zeros((16, 16, 3), np.uint8)})
    assert (obs == 0).all()


def test_sampled_terminations_follow_the_head_probability(ckpts):
    # bias -3: p = sigmoid(-3) ~ 0.047 per step: never above the 0.5 threshold, but sampled it ends episodes
    from dream_fixtures import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(ckpts["root"] / "rare.pt", load_checkpoint(ckpts["plain"])["dataset"]["path"],
                                termination_bias=-3.0)
    thr = DreamVectorEnv(num_envs=16, checkpoint=ckpt, horizon=1000)
    smp = DreamVectorEnv(num_envs=16, checkpoint=ckpt, horizon=1000, termination="sample")
    thr.reset(seed=0)
    smp.reset(seed=0)
    ends_thr = ends_smp = 0
    for _ in range(20):
        ends_thr += int(thr.step(np.zeros(16, np.int64))[2].sum())
        ends_smp += int(smp.step(np.zeros(16, np.int64))[2].sum())
    assert ends_thr == 0
    assert 3 <= ends_smp <= 40  # 320 steps x ~0.047
    with pytest.raises(ValueError, match="termination must be one of"):
        DreamEnv(checkpoint=ckpt, termination="maybe")


def test_context_clips_stay_before_the_real_end(tmp_path):
    """Random context clips never reach an episode's terminal frame or its terminal tail."""
    from sfv_world.datasets import DatasetReader, EpisodeWriter, live_steps
    from sfv_world.envs.dream import load_context_pool
    from gymnasium import spaces

    rng = np.random.default_rng(0)
    with EpisodeWriter(tmp_path / "ds", action_space=spaces.Discrete(2), frame_shape=(8, 8, 3)) as w:
        for e in range(12):
            live, tail = int(rng.integers(4, 9)), int(rng.integers(0, 4))
            T = live + tail
            frames = np.zeros((T + 1, 8, 8, 3), np.uint8)
            frames[:, 0, 0, 0] = np.arange(T + 1)  # frame index
            frames[:, 0, 0, 1] = e  # episode
            terms = np.arange(T) >= live - 1
            w.add_episode(frames, rng.integers(0, 2, T), np.ones(T), terms, np.zeros(T, bool))
    reader = DatasetReader(tmp_path / "ds")
    live = {e: live_steps(reader.load_episode(e, observations=False).terminations) for e in reader.episode_ids}
    pool = load_context_pool(tmp_path / "ds", None, context_frames=4, frame_size=8, pool_size=256, seed=1)
    last = pool.frames[:, -1, 0, 0]  # [N, C] of each clip's last frame
    assert all(int(t) <= live[int(e)] - 1 for t, e in zip(last[:, 0], last[:, 1], strict=True))
    # every live start is reachable: some clip ends on the last live frame of its episode
    assert any(int(t) == live[int(e)] - 1 for t, e in zip(last[:, 0], last[:, 1], strict=True))


def test_time_scale_advances_several_frames_per_step(ckpts):
    # time_scale=2: one step is two dream frames under the same action, bit for bit (the frame draw uses no RNG
    # at an integer scale); the reward is their mean; the horizon counts steps
    one = DreamEnv(checkpoint=ckpts["plain"], frame_stack=2, horizon=50)
    two = DreamEnv(checkpoint=ckpts["plain"], frame_stack=2, horizon=50, time_scale=2)
    o1, _ = one.reset(seed=3)
    o2, _ = two.reset(seed=3)
    np.testing.assert_array_equal(o1, o2)
    rewards = []
    for a in (1, 0):
        _, r, _, _, _ = one.step(a)
        rewards.append(r)
        _, r, _, _, _ = one.step(a)
        rewards.append(r)
        _, r2, _, _, info2 = two.step(a)
        assert r2 == pytest.approx((rewards[-2] + rewards[-1]) / 2, rel=1e-6)
        assert info2["jacobi_iterations"] >= 2
    np.testing.assert_array_equal(one.core.stack, two.core.stack)  # the same four frames
    assert two.core.steps[0] == 2 and one.core.steps[0] == 4  # the horizon counts steps, not frames


def test_time_scaled_step_ends_if_any_frame_ends_and_averages_rewards(ckpts):
    # the real runtime's per-frame outputs, rewritten so that only the first frame of each step ends row 0 and
    # pays 1: a step of two frames must end row 0 (not just read its last frame) and pay the mean, 0.5
    from dataclasses import replace

    core = DreamVectorEnv(num_envs=2, checkpoint=ckpts["never_ends"], horizon=50, time_scale=2).core
    core.seed(0)
    core.reset_rows(np.arange(2))
    step, calls = core.runtime.step, []

    def scripted(actions, **kwargs):
        out = step(actions, **kwargs)
        first = len(calls) % 2 == 0
        calls.append(first)
        return replace(out, termination_prob=np.array([0.9 if first else 0.0, 0.0], np.float32),
                       rewards=np.array([1.0 if first else 0.0, 1.0], np.float32))

    core.runtime.step = scripted
    _, rewards, terminated, _, _ = core.step(np.zeros(2, np.int64))
    assert calls == [True, False]
    np.testing.assert_array_equal(terminated, [True, False])
    np.testing.assert_allclose(rewards, [0.5, 1.0])


def test_fractional_time_scale_draws_frames_per_step(ckpts):
    core = DreamEnv(checkpoint=ckpts["plain"], time_scale=1.25).core
    core.seed(0)
    draws = np.array([core.frames_this_step() for _ in range(2000)])
    assert set(np.unique(draws)) == {1, 2}
    assert draws.mean() == pytest.approx(1.25, abs=0.03)
    for bad in (0.5, True, float("nan"), "2", 16):
        with pytest.raises(ValueError, match="time_scale must be a number in"):
            DreamEnv(checkpoint=ckpts["plain"], time_scale=bad)


def test_termination_logit_in_info_is_the_largest_over_a_steps_frames(ckpts):
    """info["termination_logit"] (float32 [N]) is the head's log-odds; a time-scaled step reports its largest frame's."""
    from dataclasses import replace

    venv = DreamSB3VecEnv(ckpts["plain"], num_envs=2, horizon=50)
    venv.seed(0)
    venv.reset()
    _, _, _, infos = venv.step(np.zeros(2, np.int64))
    assert all(isinstance(i["termination_logit"], float) and np.isfinite(i["termination_logit"]) for i in infos)

    core = DreamVectorEnv(num_envs=2, checkpoint=ckpts["never_ends"], horizon=50, time_scale=2).core
    core.seed(0)
    core.reset_rows(np.arange(2))
    step, calls = core.runtime.step, []

    def scripted(actions, **kwargs):
        out = step(actions, **kwargs)
        calls.append(len(calls))
        logit = np.array([-3.0, -9.0] if len(calls) == 1 else [-7.0, -1.0], np.float32)
        return replace(out, termination_logit=logit)

    core.runtime.step = scripted
    *_, info = core.step(np.zeros(2, np.int64))
    assert calls == [0, 1]
    assert info["termination_logit"].dtype == np.float32
    np.testing.assert_array_equal(info["termination_logit"], [-3.0, -1.0])


def test_a_frame_out_of_the_data_range_truncates_its_episode(ckpts):
    """info["out_of_range"] marks a frame the world clamped (sampler.bound_sigmas); with truncate_out_of_range it
    truncates the episode (SB3: TimeLimit.truncated, the value is bootstrapped); by default it does not."""
    tight = {"bound_sigmas": 1e-3}  # a bound of 1.0001: every frame of an untrained model leaves it
    venv = DreamSB3VecEnv(ckpts["never_ends"], num_envs=2, horizon=50, sampler=tight, truncate_out_of_range=True)
    venv.seed(0)
    venv.reset()
    _, _, dones, infos = venv.step(np.zeros(2, np.int64))
    assert dones.all()
    assert all(i["out_of_range"] is True and i["TimeLimit.truncated"] is True for i in infos)

    core = DreamVectorEnv(num_envs=2, checkpoint=ckpts["never_ends"], horizon=50, sampler=tight).core
    core.seed(0)
    core.reset_rows(np.arange(2))
    _, _, term, trunc, info = core.step(np.zeros(2, np.int64))
    assert info["out_of_range"].dtype == np.bool_ and info["out_of_range"].all()
    assert not trunc.any() and not term.any()

    env = DreamEnv(checkpoint=ckpts["never_ends"], horizon=50)  # the fixtures' sampler: no bound
    env.reset(seed=0)
    _, _, terminated, truncated, info = env.step(0)
    assert info["out_of_range"] is False and not truncated and not terminated
