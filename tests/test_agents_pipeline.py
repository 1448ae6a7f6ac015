"""``sfv-world pipeline`` end to end on a tiny config: every stage, the report, and skipping on re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfv_world.apps.cli import compose


def tiny_pipeline_cfg(run_dir, *extra):
    return compose([
        "preset=tiny", "device=cpu", f"run_dir={run_dir}", "seed=0", "env=cartpole",
        "collect.episodes=8", "collect.frame_size=32", "collect.progress=false",
        "train.steps=6", "train.eval_every=6", "train.checkpoint_every=3", "train.log_every=1",
        "quality.context=2", "quality.horizon=2", "quality.max_windows=4",
        "agent.n_envs=4", "agent.total_timesteps=64", "agent.eval_every=64", "agent.eval_episodes=1",
        "agent.horizon=8", "agent.frame_stack=2",
        "agent.baseline_steps=32", "agent.baseline_n_envs=2",
        "+agent.algo_kwargs.n_steps=16", "+agent.algo_kwargs.batch_size=32", "+agent.algo_kwargs.n_epochs=1",
        *extra,
    ])


def test_pipeline_runs_every_stage_writes_the_report_and_skips_finished_stages(tmp_path):
    from sfv_world.apps import pipeline

    from sfv_world.datasets import DatasetReader

    cfg = tiny_pipeline_cfg(tmp_path, "collect.terminal_tail=3")
    results = pipeline.run(cfg)
    report = tmp_path / "report"
    with DatasetReader(cfg.dataset) as r:  # terminal tails are collected, and count as real frames
        assert r.metadata["sfv_world"]["terminal_tail"] == 3
        assert all(r.load_episode(e).terminations[-4:].all() for e in r.episode_ids)
    quality = json.loads((report / "quality.json").read_text())
    assert 0 <= quality["termination_f1_to_end"] <= 1
    assert quality["termination_positives"] == 4 * quality["termination_positives_to_end"]
    text = (report / "report.md").read_text()
    for fig in ("training_curves.png", "quality_vs_horizon.png", "returns.png", "dream_vs_real_0.gif"):
        assert (report / fig).is_file(), fig
        assert fig in text
    agent_json = json.loads((report / "agent.json").read_text())
    assert agent_json["real_return_mean"] is not None and agent_json["real_return_mean"] > 0
    assert agent_json["model_free_real_return_mean"] is not None and agent_json["random_real_return_mean"] > 0
    assert agent_json["real_frames_used"] == results["collect"]["transitions"]
    assert json.loads((tmp_path / "agent" / "model_free-ppo" / "result.json").read_text())["real_steps"] >= 32
    assert set(agent_json["stage_wall_s"]) == {"collect", "train", "agent", "quality", "baseline", "evaluate"}
    assert (tmp_path / "agent" / "ppo-pixels" / "policy.zip").is_file()
    assert (tmp_path / "agent" / "model_free-ppo" / "policy.zip").is_file()

    # a second run finds every stage's output and redoes nothing
    ckpt = tmp_path / "checkpoints" / "last.pt"
    mtime = ckpt.stat().st_mtime_ns
    again = pipeline.run(cfg)
    assert ckpt.stat().st_mtime_ns == mtime
    assert again["evaluate"] == json.loads(json.dumps(results["evaluate"]))


def test_pipeline_restarts_an_interrupted_collection(tmp_path):
    from sfv_world.datasets import partial_path_for

    from sfv_world.apps.pipeline import stage_collect

    cfg = tiny_pipeline_cfg(tmp_path)
    partial = partial_path_for(cfg.dataset)
    partial.mkdir(parents=True)
    (partial / "junk").write_text("left by a killed collector")
    out = stage_collect(cfg)
    assert out["episodes"] == 8 and not out["reused"] and not partial.exists()
    assert stage_collect(cfg)["reused"]


def test_outer_loop_collects_with_the_agent_retrains_and_continues(tmp_path):
    from omegaconf import open_dict
    from sfv_world.datasets import DatasetReader

    from sfv_world.apps import pipeline

    cfg = tiny_pipeline_cfg(tmp_path)
    with open_dict(cfg):
        cfg.pipeline = {"iterations": 2, "collect_episodes": 3, "epsilon": 0.5, "max_real_frames": 50_000}
        cfg.agent.snapshot_every, cfg.agent.ensemble_snapshots = 32, 2  # the agent collects as a snapshot ensemble
    results = pipeline.run(cfg)
    first = results["collect"]["transitions"]
    second = results["collect@1"]
    assert second["new_episodes"] == 3 and second["transitions"] == first + second["new_transitions"]
    with DatasetReader(tmp_path / "iter1" / "data" / "cartpole") as r:
        assert r.num_episodes == 8 + 3 and r.metadata["sfv_world"]["merged_from"]
    with DatasetReader(tmp_path / "iter1" / "data" / "collected") as r:
        assert r.metadata["sfv_world"]["policy"]["name"] == "sb3-imagination"
        assert r.metadata["sfv_world"]["collect_envs"] == 3  # pipeline.collect_envs (16) capped by the episodes
        assert json.dumps(r.metadata).count("ensemble.json") >= 1  # collected by the ensemble
    assert (tmp_path / "iter1" / "checkpoints" / "last.pt").is_file()
    assert results["agent@1"]["imagination"]["dream_steps"] == 128  # continued from iteration 0's 64 steps
    agent_json = json.loads((tmp_path / "report" / "agent.json").read_text())
    assert [h["iteration"] for h in agent_json["iterations"]] == [0, 1]
    assert agent_json["real_frames_used"] == second["transitions"]
    assert "Outer loop" in (tmp_path / "report" / "report.md").read_text()
    assert agent_json["ensemble_members"] == ["96.zip", "128.zip"]  # the last two of 32, 64, 96, 128
    assert agent_json["last_policy_real_return_mean"] > 0
    assert "last policy alone" in (tmp_path / "report" / "report.md").read_text()
    # a smaller budget (what pipeline.collection_budget leaves) stops the agent's collection early
    from sfv_world.apps.pipeline import iteration_cfg, stage_collect_with_agent

    small = stage_collect_with_agent(iteration_cfg(cfg, 0), iteration_cfg(cfg, 1), 1, first + 5)
    assert small["new_transitions"] == 5 and small["transitions"] == first + 5


def test_finetune_iterations_continue_the_previous_world_model(tmp_path):
    from sfv_world.apps.pipeline import iteration_cfg

    cfg = tiny_pipeline_cfg(tmp_path)
    assert iteration_cfg(cfg, 1).train.init_from is None, "default: retrain from scratch"
    cfg.pipeline.finetune_steps = 40
    one, two = iteration_cfg(cfg, 1), iteration_cfg(cfg, 2)
    assert one.train.init_from == str(cfg.checkpoint) and one.train.steps == 40
    assert two.train.init_from == str(tmp_path / "iter1" / "checkpoints" / "last.pt")
    assert two.checkpoint == str(tmp_path / "iter2" / "checkpoints" / "last.pt")
    assert one.train.warmup_steps <= 4 and two.agent.total_timesteps == 3 * cfg.agent.total_timesteps


def test_agent_restart_iterations_keep_one_iterations_budget(tmp_path):
    from sfv_world.apps.pipeline import agent_warm_start, iteration_cfg

    cfg = tiny_pipeline_cfg(tmp_path)
    assert agent_warm_start(cfg), "default: continue the previous agent"
    cfg.pipeline.agent_warm_start = False
    assert iteration_cfg(cfg, 2).agent.total_timesteps == cfg.agent.total_timesteps
    cfg.pipeline.agent_warm_start = "yes"
    with pytest.raises(ValueError, match="pipeline.agent_warm_start"):
        agent_warm_start(cfg)


def test_pipeline_with_a_seed_ensemble(tmp_path):
    """agent.seeds=2: the pipeline evaluates the ensemble and the first seed alone, and says so in the report;
    an outer loop that would warm-start one agent refuses before any stage runs. With agent.select=best the
    selection's real frames are capped by what the budget leaves and counted in real_frames_used."""
    from sfv_world.apps import pipeline
    from sfv_world.apps.agent import agent_dirs

    cfg = tiny_pipeline_cfg(tmp_path)
    cfg.agent.seeds = 2
    cfg.pipeline.iterations = 2
    with pytest.raises(ValueError, match="agent.seeds=2 trains several: pass pipeline.agent_warm_start=false"):
        pipeline.run(cfg)
    assert not (tmp_path / "data").exists()
    cfg.pipeline.iterations = 1
    pipeline.run(cfg)
    agent_json = json.loads((tmp_path / "report" / "agent.json").read_text())
    assert agent_json["ensemble_kind"] == "seeds"
    assert agent_json["ensemble_members"] == ["seed0/policy.zip", "seed1/policy.zip"]
    assert agent_json["last_policy_real_return_mean"] is not None and agent_json["dream_steps"] == 2 * 64
    text = (tmp_path / "report" / "report.md").read_text()
    assert "ensemble of 2 independently seeded agents" in text and "first seed's agent alone" in text
    assert agent_json["selection_real_frames"] == 0 and agent_json["selected"] is None
    # agent.select=best: the same seeds compete on real episodes; what is left of the budget caps them
    frames = agent_json["real_frames_used"]
    for stage in ("agent", "evaluate", "report"):
        (tmp_path / "pipeline" / f"{stage}.json").unlink()
    (agent_dirs(cfg)["imagination"] / "result.json").unlink()  # the seeds' own runs stay and are reused
    cfg.agent.select = "best"
    cfg.pipeline.max_real_frames = frames + 3 * 1 * 4  # 3 candidates, 1 episode each: 4 steps per episode
    pipeline.run(cfg)
    agent_json = json.loads((tmp_path / "report" / "agent.json").read_text())
    sel = json.loads((agent_dirs(cfg)["imagination"] / "result.json").read_text())["selection"]
    assert sel["max_episode_steps"] == 4 and 3 <= sel["real_frames"] <= 12
    assert agent_json["selection_real_frames"] == sel["real_frames"] and agent_json["selected"] == sel["selected"]
    assert agent_json["real_frames_used"] == frames + sel["real_frames"] <= cfg.pipeline.max_real_frames
    assert f"{sel['selected']} chosen from 3 candidates by 1 real episodes each" in (
        tmp_path / "report" / "report.md").read_text()
    # agent.select=halving: the same pool by successive halving, within what the budget leaves
    for stage in ("agent", "evaluate", "report"):
        (tmp_path / "pipeline" / f"{stage}.json").unlink()
    (agent_dirs(cfg)["imagination"] / "result.json").unlink()
    cfg.agent.select = "halving"
    cfg.pipeline.max_real_frames = frames + 30  # 3 candidates x 2 episodes: cut at 5 steps
    pipeline.run(cfg)
    agent_json = json.loads((tmp_path / "report" / "agent.json").read_text())
    sel = json.loads((agent_dirs(cfg)["imagination"] / "result.json").read_text())["selection"]
    assert sel["rule"] == "successive halving" and sel["budget"] == 30 and sel["rounds"][0]["max_steps"] == 5
    assert agent_json["real_frames_used"] == frames + sel["real_frames"] <= cfg.pipeline.max_real_frames
    assert f"{sel['selected']} chosen from 3 candidates by successive halving over" in (
        tmp_path / "report" / "report.md").read_text()


