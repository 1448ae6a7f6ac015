"""Dataset format, reader validation, Minari compatibility, area resize, clips and splits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from gymnasium import spaces

from sfv_world.datasets import (
    DatasetError,
    DatasetReader,
    EpisodeWriter,
    area_resize,
    area_resize_reference,
    partial_path_for,
)
from sfv_world.datasets.clips import ClipDataset, split_episodes
from sfv_world.datasets.format import DATA_DIR, MAIN_FILE, METADATA_FILE

FRAME = (12, 16, 3)
LENGTHS = [5, 9, 3, 12]


def make_episode(eid: int, num_steps: int, space: spaces.Space, rng: np.random.Generator) -> dict:
    """Frames encode (episode, t): pixel [0, 0, 0] = episode, [0, 0, 1] = t, so windows are traceable."""
    obs = rng.integers(0, 256, (num_steps + 1, *FRAME), dtype=np.uint8)
    obs[:, 0, 0, 0] = eid
    obs[:, 0, 0, 1] = np.arange(num_steps + 1)
    if isinstance(space, spaces.Discrete):
        actions = rng.integers(space.start, space.start + space.n, num_steps)
    elif isinstance(space, spaces.Box):
        actions = rng.uniform(space.low, space.high, (num_steps, *space.shape)).astype(np.float32)
    else:
        actions = rng.integers(0, space.nvec, (num_steps, len(space.nvec)))
    terms = np.zeros(num_steps, bool)
    truncs = np.zeros(num_steps, bool)
    (terms if eid % 2 == 0 else truncs)[-1] = True
    return {"observations": obs, "actions": actions, "rewards": rng.normal(size=num_steps).astype(np.float32),
            "terminations": terms, "truncations": truncs}


def write_dataset(path: Path, space: spaces.Space = spaces.Discrete(4), lengths=LENGTHS, **kw) -> list[dict]:
    rng = np.random.default_rng(0)
    eps = [make_episode(i, n, space, rng) for i, n in enumerate(lengths)]
    with EpisodeWriter(path, action_space=space, frame_shape=FRAME, env_id="Fake-v0",
                       info={"policy": {"name": "test"}}, **kw) as w:
        for i, ep in enumerate(eps):
            w.add_episode(**ep, seed=100 + i)
    return eps


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[dict]]:
    path = tmp_path / "ds"
    return path, write_dataset(path)


# ------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("space", [spaces.Discrete(4), spaces.Discrete(3, start=-1),
                                   spaces.Box(-1.0, 2.0, (2,), np.float32), spaces.Box(0.0, 1.0, (2, 2), np.float32),
                                   spaces.MultiDiscrete([3, 5])],
                         ids=["discrete", "discrete-start", "box", "box-2d", "multidiscrete"])
def test_round_trip(tmp_path: Path, space: spaces.Space) -> None:
    eps = write_dataset(tmp_path / "ds", space)
    r = DatasetReader(tmp_path / "ds")
    assert r.complete and r.env_id == "Fake-v0"
    assert r.frame_shape == FRAME
    assert r.action_space == space
    assert r.episode_ids == [0, 1, 2, 3]
    assert r.episode_lengths == dict(enumerate(LENGTHS))
    assert r.num_transitions == sum(LENGTHS)
    assert r.metadata["sfv_world"]["schema_version"] == 1
    assert r.metadata["sfv_world"]["policy"] == {"name": "test"}
    for i, ep in enumerate(eps):
        got = r.load_episode(i)
        assert got.seed == 100 + i and len(got) == LENGTHS[i]
        for field, value in ep.items():
            arr = getattr(got, field)
            np.testing.assert_array_equal(arr, np.asarray(value).reshape(arr.shape))
        assert got.observations.dtype == np.uint8
        assert got.actions.dtype == (np.float32 if isinstance(space, spaces.Box) else np.int64)
        assert got.rewards.dtype == np.float32 and got.terminations.dtype == bool
    np.testing.assert_array_equal(r.read_frames(3, 4, 7), eps[3]["observations"][4:7])
    assert r.load_episode(1, observations=False).observations.shape == (0, *FRAME)


def test_layout_and_compression(dataset) -> None:
    path, _ = dataset
    assert sorted(p.name for p in path.iterdir()) == [DATA_DIR]
    assert sorted(p.name for p in (path / DATA_DIR).iterdir()) == [MAIN_FILE, METADATA_FILE]
    with h5py.File(path / DATA_DIR / MAIN_FILE) as f:
        obs = f["episode_3/observations"]
        assert obs.compression == "gzip" and obs.compression_opts == 1
        assert obs.chunks == (13, *FRAME)  # one chunk per episode here (13 frames <= 32)
        assert f["episode_3"].attrs["total_steps"] == 12


def test_reader_accepts_data_folder(dataset) -> None:
    path, _ = dataset
    assert DatasetReader(path / DATA_DIR).path == path


def test_writer_refuses_existing_dataset(dataset) -> None:
    path, _ = dataset
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        write_dataset(path)
    write_dataset(path, lengths=[2, 2], overwrite=True)
    assert DatasetReader(path).num_episodes == 2


def test_writer_exception_keeps_finished_episodes(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="boom") as info:
        with EpisodeWriter(path, action_space=spaces.Discrete(4), frame_shape=FRAME) as w:
            w.add_episode(**make_episode(0, 4, spaces.Discrete(4), rng))
            w.add_episode(**make_episode(1, 6, spaces.Discrete(4), rng))
            raise RuntimeError("boom")
    partial = partial_path_for(path)
    assert not path.exists() and partial.is_dir()
    assert str(partial) in "\n".join(getattr(info.value, "__notes__", []))
    r = DatasetReader(partial)
    assert not r.complete and r.episode_lengths == {0: 4, 1: 6}
    r.validate()
    # a leftover partial folder blocks a new collection unless overwrite
    with pytest.raises(FileExistsError, match="partial dataset from an interrupted collection"):
        EpisodeWriter(path, action_space=spaces.Discrete(4), frame_shape=FRAME)


def test_writer_waits_for_a_reader_holding_the_file_lock(tmp_path: Path) -> None:
    """Another process reading the .partial file (``sfv-world inspect`` during a collection) holds HDF5's
    lock; the writer waits for it instead of ending the collection."""
    import subprocess
    import sys

    path = tmp_path / "ds"
    rng = np.random.default_rng(0)
    with EpisodeWriter(path, action_space=spaces.Discrete(4), frame_shape=FRAME) as w:
        w.add_episode(**make_episode(0, 4, spaces.Discrete(4), rng))
        main = partial_path_for(path) / DATA_DIR / MAIN_FILE
        holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(main)!r}, 'r'); "
                                   "print('open', flush=True); time.sleep(1.5)"], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "open"
            with pytest.raises(BlockingIOError):  # really locked: h5py refuses to open it for writing
                h5py.File(main, "a").close()
            w.add_episode(**make_episode(1, 6, spaces.Discrete(4), rng))  # waits until the reader exits
        finally:
            holder.wait(timeout=30)
    assert DatasetReader(path).episode_lengths == {0: 4, 1: 6}


@pytest.mark.parametrize("field,bad,message", [
    ("actions", np.full(4, 9), r"field .actions.: 4 action\(s\) outside the recorded action space Discrete\(4\) \(first at step 0: 9\)"),
    ("observations", np.zeros((5, 12, 16, 1), np.uint8), "field 'observations'.*shape"),
    ("rewards", np.zeros(3), "field 'observations'.*length"),
    ("terminations", np.array([1, 0, 0, 1], bool), "field 'terminations': step 0 is terminal but step 1 is not"),
    ("terminations", np.array([0, 1, 0, 0], bool), "field 'terminations': step 1 is terminal but step 2 is not"),
    ("truncations", np.array([0, 1, 0, 1], bool), "field 'truncations'.*ends at step 1"),
])
def test_writer_rejects_bad_episode(tmp_path: Path, field, bad, message) -> None:
    ep = make_episode(0, 4, spaces.Discrete(4), np.random.default_rng(0))
    ep[field] = bad
    with EpisodeWriter(tmp_path / "ds", action_space=spaces.Discrete(4), frame_shape=FRAME) as w:
        with pytest.raises(ValueError, match=message):
            w.add_episode(**ep)
    assert DatasetReader(tmp_path / "ds").num_episodes == 0


# ------------------------------------------------------------------------------------------------
# reader validation: every error names the file, the episode and the field


def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def _h5_edit(path: Path, edit) -> None:
    with h5py.File(path / DATA_DIR / MAIN_FILE, "a") as f:
        edit(f)


BAD_H5 = {
    "missing field": (lambda f: f.__delitem__("episode_2/actions"), 2, "actions", "missing"),
    "mismatched length": (lambda f: _replace(f, "episode_1/actions", np.zeros(10, np.int64)), 1, "actions",
                          "length 10 does not match 9 transitions"),
    "wrong dtype (actions)": (lambda f: _replace(f, "episode_1/actions", np.zeros(9, np.float64)), 1, "actions",
                              "wrong dtype float64"),
    "wrong dtype (frames)": (lambda f: _replace(f, "episode_3/observations", np.zeros((13, *FRAME), np.float32)),
                             3, "observations", "wrong dtype float32"),
    "wrong shape (frames)": (lambda f: _replace(f, "episode_0/observations", np.zeros((6, 12, 16), np.uint8)),
                             0, "observations", r"wrong shape \[6, 12, 16\]"),
    "wrong flag dtype": (lambda f: _replace(f, "episode_0/terminations", np.zeros(5, np.int8)), 0,
                         "terminations", "wrong dtype int8"),
    "missing episode": (lambda f: f.__delitem__("episode_3"), 3, None, "missing group 'episode_3'"),
    "total_steps attribute": (lambda f: f["episode_2"].attrs.__setitem__("total_steps", 7), 2, "total_steps",
                              "total_steps=7"),
}


@pytest.mark.parametrize("case", list(BAD_H5), ids=list(BAD_H5))
def test_reader_rejects_bad_structure(dataset, case) -> None:
    path, _ = dataset
    edit, episode, field, message = BAD_H5[case]
    _h5_edit(path, edit)
    with pytest.raises(DatasetError, match=message) as info:
        DatasetReader(path)
    err = info.value
    assert err.episode == episode and err.field == field
    assert MAIN_FILE in str(err) and f"episode {episode}" in str(err)
    if field:
        assert f"field '{field}'" in str(err)


BAD_VALUES = {
    "action outside space": (lambda f: _replace(f, "episode_1/actions", np.full(9, 4, np.int64)), 1, "actions",
                             r"9 action\(s\) outside the recorded action space Discrete\(4\)"),
    "negative action": (lambda f: f["episode_2/actions"].__setitem__(1, -1), 2, "actions", "first at step 1"),
    "early termination": (lambda f: f["episode_3/terminations"].__setitem__(4, True), 3, "terminations",
                          "step 4 is terminal but step 5 is not"),
    "non-finite reward": (lambda f: f["episode_0/rewards"].__setitem__(2, np.nan), 0, "rewards", "non-finite"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES), ids=list(BAD_VALUES))
def test_reader_rejects_bad_values(dataset, case) -> None:
    path, _ = dataset
    edit, episode, field, message = BAD_VALUES[case]
    _h5_edit(path, edit)
    r = DatasetReader(path)  # structure is fine; values are checked before data is returned
    for other in set(r.episode_ids) - {episode}:
        r.load_episode(other)
    with pytest.raises(DatasetError, match=message) as info:
        r.load_episode(episode)
    assert (info.value.episode, info.value.field) == (episode, field)
    assert f"{MAIN_FILE}: episode {episode}: field '{field}'" in str(info.value)
    with pytest.raises(DatasetError):
        r.validate()


def test_reader_rejects_box_action_out_of_bounds(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", spaces.Box(-1.0, 1.0, (2,), np.float32))
    _h5_edit(tmp_path / "ds", lambda f: f["episode_2/actions"].__setitem__(0, [0.5, 3.0]))
    with pytest.raises(DatasetError, match="episode 2: field 'actions'.*outside"):
        DatasetReader(tmp_path / "ds").load_episode(2)


def test_reader_rejects_truncated_file(dataset) -> None:
    path, _ = dataset
    data = path / DATA_DIR / MAIN_FILE
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DatasetError, match="truncated or corrupt") as info:
        DatasetReader(path)
    assert str(data) in str(info.value)


def test_reader_rejects_corrupt_chunk(dataset) -> None:
    path, _ = dataset
    data = path / DATA_DIR / MAIN_FILE
    with h5py.File(data) as f:
        chunk = f["episode_1/observations"].id.get_chunk_info(0)
    with open(data, "r+b") as f:  # overwrite the middle of episode 1's compressed frames
        f.seek(chunk.byte_offset + chunk.size // 4)
        f.write(b"\xff" * (chunk.size // 2))
    r = DatasetReader(path)
    r.load_episode(0)
    with pytest.raises(DatasetError, match="unreadable data") as info:
        r.load_episode(1)
    assert (info.value.episode, info.value.field) == (1, "observations")
    assert str(data) in str(info.value)


def _edit_meta(path: Path, edit) -> Path:
    meta_file = path / DATA_DIR / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    return meta_file


BAD_META = {
    "unknown schema": (lambda m: m["sfv_world"].__setitem__("schema_version", 99), "sfv_world.schema_version",
                       "unknown schema version 99"),
    "no sfv_world section": (lambda m: m.pop("sfv_world"), "sfv_world", "not an sfv-world dataset"),
    "missing action space": (lambda m: m.pop("action_space"), "action_space", "missing"),
    "bad action space": (lambda m: m.__setitem__("action_space", '{"type": "Graph"}'), "action_space",
                         "unsupported space type 'Graph'"),
    "bad observation space": (lambda m: m.__setitem__("observation_space", '{"type": "Discrete", "n": 3}'),
                              "observation_space", "uint8 Box"),
    "bad episode count": (lambda m: m.__setitem__("total_episodes", "four"), "total_episodes",
                          "non-negative integer"),
    "jpeg": (lambda m: m.__setitem__("jpeg_encoding", True), "jpeg_encoding", "JPEG"),
    "step count": (lambda m: m.__setitem__("total_steps", 3), "total_steps", "says 3 transitions"),
}


@pytest.mark.parametrize("case", list(BAD_META), ids=list(BAD_META))
def test_reader_rejects_bad_metadata(dataset, case) -> None:
    path, _ = dataset
    edit, field, message = BAD_META[case]
    meta_file = _edit_meta(path, edit)
    with pytest.raises(DatasetError, match=message) as info:
        DatasetReader(path)
    assert info.value.field == field
    assert str(meta_file) in str(info.value) and f"field '{field}'" in str(info.value)


def test_reader_rejects_missing_or_invalid_metadata(dataset) -> None:
    path, _ = dataset
    meta_file = path / DATA_DIR / METADATA_FILE
    meta_file.write_text("{not json")
    with pytest.raises(DatasetError, match="invalid JSON") as info:
        DatasetReader(path)
    assert str(meta_file) in str(info.value)
    meta_file.unlink()
    with pytest.raises(DatasetError, match="missing metadata.json"):
        DatasetReader(path)
    with pytest.raises(DatasetError, match="does not exist"):
        DatasetReader(path / "nowhere")


def test_reader_rejects_missing_data_file(dataset) -> None:
    path, _ = dataset
    (path / DATA_DIR / MAIN_FILE).unlink()
    with pytest.raises(DatasetError, match="missing main_data.hdf5"):
        DatasetReader(path)


# ------------------------------------------------------------------------------------------------
# Minari compatibility: Minari's own reader loads our dataset


def test_minari_reads_our_dataset(tmp_path: Path, monkeypatch) -> None:
    minari = pytest.importorskip("minari", reason="minari (test extra) is needed to prove compatibility")
    # place the dataset where minari.load_dataset looks: $MINARI_DATASETS_PATH/<dataset_id>/data
    path = tmp_path / "root" / "sfv_world" / "fake-v0"
    eps = write_dataset(path)
    ours = DatasetReader(path)
    assert ours.metadata["dataset_id"] == "sfv_world/fake-v0"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    by_id = minari.load_dataset("sfv_world/fake-v0")
    by_path = minari.MinariDataset(path / DATA_DIR)
    for mds in (by_id, by_path):
        assert mds.total_episodes == 4 and mds.total_steps == sum(LENGTHS)
        assert mds.action_space == spaces.Discrete(4)
        assert mds.observation_space == spaces.Box(0, 255, FRAME, np.uint8)
        for i, ep in enumerate(mds.iterate_episodes()):
            assert ep.id == i
            for field in ("observations", "actions", "rewards", "terminations", "truncations"):
                np.testing.assert_array_equal(getattr(ep, field), eps[i][field])
    assert list(by_id.storage.get_episode_metadata([2]))[0]["seed"] == 102
    assert "sfv_world/fake-v0" in minari.list_local_datasets()


# ------------------------------------------------------------------------------------------------
# area resize


@pytest.mark.parametrize("shape,size", [((210, 160, 3), 64), ((400, 600, 3), 64), ((7, 5, 1), 3),
                                        ((16, 16, 3), 16), ((9, 11, 2), (4, 7)), ((5, 6, 3), 8),
                                        ((2, 3, 13, 17, 3), 5)])
def test_area_resize_matches_reference(shape, size) -> None:
    x = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    got, ref = area_resize(x, size), area_resize_reference(x, size)
    h, w = (size, size) if isinstance(size, int) else size
    assert got.shape == ref.shape == (*shape[:-3], h, w, shape[-1]) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert np.array_equal(got, ref)  # both are exact integer area sums: they agree bit for bit


def test_area_resize_by_hand() -> None:
    # width 3 -> 2: output pixel 0 = (1 * 0 + 0.5 * 90) / 1.5 = 30, pixel 1 = (0.5 * 90 + 1 * 180) / 1.5 = 150
    x = np.array([[0, 90, 180]], np.uint8)[:, :, None].repeat(2, axis=0)  # [2, 3, 1]
    assert area_resize(x, (1, 2))[..., 0].tolist() == [[30, 150]]
    assert area_resize_reference(x, (1, 2))[..., 0].tolist() == [[30, 150]]
    # integer factor: plain 2x2 block means, rounded half up
    y = np.array([[1, 2], [3, 5]], np.uint8)[:, :, None]
    assert area_resize(y, 1).item() == 3  # 11 / 4 = 2.75
    const = np.full((37, 53, 3), 200, np.uint8)
    assert np.all(area_resize(const, 16) == 200)
    batch = np.random.default_rng(1).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    assert np.array_equal(area_resize(batch, 8)[2], area_resize(batch[2], 8))


def test_area_resize_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        area_resize(np.zeros((8, 8, 3), np.float32), 4)
    with pytest.raises(ValueError, match="H, W, C"):
        area_resize(np.zeros((8, 8), np.uint8), 4)
    with pytest.raises(ValueError, match="size must be positive"):
        area_resize(np.zeros((8, 8, 3), np.uint8), 0)


# ------------------------------------------------------------------------------------------------
# clips and splits


def _check_item(item: dict, eps: list[dict], T: int, pad_mode: str = "repeat") -> None:
    e, s = int(item["episode"]), int(item["start"])
    frames = item["frames"].numpy().transpose(0, 2, 3, 1)
    assert item["frames"].dtype == torch.uint8 and item["frames"].shape == (T, 3, *FRAME[:2])
    assert item["mask"].shape == (T,) and item["actions"].shape == (T - 1,)
    ep = eps[e]
    pad = max(-s, 0)
    assert item["mask"].tolist() == [False] * pad + [True] * (T - pad)
    # real frames belong to episode e and are consecutive: never across an episode boundary
    np.testing.assert_array_equal(frames[pad:], ep["observations"][s + pad : s + T])
    assert set(frames[pad:, 0, 0, 0].tolist()) == {e}
    padding = ep["observations"][:1].repeat(pad, 0) if pad_mode == "repeat" else np.zeros((pad, *FRAME), np.uint8)
    np.testing.assert_array_equal(frames[:pad], padding)
    n_pad = min(pad, T - 1)
    np.testing.assert_array_equal(item["actions"][n_pad:].numpy(), ep["actions"][s + n_pad : s + T - 1])
    np.testing.assert_array_equal(item["rewards"][n_pad:].numpy(), ep["rewards"][s + n_pad : s + T - 1])
    np.testing.assert_array_equal(item["terminations"][n_pad:].numpy(), ep["terminations"][s + n_pad : s + T - 1])
    assert not item["actions"][:n_pad].any() and not item["terminations"][:n_pad].any()


def test_clip_windows_never_cross_episodes(dataset) -> None:
    path, eps = dataset
    T = 5
    ds = ClipDataset(DatasetReader(path), None, clip_len=T)
    # frames per episode: 6, 10, 4 (< T: skipped), 13 -> 2 + 6 + 0 + 9 windows
    assert ds.num_windows_per_episode == {0: 2, 1: 6, 2: 0, 3: 9}
    assert len(ds) == 17 and ds.in_memory
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        _check_item(item, eps, T)
        assert int(item["start"]) + T <= LENGTHS[int(item["episode"])] + 1
        seen.add((int(item["episode"]), int(item["start"])))
    assert len(seen) == 17 and 2 not in {e for e, _ in seen}
    assert ds[3]["actions"].dtype == torch.int64 and ds[3]["rewards"].dtype == torch.float32
    with pytest.raises(IndexError):
        ds[17]


@pytest.mark.parametrize("pad_mode", ["repeat", "zeros"])
def test_clip_pad_start(dataset, pad_mode) -> None:
    path, eps = dataset
    T = 5
    ds = ClipDataset(path, [0, 2], clip_len=T, pad_start=True, pad_mode=pad_mode)
    # with padding every frame can end a window: 6 + 4 windows, the short episode 2 included
    assert ds.num_windows_per_episode == {0: 6, 2: 4}
    starts = {(int(it["episode"]), int(it["start"])) for it in (ds[i] for i in range(len(ds)))}
    assert starts == {(0, s) for s in range(-4, 2)} | {(2, s) for s in range(-4, 0)}
    for i in range(len(ds)):
        _check_item(ds[i], eps, T, pad_mode)
    first = ds[0]
    assert int(first["start"]) == -4 and first["mask"].sum() == 1 and not first["actions"].any()


def test_clip_streaming_matches_ram_and_works_with_workers(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    eps = write_dataset(path, chunk_frames=4)  # windows span several chunks
    chunk_bytes = 4 * int(np.prod(FRAME))
    for kw in ({}, {"pad_start": True}, {"frame_size": 6}):
        ram = ClipDataset(path, [0, 1, 3], clip_len=6, **kw)
        stream = ClipDataset(path, [0, 1, 3], clip_len=6, memory_budget_gb=1e-6,
                             cache_mb=2.5 * chunk_bytes / 2**20, **kw)
        assert ram.in_memory and not stream.in_memory and len(ram) == len(stream)
        order = np.random.default_rng(0).permutation(len(ram))
        for i in order:
            a, b = ram[int(i)], stream[int(i)]
            assert all(torch.equal(a[k], b[k]) for k in a), (kw, i)
        assert len(stream._cache) >= 1 and 0 < stream._cache_bytes <= stream.cache_bytes_max
    stream = ClipDataset(path, [0, 1, 3], clip_len=4, memory_budget_gb=1e-6)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert sum(b["frames"].shape[0] for b in batches) == len(stream)
    assert batches[0]["frames"].shape[1:] == (4, 3, *FRAME[:2])
    for b in batches:
        for j in range(b["frames"].shape[0]):
            _check_item({k: v[j] for k, v in b.items()}, eps, 4)


def test_clip_frame_size_resizes_on_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "sq"
    frames = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    with EpisodeWriter(path, action_space=spaces.Discrete(2), frame_shape=(16, 16, 3)) as w:
        w.add_episode(frames, np.zeros(6, np.int64), np.zeros(6), np.zeros(6, bool), np.eye(6, dtype=bool)[-1])
    for streaming in (False, True):
        ds = ClipDataset(path, None, clip_len=3, frame_size=8, memory_budget_gb=1e-9 if streaming else 4.0)
        item = ds[2]
        assert item["frames"].shape == (3, 3, 8, 8)
        np.testing.assert_array_equal(item["frames"].numpy().transpose(0, 2, 3, 1), area_resize(frames[2:5], 8))
    with pytest.raises(ValueError, match="frame_size=32.*upscaling"):
        ClipDataset(path, None, clip_len=3, frame_size=32)
    with pytest.raises(ValueError, match="clip_len must be >= 2"):
        ClipDataset(path, None, clip_len=1)
    with pytest.raises(ValueError, match=r"episode_ids \[5\]"):
        ClipDataset(path, [5], clip_len=2)


def test_split_is_disjoint_deterministic_and_by_episode() -> None:
    ids = list(range(50))
    a = split_episodes(ids, 0.1, 0.2, seed=3)
    b = split_episodes(list(reversed(ids)), 0.1, 0.2, seed=3)
    assert a == b
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (35, 5, 10)
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(ids)
    assert split_episodes(ids, 0.1, 0.2, seed=4) != a
    tiny = split_episodes([7, 8], 0.5, 0.5 - 1e-9)
    assert len(tiny["train"]) >= 1 and sum(map(len, tiny.values())) == 2
    assert split_episodes([], 0.1, 0.1) == {"train": [], "val": [], "test": []}
    with pytest.raises(ValueError, match="val_fraction"):
        split_episodes(ids, 1.2, 0.0)
    with pytest.raises(ValueError, match="must be < 1"):
        split_episodes(ids, 0.5, 0.5)
    with pytest.raises(ValueError, match="duplicates"):
        split_episodes([1, 1, 2], 0.1, 0.1)


def test_split_feeds_disjoint_clip_datasets(dataset) -> None:
    path, _ = dataset
    splits = split_episodes(DatasetReader(path).episode_ids, 0.25, 0.25, seed=0)
    sets = {}
    for name, ids in splits.items():
        ds = ClipDataset(path, ids, clip_len=2)
        sets[name] = {int(ds[i]["episode"]) for i in range(len(ds))}
    assert sets["train"] and sets["train"] | sets["val"] | sets["test"] == set(range(4))
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])


def test_partial_folder_is_cleaned_on_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    partial = partial_path_for(path)
    (partial / "junk").mkdir(parents=True)
    write_dataset(path, overwrite=True)
    assert path.is_dir() and not partial.exists()
    shutil.rmtree(path)
    assert not os.path.exists(path)


def test_resize_in_forked_dataloader_workers(tmp_path: Path) -> None:
    """Resizing in the parent and then in forked workers must not abort them (numba/OpenMP fork safety)."""
    path = tmp_path / "ds"
    write_dataset(path, chunk_frames=4)
    area_resize(np.zeros((32, 24, 24, 3), np.uint8), 8)  # the parent uses the kernel on a batch first
    ram = ClipDataset(path, None, clip_len=3, frame_size=6)
    stream = ClipDataset(path, None, clip_len=3, frame_size=6, memory_budget_gb=1e-9)
    loader = torch.utils.data.DataLoader(stream, batch_size=5, num_workers=2)
    frames = torch.cat([b["frames"] for b in loader])
    assert frames.shape == (len(ram), 3, 3, 6, 6)
    assert torch.equal(frames, torch.stack([ram[i]["frames"] for i in range(len(ram))]))
