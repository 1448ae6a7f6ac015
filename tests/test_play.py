"""Headless play (SDL_VIDEODRIVER=dummy): scripted key events drive the window; frames, the human <->
policy switch, pause / single step, horizon keys and the recording files are checked."""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np
import pygame
import pytest
from dream_fixtures import REPO, make_tiny_checkpoint, make_tiny_dataset
from gymnasium import spaces
from policy_fixtures import save_tiny_policy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("play")
    ds = make_tiny_dataset(root / "ds")
    # termination pinned low: imagined episodes end by the horizon only, so the script is predictable
    ckpt = make_tiny_checkpoint(root / "ckpt.pt", ds, termination_bias=-20.0)
    return {"root": root, "dataset": ds, "ckpt": ckpt}


def compose(tiny, *overrides):
    from sfv_world.apps.cli import compose as hydra_compose

    return hydra_compose([f"checkpoint={tiny['ckpt']}", f"run_dir={tiny['root'] / 'run'}", "device=cpu",
                          "play.fps=30", "play.scale=4", *overrides])


def key(kind, k):
    return pygame.event.Event(kind, key=k, mod=0, unicode="", scancode=0)


def down(k):
    return key(pygame.KEYDOWN, k)


def up(k):
    return key(pygame.KEYUP, k)


def test_keymap_defaults_and_override():
    from sfv_world.apps.play_ui import make_keymap

    km = make_keymap(spaces.Discrete(2))
    assert km.action({pygame.K_LEFT}) == 0 and km.action({pygame.K_d}) == 1 and km.action(set()) is None
    assert km.idle is None and "Left/a: 0 left" in km.legend()
    km3 = make_keymap(spaces.Discrete(3))
    assert km3.action({pygame.K_UP}) == 2 and km3.action({pygame.K_w}) == 2
    km6 = make_keymap(spaces.Discrete(6))
    assert km6.action({pygame.K_5}) == 5
    over = make_keymap(spaces.Discrete(2), override={"space": 1, "x": 0})
    assert over.action({pygame.K_SPACE}) == 1 and over.action({pygame.K_x}) == 0 and over.action({pygame.K_LEFT}) is None
    with pytest.raises(ValueError, match="play.keys: actions \\[5\\]"):
        make_keymap(spaces.Discrete(2), override={"x": 5})
    with pytest.raises(ValueError, match="unknown key name 'nokey'"):
        make_keymap(spaces.Discrete(2), override={"nokey": 0})
    box = make_keymap(spaces.Box(-2.0, 2.0, (2,)))
    np.testing.assert_allclose(box.action({pygame.K_RIGHT, pygame.K_UP}), [2.0, 2.0])


def test_keymap_from_ale_env():
    """The env's own map wins (ALE: combos such as RIGHTFIRE = d + space); NOOP becomes the idle action."""
    import ale_py
    import gymnasium as gym

    from sfv_world.apps.play_ui import make_keymap

    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5")
    km = make_keymap(env.action_space, env)
    env.close()
    assert km.idle == 0 and km.labels[1] == "1 fire"
    assert km.action({pygame.K_d}) == 2 and km.action({pygame.K_RIGHT}) == 2  # arrows alias WASD
    assert km.action({pygame.K_d, pygame.K_SPACE}) == 4


