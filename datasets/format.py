"""The sfv-world episode dataset: HDF5 in Minari's on-disk layout (DESIGN.md section 3).

Layout of a dataset folder ``<dataset>/`` (Minari 0.5's layout for one dataset, see below)::

    <dataset>/data/main_data.hdf5   one group per episode, episode_0 ... episode_{N-1}
    <dataset>/data/metadata.json    Minari's metadata keys plus an "sfv_world" section

Each group ``episode_<id>`` holds (T = number of transitions, T >= 1)::

    observations  uint8   [T+1, H, W, C]  raw frames (never JPEG), gzip-1, chunks of <= 32 frames
    actions       int64   [T]             Discrete           (int64 [T, k] MultiDiscrete)
                  float32 [T, k]          Box
    rewards       float32 [T]
    terminations  bool    [T]
    truncations   bool    [T]

and the attributes Minari writes: ``id``, ``total_steps`` (= T) and, when known, ``seed``.

``terminations[t]`` says the state after step t is terminal. Once True it stays True: an episode
recorded with a *terminal tail* (``collect(terminal_tail=k)``: the env stepped on for k more steps after
it terminated, as CartPole's physics allows) ends with a run of True, the first of which is the real
termination (:func:`live_steps`). ``truncations`` may only be True at the last step.

Minari compatibility: Minari 0.5 keeps ``metadata.json`` *next to* ``main_data.hdf5`` inside ``data/``
(``MinariStorage.read(<dataset>/data)``, ``minari.load_dataset`` looks for ``<root>/<id>/data``), so we
do the same; ``minari.MinariDataset("<dataset>/data")`` reads our datasets unchanged. The keys Minari
needs are ``dataset_id``, ``minari_version``, ``data_format="hdf5"``, ``jpeg_encoding=false``,
``observation_space``/``action_space`` (its JSON space format), ``total_episodes``/``total_steps``.

Crash safety. :class:`EpisodeWriter` writes ``<dataset>.partial/`` and renames it to ``<dataset>`` only
when closed without error. ``metadata.json`` is the commit record: after an episode has been written and
the HDF5 file closed, ``metadata.json`` is replaced atomically with the new episode count. Readers only
look at episodes ``0 .. total_episodes-1``, so an episode being written when the process dies is never
seen. An exception or Ctrl-C inside the writer removes the half-written group and leaves the partial
folder readable by :class:`DatasetReader`. (A SIGKILL during the few milliseconds of an episode write can
in principle damage the HDF5 file's internal structures; a kill at any other time loses nothing.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from gymnasium import spaces

from sfv_world.datasets.spaces import (
    SpaceSerialisationError,
    action_storage_dtype,
    action_storage_shape,
    actions_outside_space,
    deserialize_space,
    serialize_space,
)

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
# The Minari dataset-format version whose layout we follow; Minari refuses versions it does not know.
MINARI_FORMAT_VERSION = "0.5.4"
DATA_DIR = "data"
MAIN_FILE = "main_data.hdf5"
METADATA_FILE = "metadata.json"
PARTIAL_SUFFIX = ".partial"
FIELDS = ("observations", "actions", "rewards", "terminations", "truncations")
DEFAULT_CHUNK_FRAMES = 32


class DatasetError(ValueError):
    """A dataset on disk is missing, corrupt or inconsistent.

    ``file``, ``episode`` and ``field`` say where; the message always names those that apply.
    """

    def __init__(self, file: str | os.PathLike, problem: str, *, episode: int | None = None,
                 field: str | None = None):
        self.file = str(file)
        self.episode = episode
        self.field = field
        self.problem = problem
        where = [self.file]
        if episode is not None:
            where.append(f"episode {episode}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {problem}")


@dataclass
class Episode:
    """One episode of T transitions, as stored.

    observations: uint8 [T+1, H, W, C]; actions: int64 [T] (Discrete), int64 [T, k] (MultiDiscrete) or
    float32 [T, k] (Box); rewards: float32 [T]; terminations, truncations: bool [T].
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    id: int = -1
    seed: int | None = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


# ----------------------------------------------------------------------------------------------------
# Shared checks (writer and reader)


