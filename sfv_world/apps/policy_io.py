"""Saved SB3 policies driving the world model (play and rollout).

A policy trained by ``sfv-world agent`` sees either channel-stacked uint8 frames at the model's frame
size (``obs_mode=pixels``, ``[h, w, C*S]`` channels-last, or its CHW transpose after SB3's
``VecTransposeImage``) or the world model's causal features (``obs_mode=latent``: ``[D]``, their mean
over the frame's token slots, or ``[F * D]``, the slots side by side). Which one, and the stack S, are
read off the saved model's observation space.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sfv_world.datasets.policies import load_sb3_model


def policy_input(model: Any, frame_shape: tuple[int, int, int], feature_dims: dict[str, int]
                 ) -> tuple[str, int, str]:
    """(obs_mode, frame_stack, latent_features) a saved SB3 model expects.

    frame_shape: the world's (h, w, C); feature_dims: the feature sizes it offers per
    ``latent_features`` kind (``WorldRuntime.feature_dims``, e.g. {"mean": D, "slots": F * D}).
    latent_features is "mean" for a pixel policy (unused).
    """
    shape = tuple(getattr(model.observation_space, "shape", ()) or ())
    h, w, c = frame_shape
    for kind, dim in feature_dims.items():
        if shape == (int(dim),):
            return "latent", 1, kind
    if len(shape) == 3 and shape[:2] == (h, w) and shape[2] % c == 0:
        return "pixels", shape[2] // c, "mean"
    if len(shape) == 3 and shape[1:] == (h, w) and shape[0] % c == 0:
        return "pixels", shape[0] // c, "mean"
    dims = " or ".join(f"({d},) ({k})" for k, d in feature_dims.items())
    raise ValueError(
        f"the saved policy observes {model.observation_space}, which fits neither the world's frames "
        f"({h}x{w}x{c}, stacked) nor its features {dims}: was it trained on this checkpoint?"
    )


class WorldPolicy:
    """A saved SB3 policy acting in B worlds of a :class:`~sfv_world.world.WorldRuntime`.

    Call :meth:`reset` with the context frames uint8 [B, k, h, w, C]; then ``policy(frames, features)``
    with the newest frame uint8 [B, h, w, C] and features float32 [B, D] (the runtime's
    ``latent_features`` kind, which the policy names in ``self.latent_features``) returns actions [B] (or
    [B, A]). The frame stack matches the dream env's: at reset it holds the last context frames, the
    oldest one repeated where the context is shorter than the stack.
    """

    def __init__(self, path: str | os.PathLike, frame_shape: tuple[int, int, int], feature_dims: dict[str, int],
                 algo: str = "auto", device: str = "cpu", deterministic: bool = True, model: Any = None):
        self.path = str(path)
        self.model = model if model is not None else load_sb3_model(path, algo, device)
        self.obs_mode, self.frame_stack, self.latent_features = policy_input(self.model, frame_shape, feature_dims)
        self.deterministic = deterministic
        self.stack: np.ndarray | None = None
        self._fresh = False

    def reset(self, context_frames: np.ndarray) -> None:
        ctx = np.asarray(context_frames)
        k = ctx.shape[1]
        S = self.frame_stack
        take = min(k, S)
        self.stack = np.concatenate([np.repeat(ctx[:, k - take : k - take + 1], S - take, 1), ctx[:, k - take :]], 1)
        self._fresh = True

    def observation(self, frames: np.ndarray, features: np.ndarray) -> np.ndarray:
        if self.obs_mode == "latent":
            return np.asarray(features, np.float32)
        if self.stack is None:
            raise RuntimeError("WorldPolicy: call reset(context_frames) before acting")
        if not self._fresh:
            self.stack = np.concatenate([self.stack[:, 1:], frames[:, None]], 1)
        self._fresh = False
        B, S, h, w, c = self.stack.shape
        return np.ascontiguousarray(np.moveaxis(self.stack, 1, 3).reshape(B, h, w, S * c))

    def __call__(self, frames: np.ndarray, features: np.ndarray) -> np.ndarray:
        action, _ = self.model.predict(self.observation(frames, features), deterministic=self.deterministic)
        return np.asarray(action)
