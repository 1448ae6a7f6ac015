"""``sfv-world play [checkpoint] [play.*=...]``: play the dream in a pygame-ce window.

The dream (``sfv_world/Dream-v0`` over the checkpoint) is drawn ``play.scale`` times larger, next to
the real env under the same actions when ``play.side_by_side=true`` (the dream then starts from the
real env's first frame). A side panel shows FPS, step, reward and return, the action, a running
log-likelihood meter (bits/dim of each generated frame against the real context's), Jacobi
iterations per frame, and the keys:

    action keys        from the env (ALE's map), play.keys, or arrows/WASD (digits for Discrete(n>3))
    m                  human <-> the SB3 policy of play.policy=<model.zip>
    p / n              pause / single step while paused
    r / i              reset from a random dataset context / from play.image (image-to-world)
    [ / ]              imagination horizon -25 / +25 steps
    c                  start / stop recording (<record_dir>/<time>/rec_<n>/: dream.mp4|gif + HDF5 episodes)
    o or F12           screenshot PNG
    q or Esc           quit

Headless: ``SDL_VIDEODRIVER=dummy``; :meth:`PlayApp.run` takes a script of pygame events per tick.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

HORIZON_STEP = 25


@dataclass
class Recording:
    """Frames and transitions recorded since ``c`` was pressed; episodes split at resets."""

    folder: Path
    episodes: list[dict[str, list]] = field(default_factory=list)
    video: list[np.ndarray] = field(default_factory=list)

    def start_episode(self, frame: np.ndarray) -> None:
        self.episodes.append({"observations": [frame], "actions": [], "rewards": [], "terminations": [],
                              "truncations": []})

    def add(self, frame: np.ndarray, action: Any, reward: float, terminated: bool, truncated: bool,
            video_frame: np.ndarray) -> None:
        ep = self.episodes[-1]
        ep["observations"].append(frame)
        ep["actions"].append(action)
        ep["rewards"].append(reward)
        ep["terminations"].append(terminated)
        ep["truncations"].append(truncated)
        self.video.append(video_frame)


class PlaySession:
    """The game state behind the window (no pygame): the dream env, optional real env and policy,
    the episode counters and the recording. ``frame`` / ``real_frame`` are uint8 [h, w, C]."""

    def __init__(self, cfg: DictConfig):
        import gymnasium as gym

        from sfv_world.envs.dream import DreamEnv
        from sfv_world.train import resolve_device
        from sfv_world.world import WorldRuntime

        p = cfg.play
        self.cfg = cfg
        device = resolve_device(cfg.device)
        sampler = dict(OmegaConf.to_container(cfg.sampler, resolve=True)) if "sampler" in cfg else None
        runtime = WorldRuntime.from_checkpoint(cfg.checkpoint, batch_size=1, device=device, sampler=sampler)
        self.runtime = runtime
        meta = runtime.dataset_meta
        self.env_id = (meta.get("sfv_world") or {}).get("env_id") or "dream"
        self.policy = None
        obs_mode, frame_stack = "pixels", 1
        if p.get("policy"):
            from sfv_world.apps.policy_io import policy_input
            from sfv_world.datasets.policies import load_sb3_model

            self.policy = load_sb3_model(str(p.policy), "auto", "cpu")
            obs_mode, frame_stack, runtime.features = policy_input(self.policy, runtime.frame_shape,
                                                                   runtime.feature_dims)
        self.env = DreamEnv(runtime=runtime, horizon=int(p.horizon), context_frames=int(p.context),
                            obs_mode=obs_mode, frame_stack=frame_stack, render_mode="rgb_array")
        self.action_space = self.env.action_space
        self.image = None
        if p.get("image"):
            from sfv_world.rollout import load_image_frame

            h, _, c = runtime.frame_shape
            self.image = load_image_frame(p.image, h, c)
        self.real_env: gym.Env | None = None
        self.key_env = None
        if p.get("side_by_side") or "env" in cfg:
            self._make_real_env(cfg, want=bool(p.get("side_by_side")))
        self.rng = np.random.default_rng(int(p.seed))
        self._seed: int | None = int(p.seed)
        self.human = True
        self.paused = False
        self.message = ""
        self.recording: Recording | None = None
        self.record_count = 0
        self.session_dir = Path(str(p.record_dir)) / time.strftime("%Y%m%d-%H%M%S")
        self.last_action: Any = None
        self.history: list[dict[str, Any]] = []  # one entry per step (for tests and the summary)
        self.reset("image" if self.image is not None else "dataset")

    # -- real env --------------------------------------------------------------------------------

    def _make_real_env(self, cfg: DictConfig, want: bool) -> None:
        """The real env of ``cfg.env`` (for side-by-side and for the env's key map)."""
        from gymnasium import spaces

        from sfv_world.agents.evaluation import ObservationSpec, make_real_pixel_env

        env_cfg = cfg.env
        same_env = str(env_cfg.get("id")) == self.env_id
        if not want and not same_env:
            return  # the key map would belong to another env
        try:
            spec = ObservationSpec.from_runtime(self.runtime, "pixels", 1)
            env = make_real_pixel_env(env_cfg, spec)
        except Exception as e:  # a missing ROM or package only costs the side-by-side view
            if want:
                raise ValueError(f"play.side_by_side: cannot make the real env {env_cfg.get('id')!r}: {e}") from e
            return
        if want:
            if spaces.flatten_space(env.action_space) != spaces.flatten_space(self.action_space):
                raise ValueError(f"play.side_by_side: the real env {env_cfg.get('id')} acts in {env.action_space}, "
                                 f"the checkpoint in {self.action_space} (pass env=<the checkpoint's env>)")
            self.real_env = env
            if not same_env:
                self.message = f"real env {env_cfg.get('id')} differs from the dataset's {self.env_id}"
        self.key_env = env

    # -- episode control -------------------------------------------------------------------------

    def reset(self, source: str = "dataset") -> None:
        """New imagined episode from a dataset context clip, the image, or the real env's first frame."""
        self._finish_recorded_episode()
        options = None
        if self.real_env is not None:
            seed = int(self.rng.integers(0, 2**31))
            first, _ = self.real_env.reset(seed=seed)
            self.real_frame, self.real_done, self.real_return = first, False, 0.0
            options = {"frames": first}
            source = "real env"
        elif source == "image":
            if self.image is None:
                self.message = "no image: start with play.image=<picture>"
                source = "dataset"
            else:
                options = {"frames": self.image}
        obs, info = self.env.reset(seed=self._seed, options=options)
        self._seed = None  # seeded once: later resets draw new contexts and noise
        self.obs = obs
        self.frame = self.env.render()
        self.ref_ll = float(np.mean(info["context_log_likelihood"]))
        self.ll_history: list[float] = []
        self.step_count, self.reward, self.episode_return, self.jacobi = 0, 0.0, 0.0, 0
        self.ood, self.ood_score = None, None
        self.source = source
        if self.recording is not None:
            self.recording.start_episode(self.frame)

    def human_action(self, keymap, held: set[int]) -> Any:
        a = keymap.action(held)
        if a is None:
            a = keymap.idle if keymap.idle is not None else self.last_action
        if a is None:  # nothing pressed yet and no no-op: the first action
            a = keymap.idle if keymap.idle is not None else int(getattr(self.action_space, "start", 0))
        return a

    def policy_action(self) -> Any:
        action, _ = self.policy.predict(self.obs, deterministic=True)
        return action.item() if np.ndim(action) == 0 else np.asarray(action)

    def step(self, action: Any) -> None:
        """One dream step (and one real step in side-by-side mode); auto-resets at the episode's end."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.obs, self.frame = obs, self.env.render()
        self.last_action = action
        self.step_count += 1
        self.reward = float(reward)
        self.episode_return += self.reward
        self.ll_history.append(float(info["log_likelihood"]))
        self.jacobi = int(info["jacobi_iterations"])
        self.ood = info.get("ood")  # the env's OOD flag and score (calibrated checkpoints)
        self.ood_score = info.get("ood_score")
        if self.real_env is not None and not self.real_done:
            self.real_frame, r, rt, rtr, _ = self.real_env.step(action)
            self.real_return += float(r)
            self.real_done = bool(rt or rtr)
        self.history.append({"step": self.step_count, "action": action, "human": self.human,
                             "reward": self.reward, "log_likelihood": self.ll_history[-1], "jacobi": self.jacobi,
                             "frame_mean": float(self.frame.mean())})
        if self.recording is not None:
            self.recording.add(self.frame, action, self.reward, terminated, truncated, self.panels())
        if terminated or truncated:
            self.message = f"episode {'terminated' if terminated else 'truncated'} after {self.step_count} steps"
            self.reset(self.source if self.source != "real env" else "dataset")

    def panels(self) -> np.ndarray:
        """uint8 [h, w', C]: the dream frame, with the real frame beside it in side-by-side mode."""
        if self.real_env is None:
            return self.frame
        from sfv_world.video import side_by_side

        return side_by_side(self.frame, self.real_frame)

    def change_horizon(self, delta: int) -> None:
        self.env.core.horizon = max(1, self.env.core.horizon + delta)

    def toggle_policy(self) -> None:
        if self.policy is None:
            self.message = "no policy loaded (play.policy=<model.zip>)"
            return
        self.human = not self.human
        self.message = "human control" if self.human else "policy control"

    # -- recording -------------------------------------------------------------------------------

    def toggle_recording(self) -> list[Path]:
        """Start recording, or stop and write the video and the HDF5 episodes; returns the paths written."""
        if self.recording is None:
            self.recording = Recording(self.session_dir / f"rec_{self.record_count:03d}")
            self.record_count += 1
            self.recording.start_episode(self.frame)
            self.recording.video.append(self.panels())
            self.message = f"recording to {self.recording.folder}"
            return []
        rec, self.recording = self.recording, None
        return self.write_recording(rec)

    def _finish_recorded_episode(self) -> None:
        """At a reset, the recorded episode ends (truncated unless it terminated)."""
        if self.recording is not None and self.recording.episodes:
            ep = self.recording.episodes[-1]
            if ep["truncations"] and not ep["terminations"][-1]:
                ep["truncations"][-1] = True

    def write_recording(self, rec: Recording) -> list[Path]:
        from sfv_world.rollout import write_episodes
        from sfv_world.video import write_video

        paths = [write_video(np.stack(rec.video), rec.folder / "dream.mp4", fps=float(self.cfg.play.fps), scale=4)]
        episodes = []
        for ep in rec.episodes:
            if not ep["actions"]:
                continue
            trunc = np.asarray(ep["truncations"], bool)
            trunc[-1] = not ep["terminations"][-1]
            episodes.append({"observations": np.stack(ep["observations"]), "actions": np.asarray(ep["actions"]),
                             "rewards": np.asarray(ep["rewards"], np.float32),
                             "terminations": np.asarray(ep["terminations"], bool), "truncations": trunc})
        if episodes:
            paths.append(write_episodes(rec.folder / "episodes", self.runtime.dataset_meta, episodes,
                                        info={"source": "sfv-world play", "checkpoint": str(self.cfg.checkpoint)}))
        self.message = f"saved {rec.folder}"
        return paths

    def close(self) -> list[Path]:
        paths = self.toggle_recording() if self.recording is not None else []
        for env in {id(e): e for e in (self.real_env, self.key_env) if e is not None}.values():
            env.close()
        return paths


class PlayApp:
    """The pygame window around a :class:`PlaySession`."""

    def __init__(self, cfg: DictConfig, session: PlaySession | None = None):
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame

        from sfv_world.apps.play_ui import make_keymap

        self.pg = pygame
        self.cfg = cfg
        self.session = session or PlaySession(cfg)
        s = self.session
        keys = OmegaConf.to_container(cfg.play.keys, resolve=True) if cfg.play.get("keys") else None
        self.keymap = make_keymap(s.action_space, s.key_env, keys)
        if cfg.play.get("idle_action") is not None:
            self.keymap.idle = int(cfg.play.idle_action)
        try:
            pygame.display.init()  # no audio: pygame.init() would open a sound device
        except pygame.error as e:
            raise RuntimeError(f"sfv-world play: no display ({e}); for a headless run set SDL_VIDEODRIVER=dummy "
                               "and play.max_ticks / play.screenshot") from e
        pygame.font.init()
        self.scale = int(cfg.play.scale)
        h, w, _ = s.runtime.frame_shape
        self.panel_w = w * self.scale
        n_panels = 2 if s.real_env is not None else 1
        self.sidebar_x = n_panels * self.panel_w + (n_panels + 1) * 10
        size = (self.sidebar_x + 330, max(h * self.scale + 40, 460))
        self.window_size = size
        self.screen = pygame.display.set_mode(size)
        pygame.display.set_caption(f"sfv-world play: {s.env_id}")
        self.font = pygame.font.Font(None, 22)
        self.small = pygame.font.Font(None, 18)
        self.clock = pygame.time.Clock()
        self.held: set[int] = set()
        self.written: list[Path] = []
        self.screenshots: list[Path] = []
        self.running = True

    # -- input -------------------------------------------------------------------------------------

    def handle(self, event) -> None:
        pg, s = self.pg, self.session
        if event.type == pg.QUIT:
            self.running = False
        elif event.type == pg.KEYUP:
            self.held.discard(event.key)
        elif event.type == pg.KEYDOWN:
            k = event.key
            if k in (pg.K_q, pg.K_ESCAPE):
                self.running = False
            elif k == pg.K_m:
                s.toggle_policy()
            elif k == pg.K_p:
                s.paused = not s.paused
            elif k == pg.K_n and s.paused:
                self.advance()
            elif k == pg.K_r:
                s.reset("dataset")
            elif k == pg.K_i:
                s.reset("image")
            elif k == pg.K_LEFTBRACKET:
                s.change_horizon(-HORIZON_STEP)
            elif k == pg.K_RIGHTBRACKET:
                s.change_horizon(HORIZON_STEP)
            elif k == pg.K_c:
                self.written += s.toggle_recording()
            elif k in (pg.K_o, pg.K_F12):
                self.screenshot(Path(str(self.cfg.play.record_dir)) / f"screenshot_{len(self.screenshots):03d}.png")
            else:
                self.held.add(k)

    def advance(self) -> None:
        s = self.session
        action = s.human_action(self.keymap, self.held) if s.human or s.policy is None else s.policy_action()
        s.step(action)

    # -- drawing -----------------------------------------------------------------------------------

    def action_text(self, a: Any) -> str:
        if a is None:
            return "-"
        if isinstance(a, np.ndarray) and a.ndim:
            return str(np.round(a, 2).tolist())
        return self.keymap.labels.get(int(a), str(a))

    def draw(self) -> None:
        from sfv_world.apps.play_ui import (
            BG,
            GREEN,
            GREY,
            RED,
            WHITE,
            YELLOW,
            draw_hud,
            draw_text,
            frame_surface,
        )

        pg, s = self.pg, self.session
        self.screen.fill(BG)
        self.screen.blit(frame_surface(s.frame, self.scale), (10, 30))
        draw_text(self.screen, self.small, f"dream ({s.source})", (10, 8), GREY)
        if s.real_env is not None:
            x = 20 + self.panel_w
            surf = frame_surface(s.real_frame, self.scale)
            if s.real_done:
                surf.fill((90, 90, 90), special_flags=pg.BLEND_RGB_MULT)
            self.screen.blit(surf, (x, 30))
            draw_text(self.screen, self.small, f"real env{' (done)' if s.real_done else ''}  return {s.real_return:.1f}",
                      (x, 8), GREY)
        ll = s.ll_history[-1] if s.ll_history else s.ref_ll
        mean_ll = float(np.mean(s.ll_history[-32:])) if s.ll_history else s.ref_ll
        flags = ("  PAUSED" if s.paused else "") + ("  [REC]" if s.recording is not None else "")
        lines = [
            (f"sfv-world play — {s.env_id}", WHITE),
            (f"{'HUMAN' if s.human else 'POLICY'}{flags}", YELLOW if s.recording is None else RED),
            (f"FPS {self.clock.get_fps():5.1f}    step {s.step_count} / {s.env.core.horizon}", WHITE),
            (f"reward {s.reward:+.2f}    return {s.episode_return:.2f}", WHITE),
            (f"action {self.action_text(s.last_action)}", WHITE),
            (f"log-lik {ll:.3f} bits/dim (mean {mean_ll:.3f})", GREEN if ll >= s.ref_ll - 0.5 else RED),
            (f"context {s.ref_ll:.3f}    Jacobi it/frame {s.jacobi}", GREY),
        ]
        if s.ood is not None:
            score = "" if s.ood_score is None or not np.isfinite(s.ood_score) else f" (score {s.ood_score:.2f})"
            lines.append((("OOD!" if s.ood else "in distribution") + score, RED if s.ood else GREEN))
        legend = ["keys:"] + self.keymap.legend() + [
            "m human/policy   p pause   n step", "r reset (data)   i reset (image)",
            "[ ] horizon   c record   o shot   q quit",
        ]
        if s.message:
            legend += ["", s.message[:48]]
        draw_hud(self.screen, self.font, self.small, self.sidebar_x, lines, (s.ll_history, s.ref_ll), legend)
        pg.display.flip()

    def screenshot(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.draw()
        self.pg.image.save(self.screen, str(path))
        self.screenshots.append(path)
        self.session.message = f"screenshot {path.name}"
        return path

    # -- loop --------------------------------------------------------------------------------------

    def run(self, script: dict[int, list] | None = None, max_ticks: int | None = None, throttle: bool = True) -> dict:
        """Run the window until quit (or ``max_ticks`` frames); ``script`` maps a tick to pygame events
        posted at its start. Returns a summary (ticks, steps, files written)."""
        pg = self.pg
        tick = 0
        fps = float(self.cfg.play.fps)
        while self.running and (max_ticks is None or tick < max_ticks):
            for ev in (script or {}).get(tick, []):
                pg.event.post(ev)
            for ev in pg.event.get():
                self.handle(ev)
            if not self.running:
                break
            if not self.session.paused:
                self.advance()
            self.draw()
            self.clock.tick(fps if throttle else 0)
            tick += 1
        shot = self.cfg.play.get("screenshot")
        if shot:
            self.screenshot(shot)
        self.written += self.session.close()
        pg.display.quit()
        return {"ticks": tick, "steps": len(self.session.history), "written": [str(p) for p in self.written],
                "screenshots": [str(p) for p in self.screenshots]}


def run(cfg: DictConfig) -> dict:
    max_ticks = cfg.play.get("max_ticks")
    app = PlayApp(cfg)
    out = app.run(max_ticks=None if max_ticks is None else int(max_ticks))
    for p in out["written"] + out["screenshots"]:
        print(f"wrote {p}")
    return out
