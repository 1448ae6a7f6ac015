"""``sfv-world pipeline [overrides]``: collect -> train -> quality -> agent -> real-env evaluation -> report.

Every stage runs through the other commands' ``run(cfg)`` on the same config and writes into the run
folder ``cfg.run_dir``. A stage whose marker ``<run_dir>/pipeline/<stage>.json`` exists is skipped; an
interrupted stage is resumed: collection restarts from scratch (it is the cheap stage), training resumes
from ``checkpoints/last.pt`` (``train.resume=true``), the agents resume from their ``checkpoint.zip``.

Report (``<run_dir>/report/``): ``report.md`` with

- training curves (``training_curves.png``),
- open-loop prediction quality against horizon (``quality_vs_horizon.png``),
- dream-against-real GIFs under the same logged actions (``dream_vs_real_<i>.gif``),
- imagined and real returns of the imagination agent against the model-free baseline and a random
  policy (``returns.png``),

plus ``agent.json`` (``real_return_mean`` of the imagination agent; with the ``cpu-demo`` preset, or
``pipeline.record_benchmark=true``, it is also written to ``benchmarks/results/agent.json``) and the
stage timings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

STAGES = ("collect", "train", "fidelity", "quality", "agent", "evaluate", "report")
REPO = Path(__file__).resolve().parents[2]


def _with(cfg: DictConfig, **updates: Any) -> DictConfig:
    """A copy of cfg with dotted keys set (new keys allowed)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in updates.items():
            OmegaConf.update(out, key, value, force_add=True)
    return out


class Stages:
    """Markers, timings and skipping for the stages of one run folder."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "pipeline"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings_path = self.dir / "timings.json"
        self.timings: dict[str, float] = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    def marker(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def result(self, stage: str) -> Any:
        return json.loads(self.marker(stage).read_text())

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        if self.done(stage):
            print(f"[pipeline] {stage}: done before, skipped ({self.marker(stage)})", flush=True)
            return self.result(stage)
        print(f"[pipeline] {stage} ...", flush=True)
        t0 = time.time()
        result = fn()
        self.timings[stage] = round(time.time() - t0, 1)
        self.timings_path.write_text(json.dumps(self.timings, indent=1))
        self.marker(stage).write_text(json.dumps(result, indent=1, default=_json_default))
        print(f"[pipeline] {stage}: {self.timings[stage]:.0f} s", flush=True)
        return result


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ----------------------------------------------------------------------------------------------
# stages


def stage_collect(cfg: DictConfig) -> dict[str, Any]:
    from sfv_world.apps import collect
    from sfv_world.datasets import DatasetReader, partial_path_for

    path = Path(cfg.dataset)
    if path.exists():
        with DatasetReader(path) as reader:
            if reader.complete:
                return {"dataset": str(path), "episodes": reader.num_episodes, "transitions": reader.num_transitions,
                        "reused": True}
    overwrite = path.exists() or partial_path_for(path).exists()  # an interrupted collection starts over
    rc = collect.run(_with(cfg, **{"collect.overwrite": overwrite}))
    if rc not in (0, None):
        raise SystemExit(f"[pipeline] collect stopped with code {rc}")
    with DatasetReader(path) as reader:
        return {"dataset": str(path), "episodes": reader.num_episodes, "transitions": reader.num_transitions,
                "reused": False}


def stage_train(cfg: DictConfig) -> dict[str, Any]:
    from sfv_world.apps import train

    metrics = train.run(_with(cfg, **{"train.resume": True}))
    return {"checkpoint": str(cfg.checkpoint), "final": {k: v for k, v in (metrics or {}).items() if "bpd_t" not in k}}


def records_benchmark(cfg: DictConfig) -> bool:
    """``pipeline.record_benchmark``: write the run's figures to ``benchmarks/results`` (null: only the cpu-demo
    preset, whose ``make demo`` run is the recorded benchmark)."""
    record = OmegaConf.select(cfg, "pipeline.record_benchmark", default=None)
    return str(cfg.preset_name) == "cpu-demo" if record is None else bool(record)


def quality_output(cfg: DictConfig) -> Path:
    """benchmarks/results/quality.json where the run is the recorded benchmark (records_benchmark), else the
    run folder's report/quality.json."""
    if records_benchmark(cfg):
        return Path(cfg.quality.output)
    return Path(cfg.run_dir) / "report" / "quality.json"


def stage_quality(cfg: DictConfig) -> dict[str, Any]:
    from sfv_world.apps import quality

    return quality.run(_with(cfg, **{"quality.output": str(quality_output(cfg))}))


def stage_agent(cfg: DictConfig, warm_start: Path | None = None, max_real_frames: int | None = None,
                spent: int = 0) -> dict[str, Any]:
    """The imagination agent; ``warm_start``: a previous iteration's ``checkpoint.zip`` to continue from.

    With ``agent.select=best`` or ``halving`` the real episodes that choose the agent are capped to what is left of
    ``max_real_frames`` after the dataset and the ``spent`` frames of earlier selections (unless
    ``agent.select_max_frames`` is set)."""
    from sfv_world.apps import agent
    from sfv_world.datasets import DatasetReader

    overrides: dict[str, Any] = {"agent.baseline": False}
    rule = OmegaConf.select(cfg, "agent.select", default="ensemble")
    if (rule in ("best", "halving") and max_real_frames is not None
            and OmegaConf.select(cfg, "agent.select_max_frames", default=None) is None):
        with DatasetReader(cfg.dataset) as reader:
            left = int(max_real_frames) - reader.num_transitions - int(spent)
        if left <= 0:
            raise ValueError(f"agent.select={rule} needs real frames, but the budget pipeline.max_real_frames="
                             f"{max_real_frames} is spent")
        overrides["agent.select_max_frames"] = left
    if warm_start is not None:
        check_warm_start_seeds(cfg)
        target = agent.agent_dirs(cfg)["imagination"] / "checkpoint.zip"
        if not target.exists() and warm_start.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(warm_start, target)
    return agent.run(_with(cfg, **overrides))


