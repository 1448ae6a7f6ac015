"""Training: loss goes down, exact resume, a killed run resumes, mismatched checkpoints, 2-process DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfv_world.apps.cli import compose
from sfv_world.checkpoint import CheckpointError, load_checkpoint
from sfv_world.train import Trainer, lr_lambda, read_metrics, shift_clips

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cartpole16(tmp_path_factory) -> Path:
    """A real CartPole-pixels dataset at 16x16 (random policy), collected through the CLI path."""
    from sfv_world.apps import collect

    path = tmp_path_factory.mktemp("data") / "cartpole16"
    collect.run(compose(["env=cartpole", "collect.episodes=24", "collect.frame_size=16", f"dataset={path}", "seed=0"]))
    return path


def tiny_overrides(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["preset=tiny", "device=cpu", f"dataset={dataset}", f"run_dir={run_dir}", "train.log_every=1", *extra]


def run_trainer(overrides: list[str]) -> Trainer:
    trainer = Trainer(compose(overrides))
    trainer.fit()
    return trainer


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return dict(read_metrics(run_dir / "train" / "metrics.csv")[key])


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 10, 100, 0.01) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.01) == pytest.approx(1.0)
    assert lr_lambda(100, 10, 100, 0.01) == pytest.approx(0.01)
    mid = lr_lambda(55, 10, 100, 0.01)
    assert 0.01 < mid < 1.0


def test_lr_schedule_follows_the_clock_when_it_is_ahead_of_the_steps():
    assert lr_lambda(20, 10, 100, 0.01, time_progress=1.0) == pytest.approx(0.01)  # the budget is spent: annealed
    assert lr_lambda(20, 10, 100, 0.01, time_progress=0.5) == pytest.approx(lr_lambda(55, 10, 100, 0.01))
    assert lr_lambda(80, 10, 100, 0.01, time_progress=0.1) == lr_lambda(80, 10, 100, 0.01)  # steps ahead: steps
    assert lr_lambda(3, 10, 100, 0.01, time_progress=0.9) == pytest.approx(0.4)  # warm-up is by steps


def test_training_anneals_to_max_minutes_and_counts_time_over_resumes(cartpole16, tmp_path):
    """train.anneal_to_max_minutes: a run the clock stops long before train.steps still ends at min_lr, and the
    seconds trained are saved, so a resumed run continues the same budget instead of starting a new one."""
    from sfv_world.checkpoint import load_checkpoint

    budget = ["train.steps=100000", "train.max_minutes=0.05", "train.eval_every=100000", "train.warmup_steps=2"]
    trainer = run_trainer(tiny_overrides(cartpole16, tmp_path, *budget, "train.anneal_to_max_minutes=true"))
    assert 2 < trainer.step < 100000 and trainer.train_seconds > 3.0
    assert trainer.flow_sched.get_last_lr()[0] == pytest.approx(trainer.tcfg.min_lr)  # annealed, however slow the last step
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["train"]["train_seconds"]
    assert saved == pytest.approx(trainer.train_seconds)
    resumed = run_trainer(tiny_overrides(cartpole16, tmp_path, *budget, "train.anneal_to_max_minutes=true",
                                         "train.resume=true"))
    assert resumed.step == trainer.step + 1  # the budget was already spent: one step, then stop
    plain = run_trainer(tiny_overrides(cartpole16, tmp_path / "plain", *budget))  # without: the step cosine
    assert plain.flow_sched.get_last_lr()[0] > 0.9 * plain.tcfg.lr


def test_tiny_training_loss_goes_down(cartpole16, tmp_path):
    trainer = run_trainer(tiny_overrides(cartpole16, tmp_path, "train.steps=60", "train.eval_every=60"))
    curve = losses(tmp_path)
    steps = sorted(curve)
    assert steps[0] == 1 and steps[-1] == 60
    first = sum(curve[s] for s in steps[:5]) / 5
    last = sum(curve[s] for s in steps[-5:]) / 5
    assert last < first - 0.05, f"flow loss did not go down: first {first:.4f}, last {last:.4f}"
    den = losses(tmp_path, "train/denoiser_loss")
    assert all(torch.isfinite(torch.tensor(v)) for v in den.values())
    # the run folder is self-contained
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert any((tmp_path / "train" / "tb").iterdir())
    metrics = read_metrics(tmp_path / "train" / "metrics.csv")
    assert "val/bpd" in metrics and "val/termination_f1" in metrics
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == trainer.step == 60


def test_exact_resume_matches_uninterrupted_run(cartpole16, tmp_path):
    common = ["train.steps=8", "train.checkpoint_every=4", "train.eval_every=100"]
    run_trainer(tiny_overrides(cartpole16, tmp_path / "straight", *common))
    run_trainer(tiny_overrides(cartpole16, tmp_path / "paused", *common, "train.stop_after=4"))
    assert load_checkpoint(tmp_path / "paused" / "checkpoints" / "last.pt")["step"] == 4
    run_trainer(tiny_overrides(cartpole16, tmp_path / "paused", *common, "train.resume=true"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "paused")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), f"step {step} differs after resume"
    den_s, den_r = losses(tmp_path / "straight", "train/denoiser_loss"), losses(tmp_path / "paused", "train/denoiser_loss")
    assert den_r[5] == pytest.approx(den_s[5], rel=1e-6, abs=1e-7)


def test_killed_training_resumes(cartpole16, tmp_path):
    """SIGKILL a real training process after its second checkpoint; at most one interval is lost."""
    every = 10
    args = tiny_overrides(cartpole16, tmp_path, "train.steps=60", f"train.checkpoint_every={every}", "train.eval_every=1000")
    proc = subprocess.Popen([sys.executable, "-m", "sfv_world.apps.train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 2 * every:
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        else:
            pytest.fail("no second checkpoint within 240 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    saved = load_checkpoint(ckpt)["step"]
    logged = max(losses(tmp_path))
    assert saved % every == 0 and saved >= 2 * every
    assert logged - saved <= every, f"killed at step {logged}, last checkpoint {saved}: lost more than one interval"
    assert not [p for p in ckpt.parent.iterdir() if p.name != "last.pt"], "temporary checkpoint files left behind"
    trainer = run_trainer(args + ["train.resume=true"])
    assert trainer.step == 60
    assert load_checkpoint(ckpt)["step"] == 60


def test_mismatched_checkpoint_is_a_clear_error(cartpole16, tmp_path):
    run_trainer(tiny_overrides(cartpole16, tmp_path, "train.steps=4", "train.eval_every=100"))
    with pytest.raises(CheckpointError, match=r"deep_width: checkpoint=64 config=32"):
        Trainer(compose(tiny_overrides(cartpole16, tmp_path, "train.resume=true", "model.deep_width=32")))


def test_corrupt_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_ddp_two_cpu_processes(cartpole16, tmp_path):
    """torchrun with 2 gloo processes: a decreasing loss like the single-process run, one checkpoint by rank 0."""
    steps = 40
    common = [f"train.steps={steps}", "train.eval_every=1000", "train.checkpoint_every=20"]
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    run_trainer(tiny_overrides(cartpole16, single_dir, *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "sfv_world.apps.train", *tiny_overrides(cartpole16, ddp_dir, *common)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in (ddp_dir / "checkpoints").iterdir())
    assert files == ["last.pt"]
    assert load_checkpoint(ddp_dir / "checkpoints" / "last.pt")["step"] == steps
    ddp, single = losses(ddp_dir), losses(single_dir)
    assert sorted(ddp) == list(range(1, steps + 1)), "rank 0 alone must log, once per step"

    def head_tail(curve):
        s = sorted(curve)
        return sum(curve[k] for k in s[:5]) / 5, sum(curve[k] for k in s[-5:]) / 5

    (d0, d1), (s0, s1) = head_tail(ddp), head_tail(single)
    assert d1 < d0 - 0.05 and s1 < s0 - 0.05
    assert abs(d0 - s0) < 0.05, "both runs start from the same initialisation"
    assert abs(d1 - s1) < 0.5 * (s0 - s1), f"DDP final loss {d1:.4f} far from single-process {s1:.4f}"


def test_terminal_oversampling_adds_copies_of_episode_ending_windows(cartpole16):
    from sfv_world.datasets import ClipDataset, DatasetReader
    from sfv_world.train import terminal_window_indices, with_terminal_windows

    reader = DatasetReader(cartpole16)
    clips = ClipDataset(reader, reader.episode_ids, clip_len=4)
    terminal = terminal_window_indices(clips)
    # one episode-ending window per episode long enough for a window; CartPole's random episodes all terminate
    assert len(terminal) == sum(1 for e in reader.episode_ids if reader.episode_lengths[e] + 1 >= 4)
    assert all(bool(clips[i]["terminations"][-1]) for i in terminal)
    assert not any(bool(clips[i]["terminations"][:-1].any()) for i in terminal)
    assert with_terminal_windows(clips, 0) is clips
    boosted = with_terminal_windows(clips, 3)
    assert len(boosted) == len(clips) + 3 * len(terminal)
    assert bool(boosted[len(clips)]["terminations"][-1])
    with pytest.raises(ValueError, match="terminal_oversample"):
        with_terminal_windows(clips, 10**6)


def test_transition_set_balanced_batches_are_seeded_by_step(cartpole16):
    from sfv_world.datasets import DatasetReader
    from sfv_world.train import TransitionSet

    reader = DatasetReader(cartpole16)
    ts = TransitionSet(reader, reader.episode_ids, frame_size=16, memory_budget_gb=1.0)
    # one window per transition: its last transition is real, and every episode's terminal one is listed
    assert len(ts) == sum(reader.episode_lengths[e] for e in reader.episode_ids)
    assert len(ts.terminal) == sum(int(reader.load_episode(e, observations=False).terminations.any())
                                   for e in reader.episode_ids)
    b = ts.sample(step=7, batch_size=20, terminal_fraction=0.25, seed=3)
    assert b["frames"].shape == (20, 3, 3, 16, 16) and b["frames"].dtype == torch.uint8
    assert bool(b["mask"][:, 1:].all()), "the transition of interest always has two real frames"
    assert int(b["terminations"][:, -1].sum()) >= 5  # round(20 * 0.25) drawn from terminal windows
    # env=cartpole records terminal tails: a terminal step is only ever followed by another terminal one
    assert not bool((b["terminations"][:, 0] & ~b["terminations"][:, 1]).any())
    again = ts.sample(step=7, batch_size=20, terminal_fraction=0.25, seed=3)
    assert torch.equal(b["frames"], again["frames"]) and torch.equal(b["actions"], again["actions"])
    other = ts.sample(step=8, batch_size=20, terminal_fraction=0.25, seed=3)
    assert not torch.equal(b["frames"], other["frames"])
    # a padded first transition (x_{-1} missing): mask False for frame 0 only
    first = ts.batch(ts.windows[:1])
    assert first["mask"].tolist() == [[False, True, True]]


def test_f1_threshold_on_known_inputs():
    from sfv_world.heads import f1_threshold

    thr, f1 = f1_threshold(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([True, True, False, False]))
    assert thr == pytest.approx(1.5) and f1 == pytest.approx(1.0)
    # best cut keeps 3 predictions (2 TP, 1 FP): F1 = 4/5, vs 1 prediction: 2/3
    thr, f1 = f1_threshold(torch.tensor([5.0, 4.0, 3.0, 0.0]), torch.tensor([True, False, True, False]))
    assert 0.0 < thr < 3.0 and f1 == pytest.approx(0.8)
    # ties are never split: both 2.0 logits fall on the same side
    thr, f1 = f1_threshold(torch.tensor([2.0, 2.0, 1.0]), torch.tensor([True, False, False]))
    assert thr == pytest.approx(1.5) and f1 == pytest.approx(2 / 3)
    # every logit positive-labelled: the threshold lies below them all
    thr, f1 = f1_threshold(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    assert thr < 1.0 and f1 == 1.0
    with pytest.raises(ValueError, match="2 logits but 3 labels"):
        f1_threshold(torch.zeros(2), torch.zeros(3, dtype=torch.bool))


def test_termination_threshold_is_calibrated_on_validation_and_stored(cartpole16, tmp_path):
    from sfv_world.checkpoint import load_world_model
    from sfv_world.heads import f1_threshold
    from sfv_world.train import head_logits

    trainer = run_trainer(tiny_overrides(cartpole16, tmp_path, "train.steps=12", "train.eval_every=1000"))
    model, _ = load_world_model(tmp_path / "checkpoints" / "last.pt")
    heads = model.flow.heads
    offset = float(heads.termination_offset)
    # recompute: raw logits on every validation transition, the same noise seed as the trainer
    gen = torch.Generator().manual_seed(4321)
    logits, labels = [], []
    with torch.no_grad():
        for hb in trainer.head_val.chunks(256):
            logits.append(head_logits(heads, hb, model.config.sigma, "cpu", gen, calibrated=False)[1])
            labels.append(hb["terminations"][:, -1])
    expected, f1 = f1_threshold(torch.cat(logits), torch.cat(labels))
    assert offset == pytest.approx(expected, abs=1e-5) and offset != 0.0
    assert read_metrics(tmp_path / "train" / "metrics.csv")["val/termination_f1"][-1][1] == pytest.approx(f1)
    # the calibrated logit is the raw one minus the stored threshold
    hb = trainer.head_val.batch(trainer.head_val.windows[:4])
    x = hb["frames"].float() / 127.5 - 1
    with torch.no_grad():
        _, raw = heads.transitions(x, hb["actions"], hb["mask"], calibrated=False)
        _, cal = heads.transitions(x, hb["actions"], hb["mask"])
    assert torch.allclose(cal, raw - offset)


def test_init_from_starts_from_another_runs_weights(cartpole16, tmp_path):
    from sfv_world.checkpoint import load_checkpoint as load

    run_trainer(tiny_overrides(cartpole16, tmp_path / "a", "train.steps=4", "train.eval_every=4"))
    first = load(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    trainer = Trainer(compose(tiny_overrides(cartpole16, tmp_path / "b", "train.steps=2",
                                             f"train.init_from={tmp_path / 'a' / 'checkpoints' / 'last.pt'}")))
    loaded = trainer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in first.items()), "weights (and the head threshold) copied"
    assert trainer.step == 0, "a fresh schedule, not a resume"
    # a model of another size cannot start from it
    with pytest.raises(CheckpointError, match=r"deep_layers: checkpoint=2 config=3"):
        Trainer(compose(tiny_overrides(cartpole16, tmp_path / "c", "model.deep_layers=3",
                                       f"train.init_from={tmp_path / 'a' / 'checkpoints' / 'last.pt'}")))


def test_head_loads_state_without_a_calibrated_threshold():
    from sfv_world.heads import RewardTerminationHead

    head = RewardTerminationHead(3, 16, "discrete", 2, "regression")
    state = {k: v for k, v in head.state_dict().items() if k != "termination_offset"}
    fresh = RewardTerminationHead(3, 16, "discrete", 2, "regression")
    fresh.termination_offset.fill_(5.0)
    fresh.load_state_dict(state)  # strict: the missing buffer defaults to 0
    assert float(fresh.termination_offset) == 0.0


def test_shift_clips_translates_whole_clips_with_edge_replication():
    """train.shift_augment: one horizontal shift per clip, the same for all its frames, edges replicated."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (6, 3, 2, 4, 10), generator=g, dtype=torch.uint8)  # [B, T, C, H, W]
    assert shift_clips(frames, 0, g) is frames
    with pytest.raises(ValueError, match="train.shift_augment must be >= 0"):
        shift_clips(frames, -1, g)
    out = shift_clips(frames, 3, torch.Generator().manual_seed(1))
    assert out.shape == frames.shape and out.dtype == torch.uint8
    shifts = torch.randint(-3, 4, (6,), generator=torch.Generator().manual_seed(1))  # the draws shift_clips makes
    assert len(set(shifts.tolist())) > 1
    for b, s in enumerate(shifts.tolist()):
        for j in range(10):  # output column j shows input column j - s, clamped to the frame
            assert torch.equal(out[b, ..., j], frames[b, ..., min(max(j - s, 0), 9)])