def test_collector_timesteps_shorten_every_agent_but_the_last(tmp_path):
    from omegaconf import open_dict

    from sfv_world.apps.pipeline import iteration_cfg

    cfg = tiny_pipeline_cfg(tmp_path)
    with open_dict(cfg):
        cfg.pipeline.iterations = 3
        cfg.pipeline.agent_warm_start = False
        cfg.pipeline.collector_timesteps = 16
    full = cfg.agent.total_timesteps
    assert [iteration_cfg(cfg, it).agent.total_timesteps for it in range(3)] == [16, 16, full]
    assert iteration_cfg(cfg, 0).agent.eval_every <= 16 and iteration_cfg(cfg, 0).run_dir == cfg.run_dir
    cfg.pipeline.iterations = 1  # a single iteration's agent is the last one: never shortened
    assert iteration_cfg(cfg, 0) is cfg
    cfg.pipeline.iterations = 2
    cfg.pipeline.agent_warm_start = True
    with pytest.raises(ValueError, match="needs pipeline.agent_warm_start=false"):
        iteration_cfg(cfg, 0)
    cfg.pipeline.agent_warm_start = False
    cfg.pipeline.collector_timesteps = 0
    with pytest.raises(ValueError, match="pipeline.collector_timesteps must be a positive integer"):
        iteration_cfg(cfg, 1)