def selection_frames(results: dict[str, Any]) -> int:
    """Real frames that agent stages (``agent``, ``agent@<k>`` results) spent choosing among seeds."""
    return sum(int((((r or {}).get("imagination") or {}).get("selection") or {}).get("real_frames", 0))
               for k, r in results.items() if k.split("@")[0] == "agent")


def check_warm_start_seeds(cfg: DictConfig) -> None:
    """A warm-started agent is one agent: refuse ``agent.seeds`` > 1 with ``pipeline.agent_warm_start``."""
    seeds = int(OmegaConf.select(cfg, "agent.seeds", default=1))
    if seeds > 1 and agent_warm_start(cfg):
        raise ValueError(f"pipeline.agent_warm_start continues one agent, but agent.seeds={seeds} trains several: "
                         "pass pipeline.agent_warm_start=false")


# ----------------------------------------------------------------------------------------------
# the dream-fidelity gate: measure, and redraw a world model whose dream ends episodes unlike the real env


def fidelity_settings(cfg: DictConfig) -> dict[str, Any]:
    """``pipeline.fidelity``: check (bool), max_ratio (float > 1 or None: no gate), redraws (int >= 0),
    episodes, horizon; validated, with the defaults of ``configs/config.yaml`` where a key is missing."""
    f = OmegaConf.select(cfg, "pipeline.fidelity", default=None) or {}
    get = (lambda k, d: OmegaConf.select(f, k, default=d)) if OmegaConf.is_config(f) else f.get
    out = {"check": get("check", False), "max_ratio": get("max_ratio", None), "redraws": get("redraws", 0),
           "episodes": get("episodes", 64), "horizon": get("horizon", 100)}
    if not isinstance(out["check"], bool):
        raise ValueError(f"pipeline.fidelity.check must be true or false, got {out['check']!r}")
    if out["max_ratio"] is not None and not (isinstance(out["max_ratio"], (int, float)) and out["max_ratio"] > 1):
        raise ValueError(f"pipeline.fidelity.max_ratio must be a factor > 1 or null, got {out['max_ratio']!r}")
    for key in ("redraws", "episodes", "horizon"):
        value, least = out[key], 0 if key == "redraws" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"pipeline.fidelity.{key} must be an integer >= {least}, got {value!r}")
    if out["redraws"] and out["max_ratio"] is None:
        raise ValueError("pipeline.fidelity.redraws needs pipeline.fidelity.max_ratio (the gate a redraw must pass)")
    out["check"] = out["check"] or out["max_ratio"] is not None
    return out


def draw_cfg(cfg: DictConfig, k: int) -> DictConfig:
    """Config of the k-th redrawn world model: seed + k, trained into ``<run_dir>/draw<k>`` on the same data."""
    if k == 0:
        return cfg
    rd = Path(cfg.run_dir) / f"draw{k}"
    return _with(cfg, run_dir=str(rd), dataset=str(cfg.dataset), seed=int(cfg.seed) + k,
                 checkpoint=str(rd / "checkpoints" / "last.pt"))


def stage_fidelity(cfg: DictConfig) -> dict[str, Any]:
    """Dream against real episode lengths under open-loop policies (``sfv_world.agents.fidelity``), with the
    agent's termination rule; ``passes`` against ``pipeline.fidelity.max_ratio`` (None when there is no gate)."""
    from sfv_world.agents import fidelity

    settings = fidelity_settings(cfg)
    result = fidelity.measure(cfg.checkpoint, cfg.env, dataset=cfg.dataset, episodes=settings["episodes"],
                              horizon=settings["horizon"], termination=str(cfg.agent.termination),
                              termination_threshold=float(cfg.agent.termination_threshold), seed=int(cfg.seed),
                              progress=bool(OmegaConf.select(cfg, "agent.progress", default=True)))
    result["checkpoint"], result["max_ratio"] = str(cfg.checkpoint), settings["max_ratio"]
    result["passes"] = None if settings["max_ratio"] is None else fidelity.passes(result, float(settings["max_ratio"]))
    print(f"[pipeline] dream fidelity of {cfg.checkpoint} (dream / real mean episode length):\n"
          f"{fidelity.summary(result)}\n[pipeline] worst factor x{np.exp(result['worst']):.2f} ({result['worst_policy']})"
          + ("" if result["passes"] is None else f": {'passes' if result['passes'] else 'fails'} the gate "
             f"x{settings['max_ratio']}"), flush=True)
    return result


def fidelity_draws(stages: Stages) -> list[dict[str, Any]]:
    """The recorded fidelity results of the run's world models, in draw order (``fidelity``, ``fidelity~1``, ...)."""
    out, k = [], 0
    while stages.done("fidelity" if k == 0 else f"fidelity~{k}"):
        out.append(stages.result("fidelity" if k == 0 else f"fidelity~{k}"))
        k += 1
    return out


