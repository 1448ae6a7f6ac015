"""Train an SB3 agent purely inside the dream; evaluate it periodically in the real env.

The agent never sees a real transition while it learns: its VecEnv is
:class:`~sfv_world.envs.sb3.DreamSB3VecEnv` (N worlds, one batched world-model call per step). Every
``eval_every`` dream steps the current policy plays ``eval_episodes`` real episodes with the same
observations (:mod:`sfv_world.agents.evaluation`). Imagined returns (VecMonitor over dream episodes) and
real returns are written side by side to tensorboard (``eval/*``) and to ``eval.csv``.

Output folder (``out_dir``)::

    policy.zip         the final policy (SB3 ``save``)
    checkpoint.zip     the latest policy during training (resume point)
    eval.csv           timesteps, imagined and real returns, wall time
    tb/                tensorboard events (SB3's own scalars plus eval/*)
    snapshots/         <steps>.zip every ``snapshot_every`` steps (optional)
    ensemble.json      with ``ensemble_snapshots`` = K: the agent is the ensemble of the last K snapshots
                       (:mod:`sfv_world.agents.ensemble`); the final evaluation is the ensemble's
    result.json        final real-env evaluation and settings

With ``seeds`` = N > 1 (:func:`train_agent`) the folder holds N such runs, ``seed<s>/`` for seeds ``seed`` ..
``seed + N - 1``, each trained independently in the same dream; ``ensemble.json`` lists their policies (mean
action distribution), ``policy.zip`` is a copy of the first seed's alone, and ``result.json`` evaluates the
ensemble and lists every member's own result. With ``select`` = ``"best"`` each seed's agent and the ensemble
play the same real episodes and the best mean return is the agent (:func:`select_agent`): ``policy.zip`` is
that seed's policy (no ``ensemble.json``) or the ensemble as above, and ``result.json["selection"]`` holds the
scores and the real frames the choice cost. With ``select`` = ``"halving"`` the pool also holds each seed's
snapshots from ``select_snapshots_from`` steps on (``seed<s>@<steps>``), chosen by successive halving
(:mod:`sfv_world.agents.selection`); a chosen snapshot is copied to ``policy.zip``.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sfv_world.agents.ensemble import MANIFEST, load_ensemble
from sfv_world.agents.evaluation import EvalResult, ObservationSpec, evaluate_real
from sfv_world.agents.policies import StandardizedFeatures, algo_class, algo_kwargs, policy_for, resolve_schedules
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnvWrapper, VecMonitor

SELECT_RULES = ("ensemble", "best", "halving")
EVAL_FIELDS = ["timesteps", "imagined_return_mean", "imagined_length_mean", "real_return_mean", "real_return_std",
               "real_length_mean", "wall_s"]


@dataclass
class AgentSettings:
    """Settings of one agent run (``configs/agent/*.yaml`` keys plus where to run)."""

    algo: str = "ppo"
    obs_mode: str = "pixels"
    latent_features: str = "mean"  # obs_mode=latent: "mean" [D] | "slots" [F * D] (WorldRuntime features)
    policy: str | None = None
    n_envs: int = 64
    total_timesteps: int = 500_000
    horizon: int = 200
    frame_stack: int = 4
    eval_every: int = 50_000
    eval_episodes: int = 20
    context_frames: int = 4
    context_start: str = "random"
    context_window: int | None = None  # frames in the dream's KV cache (None: the model's max_frames)
    termination: str = "threshold"
    termination_threshold: float = 0.5
    seed: int = 0
    device: str = "cpu"
    sampler: dict[str, Any] = field(default_factory=dict)
    algo_kwargs: dict[str, Any] = field(default_factory=dict)
    ood_truncate: bool = False  # truncate imagined episodes the world model flags as OOD (sfv_world.envs.ood)
    action_noise: float = 0.0  # probability that the dream executes a uniformly random action instead of the agent's
    obs_noise: float = 0.0  # latent: Gaussian noise added to the dream's features, in units of each feature's std
    time_scale: float = 1.0  # dream frames per agent step, on average (>= 1; see DreamCore: 1 / the dream's motion gain)
    termination_penalty: float = 0.0  # c in [0, 1]: each imagined reward loses c * sigmoid(termination logit / T)
    termination_penalty_temperature: float = 10.0  # T > 0 (see TerminationPenaltyVecEnv)
    snapshot_every: int | None = None  # save the policy to snapshots/<steps>.zip every this many steps (None: never)
    ensemble_snapshots: int | None = None  # the agent is the ensemble of its last K snapshots (None: the last policy)
    dataset: str | None = None  # dataset folder the dream draws reset context from (None: the checkpoint's)
    seeds: int = 1  # N > 1: N agents with seeds seed..seed+N-1, trained independently, act as one ensemble
    select: str = "ensemble"  # "ensemble" (all seeds together) | "best" (by real return, see select_agent) |
    # "halving" (successive halving over every seed's snapshots, last policies and their ensemble, see select_halving)
    select_max_frames: int | None = None  # best / halving: real frames the selection episodes may use (None: no cap)
    select_snapshots_from: int | None = None  # halving: snapshots of at least this many steps are candidates (None: none)
    select_first_episodes: int = 2  # halving: real episodes each candidate plays in the first round (doubling after)
    select_keep: int = 3  # halving: the best 1 / keep of a round's candidates go on to the next
    workers: int = 1  # seeds > 1: seeds trained at once, each in its own process with cpu_count // workers torch threads

    @classmethod
    def from_config(cls, agent_cfg: Any, **extra: Any) -> AgentSettings:
        """From an ``agent`` config mapping; unknown keys are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in dict(agent_cfg).items() if k in known}
        d.update({k: v for k, v in extra.items() if k in known and v is not None})
        return cls(**d)

    def validate(self) -> None:
        if self.total_timesteps < 1 or self.n_envs < 1 or self.eval_every < 1 or self.eval_episodes < 1:
            raise ValueError(f"agent: total_timesteps, n_envs, eval_every, eval_episodes must be >= 1: {self}")
        if not 0.0 <= float(self.action_noise) <= 1.0:
            raise ValueError(f"agent.action_noise must be a probability in [0, 1], got {self.action_noise}")
        if isinstance(self.obs_noise, bool) or not isinstance(self.obs_noise, (int, float)) or not (
                0.0 <= float(self.obs_noise) < float("inf")):
            raise ValueError(f"agent.obs_noise must be a finite number >= 0, got {self.obs_noise!r}")
        if self.obs_noise > 0 and self.obs_mode != "latent":
            raise ValueError(f"agent.obs_noise={self.obs_noise} perturbs latent features; it needs agent.obs_mode=latent, "
                             f"got {self.obs_mode!r}")
        if isinstance(self.time_scale, bool) or not isinstance(self.time_scale, (int, float)) or not (
                1.0 <= float(self.time_scale) < 16):
            raise ValueError(f"agent.time_scale must be a number in [1, 16) (dream frames per agent step), got "
                             f"{self.time_scale!r}")
        c, temp = self.termination_penalty, self.termination_penalty_temperature
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= float(c) <= 1.0:
            raise ValueError(f"agent.termination_penalty must be a number in [0, 1] (above 1 a step near the end could "
                             f"pay less than ending the episode), got {c!r}")
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0.0 < float(temp) < float("inf"):
            raise ValueError(f"agent.termination_penalty_temperature must be a finite number > 0, got {temp!r}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"agent.seeds must be an integer >= 1, got {self.seeds!r}")
        if self.seeds > 1 and self.ensemble_snapshots is not None:
            raise ValueError(f"agent.seeds={self.seeds} and agent.ensemble_snapshots={self.ensemble_snapshots}: choose "
                             "one kind of ensemble (independent seeds or one run's snapshots)")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"agent.workers must be an integer >= 1, got {self.workers!r}")
        if self.select not in SELECT_RULES:
            raise ValueError(f"agent.select must be one of {SELECT_RULES}, got {self.select!r}")
        if self.select == "best" and self.seeds < 2:
            raise ValueError(f"agent.select=best picks among agent.seeds > 1 agents, got agent.seeds={self.seeds}")
        if self.select == "halving":
            if self.seeds < 2 and self.select_snapshots_from is None:
                raise ValueError("agent.select=halving with agent.seeds=1 needs agent.select_snapshots_from: there is "
                                 "nothing else to choose from")
            if self.select_snapshots_from is not None and not self.snapshot_every:
                raise ValueError(f"agent.select_snapshots_from={self.select_snapshots_from} needs agent.snapshot_every")
            for key in ("select_first_episodes", "select_keep"):
                v = getattr(self, key)
                if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "select_first_episodes" else 2):
                    raise ValueError(f"agent.{key} must be an integer >= {1 if key == 'select_first_episodes' else 2}, "
                                     f"got {v!r}")
        if self.select_max_frames is not None and (isinstance(self.select_max_frames, bool)
                                                   or not isinstance(self.select_max_frames, int)
                                                   or self.select_max_frames < 1):
            raise ValueError(f"agent.select_max_frames must be a positive integer or null, got "
                             f"{self.select_max_frames!r}")
        if self.ensemble_snapshots is not None and (int(self.ensemble_snapshots) < 1 or not self.snapshot_every):
            raise ValueError(f"agent.ensemble_snapshots={self.ensemble_snapshots} needs a count >= 1 and "
                             f"agent.snapshot_every set (got {self.snapshot_every})")
        from sfv_world.world import FEATURES

        if self.latent_features not in FEATURES:
            raise ValueError(f"agent.latent_features must be one of {FEATURES}, got {self.latent_features!r}")
        policy_for(self.obs_mode, _dummy_space(self.obs_mode), self.policy)
        algo_class(self.algo)


def _dummy_space(obs_mode: str):
    import gymnasium as gym

    if obs_mode == "pixels":
        return gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    return gym.spaces.Box(-np.inf, np.inf, (8,), np.float32)


class RandomActionVecEnv(VecEnvWrapper):
    """Each env executes a uniformly random action instead of the agent's with probability ``p``.

    Robustness training (``agent.action_noise``): the agent must keep a margin from which it can
    recover from perturbations. The learner still records the action it chose; the real-env
    evaluation is noise-free.
    """

    def __init__(self, venv, p: float, seed: int = 0):
        super().__init__(venv)
        self.p = float(p)
        self.rng = np.random.default_rng(seed)
        self.action_space.seed(int(self.rng.integers(0, 2**31)))

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.array(actions, copy=True)
        swap = self.rng.random(self.num_envs) < self.p
        for i in np.flatnonzero(swap):
            actions[i] = self.action_space.sample()
        self.venv.step_async(actions)

    def step_wait(self):
        return self.venv.step_wait()

    def reset(self):
        return self.venv.reset()


class TerminationPenaltyVecEnv(VecEnvWrapper):
    """Imagined rewards minus ``c * sigmoid(logit / T)``, the termination head's danger at temperature T.

    The dream ends an episode only once the head's probability passes the threshold, so a policy
    that keeps the pole at a steady small tilt loses nothing there, although real physics would make
    that tilt grow (the dream's pole falls slower than the real one). The head's logit is graded far
    below the threshold: on real CartPole frames its median rises from -31.8 below 1 degree to -23.0
    at 4-6 and -4.4 at 10-12 (benchmarks/results/termination_logit_s22.md). A temperature T > 1 turns
    it into a penalty that grows smoothly with the danger (T = 10: 0.04, 0.09 and 0.39 there), so the
    policy is paid to stay upright, not just alive. ``c <= 1`` keeps every step's reward >= 0 for a
    reward of 1, so ending an episode never pays. Reads ``infos[i]["termination_logit"]`` (float) of a
    dream VecEnv; rewards float32 [N].
    Wrap it outside ``VecMonitor``, which then logs the unshaped imagined returns.
    """

    def __init__(self, venv, c: float, temperature: float):
        super().__init__(venv)
        self.c, self.temperature = float(c), float(temperature)

    def step_async(self, actions: np.ndarray) -> None:
        self.venv.step_async(actions)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        logit = np.array([info["termination_logit"] for info in infos], dtype=np.float64)
        danger = 0.5 * (1.0 + np.tanh(logit / (2.0 * self.temperature)))  # sigmoid(logit / T), no overflow
        return obs, (rewards - self.c * danger).astype(np.float32), dones, infos

    def reset(self):
        return self.venv.reset()


class FeatureNoiseVecEnv(VecEnvWrapper):
    """Adds Gaussian noise ``N(0, (scale * std)^2)`` to every latent observation the agent sees in the dream.

    Robustness training (``agent.obs_noise``): in the dream the features *are* the world's state, so a
    policy can rely on differences far below what the features of real frames resolve (the pole angle
    is read from them with an RMSE of ~2 degrees, ``benchmarks/perception_probe.py``). Noise of a fraction
    of each feature's spread makes the policy act on what survives it. ``std``: float32 [D], the
    per-dimension std the policy standardizes with. Observations float32 [N, D] in and out; the
    ``terminal_observation`` in ``infos`` is perturbed the same way. The real-env evaluation is noise-free.
    """

    def __init__(self, venv, std: np.ndarray, scale: float, seed: int = 0):
        super().__init__(venv)
        self.sigma = (float(scale) * np.asarray(std, np.float32)).astype(np.float32)  # [D]
        if self.sigma.shape != venv.observation_space.shape:
            raise ValueError(f"FeatureNoiseVecEnv: std has shape {self.sigma.shape}, observations "
                             f"{venv.observation_space.shape}")
        self.rng = np.random.default_rng(seed)

    def _noisy(self, obs: np.ndarray) -> np.ndarray:
        return (obs + self.rng.standard_normal(obs.shape, dtype=np.float32) * self.sigma).astype(np.float32)

    def step_async(self, actions: np.ndarray) -> None:
        self.venv.step_async(actions)

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = self._noisy(info["terminal_observation"])
        return self._noisy(obs), rewards, dones, infos

    def reset(self):
        return self._noisy(self.venv.reset())


class EvalLog:
    """Append-only eval.csv plus tensorboard scalars through the SB3 logger."""

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=EVAL_FIELDS)
        if new:
            self.writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: row.get(k, "") for k in EVAL_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_eval_csv(path: str | Path) -> dict[str, np.ndarray]:
    """eval.csv -> {column: float array} (empty cells are NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]) for k in EVAL_FIELDS}


class SnapshotCallback(BaseCallback):
    """Save the model to ``folder/<num_timesteps>.zip`` at the first env step that reaches each multiple of
    ``every`` (snapshot ensembles, model selection)."""

    def __init__(self, every: int, folder: Path):
        super().__init__()
        self.every, self.folder = int(every), Path(folder)
        self.next_save = None

    def _on_training_start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.next_save = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_save:
            self.next_save += self.every
            self.model.save(self.folder / f"{self.num_timesteps}.zip")
        return True


def list_snapshots(out_dir: str | Path) -> list[Path]:
    """The saved snapshots of an agent run, oldest first."""
    folder = Path(out_dir) / "snapshots"
    return sorted(folder.glob("*.zip"), key=lambda p: int(p.stem)) if folder.is_dir() else []


class RealEvalCallback(BaseCallback):
    """Every ``every`` steps: real-env evaluation, imagined-return summary, logs, a resume checkpoint."""

    def __init__(self, every: int, evaluate, log: EvalLog, checkpoint_path: Path, t0: float, label: str = "dream"):
        super().__init__()
        self.every, self.evaluate, self.log = int(every), evaluate, log
        self.checkpoint_path, self.t0, self.label = checkpoint_path, t0, label
        self.next_eval = None
        self.last_row: dict[str, Any] | None = None
        self.last_params: list | None = None  # the policy's parameters at the last evaluation

    def _on_training_start(self) -> None:
        self.next_eval = (self.num_timesteps // self.every + 1) * self.every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_eval:
            self.next_eval += self.every
            self.run_eval()
        return True

    def imagined(self) -> tuple[float, float]:
        buf = self.model.ep_info_buffer
        if not buf:
            return float("nan"), float("nan")
        return float(np.mean([e["r"] for e in buf])), float(np.mean([e["l"] for e in buf]))

    def run_eval(self) -> dict[str, Any]:
        result = self.evaluate(self.model)
        im_r, im_l = self.imagined()
        row = {"timesteps": self.num_timesteps, "imagined_return_mean": im_r, "imagined_length_mean": im_l,
               "real_return_mean": result.mean, "real_return_std": result.std,
               "real_length_mean": float(result.lengths.mean()), "wall_s": round(time.time() - self.t0, 1)}
        self.log.write(row)
        for k in ("imagined_return_mean", "real_return_mean", "real_length_mean"):
            self.logger.record(f"eval/{k}", row[k])
        self.logger.dump(self.num_timesteps)
        self.model.save(self.checkpoint_path)
        print(f"[agent] {self.num_timesteps} {self.label} steps: training-episode return {im_r:.1f}, real return "
              f"{result.mean:.1f} +- {result.std:.1f}", flush=True)
        self.last_row = row
        self.last_params = self._params()
        return row

    def _params(self) -> list:
        return [p.detach().clone() for p in self.model.policy.parameters()]

    def final_eval(self) -> dict[str, Any]:
        """The evaluation at the end of training, reused when the last periodic one was at this step or saw the
        same policy (a linear schedule's last update has learning rate 0, so an evaluation at 50,048 of 50,000
        steps already scored the final policy)."""
        self.num_timesteps = self.model.num_timesteps
        if self.last_row is not None and (self.last_row["timesteps"] == self.num_timesteps or all(
                torch.equal(a, b) for a, b in zip(self.last_params, self._params(), strict=True))):
            return self.last_row
        return self.run_eval()


def training_env(venv, settings: AgentSettings, std: np.ndarray | None = None):
    """The dream vec env as the learner sees it: ``VecMonitor`` (unshaped imagined returns, after OOD
    truncation where ``agent.ood_truncate``), then the termination penalty, feature noise (``std``: float32
    [D], the policy's standardization) and action noise that the settings ask for."""
    if settings.ood_truncate:
        from sfv_world.envs.ood import OODTruncationVecEnv

        monitored = VecMonitor(OODTruncationVecEnv(venv))
    else:
        monitored = VecMonitor(venv)
    if settings.termination_penalty > 0:
        monitored = TerminationPenaltyVecEnv(monitored, settings.termination_penalty,
                                             settings.termination_penalty_temperature)
    if settings.obs_noise > 0:
        monitored = FeatureNoiseVecEnv(monitored, std, settings.obs_noise, seed=settings.seed)
    if settings.action_noise > 0:
        monitored = RandomActionVecEnv(monitored, settings.action_noise, seed=settings.seed)
    return monitored


def latent_feature_stats(venv, steps: int = 16, seed: int = 0, min_std: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (float32 [D] each) of a latent dream vec env's observations.

    Resets ``venv`` and plays ``steps`` uniformly random actions in all its worlds (so ~N * (steps + 1)
    samples of the states the agent starts from); std is floored at ``min_std``. The caller resets the
    env again before training (SB3's ``learn`` does).
    """
    space = venv.action_space
    space.seed(seed)
    obs = [venv.reset()]
    for _ in range(int(steps)):
        o, *_ = venv.step(np.stack([space.sample() for _ in range(venv.num_envs)]))
        obs.append(o)
    x = np.concatenate(obs).astype(np.float64)
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), min_std).astype(np.float32)


def real_evaluator(runtime, env_cfg: Any, settings: AgentSettings, max_steps: int = 100_000):
    """``evaluate(model)``: ``settings.eval_episodes`` real episodes (seeds ``10_000 + settings.seed`` on, each
    cut after ``max_steps`` steps) with the observations of ``runtime``'s world model; raises now if
    ``env_cfg`` crops unlike its dataset."""
    spec = ObservationSpec.from_runtime(runtime, settings.obs_mode, settings.frame_stack)
    spec.check_env(env_cfg)

    def evaluate(model):
        return evaluate_real(model, env_cfg, spec, episodes=settings.eval_episodes, seed=10_000 + settings.seed,
                             runtime_factory=runtime.sibling, max_steps=max_steps)

    return evaluate


def dream_vec_env(checkpoint: str | Path, settings: AgentSettings, **overrides: Any):
    """The dream an agent with ``settings`` trains in: a ``DreamSB3VecEnv`` of ``settings.n_envs`` worlds with its
    observation, horizon, context, termination, sampler and time-scale settings. ``overrides`` replace any of
    ``DreamSB3VecEnv``'s keyword arguments (``horizon=...``, ``termination_threshold=...``) for diagnostics."""
    from sfv_world.envs.sb3 import DreamSB3VecEnv

    kwargs = dict(
        num_envs=settings.n_envs, obs_mode=settings.obs_mode, latent_features=settings.latent_features,
        frame_stack=settings.frame_stack, horizon=settings.horizon, context_frames=settings.context_frames,
        context_start=settings.context_start, context_window=settings.context_window, dataset=settings.dataset,
        termination=settings.termination, termination_threshold=settings.termination_threshold,
        sampler=settings.sampler or None, device=settings.device, time_scale=settings.time_scale,
    )
    return DreamSB3VecEnv(checkpoint, **{**kwargs, **overrides})


def train_in_imagination(checkpoint: str | Path, env_cfg: Any, out_dir: str | Path, settings: AgentSettings,
                         progress: bool = False, callbacks: list[BaseCallback] | None = None) -> dict[str, Any]:
    """Train ``settings.algo`` inside the dream of ``checkpoint``; evaluate in the real env of ``env_cfg``.

    ``callbacks``: extra SB3 callbacks for ``learn`` (the parallel seeds report their steps through one).

    Resumes from ``out_dir/checkpoint.zip`` if a previous run was interrupted. Returns the result dict
    (also written to ``out_dir/result.json``).
    """
    settings.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    venv = dream_vec_env(checkpoint, settings)
    venv.seed(settings.seed)
    runtime = venv.runtime
    evaluate = real_evaluator(runtime, env_cfg, settings)  # checks the crop now, not at the first evaluation

    policy_name, policy_kwargs = policy_for(settings.obs_mode, venv.observation_space, settings.policy)
    cls = algo_class(settings.algo)
    ckpt = out / "checkpoint.zip"
    if settings.obs_mode == "latent" and not ckpt.exists():
        mean, std = latent_feature_stats(venv, seed=settings.seed)
        policy_kwargs = {**policy_kwargs, "features_extractor_class": StandardizedFeatures,
                         "features_extractor_kwargs": {"mean": mean.tolist(), "std": std.tolist()}}
    elif settings.obs_noise > 0:  # resuming: the noise follows the stats the policy was built with
        std = np.asarray(cls.load(ckpt, device="cpu").policy.features_extractor.std.cpu().numpy(), np.float32)
    monitored = training_env(venv, settings, std if settings.obs_noise > 0 else None)
    if ckpt.exists():
        model = cls.load(ckpt, env=monitored, device="cpu", tensorboard_log=str(out / "tb"))
        print(f"[agent] resuming from {ckpt} at {model.num_timesteps} steps")
    else:
        for stale in list_snapshots(out):  # a fresh run: snapshots another run left here are not this run's
            stale.unlink()
        kwargs = resolve_schedules({**algo_kwargs(settings.algo, settings.n_envs, settings.total_timesteps), **settings.algo_kwargs})
        model = cls(policy_name, monitored, policy_kwargs=policy_kwargs, seed=settings.seed, device="cpu",
                    tensorboard_log=str(out / "tb"), verbose=0, **kwargs)
    log = EvalLog(out / "eval.csv")
    t0 = time.time()
    callback = RealEvalCallback(settings.eval_every, evaluate, log, ckpt, t0)
    callbacks = [callback, *(callbacks or [])]
    if settings.snapshot_every:
        callbacks.append(SnapshotCallback(settings.snapshot_every, out / "snapshots"))
    remaining = settings.total_timesteps - model.num_timesteps
    try:
        if remaining > 0:
            model.learn(remaining, callback=callbacks, reset_num_timesteps=False, progress_bar=progress,
                        tb_log_name="imagination")
        else:  # an interrupted run that had finished learning: only the final evaluation is left
            from stable_baselines3.common.logger import configure

            model.set_logger(configure(str(out / "tb" / "final"), ["tensorboard"]))
        callback.init_callback(model)
        final = callback.final_eval()
    finally:
        log.close()
    model.save(out / "policy.zip")
    (out / MANIFEST).unlink(missing_ok=True)  # a previous run's ensemble is not this run's
    single, members = final, []
    if settings.ensemble_snapshots:
        members = list_snapshots(out)[-int(settings.ensemble_snapshots):]
        ensemble = load_ensemble(members, cls)
        ev = evaluate(ensemble)
        ensemble.save(out)
        final = {**final, "real_return_mean": ev.mean, "real_return_std": ev.std,
                 "real_length_mean": float(ev.lengths.mean())}
        print(f"[agent] ensemble of {len(members)} snapshots ({members[0].stem}..{members[-1].stem} steps): real "
              f"return {ev.mean:.1f} +- {ev.std:.1f} (last policy alone: {single['real_return_mean']:.1f})", flush=True)
    result = {
        "kind": "imagination",
        "checkpoint": str(checkpoint),
        "real_return_mean": final["real_return_mean"],
        "real_return_std": final["real_return_std"],
        "real_length_mean": final["real_length_mean"],
        "imagined_return_mean": final["imagined_return_mean"],
        "last_policy_real_return_mean": single["real_return_mean"],
        "ensemble_kind": "snapshots" if members else None,
        "ensemble_members": [p.name for p in members] or None,
        "eval_episodes": settings.eval_episodes,
        "dream_steps": int(model.num_timesteps),
        "wall_s": round(time.time() - t0, 1),
        "settings": asdict(settings),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def select_agent(candidates: dict[str, Any], runtime, env_cfg: Any, settings: AgentSettings):
    """Pick the candidate policy with the highest mean real return (``agent.select=best``).

    Every candidate (name -> SB3 model or :class:`PolicyEnsemble`, all trained only in the dream) plays the
    same ``settings.eval_episodes`` real episodes (seeds ``10_000 + settings.seed`` on). These are real
    frames spent on a decision, so they are counted (``real_frames``) and capped: with
    ``settings.select_max_frames`` = F each episode is cut after F // (episodes * candidates) steps, so the
    selection never uses more than F frames. Ties go to the earlier candidate. Returns (selection dict,
    the winner's :class:`~sfv_world.agents.evaluation.EvalResult`); the score is biased upwards by the
    choice itself (judge the winner on other episodes).
    """
    n = settings.eval_episodes * len(candidates)
    cap = 100_000 if settings.select_max_frames is None else int(settings.select_max_frames) // n
    if cap < 1:
        raise ValueError(f"agent.select_max_frames={settings.select_max_frames} cannot give {len(candidates)} "
                         f"candidates {settings.eval_episodes} real episodes of at least one step each")
    evaluate = real_evaluator(runtime, env_cfg, settings, max_steps=cap)
    results = {}
    for name, policy in candidates.items():
        results[name] = evaluate(policy)
        print(f"[agent] selection: {name} real return {results[name].mean:.1f} +- {results[name].std:.1f}", flush=True)
    best = max(results, key=lambda k: results[k].mean)  # max keeps the first of equal scores
    frames = int(sum(int(r.lengths.sum()) for r in results.values()))
    print(f"[agent] selected {best} ({frames} real frames over {n} selection episodes)", flush=True)
    selection = {"rule": "best mean real return", "selected": best, "episodes": settings.eval_episodes,
                 "seed": 10_000 + settings.seed, "max_episode_steps": cap if settings.select_max_frames else None,
                 "real_frames": frames, "scores": {k: r.mean for k, r in results.items()}}
    return selection, results[best]


def halving_candidates(out: Path, settings: AgentSettings, ensemble) -> dict[str, Any]:
    """The pool of ``agent.select=halving``: each seed's last policy (``seed<s>``), its snapshots of at least
    ``settings.select_snapshots_from`` steps (``seed<s>@<steps>``) and, with several seeds, their ensemble."""
    candidates: dict[str, Any] = {}
    for k, model in enumerate(ensemble.models):
        name = f"seed{settings.seed + k}"
        candidates[name] = model
        if settings.select_snapshots_from is not None:
            for path in list_snapshots(out / name):
                if int(path.stem) >= int(settings.select_snapshots_from):
                    candidates[f"{name}@{path.stem}"] = algo_class(settings.algo).load(path, device=settings.device)
    if len(ensemble.models) > 1:
        candidates["ensemble"] = ensemble
    return candidates


def select_halving(candidates: dict[str, Any], runtime, env_cfg: Any, settings: AgentSettings):
    """Pick a candidate by :func:`~sfv_world.agents.selection.successive_halving` over real episodes (seeds
    ``10_000 + settings.seed`` on), within ``settings.select_max_frames`` real frames (None: 100k). Returns
    (selection dict, the winner's :class:`~sfv_world.agents.evaluation.EvalResult` over all its selection
    episodes; biased upwards by the choice)."""
    from sfv_world.agents.selection import successive_halving

    spec = ObservationSpec.from_runtime(runtime, settings.obs_mode, settings.frame_stack)
    spec.check_env(env_cfg)
    played: dict[str, list[np.ndarray]] = {name: [] for name in candidates}

    def evaluate(name: str, episodes: int, seed: int, max_steps: int):
        r = evaluate_real(candidates[name], env_cfg, spec, episodes=episodes, seed=seed,
                          runtime_factory=runtime.sibling, max_steps=max_steps)
        played[name].append(r.lengths)
        return r.returns, r.lengths

    budget = 100_000 if settings.select_max_frames is None else int(settings.select_max_frames)
    chosen, rounds, returns = successive_halving(
        list(candidates), evaluate, budget, first_episodes=settings.select_first_episodes, keep=settings.select_keep,
        seed=10_000 + settings.seed, log=lambda msg: print(f"[agent] {msg}", flush=True))
    frames = int(sum(r.real_frames for r in rounds))
    ev = EvalResult(np.asarray(returns[chosen], dtype=np.float64), np.concatenate(played[chosen]).astype(np.int64))
    print(f"[agent] selected {chosen}: real return {ev.mean:.1f} over its {ev.returns.size} selection episodes "
          f"({frames} real frames, {len(candidates)} candidates)", flush=True)
    selection = {"rule": "successive halving", "selected": chosen, "candidates": len(candidates),
                 "seed": 10_000 + settings.seed, "budget": budget, "real_frames": frames,
                 "rounds": [asdict(r) for r in rounds],
                 "scores": {k: float(np.mean(v)) for k, v in returns.items() if v},
                 "episodes": {k: len(v) for k, v in returns.items() if v}}
    return selection, ev


def chosen_policy_file(out: Path, chosen: str) -> Path:
    """The ``.zip`` of a selected candidate ``seed<s>`` or ``seed<s>@<steps>`` under ``out``."""
    seed_dir, _, steps = chosen.partition("@")
    return out / seed_dir / "snapshots" / f"{steps}.zip" if steps else out / seed_dir / "policy.zip"


class StepCounter(BaseCallback):
    """Writes the model's imagined steps to ``counter[slot]`` (a shared array the parent's progress bar reads)."""

    def __init__(self, counter, slot: int):
        super().__init__()
        self.counter, self.slot = counter, slot

    def _on_step(self) -> bool:
        self.counter[self.slot] = self.num_timesteps
        return True


_STEPS = None  # a worker's view of the parent's shared step counters (set by _init_worker)


def _init_worker(steps) -> None:
    global _STEPS
    _STEPS = steps


def _train_member(checkpoint: str, env_cfg: Any, out_dir: Path, member: AgentSettings, threads: int, slot: int) -> float:
    """One seed's run in a worker process with ``threads`` torch threads; returns its real return."""
    torch.set_num_threads(threads)
    counter = [StepCounter(_STEPS, slot)] if _STEPS is not None else []
    return float(train_in_imagination(checkpoint, env_cfg, out_dir, member, progress=False,
                                      callbacks=counter)["real_return_mean"])


def train_members_in_parallel(checkpoint: str | Path, env_cfg: Any, out: Path, members: list[AgentSettings],
                              workers: int, progress: bool = True) -> None:
    """Train ``members`` (one seed each) in ``workers`` spawned processes, ``cores // workers`` torch threads each.

    On 2 cores two single-thread seeds train 1.29x faster together than one after another on both threads
    (171.6 against 132.8 imagined steps/s with start-up and real evaluations, one run; small batched ops
    scale poorly across threads: benchmarks/results/agent_workers.md). Each member writes its own
    ``seed<s>/`` folder, as in the serial path; one progress bar counts the imagined steps of all of them.
    """
    import multiprocessing as mp
    import os
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    print(f"[agent] seeds {', '.join(str(m.seed) for m in members)}: {workers} at a time, {threads} torch "
          f"thread(s) each", flush=True)
    ctx = mp.get_context("spawn")
    steps = ctx.Array("q", len(members), lock=False)
    total = sum(int(m.total_timesteps) for m in members)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(steps,)) as pool, \
            tqdm(total=total, desc="agents", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        futures = {pool.submit(_train_member, str(checkpoint), env_cfg, out / f"seed{m.seed}", m, threads, i): m.seed
                   for i, m in enumerate(members)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            bar.update(min(sum(steps), total) - bar.n)
            for future in done:
                tqdm.write(f"[agent] seed {futures[future]}: real return {future.result():.1f}")


def train_agent(checkpoint: str | Path, env_cfg: Any, out_dir: str | Path, settings: AgentSettings,
                progress: bool = False) -> dict[str, Any]:
    """``settings.seeds`` = 1: :func:`train_in_imagination`. N > 1: N independently seeded agents in ``seed<s>/``
    (each resumes or is reused on its own), then their ensemble (mean action distribution), evaluated on the
    same real episodes as a single agent would be; with ``settings.select="best"`` the agent is whichever of
    the N agents and their ensemble scores best on those episodes (:func:`select_agent`); with ``"halving"`` the
    pool also holds every seed's late snapshots and successive halving picks (:func:`select_halving`; also for
    one seed). Returns the result dict (also ``out_dir/result.json``)."""
    settings.validate()
    if settings.seeds == 1 and settings.select != "halving":
        return train_in_imagination(checkpoint, env_cfg, out_dir, settings, progress)
    from sfv_world.world import WorldRuntime

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    t0 = time.time()
    members = [out / f"seed{settings.seed + k}" / "policy.zip" for k in range(settings.seeds)]
    todo = []
    for k in range(settings.seeds):
        seed = settings.seed + k
        if not (out / f"seed{seed}" / "result.json").exists():
            todo.append(replace(settings, seed=seed, seeds=1, select="ensemble", select_max_frames=None, workers=1))
    workers = min(settings.workers, len(todo))
    if workers > 1:
        train_members_in_parallel(checkpoint, env_cfg, out, todo, workers, progress)
    else:
        for member in todo:
            print(f"[agent] seed {member.seed} ({member.seed - settings.seed + 1} of {settings.seeds})", flush=True)
            train_in_imagination(checkpoint, env_cfg, out / f"seed{member.seed}", member, progress)
    member_results = [json.loads((p.parent / "result.json").read_text()) for p in members]
    ensemble = load_ensemble(members, algo_class(settings.algo))
    runtime = WorldRuntime.from_checkpoint(checkpoint, batch_size=1, device=settings.device,
                                           sampler=settings.sampler or None, context_window=settings.context_window,
                                           seed=settings.seed, features=settings.latent_features)
    alone = [r["real_return_mean"] for r in member_results]
    selection = None
    if settings.select == "best":
        candidates = {f"seed{settings.seed + k}": m for k, m in enumerate(ensemble.models)}
        candidates["ensemble"] = ensemble
        selection, ev = select_agent(candidates, runtime, env_cfg, settings)
        chosen = selection["selected"]
    elif settings.select == "halving":
        selection, ev = select_halving(halving_candidates(out, settings, ensemble), runtime, env_cfg, settings)
        chosen = selection["selected"]
    else:
        chosen, ev = "ensemble", real_evaluator(runtime, env_cfg, settings)(ensemble)
    if chosen == "ensemble":
        ensemble.save(out)
        shutil.copyfile(members[0], out / "policy.zip")
        print(f"[agent] ensemble of {len(members)} seeds: real return {ev.mean:.1f} +- {ev.std:.1f} (each alone: "
              f"{', '.join(f'{v:.1f}' for v in alone)})", flush=True)
    else:
        shutil.copyfile(chosen_policy_file(out, chosen), out / "policy.zip")
    result = {
        "kind": "imagination",
        "checkpoint": str(checkpoint),
        "real_return_mean": ev.mean,
        "real_return_std": ev.std,
        "real_length_mean": float(ev.lengths.mean()),
        "imagined_return_mean": float(np.mean([r["imagined_return_mean"] for r in member_results])),
        "last_policy_real_return_mean": alone[0],
        "ensemble_kind": "seeds" if chosen == "ensemble" else None,
        "ensemble_members": [str(p.relative_to(out)) for p in members] if chosen == "ensemble" else None,
        "selection": selection,
        "members": member_results,
        "eval_episodes": settings.eval_episodes,
        "dream_steps": int(sum(r["dream_steps"] for r in member_results)),
        "wall_s": round(sum(r["wall_s"] for r in member_results) + time.time() - t0, 1),
        "settings": asdict(settings),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result