def test_training_step_applies_shift_augment(cartpole16, tmp_path, monkeypatch):
    """train.shift_augment > 0 shifts the flow batch and the head batch of every step; 0 shifts nothing."""
    import sfv_world.train as T

    calls = []
    real = T.shift_clips

    def spy(frames, max_shift, generator):
        calls.append((tuple(frames.shape), max_shift))
        return real(frames, max_shift, generator)

    monkeypatch.setattr(T, "shift_clips", spy)
    run_trainer(tiny_overrides(cartpole16, tmp_path / "off", "train.steps=2", "train.eval_every=2"))
    assert calls == []
    run_trainer(tiny_overrides(cartpole16, tmp_path / "on", "train.steps=2", "train.eval_every=2",
                               "train.shift_augment=2"))
    assert len(calls) == 4 and {m for _, m in calls} == {2}  # flow clips and head transitions, 2 steps
    assert all(len(shape) == 5 for shape, _ in calls)  # [B, T, C, H, W] batches


def test_transition_set_balances_on_the_real_end_of_a_terminal_tail(tmp_path):
    import gymnasium as gym

    from sfv_world.datasets import DatasetReader, RandomPolicy, collect, live_steps
    from sfv_world.train import TransitionSet

    env = gym.make("CartPole-v1", render_mode="rgb_array")
    collect(env, tmp_path / "tail", RandomPolicy(env.action_space), episodes=5, frame_size=16, progress=False,
            terminal_tail=4)
    reader = DatasetReader(tmp_path / "tail")
    ts = TransitionSet(reader, reader.episode_ids, frame_size=16, memory_budget_gb=1.0)
    # one balanced window per episode, the one whose transition is the real termination; the tail's terminal
    # transitions are in the uniform pool
    ends = {e: live_steps(reader.load_episode(e, observations=False).terminations) - 1 for e in reader.episode_ids}
    picked = ts.clips.index[ts.terminal]
    assert sorted((int(e), int(s) + 1) for e, s in picked) == sorted(ends.items())
    b = ts.batch(ts.windows)
    assert int(b["terminations"][:, -1].sum()) == 5 * 5  # each episode: the end and its 4-step tail
    # `live` marks the transitions up to the real end: the end itself is the only terminal one among them
    assert int(ts.live.sum()) == sum(ends[e] + 1 for e in ends)
    assert int(b["terminations"][ts.live, -1].sum()) == 5
