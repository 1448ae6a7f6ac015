"""The package-dir mapping works with the package installed (DESIGN.md section 1)."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {
    "sfv_world": ROOT / "sfv_world",
    "sfv_world.apps": ROOT / "sfv_world" / "apps",
    "sfv_world.envs": ROOT / "envs",
    "sfv_world.agents": ROOT / "agents",
    "sfv_world.datasets": ROOT / "datasets",
    "sfv_world.configs": ROOT / "configs",
}


def test_distribution_is_installed() -> None:
    dist = importlib.metadata.distribution("sfv-world")
    assert dist.version == importlib.import_module("sfv_world").__version__
    assert any(ep.name == "sfv-world" for ep in dist.entry_points if ep.group == "console_scripts")


@pytest.mark.parametrize("module,folder", list(MAPPING.items()), ids=list(MAPPING))
def test_package_dir_mapping(module: str, folder: Path) -> None:
    mod = importlib.import_module(module)
    assert Path(mod.__file__).resolve().parent == folder.resolve()


def test_no_top_level_packages_leak() -> None:
    """``envs``/``datasets``/``agents`` are only reachable inside the sfv_world namespace."""
    code = ("import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
            "print([n for n in ('envs', 'agents', 'configs') if importlib.util.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]"
    # a top-level `datasets` may exist (Hugging Face), but never ours
    code = ("import importlib.util, sys; s = importlib.util.find_spec('datasets'); "
            "print('' if s is None else s.origin)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert str(ROOT / "datasets") not in out.stdout


def test_configs_are_package_data() -> None:
    root = importlib.resources.files("sfv_world.configs")
    assert root.joinpath("config.yaml").is_file()
    for group, option in [("env", "cartpole"), ("env", "pong"), ("env", "breakout"), ("env", "minigrid")]:
        assert root.joinpath(group, f"{option}.yaml").is_file(), f"{group}/{option}.yaml"


def test_config_composes() -> None:
    from sfv_world.apps.cli import compose

    cfg = compose(["env=pong", "collect.episodes=3"])
    assert cfg.env.id == "ALE/Pong-v5" and cfg.collect.episodes == 3 and cfg.collect.frame_size == 64


def test_cli_help_runs() -> None:
    exe = shutil.which("sfv-world", path=str(Path(sys.executable).parent))
    assert exe is not None, "the sfv-world console script is not installed next to the interpreter"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: sfv-world <command>" in out.stdout
    for command in ("collect", "inspect"):
        assert command in out.stdout


@pytest.mark.parametrize("command, preset, expected", [
    ("collect", None, "dummy"),          # off-screen commands render through SDL's dummy driver
    ("collect", "x11", "x11"),           # ... unless the user chose a driver
    ("play", None, None),                # play opens a real window: left alone
])
def test_cli_sets_the_offscreen_video_driver(monkeypatch, command, preset, expected) -> None:
    import os

    from sfv_world.apps import cli

    monkeypatch.setenv("SDL_VIDEODRIVER", "restored-after-the-test")  # so the teardown undoes what main sets
    if preset is None:
        monkeypatch.delenv("SDL_VIDEODRIVER")
    else:
        monkeypatch.setenv("SDL_VIDEODRIVER", preset)
    seen = []
    monkeypatch.setattr(cli, "resolve_command", lambda name: lambda cfg: seen.append(os.environ.get("SDL_VIDEODRIVER")))
    assert cli.main([command]) == 0
    assert seen == [expected]


def test_run_module_sets_the_offscreen_video_driver_except_for_play(monkeypatch) -> None:
    import os

    from sfv_world.apps import cli

    def train_run(cfg):
        seen.append(os.environ.get("SDL_VIDEODRIVER"))

    def play_run(cfg):
        seen.append(os.environ.get("SDL_VIDEODRIVER"))

    train_run.__module__ = "sfv_world.apps.train"
    play_run.__module__ = "sfv_world.apps.play"
    seen: list = []
    monkeypatch.setenv("SDL_VIDEODRIVER", "restored-after-the-test")
    monkeypatch.delenv("SDL_VIDEODRIVER")
    cli.run_module(play_run, [])
    cli.run_module(train_run, [])
    assert seen == [None, "dummy"]


def test_wheel_contains_every_mapped_package_and_the_configs(tmp_path: Path) -> None:
    """Build a wheel from a copy of the tree: the mapped folders and the yaml configs must be inside."""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    keep = ["pyproject.toml", "README.md", "sfv_world", "envs", "agents", "datasets", "configs"]
    for name in keep:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("sfv_world-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("sfv_world/datasets/format.py", "sfv_world/datasets/clips.py", "sfv_world/envs/sources.py",
                   "sfv_world/agents/__init__.py", "sfv_world/apps/cli.py", "sfv_world/configs/config.yaml",
                   "sfv_world/configs/env/cartpole.yaml", "sfv_world/configs/env/minigrid.yaml"):
        assert module in names, module
    assert not any(n.startswith(("envs/", "datasets/", "agents/", "configs/")) for n in names)
