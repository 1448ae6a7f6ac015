"""Data-side filters on clip datasets (used by the trainer's ``train.exclude_actions``).

``exclude_action_windows`` drops every window of a :class:`~sfv_world.datasets.clips.ClipDataset`
whose real transitions use one of the given (Discrete) actions, so a model trained on the filtered
dataset never sees those actions: the held-out-action case of the OOD evaluation (issue 7, case a).
Frames themselves are untouched; only the window index shrinks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def window_uses_actions(actions: np.ndarray, starts: np.ndarray, clip_len: int, exclude: Sequence[int]) -> np.ndarray:
    """Which windows of one episode contain an excluded action among their real transitions.

    actions: int [T] the episode's Discrete actions; starts: int64 [W] first frame of each window (may
    be negative with start padding: padded transitions are not real and never count); clip_len: frames
    per window (transitions start .. start+clip_len-2). Returns bool [W].
    """
    actions = np.asarray(actions)
    if actions.ndim != 1:
        raise ValueError(f"exclude_actions needs Discrete actions [T], got an action array of shape {actions.shape}")
    bad = np.isin(actions, np.asarray(list(exclude), dtype=actions.dtype)).astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(bad)])  # csum[k] = excluded actions among transitions < k
    starts = np.asarray(starts, dtype=np.int64)
    lo = np.clip(starts, 0, len(actions))
    hi = np.clip(starts + clip_len - 1, 0, len(actions))
    return (csum[hi] - csum[lo]) > 0


def exclude_action_windows(dataset, exclude: Sequence[int]) -> int:
    """Remove, in place, the windows of ``dataset`` (a ClipDataset) that use an action in ``exclude``.

    Returns the number of windows removed. Raises TypeError for a non-Discrete action space, ValueError when
    ``exclude`` names actions outside it or when no window survives.
    """
    from gymnasium import spaces

    exclude = [int(a) for a in exclude]
    if not exclude:
        return 0
    space = dataset.reader.action_space
    if not isinstance(space, spaces.Discrete):
        raise TypeError(f"exclude_actions needs a Discrete action space, {dataset.reader.path} has {space}")
    outside = [a for a in exclude if not space.start <= a < space.start + space.n]
    if outside:
        raise ValueError(f"exclude_actions {outside} are not actions of {space} ({dataset.reader.path})")
    index = dataset.index
    keep = np.ones(len(index), dtype=bool)
    for eid in np.unique(index[:, 0]):
        rows = np.flatnonzero(index[:, 0] == eid)
        keep[rows] = ~window_uses_actions(dataset._steps[int(eid)].actions, index[rows, 1], dataset.clip_len, exclude)
    removed = int((~keep).sum())
    if not keep.any():
        raise ValueError(
            f"exclude_actions {exclude}: every one of the {len(index)} windows of {dataset.clip_len} frames in "
            f"{dataset.reader.path} uses an excluded action; collect with a stickier policy or shorten clip_len"
        )
    dataset.index = index[keep]
    return removed
