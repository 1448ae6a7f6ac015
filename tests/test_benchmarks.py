"""The benchmark scripts' own contracts (not their figures: those live in benchmarks/results)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_env_throughput(tmp_path: Path, *args: str):
    """env_throughput at batch 2 for a moment on a random-init model: (module, result JSON, output path)."""
    bench = load_benchmark("env_throughput")
    out = tmp_path / "tp"
    rc = bench.main(["--checkpoint", str(tmp_path / "absent.pt"), "--batches", "2", "--seconds", "0.01",
                     "--threads", "1", "--output", str(out), *args])
    assert rc == 0
    return bench, json.loads(out.with_suffix(".json").read_text()), out


def test_env_throughput_times_each_obs_mode_and_judges_the_target_on_pixels(tmp_path):
    bench, result, out = run_env_throughput(tmp_path, "--obs-modes", "pixels,latent")
    assert result["model"].startswith("random-init")
    modes = [(r["obs_mode"], r["method"]) for r in result["rows"]]
    assert modes == [(m, v) for m in ("pixels", "latent") for v in bench.VARIANTS]
    for r in result["rows"]:
        assert r["batch"] == 2 and r["steps"] >= 5 and r["env_steps_per_s"] > 0
        if r["method"] != "sequential":  # compared with the sequential row of its own mode
            assert r["speedup_vs_sequential"] > 0
    assert result["best_jacobi_at_64"] is None and result["best_jacobi_latent_at_64"] is None  # no batch 64 here
    table = out.with_suffix(".md").read_text()
    assert "| latent | 2 | sequential |" in table and "| pixels | 2 | jacobi |" in table


def test_env_throughput_times_only_the_named_variants(tmp_path):
    rows = run_env_throughput(tmp_path, "--variants", "jacobi-c4,sequential")[1]["rows"]
    assert [r["method"] for r in rows] == ["jacobi-c4", "sequential"]
    assert rows[0]["speedup_vs_sequential"] > 0


def test_env_throughput_rejects_an_unknown_variant(tmp_path, capsys):
    bench = load_benchmark("env_throughput")
    with pytest.raises(SystemExit):
        bench.main(["--variants", "jacobi,fast", "--output", str(tmp_path / "tp")])
    err = capsys.readouterr().err
    assert "--variants" in err and "fast" in err


def test_env_throughput_rejects_an_unknown_obs_mode(tmp_path, capsys):
    bench = load_benchmark("env_throughput")
    with pytest.raises(SystemExit):
        bench.main(["--obs-modes", "pixels,rgb", "--output", str(tmp_path / "tp")])
    assert "--obs-modes" in capsys.readouterr().err


def cartpole_latent_policy(tmp_path: Path, episodes: int) -> Path:
    """A random CartPole-pixels dataset of ``episodes`` episodes, a tiny world model on it (returned), and an
    untrained latent PPO policy saved to ``tmp_path / "policy.zip"``."""
    from dream_fixtures import make_tiny_checkpoint
    from stable_baselines3 import PPO

    from sfv_world.datasets import RandomPolicy, collect
    from sfv_world.envs.sb3 import DreamSB3VecEnv
    from sfv_world.envs.sources import make_source_env

    env = make_source_env({"id": "CartPole-v1", "frame_source": "render", "kwargs": {}})
    collect(env, tmp_path / "cartpole", RandomPolicy(env.action_space, seed=0), episodes=episodes, frame_size=32,
            progress=False)
    env.close()
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt.pt", tmp_path / "cartpole", termination_bias=-3.0)
    venv = DreamSB3VecEnv(ckpt, num_envs=2, obs_mode="latent", horizon=5)
    PPO("MlpPolicy", venv, n_steps=8, batch_size=8, seed=0, device="cpu").save(tmp_path / "policy.zip")
    venv.close()
    return ckpt


def test_dream_fidelity_runs_a_saved_latent_policy_closed_loop(tmp_path, monkeypatch):
    """--policies: a saved SB3 latent policy plays the dream and the real env (cut at the horizon); one row per
    policy and threshold; --skip-open-loop drops the fixed policies; a missing file is named."""
    from stable_baselines3 import PPO

    ckpt = cartpole_latent_policy(tmp_path, episodes=3)

    bench = load_benchmark("dream_fidelity")
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path / "results")
    bench.main(["--checkpoint", str(ckpt), "--policies", str(tmp_path / "policy.zip"), "--skip-open-loop",
                "--episodes", "3", "--horizon", "4", "--num-envs", "2", "--termination-threshold", "0.5",
                "--termination-threshold", "0.1", "--name", "closed"])
    rows = json.loads((tmp_path / "results" / "closed.json").read_text())["rows"]
    assert [(r["policy"], r["termination_threshold"]) for r in rows] == [(str(tmp_path / "policy.zip"), 0.5),
                                                                        (str(tmp_path / "policy.zip"), 0.1)]
    for r in rows:
        assert 1 <= r["real_mean_length"] <= 4 and 1 <= r["dream_mean_length"] <= 4  # both cut at the horizon
    bench_dream, _ = bench.dream_lengths(str(ckpt), PPO.load(tmp_path / "policy.zip", device="cpu"), 99, 4, 0, 2,
                                         "threshold", None, 0.5)
    assert bench_dream.shape == (2,) and ((1 <= bench_dream) & (bench_dream <= 4)).all()  # each world's first
    assert rows[0]["real_mean_length"] == rows[1]["real_mean_length"]  # one real measurement per policy
    with pytest.raises(SystemExit, match="--policies: .*absent.zip: no such file"):
        bench.main(["--checkpoint", str(ckpt), "--policies", str(tmp_path / "absent.zip")])


def test_termination_logit_bins_real_steps_by_the_true_pole_angle(tmp_path, monkeypatch):
    """Random or policy actions on real CartPole; each live step's logit lands in its |theta| bin; bad input named."""
    import numpy as np

    ckpt = cartpole_latent_policy(tmp_path, episodes=2)

    bench = load_benchmark("termination_logit")
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path / "results")
    bench.main(["--checkpoint", str(ckpt), "--episodes", "3", "--max-steps", "40", "--temperature", "10",
                "--temperature", "4", "--name", "random"])
    out = json.loads((tmp_path / "results" / "random.json").read_text())
    rows = out["rows"]
    assert rows and sum(r["steps"] for r in rows) == out["config"]["live_steps"] > 3
    for r in rows:
        assert r["logit_q10"] <= r["logit_median"] <= r["logit_q90"]
        assert r["penalty_T10_at_median"] == pytest.approx(1 / (1 + np.exp(-r["logit_median"] / 10)), abs=2e-3)
        assert "penalty_T4_at_median" in r
    bench.main(["--checkpoint", str(ckpt), "--policy", str(tmp_path / "policy.zip"), "--episodes", "2",
                "--max-steps", "10", "--name", "policy"])
    assert json.loads((tmp_path / "results" / "policy.json").read_text())["rows"]
    with pytest.raises(SystemExit, match="--policy .*absent.zip: no such file"):
        bench.main(["--checkpoint", str(ckpt), "--policy", str(tmp_path / "absent.zip")])
    with pytest.raises(SystemExit, match="--epsilon 2.0"):
        bench.main(["--checkpoint", str(ckpt), "--epsilon", "2"])