def run_fidelity_gate(cfg: DictConfig, stages: Stages, results: dict[str, Any]) -> DictConfig:
    """Measure the trained world model's dream fidelity; while it fails ``pipeline.fidelity.max_ratio`` and
    redraws are left, train another one (:func:`draw_cfg`) and measure it. Returns ``cfg`` with
    ``checkpoint`` set to the draw with the smallest worst factor (the first to pass the gate ends the
    search); fills ``results["fidelity"]`` (and ``train~k`` / ``fidelity~k``)."""
    settings = fidelity_settings(cfg)
    if not settings["check"]:
        return cfg
    draws = [stages.run("fidelity", partial(stage_fidelity, cfg))]
    for k in range(1, settings["redraws"] + 1):
        if draws[-1]["passes"] is not False:
            break
        dcfg = draw_cfg(cfg, k)
        print(f"[pipeline] the dream fails the fidelity gate: drawing world model {k} (seed {dcfg.seed})", flush=True)
        results[f"train~{k}"] = stages.run(f"train~{k}", partial(stage_train, dcfg))
        draws.append(stages.run(f"fidelity~{k}", partial(stage_fidelity, dcfg)))
    chosen = min(range(len(draws)), key=lambda i: (draws[i]["passes"] is False, draws[i]["worst"]))
    results["fidelity"] = {"draws": draws, "chosen": chosen, "checkpoint": draws[chosen]["checkpoint"],
                           "max_ratio": settings["max_ratio"]}
    if chosen:
        print(f"[pipeline] using world model {chosen}: {draws[chosen]['checkpoint']}", flush=True)
    return _with(cfg, checkpoint=draws[chosen]["checkpoint"]) if chosen else cfg


def stage_baseline(cfg: DictConfig) -> dict[str, Any]:
    """The model-free baseline with as many real steps as the (final) dataset holds."""
    from sfv_world.apps import agent

    return agent.run(_with(cfg, **{"agent.baseline": True}))["model_free"]


# ----------------------------------------------------------------------------------------------
# the outer loop: collect with the current agent -> retrain on all data -> continue the agent


