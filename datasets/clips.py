"""Torch clip dataset for training: fixed windows of T frames and their T-1 transitions.

A window never crosses an episode boundary. Window (episode e, start s) holds frames s .. s+T-1 and the
transitions between them, actions/rewards/terminations s .. s+T-2 (action k leads from frame k to
frame k+1). With ``pad_start`` a window may start before frame 0 (s >= -(T-1)); its missing frames are
copies of frame 0 (or zeros) with ``mask`` False, and missing transitions are action 0, reward 0,
termination False.

Reading strategy (measured in ``benchmarks/clip_loading.py``): a dataset whose decoded frames fit
``memory_budget_gb`` is loaded into RAM once; a larger one streams from the chunked HDF5 file: a
window decodes only the (<= 32-frame, never cross-episode) chunks it covers, through an LRU cache of
decoded chunks. On random windows that is ~7x faster than decoding whole episodes into an episode
cache, and episode-ordered access still hits the cache. The HDF5 file is opened lazily in each
process, so the dataset works with DataLoader workers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from sfv_world.datasets.format import DatasetReader, Episode
from sfv_world.datasets.preprocess import area_resize


def split_episodes(episode_ids: Sequence[int], val_fraction: float = 0.1, test_fraction: float = 0.1,
                   seed: int = 0) -> dict[str, list[int]]:
    """Deterministic split by episode: {"train", "val", "test"} -> sorted disjoint id lists.

    The ids are sorted, permuted with ``numpy.random.default_rng(seed)``, and cut into
    round(n * test_fraction) test, round(n * val_fraction) val and the rest train episodes (train keeps
    at least one episode). The result depends only on the set of ids and the seed, not on their order.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"split_episodes: {name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"split_episodes: val_fraction + test_fraction must be < 1, got "
                         f"{val_fraction} + {test_fraction}")
    ids = sorted({int(e) for e in episode_ids})
    if len(ids) != len(episode_ids):
        raise ValueError("split_episodes: episode_ids contains duplicates")
    n = len(ids)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    while n_test + n_val > max(n - 1, 0) and (n_test or n_val):  # keep one training episode
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    return {"train": sorted(perm[n_test + n_val:]), "val": sorted(perm[n_test:n_test + n_val]),
            "test": sorted(perm[:n_test])}