def test_collector_seeds_make_the_collectors_an_ensemble_and_the_reserve_is_checked(tmp_path):
    from omegaconf import open_dict

    from sfv_world.apps.pipeline import (collection_budget, iteration_cfg, selection_reserve,
                                         unreserved_selection_warning)

    cfg = tiny_pipeline_cfg(tmp_path)
    with open_dict(cfg):
        cfg.agent.seeds = 4
        cfg.agent.select = "halving"
        cfg.pipeline.iterations = 3
        cfg.pipeline.agent_warm_start = False
        cfg.pipeline.collector_timesteps = 16
        cfg.pipeline.collector_seeds = 1
        cfg.pipeline.selection_reserve = 500
    seeds = [(c.agent.seeds, c.agent.select) for c in (iteration_cfg(cfg, it) for it in range(3))]
    assert seeds == [(1, "ensemble"), (1, "ensemble"), (4, "halving")]  # the last agent keeps its own
    assert selection_reserve(cfg) == 500
    cfg.pipeline.collector_seeds = None  # null: the collectors are trained and chosen like the last agent
    assert [iteration_cfg(cfg, it).agent.seeds for it in range(3)] == [4, 4, 4]
    for bad in (0, -1, 1.5, True, "2"):
        cfg.pipeline.collector_seeds = bad
        with pytest.raises(ValueError, match="pipeline.collector_seeds must be a positive integer"):
            iteration_cfg(cfg, 0)
    cfg.pipeline.collector_seeds = 2
    cfg.pipeline.collector_timesteps = None
    with pytest.raises(ValueError, match="pipeline.collector_seeds needs pipeline.collector_timesteps"):
        iteration_cfg(cfg, 1)
    assert unreserved_selection_warning(cfg) is None  # 500 frames kept for the halving
    cfg.pipeline.selection_reserve = 0
    assert "pipeline.selection_reserve=0" in unreserved_selection_warning(cfg)
    cfg.agent.select = "ensemble"  # chooses without real episodes
    assert unreserved_selection_warning(cfg) is None
    cfg.agent.select, cfg.pipeline.selection_reserve = "halving", 500
    spent = {"agent": {"imagination": {"selection": {"real_frames": 700}}}}
    assert collection_budget(cfg, spent, 50_000) == 50_000 - 700 - 500
    for bad in (-1, 2.5, False):
        cfg.pipeline.selection_reserve = bad
        with pytest.raises(ValueError, match="pipeline.selection_reserve must be a non-negative integer"):
            selection_reserve(cfg)