def iteration_cfg(cfg: DictConfig, it: int) -> DictConfig:
    """Config of outer-loop iteration ``it`` (0: the run itself; k: ``<run_dir>/iter<k>``)."""
    collector = collector_timesteps(cfg)
    overrides = collector_agent(cfg)  # checked in every iteration, applied to the collectors
    early = collector is not None and it < int(OmegaConf.select(cfg, "pipeline.iterations", default=1)) - 1
    # a fresh agent that only collects the next iteration's data (collector_timesteps needs agent_warm_start=false)
    collecting = {"agent.total_timesteps": collector, "agent.eval_every": min(int(cfg.agent.eval_every), collector),
                  **overrides} if early else {}
    if it == 0:
        return _with(cfg, **collecting) if early else cfg
    rd = Path(cfg.run_dir) / f"iter{it}"
    updates: dict[str, Any] = dict(collecting)
    if agent_warm_start(cfg):  # the agent continues: its step budget grows by one iteration's worth
        updates["agent.total_timesteps"] = int(cfg.agent.total_timesteps) * (it + 1)
    finetune = OmegaConf.select(cfg, "pipeline.finetune_steps", default=None)
    if finetune:  # continue the previous iteration's world model on the merged data instead of retraining
        prev = cfg.checkpoint if it == 1 else Path(cfg.run_dir) / f"iter{it - 1}" / "checkpoints" / "last.pt"
        updates.update({"train.init_from": str(prev), "train.steps": int(finetune),
                        "train.warmup_steps": min(int(cfg.train.warmup_steps), max(1, int(finetune) // 10)),
                        "train.eval_every": min(int(cfg.train.eval_every), int(finetune))})
    return _with(cfg, run_dir=str(rd), dataset=str(rd / "data" / str(cfg.env.name)),
                 checkpoint=str(rd / "checkpoints" / "last.pt"), **updates)


def collector_timesteps(cfg: DictConfig) -> int | None:
    """``pipeline.collector_timesteps``: imagined steps of the fresh agents that only collect data (every
    iteration's but the last); None: ``agent.total_timesteps``. Needs ``pipeline.agent_warm_start=false``."""
    value = OmegaConf.select(cfg, "pipeline.collector_timesteps", default=None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"pipeline.collector_timesteps must be a positive integer or null, got {value!r}")
    if agent_warm_start(cfg):
        raise ValueError("pipeline.collector_timesteps needs pipeline.agent_warm_start=false (a warm-started agent "
                         "continues from the collectors, so its budget is agent.total_timesteps per iteration)")
    return int(value)


def collector_agent(cfg: DictConfig) -> dict[str, Any]:
    """Overrides of the collecting agents (``pipeline.collector_seeds``: their seed count; null keeps
    ``agent.seeds``). They are an ensemble of their seeds, chosen without real episodes, so every real
    frame they could spend on selection goes to the data they collect."""
    value = OmegaConf.select(cfg, "pipeline.collector_seeds", default=None)
    if value is None:
        return {}
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"pipeline.collector_seeds must be a positive integer or null, got {value!r}")
    if collector_timesteps(cfg) is None:
        raise ValueError("pipeline.collector_seeds needs pipeline.collector_timesteps (the collecting agents are "
                         "the fresh ones trained before the last iteration)")
    return {"agent.seeds": int(value), "agent.select": "ensemble"}


def selection_reserve(cfg: DictConfig) -> int:
    """``pipeline.selection_reserve``: real frames the agent-collection stages leave for the last agent's
    selection (``agent.select`` best / halving); 0 where the last agent chooses without real episodes."""
    value = OmegaConf.select(cfg, "pipeline.selection_reserve", default=0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"pipeline.selection_reserve must be a non-negative integer, got {value!r}")
    return int(value)


def unreserved_selection_warning(cfg: DictConfig) -> str | None:
    """Why the last agent's selection may find no real frames left (an outer loop whose agent collection
    can spend the whole budget), or None."""
    if int(OmegaConf.select(cfg, "pipeline.iterations", default=1)) < 2 or selection_reserve(cfg) > 0:
        return None
    if str(cfg.agent.select) not in ("best", "halving") or int(cfg.agent.seeds) < 2:
        return None
    return (f"agent.select={cfg.agent.select} needs real frames, but pipeline.selection_reserve=0 lets the agent's "
            "collection spend the whole budget first (set pipeline.selection_reserve)")


def collection_budget(cfg: DictConfig, results: dict[str, Any], max_real_frames: int) -> int:
    """Real frames all datasets together may hold after the next agent collection: the budget less what
    selection spent so far and the ``pipeline.selection_reserve`` kept for the last agent's."""
    return int(max_real_frames) - selection_frames(results) - selection_reserve(cfg)


def agent_warm_start(cfg: DictConfig) -> bool:
    """``pipeline.agent_warm_start``: later iterations continue the previous agent (default) or start afresh."""
    value = OmegaConf.select(cfg, "pipeline.agent_warm_start", default=True)
    if not isinstance(value, bool):
        raise ValueError(f"pipeline.agent_warm_start must be true or false, got {value!r}")
    return value


def latent_features(cfg: DictConfig) -> str:
    """The latent observation the run's agents see (``agent.latent_features``; "mean" where unset)."""
    return str(OmegaConf.select(cfg, "agent.latent_features", default="mean"))


def stage_collect_with_agent(prev: DictConfig, cur: DictConfig, it: int, max_real_frames: int) -> dict[str, Any]:
    """Iteration ``it``: collect episodes with ``prev``'s imagination agent, merge them with ``prev``'s dataset.

    ``pipeline.collect_envs`` real envs run in lock-step, so the agent and its world model (for
    ``obs_mode=latent``) are called once per step for all of them. Episode seeds start at
    ``seed + 1000 * it`` (new initial states); at most ``max_real_frames`` real transitions in all
    datasets together.
    """
    from sfv_world.agents.collection import BatchedImaginationAgentPolicy, merge_datasets
    from sfv_world.agents.ensemble import PolicyEnsemble, load_agent_policy
    from sfv_world.agents.evaluation import ObservationSpec
    from sfv_world.agents.policies import algo_class
    from sfv_world.apps.agent import agent_dirs
    from sfv_world.apps.collect import crop_list, strips_list, terminal_tail_steps
    from sfv_world.datasets import DatasetReader, collect_batched, partial_path_for
    from sfv_world.envs.sources import make_source_env
    from sfv_world.world import WorldRuntime

    with DatasetReader(prev.dataset) as reader:
        have = reader.num_transitions
    budget = int(max_real_frames) - have
    if budget <= 0:
        raise ValueError(f"the real-frame budget pipeline.max_real_frames={max_real_frames} is spent ({have} frames)")
    episodes = int(OmegaConf.select(cur, "pipeline.collect_episodes", default=None) or cur.collect.episodes)
    n_envs = int(OmegaConf.select(cur, "pipeline.collect_envs", default=16))
    if n_envs < 1:
        raise ValueError(f"pipeline.collect_envs must be >= 1, got {n_envs}")
    n_envs = min(n_envs, episodes)
    new = Path(cur.run_dir) / "data" / "collected"
    overwrite = new.exists() or partial_path_for(new).exists()
    runtime = WorldRuntime.from_checkpoint(prev.checkpoint, batch_size=n_envs, seed=int(cur.seed),
                                           features=latent_features(cur))
    spec = ObservationSpec.from_runtime(runtime, str(cur.agent.obs_mode), int(cur.agent.frame_stack))
    spec.check_env(cur.env)
    model = load_agent_policy(agent_dirs(prev)["imagination"], algo_class(cur.agent.algo))
    policy_path = agent_dirs(prev)["imagination"] / ("ensemble.json" if isinstance(model, PolicyEnsemble) else "policy.zip")
    envs = [make_source_env(cur.env) for _ in range(n_envs)]
    try:
        policy = BatchedImaginationAgentPolicy(
            model, envs[0].action_space, spec, n_envs,
            epsilon=float(OmegaConf.select(cur, "pipeline.epsilon", default=0.1)),
            runtime=runtime if spec.obs_mode == "latent" else None, path=str(policy_path))
        stats = collect_batched(envs, new, policy, episodes=episodes, max_frames=budget,
                                frame_size=int(cur.collect.frame_size), frame_source=cur.env.frame_source,
                                seed=int(cur.seed) + 1000 * it, env_id=cur.env.id, overwrite=overwrite,
                                progress=bool(OmegaConf.select(cur, "collect.progress", default=True)),
                                terminal_tail=terminal_tail_steps(cur),
                                info={"env_name": str(cur.env.name), "collected_by": str(policy_path),
                                      "crop": crop_list(cur.env), "strips": strips_list(cur.env)})
    finally:
        for env in envs:
            env.close()
    merge_datasets([prev.dataset, new], cur.dataset, overwrite=True)
    with DatasetReader(cur.dataset) as reader:
        total = reader.num_transitions
    return {"dataset": str(cur.dataset), "new_episodes": stats.episodes, "new_transitions": stats.transitions,
            "new_return_mean": float(np.mean(stats.returns)) if stats.returns else None,
            "episodes": None, "transitions": total}


def stage_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Fresh real-env evaluation of both saved policies and of a random policy (other seeds than training's)."""
    from sfv_world.agents.ensemble import PolicyEnsemble, load_agent_policy
    from sfv_world.agents.evaluation import ObservationSpec, evaluate_real
    from sfv_world.agents.policies import algo_class
    from sfv_world.apps.agent import agent_dirs
    from sfv_world.world import WorldRuntime

    dirs = agent_dirs(cfg)
    episodes = int(cfg.agent.eval_episodes)
    seed = 20_000 + int(cfg.seed)
    runtime = WorldRuntime.from_checkpoint(cfg.checkpoint, batch_size=1, features=latent_features(cfg))
    cls = algo_class(cfg.agent.algo)
    out: dict[str, Any] = {"episodes": episodes, "seed": seed}

    spec = ObservationSpec.from_runtime(runtime, str(cfg.agent.obs_mode), int(cfg.agent.frame_stack))
    model = load_agent_policy(dirs["imagination"], cls)  # the snapshot ensemble where the agent made one
    out["imagination"] = evaluate_real(model, cfg.env, spec, episodes, seed, runtime_factory=runtime.sibling).as_dict()
    if isinstance(model, PolicyEnsemble):  # policy.zip alone (the last snapshot, or the first seed), same episodes
        last = cls.load(dirs["imagination"] / "policy.zip", device="cpu")
        out["imagination_last_policy"] = evaluate_real(last, cfg.env, spec, episodes, seed,
                                                       runtime_factory=runtime.sibling).as_dict()
    pixel_spec = dataclasses.replace(spec, obs_mode="pixels")
    if (dirs["model_free"] / "policy.zip").exists():
        model = cls.load(dirs["model_free"] / "policy.zip", device="cpu")
        out["model_free"] = evaluate_real(model, cfg.env, pixel_spec, episodes, seed).as_dict()
    out["random"] = evaluate_real(RandomAgent(runtime.dataset_meta, int(cfg.seed)), cfg.env, pixel_spec, episodes,
                                  seed).as_dict()
    return out


class RandomAgent:
    """Uniformly random actions with SB3's ``predict`` signature (the random baseline)."""

    def __init__(self, dataset_meta: dict[str, Any], seed: int):
        from sfv_world.datasets.spaces import deserialize_space

        self.space = deserialize_space(dataset_meta["action_space"])
        self.space.seed(seed)

    def predict(self, obs: np.ndarray, deterministic: bool = True):
        return np.stack([self.space.sample() for _ in range(len(obs))]), None


# ----------------------------------------------------------------------------------------------
# report


def dream_vs_real(cfg: DictConfig, report: Path, n: int = 2, context: int = 4, horizon: int = 32) -> list[dict[str, Any]]:
    """GIFs real | dream | |difference| of test episodes: k real frames, then the logged actions replayed.

    Returns per-GIF facts (episode, steps, mean PSNR). Uses the world runtime (bounded window), so the
    horizon may exceed the training clip length.
    """
    from sfv_world.datasets import DatasetReader
    from sfv_world.quality import psnr, side_by_side_gif
    from sfv_world.world import WorldRuntime

    runtime = WorldRuntime.from_checkpoint(cfg.checkpoint, batch_size=1, seed=int(cfg.seed))
    meta = runtime.dataset_meta
    ids = list((meta.get("splits") or {}).get("test") or []) or list((meta.get("splits") or {}).get("val") or [])
    out = []
    with DatasetReader(meta.get("path") or cfg.dataset) as reader:
        ids = ids or list(reader.episode_ids)
        ids = sorted(ids, key=lambda e: -reader.episode_lengths[e])[:n]  # the longest: most to compare
        for j, eid in enumerate(ids):
            ep = reader.load_episode(eid)
            k = min(context, len(ep) + 1)
            steps = min(horizon, len(ep) + 1 - k)
            if steps < 1:
                continue
            from sfv_world.datasets import area_resize

            real = area_resize(ep.observations, runtime.frame_shape[0])
            runtime.seed(int(cfg.seed) + j)
            runtime.reset(real[None, :k], ep.actions[None, : k - 1])
            dream = []
            for t in range(steps):
                dream.append(runtime.step(ep.actions[None, k - 1 + t]).frames[0])
            dream = np.stack(dream)
            truth = real[k : k + steps]
            path = side_by_side_gif(truth, dream, report / f"dream_vs_real_{j}.gif")
            out.append({"gif": path.name, "episode": int(eid), "context": k, "steps": steps,
                        "psnr_mean": round(float(psnr(dream, truth).mean()), 2)})
    return out


def plot_training(run_dir: Path, report: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sfv_world.train import read_metrics

    csv_path = run_dir / "train" / "metrics.csv"
    if not csv_path.exists():
        return None
    m = read_metrics(csv_path)
    panels = [("train/flow_loss", "flow loss (nats/dim - const)"), ("train/denoiser_loss", "denoiser loss"),
              ("train/head_loss", "reward + termination loss"), ("val/bpd", "held-out bits/dim")]
    panels = [(k, t) for k, t in panels if k in m]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        steps, values = zip(*m[key])
        ax.plot(steps, values, marker="o" if key.startswith("val/") else None, ms=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report / "training_curves.png", dpi=110)
    plt.close(fig)
    return "training_curves.png"


def plot_quality(quality: dict[str, Any] | None, report: Path) -> str | None:
    if not quality or "psnr_model" not in quality:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.arange(1, len(quality["psnr_model"]) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(h, quality["psnr_model"], marker="o", label="world model")
    ax.plot(h, quality["psnr_copy_last"], marker="s", label="copy last context frame")
    ax.set_xlabel("steps after the context")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("open-loop prediction on held-out episodes", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report / "quality_vs_horizon.png", dpi=110)
    plt.close(fig)
    return "quality_vs_horizon.png"


def plot_returns(cfg: DictConfig, evaluation: dict[str, Any] | None, report: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sfv_world.agents.imagination import read_eval_csv
    from sfv_world.apps.agent import agent_dirs

    dirs = agent_dirs(cfg)
    im_csv, mf_csv = dirs["imagination"] / "eval.csv", dirs["model_free"] / "eval.csv"
    if not im_csv.exists():
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    im = read_eval_csv(im_csv)
    axes[0].plot(im["timesteps"], im["real_return_mean"], marker="o", label="real env (same policy)")
    axes[0].plot(im["timesteps"], im["imagined_return_mean"], marker="s", label="imagined (dream episodes)")
    axes[0].set_xlabel("dream steps")
    axes[0].set_title(f"{cfg.agent.algo.upper()} trained only in imagination ({cfg.agent.obs_mode})", fontsize=9)
    if mf_csv.exists():
        mf = read_eval_csv(mf_csv)
        axes[1].plot(mf["timesteps"], mf["real_return_mean"], marker="o", color="C2", label="model-free, real env")
    if evaluation:
        axes[1].axhline(evaluation["imagination"]["return_mean"], color="C0", ls="--", label="imagination agent (final)")
        if "random" in evaluation:
            axes[1].axhline(evaluation["random"]["return_mean"], color="gray", ls=":", label="random policy")
    axes[1].set_xlabel("real env steps")
    axes[1].set_title("against the model-free baseline with the same real steps", fontsize=9)
    for ax in axes:
        ax.set_ylabel("mean return")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report / "returns.png", dpi=110)
    plt.close(fig)
    return "returns.png"


def stage_report(cfg: DictConfig, stages: Stages, t_start: float, iterations: int = 1) -> dict[str, Any]:
    """The report of the final iteration's run folder (``cfg``), written to ``<top run_dir>/report``."""
    from sfv_world.datasets import DatasetReader

    run_dir = Path(cfg.run_dir)
    report = stages.dir.parent / "report"
    report.mkdir(parents=True, exist_ok=True)
    suffix = "" if iterations == 1 else f"@{iterations - 1}"
    with DatasetReader(cfg.dataset) as reader:
        collect = {"episodes": reader.num_episodes, "transitions": reader.num_transitions}
    draws = fidelity_draws(stages)
    chosen = next((i for i, d in enumerate(draws) if d.get("checkpoint") == str(cfg.checkpoint)), None)
    train_stage = "train" + suffix if not chosen or iterations > 1 else f"train~{chosen}"
    train = stages.result(train_stage) if stages.done(train_stage) else {}
    quality = stages.result("quality") if stages.done("quality") else None
    agent = stages.result("agent" + suffix) if stages.done("agent" + suffix) else {}
    evaluation = stages.result("evaluate") if stages.done("evaluate") else None
    keys = ["agent" + ("" if it == 0 else f"@{it}") for it in range(iterations)]
    agents = {k: stages.result(k) for k in keys}
    spent = selection_frames(agents)  # the same count the run's budget used
    history = []
    for it, key in enumerate(keys):
        res = (agents[key] or {}).get("imagination", {})
        frames = (stages.result("collect" + ("" if it == 0 else f"@{it}")) or {}).get("transitions")
        history.append({"iteration": it, "real_frames": frames, "dream_steps": res.get("dream_steps"),
                        "real_return_mean": res.get("real_return_mean")})
    figs = {"training": plot_training(Path(cfg.checkpoint).parents[1], report), "quality": plot_quality(quality, report),
            "returns": plot_returns(cfg, evaluation, report)}
    gifs = dream_vs_real(cfg, report)

    im = (evaluation or {}).get("imagination") or {}
    agent_json = {
        "preset": str(cfg.preset_name),
        "env": str(cfg.env.id),
        "algo": str(cfg.agent.algo),
        "obs_mode": str(cfg.agent.obs_mode),
        "real_return_mean": im.get("return_mean"),
        "real_return_std": im.get("return_std"),
        "eval_episodes": im.get("episodes"),
        "ensemble_members": (agent.get("imagination") or {}).get("ensemble_members"),
        "ensemble_kind": (agent.get("imagination") or {}).get("ensemble_kind"),
        "last_policy_real_return_mean": ((evaluation or {}).get("imagination_last_policy") or {}).get("return_mean"),
        "model_free_real_return_mean": ((evaluation or {}).get("model_free") or {}).get("return_mean"),
        "random_real_return_mean": ((evaluation or {}).get("random") or {}).get("return_mean"),
        "real_frames_used": None if collect.get("transitions") is None else collect["transitions"] + spent,
        "selection_real_frames": spent,
        "selected": ((agent.get("imagination") or {}).get("selection") or {}).get("selected"),
        "dream_steps": (agent.get("imagination") or {}).get("dream_steps"),
        "target_real_return_mean": 200.0,
        "meets_target": None if im.get("return_mean") is None else bool(im["return_mean"] >= 200.0),
        "pipeline_wall_s": round(sum(v for k, v in stages.timings.items() if k != "report"), 1),
        "stage_wall_s": stages.timings,
        "iterations": history,
        "fidelity": {"chosen": chosen, "draws": [
            {"checkpoint": d.get("checkpoint"), "worst_factor": round(float(np.exp(d["worst"])), 3),
             "worst_policy": d.get("worst_policy"), "passes": d.get("passes"),
             "policies": {k: {"real_mean": v["real_mean"], "dream_mean": v["dream_mean"]}
                          for k, v in d["policies"].items()}} for d in draws]} if draws else None,
    }
    (report / "agent.json").write_text(json.dumps(agent_json, indent=1, default=_json_default))
    if records_benchmark(cfg):
        bench = REPO / "benchmarks" / "results" / "agent.json"
        bench.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report / "agent.json", bench)

    def fmt(x: Any, nd: int = 1) -> str:
        return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    lines = [f"# sfv-world run report: {cfg.preset_name} on {cfg.env.id}", "",
             f"Run folder `{run_dir}`. Pipeline wall time {agent_json['pipeline_wall_s']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in stages.timings.items() if k != 'report')}; the report itself not included).", "",
             "## Data", "",
             f"{collect.get('episodes', 'n/a')} episodes, {collect.get('transitions', 'n/a')} real transitions "
             f"(`{cfg.collect.policy}` policy), stored at {cfg.collect.frame_size}x{cfg.collect.frame_size}; "
             f"the model works at {cfg.model.frame_size}x{cfg.model.frame_size}.", "",
             "## World model", ""]
    final = train.get("final") or {}
    if final:
        lines.append("Final training metrics: " + ", ".join(
            f"{k} {v:.4g}" for k, v in sorted(final.items()) if isinstance(v, (int, float))) + ".")
        lines.append("")
    if figs["training"]:
        lines += [f"![training curves]({figs['training']})", ""]
    if quality:
        lines += [f"Open-loop prediction on {quality.get('windows')} held-out windows, {quality.get('context')} "
                  f"context frames (termination F1 {fmt(quality.get('termination_f1'), 3)}, reward MAE "
                  f"{fmt(quality.get('reward_mae'), 4)}):", "",
                  "| steps ahead | PSNR model (dB) | PSNR copy-last (dB) |", "|---|---|---|"]
        for h, (m, c) in enumerate(zip(quality["psnr_model"], quality["psnr_copy_last"]), start=1):
            lines.append(f"| {h} | {m:.2f} | {c:.2f} |")
        lines.append("")
    if figs["quality"]:
        lines += [f"![quality vs horizon]({figs['quality']})", ""]
    if gifs:
        lines += ["Dream against real under the same logged actions (real | dream | |difference|):", ""]
        for g in gifs:
            lines += [f"![dream vs real, episode {g['episode']}]({g['gif']}) episode {g['episode']}: {g['context']} "
                      f"real frames, then {g['steps']} dreamed steps, mean PSNR {g['psnr_mean']:.1f} dB", ""]
    if draws:
        lines += ["## Dream fidelity", "",
                  f"Mean episode length in the dream against the real env under open-loop policies ({draws[0]['episodes']} "
                  f"episodes each, horizon {draws[0]['horizon']}, the agent's termination rule). A dream fit for "
                  f"policy learning ends episodes about when the real env does.", "",
                  "| world model | policy | real | dream | dream / real | at horizon |", "|---|---|---|---|---|---|"]
        for i, d in enumerate(draws):
            tag = f"{i}{' (used)' if i == chosen else ''}"
            for name, r in d["policies"].items():
                lines.append(f"| {tag} | {name} | {r['real_mean']:.1f} | {r['dream_mean']:.1f} | "
                             f"{np.exp(r['log_ratio']):.2f} | {100 * r['dream_at_horizon']:.0f}% |")
        gate = next((d for d in draws if d.get("passes") is not None), None)
        if gate is not None:
            lines += ["", f"Gate: every policy within a factor {fmt(gate.get('max_ratio'))}; "
                      + ", ".join(f"model {i} {'passed' if d['passes'] else 'failed'} (worst x{np.exp(d['worst']):.2f}, "
                                  f"{d['worst_policy']})" for i, d in enumerate(draws)) + "."]
        lines.append("")
    lines += ["## Agents", "",
              f"`{cfg.agent.algo}` with `{cfg.agent.obs_mode}` observations, trained only in the dream "
              f"({fmt(agent_json['dream_steps'])} dream steps, {cfg.agent.n_envs} worlds, horizon {cfg.agent.horizon}); "
              f"the model-free baseline trains the same algorithm in the real env for as many real steps as the "
              f"dataset holds ({fmt(collect.get('transitions'))}).", "",
              "| policy | real-env mean return | std | episodes |", "|---|---|---|---|"]
    members = agent_json["ensemble_members"]
    seeds = agent_json.get("ensemble_kind") == "seeds"
    kind = "independently seeded agents" if seeds else "snapshots"
    agent_name = f"imagination (dream only; ensemble of {len(members)} {kind})" if members else "imagination (dream only)"
    selection = (agent.get("imagination") or {}).get("selection")
    if selection:
        how = (f"by {selection['episodes']} real episodes each" if selection.get("rule") != "successive halving"
               else f"by successive halving over {len(selection['rounds'])} rounds of real episodes")
        agent_name = (f"imagination (dream only; {selection['selected']} chosen from "
                      f"{len(selection['scores'])} candidates {how}, {fmt(selection['real_frames'])} real frames)")
    alone = "imagination, first seed's agent alone" if seeds else "imagination, last policy alone"
    for name, key in ((agent_name, "imagination"), (alone, "imagination_last_policy"),
                      ("model-free (real steps)", "model_free"), ("random", "random")):
        e = (evaluation or {}).get(key)
        if e:
            lines.append(f"| {name} | {e['return_mean']:.1f} | {e['return_std']:.1f} | {e['episodes']} |")
    if iterations > 1:
        lines += ["", "Outer loop (collect with the agent -> retrain the world model -> continue the agent):", "",
                  "| iteration | real frames so far | dream steps | real return (agent's own eval) |", "|---|---|---|---|"]
        for h in history:
            lines.append(f"| {h['iteration']} | {fmt(h['real_frames'])} | {fmt(h['dream_steps'])} | "
                         f"{fmt(h['real_return_mean'])} |")
    lines += ["", f"Target: mean real return >= 200 over 20 episodes: "
              f"{'met' if agent_json['meets_target'] else 'not met'}.", ""]
    if figs["returns"]:
        lines += [f"![returns]({figs['returns']})", ""]
    (report / "report.md").write_text("\n".join(lines))
    print(f"[pipeline] report: {report / 'report.md'}", flush=True)
    return {"report": str(report / "report.md"), "figures": figs, "gifs": gifs, "agent": agent_json,
            "total_wall_s": round(time.time() - t_start, 1)}


# ----------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) the pipeline; ``pipeline.iterations`` > 1 adds outer-loop iterations.

    Keys (``configs/config.yaml``): ``pipeline.iterations`` (default 1), ``pipeline.collect_episodes``
    (episodes collected by the agent per iteration, default ``collect.episodes``), ``pipeline.epsilon``
    (0.1), ``pipeline.max_real_frames`` (50,000: the real-frame budget over all iterations),
    ``pipeline.finetune_steps`` (null: retrain the world model from scratch each iteration; N: continue
    the previous one for N steps on the merged data), ``pipeline.agent_warm_start`` (true: continue the
    previous iteration's agent; false: train a fresh one on the new world model),
    ``pipeline.collector_timesteps`` (with a fresh agent per iteration: the imagined steps of the agents
    before the last, which only collect data; null: ``agent.total_timesteps``), ``pipeline.fidelity``
    (after the first training: ``check`` the dream's episode lengths against the real env's under open-loop
    policies; ``max_ratio`` gates them, and up to ``redraws`` further world models are trained with seeds
    seed+1, ... until one passes; the best draw is used: :func:`run_fidelity_gate`).
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "pipeline_config.yaml", resolve=True)
    stages = Stages(run_dir)
    t0 = time.time()
    iterations = int(OmegaConf.select(cfg, "pipeline.iterations", default=1))
    max_frames = int(OmegaConf.select(cfg, "pipeline.max_real_frames", default=50_000))
    if iterations < 1:
        raise ValueError(f"pipeline.iterations must be >= 1, got {iterations}")
    selection_reserve(cfg)  # checked before any stage runs
    if iterations > 1:
        check_warm_start_seeds(cfg)  # now, not after the first iteration's stages
        if (warning := unreserved_selection_warning(cfg)) is not None:
            print(f"[pipeline] warning: {warning}", flush=True)
    results: dict[str, Any] = {
        "collect": stages.run("collect", lambda: stage_collect(cfg)),
        "train": stages.run("train", lambda: stage_train(cfg)),
    }
    cfg = run_fidelity_gate(cfg, stages, results)
    results["agent"] = stages.run("agent", lambda: stage_agent(iteration_cfg(cfg, 0), max_real_frames=max_frames))
    final = cfg
    for it in range(1, iterations):
        prev, cur = iteration_cfg(cfg, it - 1), iteration_cfg(cfg, it)
        from sfv_world.apps.agent import agent_dirs

        results[f"collect@{it}"] = stages.run(f"collect@{it}", partial(stage_collect_with_agent, prev, cur, it,
                                                                        collection_budget(cfg, results, max_frames)))
        results[f"train@{it}"] = stages.run(f"train@{it}", partial(stage_train, cur))
        warm = agent_dirs(prev)["imagination"] / "checkpoint.zip" if agent_warm_start(cfg) else None
        results[f"agent@{it}"] = stages.run(f"agent@{it}", partial(stage_agent, cur, warm_start=warm,
                                                                    max_real_frames=max_frames,
                                                                    spent=selection_frames(results)))
        final = cur
    results["quality"] = stages.run("quality", lambda: stage_quality(final))
    results["baseline"] = stages.run("baseline", lambda: stage_baseline(final))
    results["evaluate"] = stages.run("evaluate", lambda: stage_evaluate(final))
    results["report"] = stages.run("report", lambda: stage_report(final, stages, t0, iterations))
    return results


def main(argv: list[str] | None = None) -> int:
    from sfv_world.apps.cli import run_module

    return run_module(run, argv)


if __name__ == "__main__":
    sys.exit(main())
