"""``sfv-world agent [overrides]``: train an SB3 agent inside the dream, evaluate it in the real env.

Reads ``cfg.checkpoint`` (default ``<run_dir>/checkpoints/last.pt``), ``cfg.agent`` (algo, obs_mode,
n_envs, total_timesteps, horizon, frame_stack, eval_every, eval_episodes), ``cfg.sampler`` and
``cfg.env`` (the real env for evaluation). Writes ``<run_dir>/agent/<algo>-<obs_mode>/`` (see
``sfv_world.agents.imagination``). With ``agent.baseline=true`` it also trains the model-free baseline
(the same algorithm in the real env for as many real steps as the dataset holds) into
``<run_dir>/agent/model_free-<algo>/``. A finished run (``result.json`` present) is not repeated; an
interrupted one resumes from its ``checkpoint.zip``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def agent_dirs(cfg: DictConfig) -> dict[str, Path]:
    """Output folders of the imagination agent and of the model-free baseline."""
    a = cfg.agent
    root = Path(cfg.run_dir) / "agent"
    return {"imagination": root / f"{a.algo}-{a.obs_mode}", "model_free": root / f"model_free-{a.algo}"}


def check_env_matches(cfg: DictConfig, payload_dataset: dict[str, Any], checkpoint: Path) -> None:
    """The real env used for evaluation must be the one the world model's dataset came from."""
    env_id = (payload_dataset.get("sfv_world") or {}).get("env_id")
    if env_id is not None and env_id != cfg.env.id:
        raise SystemExit(
            f"sfv-world agent: checkpoint {checkpoint} was trained on {env_id!r} data but env.id={cfg.env.id!r}; "
            f"pass the matching env=<name>"
        )


def context_dataset(cfg: DictConfig, payload_dataset: dict[str, Any]) -> str | None:
    """The dataset the dream takes reset context from: ``cfg.dataset`` where it exists, else None (the
    checkpoint's own dataset). Raises, naming both, when neither exists."""
    wanted = OmegaConf.select(cfg, "dataset", default=None)
    recorded = payload_dataset.get("path")
    if wanted is not None and Path(str(wanted)).exists():
        if recorded is None or Path(str(wanted)).resolve() != Path(str(recorded)).resolve():
            print(f"sfv-world agent: dream contexts from dataset={wanted} (the checkpoint was trained on {recorded})")
        return str(wanted)
    if recorded is not None and Path(str(recorded)).exists():
        return None
    raise ValueError(f"dataset={wanted!r} does not exist, nor does the checkpoint's dataset {recorded!r}: the dream "
                     "needs real context frames; pass dataset=<folder> of the model's dataset")


def run(cfg: DictConfig) -> dict[str, Any]:
    from sfv_world.agents.evaluation import ObservationSpec
    from sfv_world.agents.imagination import AgentSettings, train_agent
    from sfv_world.agents.model_free import train_model_free
    from sfv_world.checkpoint import load_checkpoint
    from sfv_world.train import resolve_device

    checkpoint = Path(OmegaConf.select(cfg, "checkpoint", default=None) or Path(cfg.run_dir) / "checkpoints" / "last.pt")
    payload = load_checkpoint(checkpoint)  # clear error for a missing / unreadable file
    check_env_matches(cfg, payload["dataset"], checkpoint)
    device = str(resolve_device(str(cfg.device)))
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else {}
    agent_cfg = OmegaConf.to_container(cfg.agent, resolve=True)
    settings = AgentSettings.from_config(agent_cfg, seed=int(cfg.seed), device=device, sampler=sampler,
                                         dataset=context_dataset(cfg, payload["dataset"]))
    dirs = agent_dirs(cfg)
    progress = bool(OmegaConf.select(cfg, "agent.progress", default=False))
    results: dict[str, Any] = {}

    done = dirs["imagination"] / "result.json"
    if done.exists():
        results["imagination"] = json.loads(done.read_text())
        print(f"sfv-world agent: {done} exists; not retraining")
    else:
        results["imagination"] = train_agent(checkpoint, cfg.env, dirs["imagination"], settings, progress)

    if bool(OmegaConf.select(cfg, "agent.baseline", default=False)):
        done = dirs["model_free"] / "result.json"
        if done.exists():
            results["model_free"] = json.loads(done.read_text())
        else:
            meta = payload["dataset"]
            real_steps = int(OmegaConf.select(cfg, "agent.baseline_steps", default=None) or meta["total_steps"])
            spec = ObservationSpec.from_meta(meta, int(payload["model_config"]["frame_size"]), "pixels",
                                             int(settings.frame_stack))
            n_envs = int(OmegaConf.select(cfg, "agent.baseline_n_envs", default=8))
            results["model_free"] = train_model_free(cfg.env, spec, real_steps, dirs["model_free"], settings,
                                                     n_envs=n_envs, progress=progress)
    summary = {k: {kk: v[kk] for kk in ("real_return_mean", "real_return_std") if kk in v} for k, v in results.items()}
    print(json.dumps(summary, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    from sfv_world.apps.cli import run_module

    return run_module(run, argv)


if __name__ == "__main__":
    sys.exit(main())
