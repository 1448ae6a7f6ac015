"""Gymnasium environments of sfv-world (imported as ``sfv_world.envs``).

Importing this package registers ``sfv_world/Dream-v0``:

    env  = gymnasium.make("sfv_world/Dream-v0", checkpoint="runs/cpu-demo/checkpoints/last.pt")
    envs = gymnasium.make_vec("sfv_world/Dream-v0", num_envs=64, checkpoint=...)  # natively batched

The dream env, its vector env and the SB3 adapter live in :mod:`sfv_world.envs.dream` and
:mod:`sfv_world.envs.sb3`; the real source envs (CartPole pixels, ALE, MiniGrid) in
:mod:`sfv_world.envs.sources`.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

DREAM_ENV_ID = "sfv_world/Dream-v0"

if DREAM_ENV_ID not in registry:
    register(
        id=DREAM_ENV_ID,
        entry_point="sfv_world.envs.dream:DreamEnv",
        vector_entry_point="sfv_world.envs.dream:make_dream_vector_env",
        disable_env_checker=False,
    )

__all__ = ["DREAM_ENV_ID"]