def test_only_the_recorded_benchmark_run_writes_benchmark_results(tmp_path):
    """pipeline.record_benchmark=false keeps a cpu-demo experiment's quality figures in its own run folder
    (it used to overwrite benchmarks/results/quality.json whatever the flag said)."""
    from sfv_world.apps.pipeline import quality_output, records_benchmark

    cfg = tiny_pipeline_cfg(tmp_path)
    own = tmp_path / "report" / "quality.json"
    assert not records_benchmark(cfg) and quality_output(cfg) == own
    cfg.preset_name = "cpu-demo"
    assert records_benchmark(cfg) and quality_output(cfg) == Path(cfg.quality.output)
    cfg.pipeline.record_benchmark = False
    assert not records_benchmark(cfg) and quality_output(cfg) == own
    cfg.preset_name = "tiny"
    cfg.pipeline.record_benchmark = True
    assert records_benchmark(cfg) and quality_output(cfg) == Path(cfg.quality.output)


def test_fidelity_gate_redraws_a_failing_world_model_and_uses_the_best(tmp_path):
    """pipeline.fidelity: a gate no dream can pass (max_ratio 1.0001) makes the pipeline train one more world
    model (seed + 1, in draw1/), measure it, and use the draw with the smaller worst factor; the report and
    agent.json show every draw; a re-run redoes nothing."""
    from sfv_world.apps import pipeline

    cfg = tiny_pipeline_cfg(tmp_path)
    cfg = pipeline._with(cfg, **{"pipeline.fidelity.max_ratio": 1.0001, "pipeline.fidelity.redraws": 1,
                                 "pipeline.fidelity.episodes": 4, "pipeline.fidelity.horizon": 6})
    results = pipeline.run(cfg)
    fid = results["fidelity"]
    assert len(fid["draws"]) == 2 and all(d["passes"] is False for d in fid["draws"])
    assert [d["checkpoint"] for d in fid["draws"]] == [str(tmp_path / "checkpoints" / "last.pt"),
                                                       str(tmp_path / "draw1" / "checkpoints" / "last.pt")]
    best = min(range(2), key=lambda i: fid["draws"][i]["worst"])
    assert fid["chosen"] == best and fid["checkpoint"] == fid["draws"][best]["checkpoint"]
    for d in fid["draws"]:
        assert set(d["policies"]) == {"random", "always_0", "always_1"}
        for r in d["policies"].values():
            assert 1 <= r["real_mean"] <= 6 and 1 <= r["dream_mean"] <= 6
    assert (tmp_path / "draw1" / "checkpoints" / "last.pt").is_file()
    agent_json = json.loads((tmp_path / "report" / "agent.json").read_text())
    assert agent_json["fidelity"]["chosen"] == best and len(agent_json["fidelity"]["draws"]) == 2
    assert {"fidelity", "train~1", "fidelity~1"} <= set(agent_json["stage_wall_s"])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Dream fidelity" in text and "model 0 failed" in text and "model 1 failed" in text
    assert f"| {best} (used) | always_0 |" in text
    mtime = (tmp_path / "draw1" / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert pipeline.run(cfg)["fidelity"]["chosen"] == best
    assert (tmp_path / "draw1" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime


def test_fidelity_settings_are_checked():
    from sfv_world.apps import pipeline

    cfg = tiny_pipeline_cfg("unused")
    assert pipeline.fidelity_settings(cfg)["check"] is False
    assert pipeline.fidelity_settings(pipeline._with(cfg, **{"pipeline.fidelity.max_ratio": 2.0}))["check"] is True
    for key, value, msg in (("max_ratio", 0.5, "max_ratio must be a factor > 1"), ("redraws", -1, "redraws must be"),
                            ("episodes", 0, "episodes must be"), ("check", "yes", "check must be true or false")):
        with pytest.raises(ValueError, match=f"pipeline.fidelity.{msg}"):
            pipeline.fidelity_settings(pipeline._with(cfg, **{f"pipeline.fidelity.{key}": value}))
    with pytest.raises(ValueError, match="redraws needs pipeline.fidelity.max_ratio"):
        pipeline.fidelity_settings(pipeline._with(cfg, **{"pipeline.fidelity.redraws": 1}))
