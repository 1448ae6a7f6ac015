"""The ``sfv-world`` command line: ``sfv-world <command> [hydra overrides]``.

Every command composes the same hydra config tree (``sfv_world.configs``) and receives the resolved
``DictConfig``. Commands are imported lazily so ``sfv-world --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from omegaconf import DictConfig, OmegaConf

# command -> ("module:function", one-line help, name of the config key a bare positional fills)
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "collect": ("sfv_world.apps.collect:run", "record episodes from a Gymnasium env into an HDF5 dataset", "dataset"),
    "inspect": ("sfv_world.apps.inspect:run", "summarise a dataset and write a contact sheet", "inspect.path"),
    "train": ("sfv_world.apps.train:run", "train STARFlow-V, the denoiser and the reward/termination head", None),
    "quality": ("sfv_world.apps.quality:run", "open-loop prediction quality of a checkpoint on held-out episodes", "checkpoint"),
    "agent": ("sfv_world.apps.agent:run", "train an SB3 agent inside the dream, evaluate it in the real env", None),
    "play": ("sfv_world.apps.play:run", "play the dream in a pygame window", "checkpoint"),
    "rollout": ("sfv_world.apps.rollout:run", "replay logged datasets through the model", "checkpoint"),
    "ood": ("sfv_world.apps.ood:run", "evaluate likelihood-based out-of-distribution flags", "checkpoint"),
    "pipeline": ("sfv_world.apps.pipeline:run", "collect -> train -> agent -> evaluate -> report", None),
}


def usage() -> str:
    lines = ["usage: sfv-world <command> [hydra overrides ...]", "", "commands:"]
    for name, (_, help_, _) in COMMANDS.items():
        lines.append(f"  {name:<10} {help_}")
    lines += ["", "examples:", "  sfv-world collect env=cartpole collect.episodes=50",
              "  sfv-world inspect runs/cpu-demo/data/cartpole", "  sfv-world train preset=cpu-demo",
              "  sfv-world <command> --cfg      print the composed config and exit"]
    return "\n".join(lines)


def compose(overrides: list[str]) -> DictConfig:
    """Compose the root config with hydra overrides (``key=value``, ``group=option``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="sfv_world.configs", version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def resolve_command(name: str) -> Callable[[DictConfig], object]:
    if name not in COMMANDS:
        raise SystemExit(f"sfv-world: unknown command {name!r}\n\n{usage()}")
    target = COMMANDS[name][0]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise SystemExit(f"sfv-world: command {name!r} is not available in this version") from e
        raise
    return getattr(module, func_name)


def split_args(command: str, args: list[str]) -> tuple[list[str], bool]:
    """Hydra overrides from argv. A bare positional (no '=') fills the command's main key."""
    overrides, print_cfg = [], False
    positional_key = COMMANDS.get(command, (None, None, None))[2]
    for arg in args:
        if arg == "--cfg":
            print_cfg = True
        elif "=" in arg or arg.startswith(("+", "~")):
            overrides.append(arg)
        elif positional_key is not None:
            overrides.append(f"{positional_key}={arg}")
            positional_key = None
        else:
            raise SystemExit(f"sfv-world {command}: unexpected argument {arg!r} (overrides look like key=value)")
    return overrides, print_cfg


# Commands that open a window; every other one renders only off-screen (rgb_array).
WINDOWED_COMMANDS = ("play",)


def render_offscreen() -> None:
    """Point SDL at its dummy video driver unless the user chose one (``SDL_VIDEODRIVER``).

    gymnasium's classic-control envs call ``pygame.display.init()`` even for ``render_mode="rgb_array"``;
    on a machine without a display server SDL then prints ``error: XDG_RUNTIME_DIR is invalid`` at every
    real-env evaluation. Off-screen rendering needs no display, so the commands that never open a window
    (all but ``play``) render through the dummy driver. Frames are identical.
    """
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def run_module(run, argv: list[str] | None = None) -> int:
    """``python -m sfv_world.apps.<command> [overrides]`` (e.g. under torchrun): ``run(compose(argv))``."""
    if run.__module__.rsplit(".", 1)[-1] not in WINDOWED_COMMANDS:
        render_offscreen()
    run(compose(list(sys.argv[1:] if argv is None else argv)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"sfv-world: unknown command {command!r}\n\n{usage()}")
    overrides, print_cfg = split_args(command, rest)
    cfg = compose(overrides)
    if print_cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    if command not in WINDOWED_COMMANDS:
        render_offscreen()
    fn = resolve_command(command)
    result = fn(cfg)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
