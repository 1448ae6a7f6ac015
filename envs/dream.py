"""The dream: a trained STARFlow-V world model served as a Gymnasium environment.

Three front-ends share one batched core (:class:`DreamCore`) over a :class:`~sfv_world.world.WorldRuntime`:

- :class:`DreamEnv`, ``gymnasium.make("sfv_world/Dream-v0", checkpoint=...)``: one world;
- :class:`DreamVectorEnv`, ``gymnasium.make_vec("sfv_world/Dream-v0", num_envs=N, ...)``: N worlds
  advanced by one batched model call per step (gymnasium 1.x autoreset, next-step by default);
- ``sfv_world.envs.sb3.DreamSB3VecEnv``: the same core with SB3's ``VecEnv`` contract.

Observations (``obs_mode``):
- ``"pixels"``: uint8 ``[H, W, C * frame_stack]`` frames at the *model's* frame size, oldest first;
- ``"latent"``: float32 ``[D]``, the world model's causal feature vector of the newest frame.

An imagined episode starts from real context (``context_frames`` frames and the actions between them),
sampled from the train split of the checkpoint's dataset (read through ``sfv_world.datasets``), or from
``reset(options={"frames": ..., "actions": ...})``; one image is enough. It terminates when the
termination head's probability exceeds ``termination_threshold`` (or, with ``termination="sample"``,
with that probability) and is truncated after ``horizon`` steps (and, with
``truncate_out_of_range=True``, on a frame the world clamped back into the data's range: ``info["out_of_range"]``,
``sampler.bound_sigmas``). ``info`` holds ``log_likelihood`` (bits/dim of the newest frame), ``jacobi_iterations``,
``out_of_range``, ``termination_logit`` (the termination head's log-odds: a graded measure of danger far below the
threshold, ``agent.termination_penalty``), and ``ood_score`` / ``ood`` (``sfv_world.ood.OODMonitor``
with the checkpoint's calibration; reset infos carry the context's score).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from sfv_world.envs.wrappers import stack_frames, stacked_frame_space

from sfv_world.ood import frame_positions

OBS_MODES = ("pixels", "latent")
CONTEXT_STARTS = ("random", "episode_start")
TERMINATIONS = ("threshold", "sample")


# ----------------------------------------------------------------------------------------------
# context clips


@dataclass
class ContextPool:
    """Real context clips to start imagined episodes from.

    frames  uint8 [P, k, H, W, C]  at the model's frame size
    actions       [P, k-1]         int64 (Discrete) or float32 [P, k-1, A] (Box)
    """

    frames: np.ndarray
    actions: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self), size=n)
        return self.frames[idx], self.actions[idx]


def load_context_pool(
    dataset: str | Path,
    episode_ids: list | None,
    context_frames: int,
    frame_size: int,
    pool_size: int = 512,
    seed: int = 0,
    start: str = "random",
) -> ContextPool:
    """Read ``pool_size`` context clips of ``context_frames`` frames from ``dataset``.

    Clips come from uniformly drawn episodes of ``episode_ids`` (the train split; all episodes when
    None) and start at a uniformly drawn position (``start="random"``) or at the episode's first frame
    (``start="episode_start"``); they are area-resized to ``frame_size``. Deterministic in ``seed``.
    A clip never reaches past the real end of its episode: of an episode that terminates after step t
    (``terminations[t]``, the first True), frames 0 .. t are live; its terminal frame t+1 and a terminal
    tail's frames are not.
    """
    from sfv_world.datasets import DatasetReader, area_resize, live_steps

    if context_frames < 1:
        raise ValueError(f"context_frames must be >= 1, got {context_frames}")
    rng = np.random.default_rng(seed)
    with DatasetReader(dataset) as reader:
        ids = [int(e) for e in (reader.episode_ids if episode_ids is None else episode_ids)]
        # live frames: those before the real end (a terminal tail's frames are not states to start from)
        steps = {e: reader.load_episode(e, observations=False) for e in ids if e in reader.episode_lengths}
        live = {e: live_steps(ep.terminations) if ep.terminations.any() else len(ep) + 1 for e, ep in steps.items()}
        ids = [e for e in ids if e in live and live[e] >= context_frames]
        if not ids:
            raise ValueError(
                f"dataset {dataset}: no (train) episode has the {context_frames} frames needed for a dream context clip"
            )
        picks = sorted(ids[int(j)] for j in rng.integers(0, len(ids), size=pool_size))
        frames, actions = [], []
        for eid in picks:
            first = 0 if start == "episode_start" else int(rng.integers(0, live[eid] - context_frames + 1))
            clip = reader.read_frames(eid, first, first + context_frames)
            if clip.shape[1] != frame_size or clip.shape[2] != frame_size:
                clip = np.stack([area_resize(f, frame_size) for f in clip])
            frames.append(clip)
            actions.append(steps[eid].actions[first : first + context_frames - 1])
    return ContextPool(np.stack(frames).astype(np.uint8), np.stack(actions))


# ----------------------------------------------------------------------------------------------
# actions


def check_actions(space: spaces.Space, actions: Any, n: int, name: str = "actions") -> np.ndarray:
    """Validate ``n`` actions of ``space``; raise ValueError naming ``name`` and the offending value.

    Discrete: int [n] (a scalar when n == 1) -> int64 [n], the values the dataset stores.
    Box: float [n, *shape] (``shape`` alone when n == 1) -> float32 [n, *shape].
    """
    a = np.asarray(actions)
    if isinstance(space, spaces.Discrete):
        if a.shape != (n,) and not (n == 1 and a.shape == ()):
            raise ValueError(f"{name} must have shape ({n},) for {space}, got {a!r} with shape {a.shape}")
        a = a.reshape(n)
        if not np.issubdtype(a.dtype, np.integer):
            if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
                a = a.astype(np.int64)
            else:
                raise ValueError(f"{name} must be integers of {space}, got {a!r} (dtype {a.dtype})")
        bad = (a < space.start) | (a >= space.start + space.n)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"invalid {name}: {a[i]!r} (index {i}) is not in the action space {space}")
        return a.astype(np.int64)
    if isinstance(space, spaces.Box):
        shape = (n, *space.shape)
        if a.shape != shape and not (n == 1 and a.shape == space.shape):
            raise ValueError(f"{name} must have shape {shape} for {space}, got shape {a.shape}")
        a = a.reshape(shape).astype(np.float32)
        ok = np.isfinite(a) & (a >= space.low) & (a <= space.high)
        bad = ~ok.reshape(n, -1).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"invalid {name}: {a[i]!r} (index {i}) is not in the action space {space}")
        return a
    raise ValueError(f"unsupported action space {space} (Discrete or Box)")


# ----------------------------------------------------------------------------------------------
# the batched core


class DreamCore:
    """N imagined episodes advanced together; shared by the single, vector and SB3 envs.

    Args:
        checkpoint: path of a ``.pt`` checkpoint (``sfv_world.checkpoint``); or pass ``runtime``.
        num_envs: number of parallel worlds N.
        dataset: dataset folder for default reset context; default: the checkpoint's dataset path.
        obs_mode: ``"pixels"`` (uint8 HWC frames) or ``"latent"`` (float32 feature vectors).
        latent_features: ``"mean"`` (the slot-mean, [D]) or ``"slots"`` (every token slot, [F * D]): the
            feature vector of ``obs_mode="latent"`` (:class:`~sfv_world.world.WorldRuntime` ``features``);
            None: the runtime's (``"mean"`` for one built here).
        frame_stack: frames per pixel observation (channel-stacked, oldest first).
        horizon: imagined-episode truncation, in steps.
        context_frames: real frames given to the model at reset (from the dataset).
        termination_threshold: terminate when sigmoid(termination logit) > this.
        termination: ``"threshold"`` (default) or ``"sample"``: terminate with probability
            sigmoid(logit), drawn from the seeded env RNG. Sampling keeps rare terminations (p < 0.5 on
            every step) from vanishing, which a policy would otherwise exploit.
        sampler: sampler settings (``configs/sampler/*.yaml`` keys); default: the checkpoint's run config.
        device: torch device of the world model.
        context_window: frames kept in the KV cache (default: the model's ``max_frames``).
        runtime: an existing :class:`~sfv_world.world.WorldRuntime` with ``batch_size == num_envs``.
        context_pool: explicit :class:`ContextPool` instead of reading ``dataset``.
        pool_size: context clips read from the dataset once, at construction.
        context_start: ``"random"`` (clips start anywhere in an episode) or ``"episode_start"`` (clips
            are the first frames of episodes: the real env's initial-state distribution).
        time_scale: dream frames per step, on average (>= 1; default 1). A world model whose motion lags
            the real one (``benchmarks/motion_gain.py``: gain g < 1) runs at the real speed with
            time_scale = 1/g: each step advances floor(s) frames, or one more with probability
            s - floor(s) (drawn once per step for the whole batch, from the seeded env RNG), under the
            same action. The step's reward is the mean over its frames (a rate per real step), it
            terminates if any of its frames does, log_likelihood is its last frame's, and
            termination_logit the largest of its frames'.
        truncate_out_of_range: truncate an episode on the step whose frame left the data's range and
            was clamped (``WorldStep.out_of_range``, ``info["out_of_range"]``). Off by default: under a
            trained agent the cpu-demo model's world clamps 8% of its frames (``sampler.bound_sigmas``
            30), and the clamp already keeps the world on the data.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        num_envs: int = 1,
        *,
        dataset: str | Path | None = None,
        obs_mode: str = "pixels",
        latent_features: str | None = None,
        frame_stack: int = 1,
        horizon: int = 200,
        context_frames: int = 4,
        termination_threshold: float = 0.5,
        termination: str = "threshold",
        sampler: dict[str, Any] | None = None,
        device: str = "cpu",
        context_window: int | None = None,
        runtime=None,
        context_pool: ContextPool | None = None,
        pool_size: int = 512,
        context_start: str = "random",
        ood_score: str | None = None,
        time_scale: float = 1.0,
        truncate_out_of_range: bool = False,
    ):
        from sfv_world.datasets.spaces import deserialize_space

        from sfv_world.world import WorldRuntime

        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if int(frame_stack) < 1:
            raise ValueError(f"frame_stack must be >= 1, got {frame_stack}")
        if int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if int(context_frames) < 1:
            raise ValueError(f"context_frames must be >= 1, got {context_frames}")
        if not 0.0 < float(termination_threshold) < 1.0:
            raise ValueError(f"termination_threshold must be in (0, 1), got {termination_threshold}")
        if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not 1.0 <= float(time_scale) < 16:
            raise ValueError(f"time_scale must be a number in [1, 16) (dream frames per step), got {time_scale!r}")
        if runtime is None:
            if checkpoint is None:
                raise ValueError("DreamEnv needs checkpoint=<path to a .pt file> (or runtime=...)")
            runtime = WorldRuntime.from_checkpoint(
                checkpoint, batch_size=int(num_envs), device=device, sampler=sampler, context_window=context_window,
                features=latent_features or "mean",
            )
        elif runtime.batch_size != int(num_envs):
            raise ValueError(f"runtime.batch_size={runtime.batch_size} differs from num_envs={num_envs}")
        elif latent_features is not None and latent_features != runtime.features:
            raise ValueError(f"latent_features={latent_features!r} differs from the runtime's features="
                             f"{runtime.features!r}")
        self.runtime = runtime
        self.num_envs = int(num_envs)
        self.obs_mode = obs_mode
        self.frame_stack = int(frame_stack)
        self.horizon = int(horizon)
        self.context_frames = int(context_frames)
        self.termination_threshold = float(termination_threshold)
        if termination not in TERMINATIONS:
            raise ValueError(f"termination must be one of {TERMINATIONS}, got {termination!r}")
        self.termination = termination
        self.time_scale = float(time_scale)
        self.truncate_out_of_range = bool(truncate_out_of_range)

        meta = runtime.dataset_meta
        self.action_space = deserialize_space(meta["action_space"])
        self.height, self.width, self.channels = runtime.frame_shape
        if obs_mode == "pixels":
            self.observation_space: spaces.Space = stacked_frame_space(
                self.height, self.width, self.channels, self.frame_stack
            )
        else:
            self.observation_space = spaces.Box(-np.inf, np.inf, shape=(runtime.feature_dim,), dtype=np.float32)

        if self.context_frames > runtime.context_window:
            raise ValueError(
                f"context_frames={context_frames} exceeds the world's context window of {runtime.context_window} frames"
            )
        if context_start not in CONTEXT_STARTS:
            raise ValueError(f"context_start must be one of {CONTEXT_STARTS}, got {context_start!r}")
        self.missing_dataset: str | None = None
        if context_pool is None:
            if dataset is not None and not Path(dataset).exists():
                raise ValueError(f"dataset={str(dataset)!r} does not exist")
            dataset = dataset if dataset is not None else meta.get("path")
            if dataset is None or not Path(dataset).exists():
                context_pool = None  # reset(options={"frames": ...}) still works; a plain reset() explains
                self.missing_dataset = str(dataset)
            else:
                splits = meta.get("splits") or {}
                context_pool = load_context_pool(
                    dataset, splits.get("train"), self.context_frames, self.height, pool_size=pool_size,
                    start=context_start,
                )
        self.pool = context_pool
        # OOD scores for info["ood_score"] / info["ood"] (issue 7): the checkpoint's calibration, if any
        from sfv_world.ood import OODMonitor

        self.ood = OODMonitor.from_runtime(runtime, self.num_envs, ood_score)

        n, s = self.num_envs, self.frame_stack
        self.stack = np.zeros((n, s, self.height, self.width, self.channels), dtype=np.uint8)
        # latent observations need no pixels: the runtime skips the denoiser, and the newest frame is
        # fetched only when someone looks (frames(), render); rows whose stack[:, -1] is out of date
        self.lazy_frames = obs_mode == "latent" and not self.ood.needs_frames
        self.stale = np.zeros(n, dtype=bool)
        self.features = np.zeros((n, runtime.feature_dim), dtype=np.float32)
        self.steps = np.zeros(n, dtype=np.int64)
        self.rng = np.random.default_rng()

    # -- helpers -------------------------------------------------------------------------------

    def seed(self, seed: int | None) -> None:
        """Seed context sampling and the world's sampling noise (torch.Generator)."""
        self.rng = np.random.default_rng(seed)
        self.runtime.seed(int(self.rng.integers(0, 2**62)) if seed is not None else None)

    def observations(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The current observations of ``rows`` (all rows by default)."""
        rows = slice(None) if rows is None else rows
        if self.obs_mode == "pixels":
            return stack_frames(self.stack[rows])
        return self.features[rows].copy()

    def frames(self) -> np.ndarray:
        """uint8 [N, H, W, C]: the newest frame of every world."""
        if self.stale.any():  # latent mode: the steps since the last look did not decode their frames
            self.stack[self.stale, -1] = self.runtime.newest_frames()[self.stale]
            self.stale[:] = False
        return self.stack[:, -1].copy()

    def validate_actions(self, actions: Any, name: str = "actions") -> np.ndarray:
        """Check a batch of N actions against the action space (see :func:`check_actions`)."""
        return check_actions(self.action_space, actions, self.num_envs, name)

    def _context_from_options(self, options: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
        """frames uint8 [n, k, H, W, C] and actions [n, k-1] from ``options`` (per env or shared)."""
        frames = np.asarray(options["frames"])
        if frames.dtype != np.uint8:
            raise ValueError(f"options['frames'] must be uint8 images, got dtype {frames.dtype}")
        if frames.ndim == 3:  # one image: image-to-world
            frames = frames[None]
        if frames.ndim == 4:  # [k, H, W, C] shared by all envs
            frames = np.broadcast_to(frames[None], (n, *frames.shape))
        if frames.ndim != 5 or frames.shape[0] != n:
            raise ValueError(
                f"options['frames'] must be uint8 [H, W, C], [k, H, W, C] or [{n}, k, H, W, C], got {frames.shape}"
            )
        k = frames.shape[1]
        if "actions" in options and options["actions"] is not None:
            actions = np.asarray(options["actions"])
        else:
            if k > 1:
                raise ValueError(f"options['actions'] is required with {k} context frames (k-1 = {k - 1} actions)")
            actions = np.zeros((0,), dtype=np.int64)
        if actions.ndim == (1 if isinstance(self.action_space, spaces.Discrete) else 2):
            actions = np.broadcast_to(actions[None], (n, *actions.shape))
        if actions.shape[:2] != (n, k - 1):
            raise ValueError(
                f"options['actions'] must hold k-1 = {k - 1} actions per env for {k} frames, got shape {actions.shape}"
            )
        if k > 1:
            flat = actions.reshape(n * (k - 1), *actions.shape[2:])
            flat = check_actions(self.action_space, flat, n * (k - 1), "options['actions']")
            actions = flat.reshape(n, k - 1, *flat.shape[1:])
        return np.ascontiguousarray(frames), actions

    # -- reset / step --------------------------------------------------------------------------

    def reset_rows(self, rows: np.ndarray, options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Start new imagined episodes in ``rows`` (int64 [n]); the other rows continue untouched.

        Returns the reset info arrays for those rows: ``log_likelihood`` float32 [n] (newest context
        frame), ``context_log_likelihood`` float32 [n, k].
        """
        rows = np.asarray(rows, dtype=np.int64)
        n = rows.shape[0]
        if options and options.get("frames") is not None:
            frames, actions = self._context_from_options(options, n)
        else:
            if self.pool is None:
                raise ValueError(
                    f"no dataset to take dream context from (the checkpoint's dataset {self.missing_dataset} does "
                    "not exist here): pass dataset=<folder> or reset(options={'frames': ..., 'actions': ...})"
                )
            frames, actions = self.pool.sample(self.rng, n)
        row_arg = None if n == self.num_envs and np.array_equal(rows, np.arange(self.num_envs)) else rows
        out = self.runtime.reset(frames, actions, rows=row_arg)
        ctx = out.frames  # uint8 [n, k, H, W, C] at the model size
        k = ctx.shape[1]
        take = min(k, self.frame_stack)
        stack = np.empty((n, self.frame_stack, self.height, self.width, self.channels), dtype=np.uint8)
        stack[:, self.frame_stack - take :] = ctx[:, k - take :]
        stack[:, : self.frame_stack - take] = ctx[:, :1]
        self.stack[rows] = stack
        self.stale[rows] = False
        self.features[rows] = out.features
        self.steps[rows] = 0
        return {
            "log_likelihood": out.log_likelihood[:, -1].astype(np.float32),
            "context_log_likelihood": out.log_likelihood.astype(np.float32),
            **self.ood.reset_rows(rows, out.log_likelihood, ctx),
        }

    def frames_this_step(self) -> int:
        """Dream frames the next step advances: floor(time_scale), plus one with the fractional part's probability."""
        whole = int(np.floor(self.time_scale))
        frac = self.time_scale - whole
        return whole + int(frac > 0 and self.rng.random() < frac)

    def _advance(self, actions: np.ndarray) -> tuple[Any, np.ndarray]:
        """One dream frame for every row: (the runtime's WorldStep, terminated bool [N])."""
        out = self.runtime.step(actions, frames=not self.lazy_frames)
        if out.frames is None:  # latent mode keeps only the newest frame, decoded on demand by frames()
            self.stale[:] = True
        else:
            self.stack = np.roll(self.stack, -1, axis=1)
            self.stack[:, -1] = out.frames
        self.features = out.features.astype(np.float32)
        if self.termination == "sample":
            terminated = self.rng.random(self.num_envs) < out.termination_prob
        else:
            terminated = out.termination_prob > self.termination_threshold
        return out, terminated

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Advance every world by one step: :meth:`frames_this_step` batched model calls (one at time_scale 1).

        ``actions`` are already validated. Returns (obs, rewards float32 [N], terminated bool [N],
        truncated bool [N], info arrays [N]).
        """
        frames = self.frames_this_step()
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        iterations = np.zeros(self.num_envs, dtype=np.int64)
        logit = np.full(self.num_envs, -np.inf, dtype=np.float32)
        out_of_range = np.zeros(self.num_envs, dtype=bool)
        for _ in range(frames):
            out, term = self._advance(actions)
            rewards += out.rewards
            terminated |= term
            out_of_range |= out.out_of_range
            logit = np.maximum(logit, out.termination_logit.astype(np.float32))
            iterations += out.jacobi_iterations.astype(np.int64)
            ood = self.ood.step(out.log_likelihood, out.frames, frame_positions(self.runtime))
        self.steps += 1
        cut = out_of_range if self.truncate_out_of_range else np.zeros_like(out_of_range)
        truncated = ((self.steps >= self.horizon) | cut) & ~terminated
        info = {
            "log_likelihood": out.log_likelihood.astype(np.float32),
            "jacobi_iterations": iterations,
            "termination_logit": logit,
            "out_of_range": out_of_range,
            **ood,
        }
        return self.observations(), (rewards / frames).astype(np.float32), terminated, truncated, info


# ----------------------------------------------------------------------------------------------
# gymnasium.Env


class DreamEnv(gym.Env):
    """``sfv_world/Dream-v0``: one imagined world (see the module docstring for observations and info).

    ``reset(seed=None, options=None)``: ``options={"frames": uint8 [k, H, W, C] or [H, W, C],
    "actions": [k-1]}`` starts from given frames (any size that area-resizes to the model's);
    otherwise a context clip is drawn from the dataset's train split.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, checkpoint: str | Path | None = None, render_mode: str | None = None, **kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.core = DreamCore(checkpoint, num_envs=1, **kwargs)
        self.render_mode = render_mode
        self.observation_space = self.core.observation_space
        self.action_space = self.core.action_space
        self._needs_reset = True
        self._seeded = False

    @property
    def runtime(self):
        return self.core.runtime

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.core.seed(seed)
        elif not self._seeded:  # first reset without a seed: derive one from gymnasium's random np_random
            self.core.seed(int(self.np_random.integers(0, 2**62)))
        self._seeded = True
        info = self.core.reset_rows(np.zeros(1, dtype=np.int64), options)
        self._needs_reset = False
        return self.core.observations()[0], {k: v[0] for k, v in info.items()}

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("DreamEnv.step called before reset()")
        a = self.core.validate_actions(action, name="DreamEnv.step: action")
        obs, rew, term, trunc, info = self.core.step(a)
        return (
            obs[0],
            float(rew[0]),
            bool(term[0]),
            bool(trunc[0]),
            {"log_likelihood": float(info["log_likelihood"][0]), "jacobi_iterations": int(info["jacobi_iterations"][0]),
             "termination_logit": float(info["termination_logit"][0]),
             "out_of_range": bool(info["out_of_range"][0]),
             "ood_score": float(info["ood_score"][0]), "ood": bool(info["ood"][0])},
        )

    def render(self):
        if self.render_mode == "rgb_array":
            return self.core.frames()[0]
        return None


# ----------------------------------------------------------------------------------------------
# gymnasium.vector.VectorEnv


class DreamVectorEnv(VectorEnv):
    """N imagined worlds stepped by one batched model call (``gymnasium.make_vec`` entry point).

    Autoreset follows gymnasium 1.x (``metadata["autoreset_mode"]``): ``NEXT_STEP`` (default) resets a
    finished world on the following ``step`` call (its action is ignored, reward 0);
    ``SAME_STEP`` resets it in the same call and puts the last observation in ``info["final_obs"]``
    and its info in ``info["final_info"]``. ``reset(options={"reset_mask": bool [N]})`` resets a subset.
    """

    def __init__(
        self,
        num_envs: int = 1,
        checkpoint: str | Path | None = None,
        render_mode: str | None = None,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ):
        kwargs.pop("max_episode_steps", None)  # gymnasium passes the spec's; the dream uses `horizon`
        if render_mode is not None and render_mode != "rgb_array":
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            raise ValueError("DreamVectorEnv supports autoreset_mode NEXT_STEP or SAME_STEP, not DISABLED")
        self.core = DreamCore(checkpoint, num_envs=num_envs, **kwargs)
        self.num_envs = self.core.num_envs
        self.render_mode = render_mode
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": 15, "autoreset_mode": self.autoreset_mode}
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        self._seeded = False

    @property
    def runtime(self):
        return self.core.runtime

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        options = dict(options or {})
        if isinstance(seed, (list, tuple)):
            seed = next((s for s in seed if s is not None), None)  # one generator drives the batch
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self.core.seed(seed)
            self._seeded = True
        elif not self._seeded:
            self.core.seed(int(np.random.default_rng().integers(0, 2**62)))
            self._seeded = True
        mask = options.pop("reset_mask", None)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_ or not mask.any():
                raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with a True")
            rows = np.flatnonzero(mask)
        else:
            rows = np.arange(self.num_envs)
        info = self.core.reset_rows(rows, options)
        self._autoreset[rows] = False
        return self.core.observations(), self._batched_info(info, rows)

    def _batched_info(self, info: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, Any]:
        """gymnasium's vector info layout: ``info[key]`` [N] plus the boolean mask ``info['_' + key]``."""
        out: dict[str, Any] = {}
        for k, v in info.items():
            full = np.zeros((self.num_envs, *v.shape[1:]), dtype=v.dtype)
            full[rows] = v
            mask = np.zeros(self.num_envs, dtype=bool)
            mask[rows] = True
            out[k], out["_" + k] = full, mask
        return out

    def step(self, actions):
        a = self.core.validate_actions(actions, name="DreamVectorEnv.step: actions")
        obs, rew, term, trunc, info = self.core.step(a)
        all_rows = np.arange(self.num_envs)
        infos = self._batched_info(info, all_rows)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            rows = np.flatnonzero(self._autoreset)
            if rows.size:
                # those worlds had ended: this step resets them instead (their generated frame is dropped)
                rinfo = self.core.reset_rows(rows)
                rew[rows], term[rows], trunc[rows] = 0.0, False, False
                for k, v in rinfo.items():
                    if k in infos:
                        infos[k][rows] = v
                obs = self.core.observations()
            self._autoreset = term | trunc
        else:  # SAME_STEP
            done = np.flatnonzero(term | trunc)
            if done.size:
                final_obs = np.empty(self.num_envs, dtype=object)
                final_info = np.empty(self.num_envs, dtype=object)
                for i in done:
                    final_obs[i] = obs[i]
                    final_info[i] = {k: info[k][i] for k in info}
                mask = np.zeros(self.num_envs, dtype=bool)
                mask[done] = True
                infos["final_obs"], infos["_final_obs"] = final_obs, mask
                infos["final_info"], infos["_final_info"] = final_info, mask.copy()
                self.core.reset_rows(done)
                obs = self.core.observations()
        return obs, rew.astype(np.float64), term, trunc, infos

    def render(self):
        if self.render_mode == "rgb_array":
            return tuple(self.core.frames())
        return None

    def close_extras(self, **kwargs: Any) -> None:
        pass


def make_dream_vector_env(num_envs: int = 1, **kwargs: Any) -> DreamVectorEnv:
    """``vector_entry_point`` of ``sfv_world/Dream-v0``."""
    return DreamVectorEnv(num_envs=num_envs, **kwargs)