def test_dream_range_compares_bounds_on_the_same_seeds(tmp_path, monkeypatch):
    """One row per sampler.bound_sigmas: no bound clamps nothing; a bound every frame leaves clamps everything;
    frame peaks are ordered quantiles; bad input is named."""
    ckpt = cartpole_latent_policy(tmp_path, episodes=2)

    bench = load_benchmark("dream_range")
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path / "results")
    bench.main(["--checkpoint", str(ckpt), "--policy", str(tmp_path / "policy.zip"), "--num-envs", "2", "--steps", "3",
                "--bound-sigmas", "0", "--bound-sigmas", "0.001", "--name", "range"])
    rows = json.loads((tmp_path / "results" / "range.json").read_text())["rows"]
    assert [r["bound_sigmas"] for r in rows] == [0.0, 0.001]
    assert rows[0]["bound"] == "none" and rows[0]["clamped_fraction"] == 0.0
    assert rows[1]["bound"] == pytest.approx(1.0001) and rows[1]["clamped_fraction"] == 1.0  # an untrained model
    for r in rows:
        assert 1.0 < r["peak_q50"] <= r["peak_q90"] <= r["peak_q99"] <= r["peak_q99.9"] <= r["peak_max"]
        assert r["env_steps_per_s"] > 0
    with pytest.raises(SystemExit, match="--policy .*absent.zip: no such file"):
        bench.main(["--checkpoint", str(ckpt), "--policy", str(tmp_path / "absent.zip")])
    with pytest.raises(SystemExit, match="--bound-sigmas"):
        bench.main(["--checkpoint", str(ckpt), "--bound-sigmas", "-1"])