def test_play_headless_scripted(tiny):
    from sfv_world.datasets import DatasetReader

    from sfv_world.apps.play import PlayApp

    policy = save_tiny_policy(tiny["ckpt"], tiny["root"] / "policy.zip")
    shot = tiny["root"] / "shot.png"
    cfg = compose(tiny, f"play.policy={policy}", f"play.screenshot={shot}", "play.horizon=100",
                  f"play.record_dir={tiny['root'] / 'rec'}")
    app = PlayApp(cfg)
    K = pygame
    script = {
        0: [down(K.K_RIGHT)],                       # ticks 0-3: push right
        4: [up(K.K_RIGHT), down(K.K_LEFT)],         # ticks 4-6: push left
        6: [down(K.K_c)],                           # start recording
        7: [down(K.K_m)],                           # policy takes over (left is still held)
        10: [down(K.K_m), up(K.K_LEFT)],            # back to human; no key: repeat the last action
        12: [down(K.K_p)],                          # pause ...
        14: [down(K.K_n)],                          # ... one single step ...
        16: [down(K.K_p), down(K.K_RIGHTBRACKET)],  # ... resume; horizon +25
        18: [down(K.K_r)],                          # new episode from a dataset context
        20: [down(K.K_c)],                          # stop recording: writes the files
    }
    out = app.run(script=script, max_ticks=22, throttle=False)
    hist = app.session.history
    # 22 ticks, 3 paused (12, 13, 15 -- tick 14 pauses but single-steps)
    assert out["ticks"] == 22 and out["steps"] == len(hist) == 22 - 3
    human = [h for h in hist if h["human"]]
    assert [h["action"] for h in hist[:4]] == [1, 1, 1, 1] and [h["action"] for h in hist[4:7]] == [0, 0, 0]
    assert [h["human"] for h in hist[7:10]] == [False] * 3 and len(human) == len(hist) - 3
    assert hist[10]["action"] == hist[9]["action"]  # idle: the last action repeats
    assert app.session.env.core.horizon == 125
    # frames change from step to step and the HUD quantities are finite
    means = np.array([h["frame_mean"] for h in hist])
    assert np.unique(means).size > len(means) // 2
    assert all(np.isfinite(h["log_likelihood"]) and h["jacobi"] >= 1 for h in hist)
    # the recording: a video and an HDF5 dataset with two episodes (split at the reset on tick 18)
    video = [p for p in out["written"] if p.endswith((".gif", ".mp4"))]
    episodes = [p for p in out["written"] if p.endswith("episodes")]
    assert len(video) == 1 and os.path.getsize(video[0]) > 0 and len(episodes) == 1
    with DatasetReader(episodes[0]) as reader:
        lengths = [reader.episode_lengths[e] for e in reader.episode_ids]
        ep = reader.load_episode(reader.episode_ids[0])
        assert reader.frame_shape == (16, 16, 3)
    # recorded: the steps of ticks 6..19 but the 3 paused ones; the reset before tick 18's step splits them
    assert lengths == [(18 - 6) - 3, 20 - 18]
    assert ep.truncations[-1] and not ep.terminations.any()
    # screenshot of the whole window
    img = pygame.image.load(str(shot))
    assert img.get_size() == app.window_size and os.path.getsize(shot) > 1000


def test_play_side_by_side_and_image(tiny, tmp_path):
    """Side-by-side with a real env (CartPole, Discrete(2) like the tiny model) from its first frame;
    image-to-world from a picture file; a missing policy is reported, not fatal."""
    from PIL import Image

    from sfv_world.apps.play import PlayApp

    picture = tmp_path / "start.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(picture)
    # the tiny model's data is uncropped, the CartPole config crops: the real env would differ
    with pytest.raises(ValueError, match=r"play.side_by_side: .*collected with crop None.*pass env.crop=null"):
        PlayApp(compose(tiny, "play.side_by_side=true", f"play.record_dir={tmp_path}"))
    cfg = compose(tiny, "play.side_by_side=true", f"play.image={picture}", f"play.record_dir={tmp_path}",
                  "env.crop=null", "env.strips=null")
    app = PlayApp(cfg)
    s = app.session
    assert s.real_env is not None and s.source == "real env"
    assert s.real_frame.shape == s.frame.shape == (16, 16, 3)
    np.testing.assert_array_equal(s.frame, s.real_frame)  # the dream starts from the real first frame
    out = app.run(script={1: [down(pygame.K_m)], 2: [down(pygame.K_i)]}, max_ticks=4, throttle=False)
    assert "no policy loaded" in s.message or s.human
    assert out["steps"] == 4 and s.step_count >= 1
    assert app.window_size[0] > 2 * 16 * 4
    # without side-by-side, `i` restarts from the picture
    cfg = compose(tiny, f"play.image={picture}", f"play.record_dir={tmp_path}")
    app = PlayApp(cfg)
    assert app.session.source == "image"
    from sfv_world.rollout import load_image_frame

    assert np.abs(app.session.frame.astype(int) - load_image_frame(picture, 16)).max() == 0
    app.run(max_ticks=1, throttle=False)


def test_play_command_line(tiny, tmp_path):
    """`sfv-world play <checkpoint> play.max_ticks=...` runs headless and exits by itself."""
    from sfv_world.apps.cli import main

    shot = tmp_path / "cli.png"
    assert main(["play", str(tiny["ckpt"]), f"run_dir={tmp_path}", "device=cpu", "play.max_ticks=3", "play.fps=100",
                 f"play.screenshot={shot}"]) == 0
    assert shot.stat().st_size > 1000


def test_play_bad_policy_path(tiny, tmp_path):
    from sfv_world.apps.play import PlaySession

    with pytest.raises(FileNotFoundError, match="no saved SB3 model"):
        PlaySession(compose(tiny, f"play.policy={tmp_path / 'missing.zip'}"))


def test_docs_screenshot_exists():
    """docs/play.png is produced by `sfv-world play ... play.screenshot=docs/play.png` (see docs)."""
    img = pygame.image.load(str(REPO / "docs" / "play.png"))
    w, h = img.get_size()
    assert w >= 600 and h >= 300
