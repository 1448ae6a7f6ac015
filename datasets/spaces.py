"""Gymnasium action/observation space (de)serialisation, in Minari's JSON format.

Minari stores spaces in ``metadata.json`` as JSON strings such as
``{"type": "Discrete", "dtype": "int64", "start": 0, "n": 6}``. We write the same strings, so
``minari.serialization.deserialize_space`` reads ours and vice versa. Box bounds are written in full,
as Minari does (gymnasium 1.x rejects 0-d bounds with a shape, so Minari cannot read scalar bounds);
our reader also accepts scalar bounds.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from gymnasium import spaces

SUPPORTED_SPACES = ("Discrete", "Box", "MultiDiscrete")


class SpaceSerialisationError(ValueError):
    """A space cannot be written to, or read back from, its JSON description."""


def space_to_dict(space: spaces.Space) -> dict[str, Any]:
    """Serialise a Discrete, Box or MultiDiscrete space to a JSON-able dict (Minari's schema)."""
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "dtype": "int64", "start": int(space.start), "n": int(space.n)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "dtype": str(space.dtype),
            "shape": list(space.shape),
            "low": space.low.tolist(),
            "high": space.high.tolist(),
        }
    if isinstance(space, spaces.MultiDiscrete):
        return {
            "type": "MultiDiscrete",
            "dtype": str(space.dtype),
            "nvec": space.nvec.tolist(),
            "start": space.start.tolist(),
        }
    raise SpaceSerialisationError(
        f"cannot serialise space {space!r}: supported types are {', '.join(SUPPORTED_SPACES)}"
    )


def serialize_space(space: spaces.Space) -> str:
    """Serialise ``space`` to the JSON string Minari stores in ``metadata.json``."""
    return json.dumps(space_to_dict(space))


def deserialize_space(data: str | dict[str, Any]) -> spaces.Space:
    """Inverse of :func:`serialize_space`. Raises :class:`SpaceSerialisationError` on bad input."""
    try:
        d = json.loads(data) if isinstance(data, str) else dict(data)
        kind = d["type"]
        if kind == "Discrete":
            return spaces.Discrete(n=int(d["n"]), start=int(d.get("start", 0)))
        if kind == "Box":
            shape = tuple(int(s) for s in d["shape"])
            dtype = np.dtype(d["dtype"])
            low = np.broadcast_to(np.array(d["low"], dtype=dtype), shape).copy()
            high = np.broadcast_to(np.array(d["high"], dtype=dtype), shape).copy()
            return spaces.Box(low=low, high=high, shape=shape, dtype=dtype)
        if kind == "MultiDiscrete":
            return spaces.MultiDiscrete(nvec=d["nvec"], dtype=d.get("dtype", "int64"), start=d.get("start"))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise SpaceSerialisationError(f"invalid space description {data!r}: {e}") from e
    raise SpaceSerialisationError(
        f"unsupported space type {kind!r} (supported: {', '.join(SUPPORTED_SPACES)})"
    )


def action_storage_dtype(space: spaces.Space) -> np.dtype:
    """The dtype actions of ``space`` are stored with: int64 for Discrete/MultiDiscrete, float32 for Box."""
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete)):
        return np.dtype(np.int64)
    if isinstance(space, spaces.Box):
        return np.dtype(np.float32)
    raise SpaceSerialisationError(f"unsupported action space {space!r}")


def action_storage_shape(space: spaces.Space) -> tuple[int, ...]:
    """Per-step shape of stored actions: () for Discrete, (k,) for Box/MultiDiscrete (flattened)."""
    if isinstance(space, spaces.Discrete):
        return ()
    if isinstance(space, (spaces.Box, spaces.MultiDiscrete)):
        return (int(np.prod(space.shape)),) if len(space.shape) != 1 else tuple(space.shape)
    raise SpaceSerialisationError(f"unsupported action space {space!r}")


def actions_outside_space(actions: np.ndarray, space: spaces.Space) -> np.ndarray:
    """Boolean mask [T] of steps whose action is not a member of ``space``.

    ``actions`` has the stored layout: int64 [T] (Discrete), int64/float32 [T, k] (MultiDiscrete/Box).
    Box actions must be finite and within [low, high].
    """
    if isinstance(space, spaces.Discrete):
        return (actions < space.start) | (actions >= space.start + space.n)
    if isinstance(space, spaces.MultiDiscrete):
        start = space.start.reshape(-1)
        high = start + space.nvec.reshape(-1)
        return np.any((actions < start) | (actions >= high), axis=-1)
    if isinstance(space, spaces.Box):
        low = space.low.reshape(-1).astype(np.float64)
        high = space.high.reshape(-1).astype(np.float64)
        a = actions.astype(np.float64)
        bad = ~np.isfinite(a) | (a < low) | (a > high)
        return np.any(bad, axis=-1)
    raise SpaceSerialisationError(f"unsupported action space {space!r}")