def write_agent_run(folder: Path, evals: list[list[tuple[int, float, float]]], selected: str | None = None) -> Path:
    """An agent folder as `sfv-world agent` leaves it: seed<k>/eval.csv written by EvalLog (rows of
    (timesteps, dreamed return, real return)), and result.json with the selection when one is named."""
    from sfv_world.agents.imagination import EvalLog

    for k, rows in enumerate(evals):
        (folder / f"seed{k}").mkdir(parents=True)
        log = EvalLog(folder / f"seed{k}" / "eval.csv")
        for steps, dreamed, real in rows:
            log.write({"timesteps": steps, "imagined_return_mean": dreamed, "real_return_mean": real})
        log.close()
    if selected:
        (folder / "result.json").write_text(json.dumps({"real_return_mean": 150.25,
                                                        "selection": {"selected": selected}}))
    return folder


def test_agent_paired_compares_each_run_with_the_first_seed_by_seed(tmp_path, monkeypatch):
    """Per-seed real returns at the last (or --at) evaluation; paired difference and wins against the first run;
    the selection where a run made one; malformed runs and missing evaluations are named."""
    base = write_agent_run(tmp_path / "a", [[(50, 60.0, 100.0)], [(50, 61.0, 80.0)], [(50, 59.0, 120.0)]])
    other = write_agent_run(tmp_path / "b", [[(25, 70.0, 90.0), (50, 80.0, 130.0)], [(50, 90.0, 70.0)],
                                             [(50, 85.0, 150.0)]], selected="seed2@40000")
    bench = load_benchmark("agent_paired")
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path / "results")
    bench.main(["--run", f"before={base}", "--run", f"x.y=0.5={other}", "--name", "paired"])
    rows = json.loads((tmp_path / "results" / "paired.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["before", "x.y=0.5"]
    assert (rows[0]["seed0"], rows[0]["seed1"], rows[0]["seed2"], rows[0]["mean"]) == (100.0, 80.0, 120.0, 100.0)
    assert rows[0]["paired_diff"] == rows[0]["selected"] == ""  # the reference; chose without real episodes
    assert rows[1]["seed0"] == 130.0 and rows[1]["dreamed_mean"] == 85.0  # each seed's last evaluation
    assert rows[1]["paired_diff"] == pytest.approx((30 - 10 + 30) / 3, abs=0.05) and rows[1]["better"] == "2 of 3"
    assert (rows[1]["selected"], rows[1]["selected_return"]) == ("seed2@40000", 150.2)
    table = (tmp_path / "results" / "paired.md").read_text()
    assert "| run | seeds | seed0 | seed1 | seed2 | mean | dreamed_mean | paired_diff | better | selected |" in table
    assert "| x.y=0.5 | 3 |" in table

    bench.main(["--run", f"before={base}", "--run", f"after={other}", "--at", "20", "--name", "early"])
    early = json.loads((tmp_path / "results" / "early.json").read_text())["rows"][1]
    assert early["seed0"] == 90.0 and early["seed1"] == 70.0  # the first evaluation at or past 20 steps
    with pytest.raises(SystemExit, match="seed0.eval.csv: no real evaluation at or past 60"):
        bench.main(["--run", f"before={base}", "--run", f"after={other}", "--at", "60"])
    with pytest.raises(SystemExit, match="expected label=folder"):
        bench.main(["--run", str(base), "--run", f"after={other}"])
    with pytest.raises(SystemExit, match="absent.*not found"):
        bench.main(["--run", f"before={base}", "--run", f"after={tmp_path / 'absent'}"])
    with pytest.raises(SystemExit, match="at least two runs"):
        bench.main(["--run", f"before={base}"])
