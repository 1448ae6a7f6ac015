"""sfv-world datasets: the HDF5 episode format, the collector, clip datasets and frame preprocessing.

Bottom layer (DESIGN.md section 2): imports nothing else from sfv_world except ``__version__``.
``ClipDataset`` and ``split_episodes`` (torch) load lazily from ``sfv_world.datasets.clips``.
"""

from __future__ import annotations

from typing import Any

from sfv_world.datasets.collect import BatchPolicy, CollectStats, collect, collect_batched, get_frame
from sfv_world.datasets.format import (
    SCHEMA_VERSION,
    DatasetError,
    DatasetReader,
    Episode,
    EpisodeWriter,
    live_steps,
    partial_path_for,
)
from sfv_world.datasets.policies import (
    Policy,
    RandomPolicy,
    SB3EpsilonGreedyPolicy,
    StickyRandomPolicy,
)
from sfv_world.datasets.preprocess import area_resize, area_resize_reference, preprocess_frame
from sfv_world.datasets.spaces import deserialize_space, serialize_space

__all__ = [
    "SCHEMA_VERSION", "DatasetError", "DatasetReader", "Episode", "EpisodeWriter", "live_steps", "partial_path_for",
    "BatchPolicy", "CollectStats", "collect", "collect_batched", "get_frame", "Policy", "RandomPolicy",
    "StickyRandomPolicy",
    "SB3EpsilonGreedyPolicy", "area_resize", "area_resize_reference", "preprocess_frame",
    "serialize_space", "deserialize_space", "ClipDataset", "split_episodes",
]


def __getattr__(name: str) -> Any:
    if name in ("ClipDataset", "split_episodes"):
        from sfv_world.datasets import clips

        return getattr(clips, name)
    raise AttributeError(f"module 'sfv_world.datasets' has no attribute {name!r}")