class ClipDataset(Dataset):
    """Windows of ``clip_len`` frames from the episodes ``episode_ids`` of a dataset.

    Item (torch tensors; T = clip_len, C/H/W as stored or ``frame_size``)::

        frames        uint8   [T, C, H, W]   channel-first
        actions       int64   [T-1]          (Discrete; int64 [T-1, k] MultiDiscrete, float32 [T-1, k] Box)
        rewards       float32 [T-1]
        terminations  bool    [T-1]
        mask          bool    [T]            False for padding before frame 0
        episode       int64   []
        start         int64   []             index of the first frame (negative when padded)

    Args:
        reader: a DatasetReader or a dataset path.
        episode_ids: episodes to use (None: all), e.g. one entry of :func:`split_episodes`.
        clip_len: T >= 2 frames per window.
        frame_size: area-resize frames to this square side on load (must not exceed the stored size).
        pad_start: also yield windows starting up to T-1 frames before frame 0. Without it, episodes
            with fewer than T frames are skipped.
        pad_mode: "repeat" (copies of frame 0) or "zeros" for padded frames.
        memory_budget_gb: load everything into RAM when the decoded frames fit; otherwise stream.
        cache_mb: size of the LRU cache of decoded chunks when streaming (per process); default a
            quarter of the budget, at least 64 MB.
    """

    def __init__(self, reader: DatasetReader | str | os.PathLike, episode_ids: Sequence[int] | None,
                 clip_len: int, frame_size: int | None = None, pad_start: bool = False,
                 pad_mode: Literal["repeat", "zeros"] = "repeat", memory_budget_gb: float = 4.0,
                 cache_mb: float | None = None):
        self.reader = reader if isinstance(reader, DatasetReader) else DatasetReader(reader)
        if clip_len < 2:
            raise ValueError(f"ClipDataset: clip_len must be >= 2, got {clip_len}")
        if pad_mode not in ("repeat", "zeros"):
            raise ValueError(f"ClipDataset: pad_mode must be 'repeat' or 'zeros', got {pad_mode!r}")
        h, w, c = self.reader.frame_shape
        if frame_size is not None and (frame_size < 1 or frame_size > min(h, w)):
            raise ValueError(f"ClipDataset: frame_size={frame_size} must be in [1, {min(h, w)}] "
                             f"(stored frames are {h}x{w}; upscaling is not supported)")
        self.clip_len = int(clip_len)
        self.pad_start = bool(pad_start)
        self.pad_mode = pad_mode
        self.frame_size = None if frame_size is None or (frame_size == h == w) else int(frame_size)
        self.frame_shape = (c, *(self.frame_size,) * 2) if self.frame_size else (c, h, w)
        ids = self.reader.episode_ids if episode_ids is None else [int(e) for e in episode_ids]
        unknown = sorted(set(ids) - set(self.reader.episode_ids))
        if unknown:
            raise ValueError(f"ClipDataset: episode_ids {unknown[:5]} not in {self.reader.path} "
                             f"(episodes 0..{self.reader.num_episodes - 1})")
        self.episode_ids = list(ids)
        # transitions of every episode: small, always in RAM (also validates the values)
        self._steps: dict[int, Episode] = {e: self.reader.load_episode(e, observations=False) for e in ids}
        self.num_windows_per_episode: dict[int, int] = {e: self._num_windows(self.reader.episode_lengths[e] + 1)
                                                        for e in ids}
        self.index = self._build_index()
        frame_bytes = int(np.prod(self.frame_shape))
        self.memory_bytes = frame_bytes * sum(self.reader.episode_lengths[e] + 1 for e in ids)
        budget = int(memory_budget_gb * 2**30)
        self.in_memory = self.memory_bytes <= budget
        self._frames: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._chunk_frames: dict[int, int] = {}
        if self.in_memory:
            for e in ids:
                if self.num_windows_per_episode[e] > 0:
                    self._frames[e] = self._load_frames(e)
            self.cache_bytes_max = 0
        else:
            mb = cache_mb if cache_mb is not None else max(64.0, budget / 4 / 2**20)
            self.cache_bytes_max = int(mb * 2**20)

    # -- index ----------------------------------------------------------------------------------------
    def _num_windows(self, num_frames: int) -> int:
        if self.pad_start:
            return num_frames
        return max(num_frames - self.clip_len + 1, 0)

    def _build_index(self) -> np.ndarray:
        """int64 [N, 2] of (episode, start) for every window."""
        rows = []
        first = -(self.clip_len - 1) if self.pad_start else 0
        for e in self.episode_ids:
            n = self.num_windows_per_episode[e]
            if n:
                starts = np.arange(first, first + n, dtype=np.int64)
                rows.append(np.stack([np.full(n, e, np.int64), starts], axis=1))
        return np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    # -- frames ---------------------------------------------------------------------------------------
    def _load_frames(self, eid: int) -> np.ndarray:
        frames = self.reader.load_episode(eid).observations
        if self.frame_size is not None:
            frames = area_resize(frames, self.frame_size)
        return frames

    def _chunk_len(self, eid: int) -> int:
        if eid not in self._chunk_frames:
            chunks = self.reader.h5[f"episode_{eid}/observations"].chunks
            self._chunk_frames[eid] = int(chunks[0]) if chunks else self.reader.episode_lengths[eid] + 1
        return self._chunk_frames[eid]

    def _chunk(self, eid: int, c: int, chunk_len: int) -> np.ndarray:
        """Decoded (and resized) chunk ``c`` of episode ``eid``'s frames, through the LRU cache."""
        key = (eid, c)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        n = self.reader.episode_lengths[eid] + 1
        frames = self.reader.read_frames(eid, c * chunk_len, min((c + 1) * chunk_len, n))
        if self.frame_size is not None:
            frames = area_resize(frames, self.frame_size)
        self._cache[key] = frames
        self._cache_bytes += frames.nbytes
        while self._cache_bytes > self.cache_bytes_max and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return frames

    def frames(self, eid: int, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` (0 <= start < stop <= T+1) of episode ``eid`` as loaded:
        uint8 [stop-start, H, W, C], resized if asked."""
        if self.in_memory and eid in self._frames:
            return self._frames[eid][start:stop]
        if self.in_memory:
            return self._load_frames(eid)[start:stop]
        cl = self._chunk_len(eid)
        parts = []
        for c in range(start // cl, (stop - 1) // cl + 1):
            chunk = self._chunk(eid, c, cl)
            parts.append(chunk[max(start - c * cl, 0) : min(stop - c * cl, chunk.shape[0])])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def episode_frames(self, eid: int) -> np.ndarray:
        """All frames of episode ``eid`` as loaded: uint8 [T+1, H, W, C] (resized if asked)."""
        return self.frames(eid, 0, self.reader.episode_lengths[eid] + 1)

    # -- items ----------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"ClipDataset index {i} out of range ({len(self)} windows)")
        eid, start = (int(v) for v in self.index[i])
        return self.window(eid, start)

    def window(self, eid: int, start: int) -> dict[str, torch.Tensor]:
        """The window of episode ``eid`` whose first frame is ``start`` (see the class docstring)."""
        T = self.clip_len
        steps = self._steps[eid]
        n_frames = self.reader.episode_lengths[eid] + 1
        pad = max(-start, 0)
        s = max(start, 0)
        if pad >= T or s + T - pad > n_frames:
            raise IndexError(f"window (episode {eid}, start {start}) of {T} frames does not fit the "
                             f"episode's {n_frames} frames")
        real = self.frames(eid, s, s + T - pad)  # [T - pad, H, W, C]
        if pad:
            fill = np.repeat(real[:1], pad, axis=0) if self.pad_mode == "repeat" else \
                np.zeros((pad, *real.shape[1:]), np.uint8)
            real = np.concatenate([fill, real])
        mask = np.ones(T, bool)
        mask[:pad] = False
        # transitions start .. start+T-2; indices < 0 are padding
        n_pad_steps = min(pad, T - 1)
        acts = steps.actions[s : s + T - 1 - n_pad_steps]
        rews = steps.rewards[s : s + T - 1 - n_pad_steps]
        terms = steps.terminations[s : s + T - 1 - n_pad_steps]
        if n_pad_steps:
            acts = np.concatenate([np.zeros((n_pad_steps, *acts.shape[1:]), acts.dtype), acts])
            rews = np.concatenate([np.zeros(n_pad_steps, np.float32), rews])
            terms = np.concatenate([np.zeros(n_pad_steps, bool), terms])
        return {
            "frames": torch.from_numpy(np.ascontiguousarray(real.transpose(0, 3, 1, 2))),
            "actions": torch.from_numpy(np.ascontiguousarray(acts)),
            "rewards": torch.from_numpy(np.ascontiguousarray(rews, np.float32)),
            "terminations": torch.from_numpy(np.ascontiguousarray(terms, bool)),
            "mask": torch.from_numpy(mask),
            "episode": torch.tensor(eid, dtype=torch.int64),
            "start": torch.tensor(start, dtype=torch.int64),
        }

    def __repr__(self) -> str:
        mode = "RAM" if self.in_memory else f"streaming (LRU cache {self.cache_bytes_max / 2**20:.0f} MB of chunks)"
        return (f"ClipDataset({Path(self.reader.path).name}: {len(self.episode_ids)} episodes, "
                f"{len(self)} windows of {self.clip_len} frames {self.frame_shape}, {mode})")