def expected_field_layout(action_space: spaces.Space, frame_shape: tuple[int, int, int],
                          num_steps: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Field -> (dtype, shape) for an episode of ``num_steps`` transitions."""
    return {
        "observations": (np.dtype(np.uint8), (num_steps + 1, *frame_shape)),
        "actions": (action_storage_dtype(action_space), (num_steps, *action_storage_shape(action_space))),
        "rewards": (np.dtype(np.float32), (num_steps,)),
        "terminations": (np.dtype(np.bool_), (num_steps,)),
        "truncations": (np.dtype(np.bool_), (num_steps,)),
    }


def _layout_problems(arrays: Mapping[str, Any], action_space: spaces.Space,
                     frame_shape: tuple[int, int, int]) -> tuple[str, str] | None:
    """First (field, problem) where ``arrays`` (numpy arrays or h5py datasets) break the layout."""
    if "rewards" not in arrays:
        return "rewards", "missing"
    rewards_shape = tuple(arrays["rewards"].shape)
    if len(rewards_shape) != 1:
        return "rewards", f"expected shape [T], got {list(rewards_shape)}"
    num_steps = rewards_shape[0]
    if num_steps < 1:
        return "rewards", "empty episode (T = 0 transitions)"
    for field, (dtype, shape) in expected_field_layout(action_space, frame_shape, num_steps).items():
        if field not in arrays:
            return field, "missing"
        arr = arrays[field]
        if arr.dtype != dtype:
            return field, f"wrong dtype {arr.dtype} (expected {dtype})"
        if tuple(arr.shape) != shape:
            if len(arr.shape) == len(shape) and arr.shape[1:] == shape[1:]:
                return field, (f"length {arr.shape[0]} does not match {num_steps} transitions "
                               f"(rewards has {num_steps}; expected {shape[0]})")
            return field, f"wrong shape {list(arr.shape)} (expected {list(shape)})"
    return None


def _value_problems(ep: Episode, action_space: spaces.Space) -> tuple[str, str] | None:
    """First (field, problem) in the values of a loaded episode."""
    bad = np.flatnonzero(actions_outside_space(ep.actions, action_space))
    if bad.size:
        return "actions", (f"{bad.size} action(s) outside the recorded action space {action_space} "
                           f"(first at step {bad[0]}: {ep.actions[bad[0]].tolist()})")
    if not np.all(np.isfinite(ep.rewards)):
        return "rewards", f"non-finite reward at step {int(np.flatnonzero(~np.isfinite(ep.rewards))[0])}"
    term = np.asarray(ep.terminations, bool)
    revived = np.flatnonzero(term[:-1] & ~term[1:])
    if revived.size:
        return "terminations", (f"step {int(revived[0])} is terminal but step {int(revived[0]) + 1} is not "
                                f"(a terminal tail must run to the episode's end)")
    early = np.flatnonzero(ep.truncations[:-1])
    if early.size:
        return "truncations", f"episode ends at step {int(early[0])} but continues to step {len(ep) - 1}"
    return None


def live_steps(terminations: np.ndarray) -> int:
    """Steps up to and including the real termination: the index of the first True of
    ``terminations`` (bool [T]) plus one, or T when the episode never terminates. Steps after it are
    the terminal tail; frames 0 .. live_steps-1 are the states the policy acted in before the end."""
    term = np.asarray(terminations, bool)
    return int(np.argmax(term)) + 1 if term.any() else int(term.shape[0])


def dataset_id_for(path: Path) -> str:
    """A Minari-style dataset id (``sfv_world/<name>-vN``) from a dataset folder name (-v0 appended
    unless the name ends in a version already)."""
    name = "".join(ch if (ch.isalnum() or ch in "-_") else "_" for ch in path.name) or "dataset"
    return f"sfv_world/{name}" if re.search(r"-v\d+$", name) else f"sfv_world/{name}-v0"


def _atomic_write_json(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dir_size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 1)


def partial_path_for(path: str | os.PathLike) -> Path:
    """Where :class:`EpisodeWriter` writes ``path`` until it is complete: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


# ----------------------------------------------------------------------------------------------------
# Writer


def _open_for_append(path: Path, wait_s: float = 60.0) -> h5py.File:
    """Open the writer's HDF5 file for appending, waiting up to ``wait_s`` seconds while another process
    holds HDF5's file lock (e.g. ``sfv-world inspect`` of a ``.partial`` dataset): a reader must never
    end a collection."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return h5py.File(path, "a", track_order=True)
        except BlockingIOError as e:
            if time.monotonic() > deadline:
                raise BlockingIOError(e.errno, f"{path} stayed locked by another process for {wait_s:.0f} s; "
                                               f"close its readers and resume the collection") from e
            time.sleep(0.05)


class EpisodeWriter:
    """Crash-safe writer of one new dataset (use as a context manager).

    Episodes are written into ``<path>.partial/`` as they finish; each is flushed to disk (HDF5 file
    closed, ``metadata.json`` atomically replaced) before :meth:`add_episode` returns. Leaving the
    ``with`` block normally renames the folder to ``path``; an exception or KeyboardInterrupt keeps the
    partial folder, readable with :class:`DatasetReader`, and says where it is.

    Args:
        path: final dataset folder. Must not exist unless ``overwrite`` (then it is replaced at the end).
        action_space: Discrete, Box or MultiDiscrete space of the recorded actions.
        frame_shape: (H, W, C) of every stored frame.
        env_id: id of the environment that produced the data.
        env_spec: ``EnvSpec.to_json()`` string, stored as Minari's ``env_spec`` when given.
        info: JSON-able facts stored in ``metadata["sfv_world"]`` (policy, seed, frame source, ...).
        algorithm_name: Minari's name for the collecting policy.
        overwrite: replace an existing dataset (and a leftover ``.partial`` folder).
        chunk_frames: frames per HDF5 chunk of ``observations`` (chunks never span episodes).
        compression_level: gzip level (1 = fast; 0 disables compression).
    """

    def __init__(self, path: str | os.PathLike, *, action_space: spaces.Space,
                 frame_shape: tuple[int, int, int], env_id: str | None = None,
                 env_spec: str | None = None, info: Mapping[str, Any] | None = None,
                 algorithm_name: str | None = None, overwrite: bool = False,
                 chunk_frames: int = DEFAULT_CHUNK_FRAMES, compression_level: int = 1):
        self.path = Path(path)
        self.temp_path = partial_path_for(self.path)
        if len(tuple(frame_shape)) != 3 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape must be (H, W, C) with positive sizes, got {frame_shape!r}")
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.action_space = action_space
        serialize_space(action_space)  # fail now on an unsupported space
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.chunk_frames = int(chunk_frames)
        self.compression_level = int(compression_level)
        self.overwrite = overwrite
        self.num_episodes = 0
        self.num_transitions = 0
        self._closed = False
        self._check_destination()
        if self.temp_path.exists():
            shutil.rmtree(self.temp_path)
        (self.temp_path / DATA_DIR).mkdir(parents=True)
        self._file = self.temp_path / DATA_DIR / MAIN_FILE
        with h5py.File(self._file, "w", track_order=True):
            pass
        from sfv_world import __version__

        self._metadata: dict[str, Any] = {
            "dataset_id": dataset_id_for(self.path),
            "total_episodes": 0,
            "total_steps": 0,
            "data_format": "hdf5",
            "jpeg_encoding": False,
            "observation_space": serialize_space(
                spaces.Box(0, 255, shape=self.frame_shape, dtype=np.uint8)),
            "action_space": serialize_space(action_space),
            "minari_version": MINARI_FORMAT_VERSION,
            "dataset_size": 0.0,
            "sfv_world": {
                "schema_version": SCHEMA_VERSION,
                "version": __version__,
                "env_id": env_id,
                "frame_shape": list(self.frame_shape),
                "complete": False,
                "observations_chunk_frames": self.chunk_frames,
                "compression": f"gzip-{self.compression_level}" if self.compression_level else "none",
                **dict(info or {}),
            },
        }
        if env_spec is not None:
            self._metadata["env_spec"] = env_spec
        if algorithm_name is not None:
            self._metadata["algorithm_name"] = algorithm_name
        self._commit()

    def _check_destination(self) -> None:
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"dataset {self.path} already exists (pass overwrite=True to replace it)")
        if self.temp_path.exists() and not self.overwrite:
            raise FileExistsError(
                f"{self.temp_path} holds a partial dataset from an interrupted collection; read it with "
                f"DatasetReader('{self.temp_path}'), move or delete it, or pass overwrite=True")

    def _commit(self) -> None:
        self._metadata["total_episodes"] = self.num_episodes
        self._metadata["total_steps"] = self.num_transitions
        self._metadata["dataset_size"] = _dir_size_mb(self.temp_path)
        _atomic_write_json(self.temp_path / DATA_DIR / METADATA_FILE, self._metadata)

    def add_episode(self, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                    terminations: np.ndarray, truncations: np.ndarray, seed: int | None = None) -> int:
        """Append and flush one finished episode; returns its id.

        Shapes/dtypes as in :class:`Episode` (inputs are converted: actions to the storage dtype, rewards
        to float32, flags to bool). Raises ValueError naming the field if they do not fit.
        """
        if self._closed:
            raise RuntimeError(f"EpisodeWriter for {self.path} is closed")
        arrays = {
            "observations": np.ascontiguousarray(observations),
            "actions": np.asarray(actions),
            "rewards": np.asarray(rewards, dtype=np.float32),
            "terminations": np.asarray(terminations, dtype=bool),
            "truncations": np.asarray(truncations, dtype=bool),
        }
        store_dtype = action_storage_dtype(self.action_space)
        if arrays["actions"].dtype != store_dtype:
            if store_dtype.kind == "i" and arrays["actions"].dtype.kind not in "iub":
                raise ValueError(f"add_episode: field 'actions' has dtype {arrays['actions'].dtype}, "
                                 f"expected integers for {self.action_space}")
            arrays["actions"] = arrays["actions"].astype(store_dtype)
        if action_storage_shape(self.action_space) and arrays["actions"].ndim >= 1:
            # Box / MultiDiscrete: [T, *shape] -> [T, k] (a scalar Box gives [T] -> [T, 1])
            arrays["actions"] = arrays["actions"].reshape(arrays["actions"].shape[0], -1)
        problem = _layout_problems(arrays, self.action_space, self.frame_shape)
        if problem is None:
            problem = _value_problems(Episode(**arrays), self.action_space)
        if problem is not None:
            raise ValueError(f"add_episode (episode {self.num_episodes}): field '{problem[0]}': {problem[1]}")
        eid = self.num_episodes
        num_steps = int(arrays["rewards"].shape[0])
        with _open_for_append(self._file) as f:
            name = f"episode_{eid}"
            try:
                group = f.create_group(name)
                group.attrs["id"] = eid
                group.attrs["total_steps"] = num_steps
                if seed is not None:
                    group.attrs["seed"] = int(seed)
                self._write_fields(group, arrays)
                f.flush()
            except BaseException:
                if name in f:
                    del f[name]
                raise
        self.num_episodes += 1
        self.num_transitions += num_steps
        self._commit()
        return eid

    def _write_fields(self, group: h5py.Group, arrays: Mapping[str, np.ndarray]) -> None:
        comp = {"compression": "gzip", "compression_opts": self.compression_level} if self.compression_level else {}
        obs = arrays["observations"]
        group.create_dataset("observations", data=obs,
                             chunks=(min(self.chunk_frames, obs.shape[0]), *obs.shape[1:]), **comp)
        for field in FIELDS[1:]:
            # Minari appends to these with resize(), so they are chunked and resizable like its own.
            data = arrays[field]
            group.create_dataset(field, data=data, chunks=True, maxshape=(None, *data.shape[1:]))

    def close(self) -> Path:
        """Mark the dataset complete and move it to its final name; returns that path."""
        if self._closed:
            return self.path
        self._metadata["sfv_world"]["complete"] = True
        self._commit()
        old = None
        if self.path.exists():
            if not self.overwrite:
                raise FileExistsError(f"dataset {self.path} appeared while writing; the data is in {self.temp_path}")
            old = self.path.with_name(self.path.name + ".replaced")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.path, old)  # the old dataset goes only once the new one is in place
        os.replace(self.temp_path, self.path)
        if old is not None:
            shutil.rmtree(old)
        self._closed = True
        return self.path

    def abort(self) -> Path:
        """Stop without finishing: the partial folder stays, readable. Returns its path."""
        self._closed = True
        return self.temp_path

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        where = self.abort()
        note = (f"sfv-world: collection interrupted; {self.num_episodes} finished episode(s) "
                f"({self.num_transitions} transitions) are readable in {where}")
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # Python 3.10
            print(note, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# Reader


def _resolve_dataset_root(path: Path) -> Path:
    if path.name == DATA_DIR and (path / METADATA_FILE).exists():
        return path.parent
    return path


class DatasetReader:
    """Validating reader of a dataset folder (or of its ``.partial`` folder after a crash).

    On open it checks ``metadata.json`` (present, valid JSON, known schema version, deserialisable
    spaces) and the structure of every episode (groups and fields present, dtypes, shapes, lengths).
    :meth:`load_episode` also checks the values (actions inside the action space, finite rewards, no
    early end) before returning them. Every problem raises :class:`DatasetError` naming the file, the
    episode and the field.

    The HDF5 file is opened lazily and re-opened in a new process (after ``fork`` or when unpickled),
    so a reader can be shared with DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _resolve_dataset_root(Path(path))
        self.metadata_file = self.path / DATA_DIR / METADATA_FILE
        self.data_file = self.path / DATA_DIR / MAIN_FILE
        self._h5: h5py.File | None = None
        self._h5_pid: int | None = None
        if not self.path.is_dir():
            raise DatasetError(self.path, "dataset folder does not exist")
        self.metadata: dict[str, Any] = self._read_metadata()
        self._parse_metadata()
        self._check_structure()

    # -- metadata -------------------------------------------------------------------------------------
    def _read_metadata(self) -> dict[str, Any]:
        if not self.metadata_file.is_file():
            raise DatasetError(self.metadata_file, "missing metadata.json")
        try:
            with open(self.metadata_file) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(self.metadata_file, f"invalid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise DatasetError(self.metadata_file, "expected a JSON object")
        return meta

    def _meta_error(self, key: str, problem: str) -> DatasetError:
        return DatasetError(self.metadata_file, problem, field=key)

    def _parse_metadata(self) -> None:
        meta = self.metadata
        sfv = meta.get("sfv_world")
        if not isinstance(sfv, dict):
            raise self._meta_error("sfv_world", "missing or not an object (not an sfv-world dataset?)")
        version = sfv.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise self._meta_error("sfv_world.schema_version",
                                   f"unknown schema version {version!r} (this sfv-world reads "
                                   f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})")
        for key in ("action_space", "observation_space"):
            if key not in meta:
                raise self._meta_error(key, "missing")
        try:
            self.action_space: spaces.Space = deserialize_space(meta["action_space"])
            action_storage_dtype(self.action_space)
        except SpaceSerialisationError as e:
            raise self._meta_error("action_space", str(e)) from e
        try:
            obs_space = deserialize_space(meta["observation_space"])
        except SpaceSerialisationError as e:
            raise self._meta_error("observation_space", str(e)) from e
        if not (isinstance(obs_space, spaces.Box) and obs_space.dtype == np.uint8 and len(obs_space.shape) == 3):
            raise self._meta_error("observation_space", f"expected a uint8 Box of shape (H, W, C), got {obs_space}")
        self.frame_shape: tuple[int, int, int] = tuple(int(s) for s in obs_space.shape)  # type: ignore[assignment]
        total = meta.get("total_episodes")
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise self._meta_error("total_episodes", f"expected a non-negative integer, got {total!r}")
        if meta.get("data_format", "hdf5") != "hdf5":
            raise self._meta_error("data_format", f"expected 'hdf5', got {meta.get('data_format')!r}")
        if meta.get("jpeg_encoding", False):
            raise self._meta_error("jpeg_encoding", "JPEG-encoded frames are not supported (frames must be raw)")
        self.episode_ids: list[int] = list(range(total))

    # -- HDF5 -----------------------------------------------------------------------------------------
    @property
    def h5(self) -> h5py.File:
        """The open HDF5 file of this process (opened on first use)."""
        if self._h5 is None or self._h5_pid != os.getpid():
            if not self.data_file.is_file():
                raise DatasetError(self.data_file, "missing main_data.hdf5")
            try:
                self._h5 = h5py.File(self.data_file, "r", rdcc_nbytes=16 * 2**20)
            except OSError as e:
                if "unable to lock" in str(e).lower():
                    raise DatasetError(self.data_file, f"the file is locked by another process (is a collector "
                                       f"still writing it?) ({e})") from e
                raise DatasetError(self.data_file, f"truncated or corrupt HDF5 file ({e})") from e
            self._h5_pid = os.getpid()
        return self._h5

    def _group(self, eid: int) -> h5py.Group:
        name = f"episode_{eid}"
        try:
            group = self.h5.get(name)
        except (OSError, RuntimeError, KeyError) as e:
            raise DatasetError(self.data_file, f"corrupt episode group ({e})", episode=eid) from e
        if not isinstance(group, h5py.Group):
            raise DatasetError(self.data_file, f"missing group '{name}'", episode=eid)
        return group

    def _check_structure(self) -> None:
        self.episode_lengths: dict[int, int] = {}
        for eid in self.episode_ids:
            group = self._group(eid)
            try:
                fields = {k: v for k, v in group.items() if isinstance(v, h5py.Dataset)}
            except (OSError, RuntimeError, KeyError) as e:
                raise DatasetError(self.data_file, f"corrupt episode group ({e})", episode=eid) from e
            problem = _layout_problems(fields, self.action_space, self.frame_shape)
            if problem is not None:
                raise DatasetError(self.data_file, problem[1], episode=eid, field=problem[0])
            num_steps = int(fields["rewards"].shape[0])
            recorded = group.attrs.get("total_steps")
            if recorded is not None and int(recorded) != num_steps:
                raise DatasetError(self.data_file, f"attribute total_steps={int(recorded)} but the fields "
                                   f"hold {num_steps} transitions", episode=eid, field="total_steps")
            self.episode_lengths[eid] = num_steps
        self.num_transitions: int = sum(self.episode_lengths.values())
        recorded_total = self.metadata.get("total_steps")
        if recorded_total is not None and recorded_total != self.num_transitions:
            raise self._meta_error("total_steps", f"says {recorded_total} transitions, the episodes hold "
                                   f"{self.num_transitions}")

    # -- public API -----------------------------------------------------------------------------------
    @property
    def env_id(self) -> str | None:
        return self.metadata["sfv_world"].get("env_id")

    @property
    def complete(self) -> bool:
        """False for the ``.partial`` folder of an interrupted collection."""
        return bool(self.metadata["sfv_world"].get("complete", False))

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ids)

    @property
    def num_frames(self) -> int:
        """Stored frames: sum over episodes of T+1."""
        return self.num_transitions + self.num_episodes

    def _check_id(self, eid: int) -> None:
        if eid not in self.episode_lengths:
            raise KeyError(f"{self.path}: no episode {eid} (episodes 0..{self.num_episodes - 1})")

    def _read_field(self, eid: int, field: str, sel: Any = ()) -> np.ndarray:
        try:
            return self._group(eid)[field][sel]
        except (OSError, RuntimeError, ValueError) as e:
            raise DatasetError(self.data_file, f"unreadable data, the file is truncated or corrupt ({e})",
                               episode=eid, field=field) from e

    def read_frames(self, eid: int, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` of episode ``eid``: uint8 [stop-start, H, W, C] (reads only their chunks)."""
        self._check_id(eid)
        return self._read_field(eid, "observations", np.s_[start:stop])

    def load_episode(self, eid: int, *, observations: bool = True) -> Episode:
        """Load and validate episode ``eid``. With ``observations=False`` the frames are an empty
        uint8 [0, H, W, C] array (fast access to actions/rewards)."""
        self._check_id(eid)
        fields = {f: self._read_field(eid, f) for f in FIELDS[1:]}
        if observations:
            fields["observations"] = self._read_field(eid, "observations")
        else:
            fields["observations"] = np.zeros((0, *self.frame_shape), np.uint8)
        seed = self._group(eid).attrs.get("seed")
        ep = Episode(**fields, id=eid, seed=None if seed is None else int(seed))
        problem = _value_problems(ep, self.action_space)
        if problem is not None:
            raise DatasetError(self.data_file, problem[1], episode=eid, field=problem[0])
        return ep

    def validate(self) -> None:
        """Load every episode (all values checked); raises :class:`DatasetError` on the first problem."""
        for eid in self.episode_ids:
            self.load_episode(eid)

    def close(self) -> None:
        if self._h5 is not None and self._h5_pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_h5_pid"] = None
        return state

    def __repr__(self) -> str:
        return (f"DatasetReader('{self.path}', episodes={self.num_episodes}, "
                f"transitions={self.num_transitions}, frame_shape={self.frame_shape}, "
                f"action_space={self.action_space})")


def dataset_size_bytes(reader: DatasetReader, frame_size: int | None = None) -> int:
    """Bytes the frames of ``reader`` take decoded in RAM (at ``frame_size`` x ``frame_size`` if given)."""
    h, w, c = reader.frame_shape
    if frame_size is not None:
        h = w = frame_size
    return reader.num_frames * h * w * c

