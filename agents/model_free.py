"""The model-free baseline: the same SB3 algorithm trained directly in the real env.

It gets exactly as many real environment steps as the world model's dataset used (``real_steps``,
normally the dataset's transition count), with the same pixel observations the dream gives
(:func:`~sfv_world.agents.evaluation.make_real_pixel_env`), and is evaluated the same way, so that its
curve and the imagination agent's are comparable per real step.

Output folder: ``policy.zip``, ``checkpoint.zip``, ``eval.csv`` (``imagined_*`` columns hold the
training-episode returns of the real envs), ``tb/``, ``result.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sfv_world.agents.evaluation import (
    ObservationSpec,
    evaluate_real,
    make_real_pixel_env,
)
from sfv_world.agents.imagination import AgentSettings, EvalLog, RealEvalCallback
from sfv_world.agents.policies import algo_class, algo_kwargs, policy_for, resolve_schedules
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv


def train_model_free(env_cfg: Any, spec: ObservationSpec, real_steps: int, out_dir: str | Path,
                     settings: AgentSettings, n_envs: int = 8, progress: bool = False) -> dict[str, Any]:
    """Train ``settings.algo`` for ``real_steps`` real env steps on pixel observations ``spec``.

    ``spec.obs_mode`` must be ``"pixels"`` (a latent observation would need the world model).
    Resumes from ``out_dir/checkpoint.zip``. Returns the result dict (also ``out_dir/result.json``).
    """
    import torch

    if spec.obs_mode != "pixels":
        raise ValueError("the model-free baseline uses pixel observations (obs_mode='pixels')")
    if int(real_steps) < 1:
        raise ValueError(f"real_steps must be >= 1, got {real_steps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    venv = DummyVecEnv([lambda: Monitor(make_real_pixel_env(env_cfg, spec)) for _ in range(int(n_envs))])
    venv.seed(settings.seed)
    policy_name, policy_kwargs = policy_for("pixels", venv.observation_space, None)
    cls = algo_class(settings.algo)
    ckpt = out / "checkpoint.zip"
    if ckpt.exists():
        model = cls.load(ckpt, env=venv, device="cpu", tensorboard_log=str(out / "tb"))
    else:
        kwargs = resolve_schedules({**algo_kwargs(settings.algo, int(n_envs), int(real_steps)), **settings.algo_kwargs})
        model = cls(policy_name, venv, policy_kwargs=policy_kwargs, seed=settings.seed, device="cpu",
                    tensorboard_log=str(out / "tb"), verbose=0, **kwargs)

    def evaluate(m):
        return evaluate_real(m, env_cfg, spec, episodes=settings.eval_episodes, seed=10_000 + settings.seed)

    log = EvalLog(out / "eval.csv")
    t0 = time.time()
    every = max(1, min(settings.eval_every, int(real_steps) // 4 or 1))
    callback = RealEvalCallback(every, evaluate, log, ckpt, t0, label="real")
    remaining = int(real_steps) - model.num_timesteps
    try:
        if remaining > 0:
            model.learn(remaining, callback=callback, reset_num_timesteps=False, progress_bar=progress,
                        tb_log_name="model_free")
        else:
            from stable_baselines3.common.logger import configure

            model.set_logger(configure(str(out / "tb" / "final"), ["tensorboard"]))
        callback.init_callback(model)
        final = callback.final_eval()
    finally:
        log.close()
        venv.close()
    model.save(out / "policy.zip")
    result = {
        "kind": "model_free",
        "real_return_mean": final["real_return_mean"],
        "real_return_std": final["real_return_std"],
        "real_length_mean": final["real_length_mean"],
        "real_steps": int(model.num_timesteps),
        "eval_episodes": settings.eval_episodes,
        "wall_s": round(time.time() - t0, 1),
        "settings": {"algo": settings.algo, "seed": settings.seed, "n_envs": int(n_envs),
                     "eval_every": every, "algo_kwargs": settings.algo_kwargs},
        "observations": asdict(spec),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result
