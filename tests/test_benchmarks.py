"""The benchmark scripts' own contracts (not their figures: those live in benchmarks/results)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_env_throughput_times_each_obs_mode_and_judges_the_target_on_pixels(tmp_path):
    bench = load_benchmark("env_throughput")
    out = tmp_path / "tp"
    rc = bench.main(["--checkpoint", str(tmp_path / "absent.pt"), "--batches", "2", "--seconds", "0.01",
                     "--threads", "1", "--obs-modes", "pixels,latent", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.with_suffix(".json").read_text())
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


def test_env_throughput_rejects_an_unknown_obs_mode(tmp_path, capsys):
    bench = load_benchmark("env_throughput")
    with pytest.raises(SystemExit):
        bench.main(["--obs-modes", "pixels,rgb", "--output", str(tmp_path / "tp")])
    assert "--obs-modes" in capsys.readouterr().err
