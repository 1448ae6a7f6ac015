"""Training STARFlow-V, its flow-score-matching denoiser and the reward/termination heads.

One optimisation step (STARFLOW_V.md sections 3-4):

    x       = frames / 127.5 - 1                       [B, T, C, H, W] float32 in [-1, 1]
    x_tilde = x + sigma * eps        (requires grad)   noise augmentation
    out     = flow(x_tilde, actions, drop_actions)     exact NLL per frame
    head    = heads(balanced single transitions)       reward/termination pixel model, its own batches
    (flow_loss + head_weight * head_loss).backward()   AdamW(0.9, 0.95) on flow + heads
    g       = score_target(x_tilde.grad)               sigma * grad NLL, no gradient into the flow
    flow_score_matching_loss(denoiser, x_tilde, g)     its own AdamW

with warm-up then cosine learning rates, gradient clipping, skipping of NaN losses and exploding steps,
bf16 autocast on CUDA (the affine math stays fp32 inside the model), and exact resume from atomic
checkpoints (model, both optimisers, schedulers, RNG states, data position). Multi-process training uses
torch DDP under ``torchrun`` with a DistributedSampler; rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from sfv_world.autoencoder import IdentityCodec
from sfv_world.checkpoint import (
    CheckpointError,
    check_model_config,
    load_checkpoint,
    save_checkpoint,
    CHECKPOINT_FORMAT,
)
from sfv_world.datasets import ClipDataset, DatasetReader, live_steps, split_episodes
from sfv_world.denoiser import flow_score_matching_loss, score_target
from sfv_world.model import StarFlowVConfig, WorldModel, nll_to_bits_per_dim

# ----------------------------------------------------------------------------------------------
# config helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; under torchrun each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def action_spec(action_space) -> tuple[str, int]:
    """(action_kind, action_dim) of a gymnasium Discrete or 1-D Box space."""
    from gymnasium import spaces

    if isinstance(action_space, spaces.Discrete):
        return "discrete", int(action_space.n)
    if isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
        return "box", int(action_space.shape[0])
    raise ValueError(f"unsupported action space {action_space}: sfv-world models Discrete or 1-D Box actions")


def model_config_for(cfg: DictConfig, reader: DatasetReader) -> StarFlowVConfig:
    """The model config of a run: ``cfg.model`` plus the dataset's action space."""
    kind, dim = action_spec(reader.action_space)
    stored = reader.frame_shape  # (H, W, C)
    if cfg.model.frame_size > stored[0]:
        raise ValueError(
            f"model.frame_size={cfg.model.frame_size} exceeds the frame size {stored[0]} stored in {reader.path}"
        )
    if cfg.model.channels != stored[2]:
        raise ValueError(f"model.channels={cfg.model.channels} but {reader.path} stores {stored[2]} channels")
    return StarFlowVConfig.from_dict({**OmegaConf.to_container(cfg.model, resolve=True), "action_kind": kind, "action_dim": dim})


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float, time_progress: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 down to ``min_ratio`` at ``total``.

    ``time_progress`` in [0, 1]: the share of a wall-clock budget spent (``train.anneal_to_max_minutes``); the
    cosine follows whichever of steps and time is further along, so a run stopped by the clock ends annealed.
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), float(time_progress)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# resumable data order


class ResumableSampler(Sampler[int]):
    """DistributedSampler order (per-epoch shuffle, sharded by rank) that can start mid-epoch.

    ``position`` counts the samples of the current epoch this rank has already consumed.
    """

    def __init__(self, dataset, seed: int, rank: int, world_size: int):
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return len(self.inner) - self.position

    def __iter__(self) -> Iterator[int]:
        self.inner.set_epoch(self.epoch)
        order = list(iter(self.inner))
        yield from order[self.position:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def batches_forever(loader: DataLoader, sampler: ResumableSampler, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches across epochs, keeping ``sampler.position`` equal to what has been consumed."""
    while True:
        for batch in loader:
            sampler.position += batch_size
            yield batch
        sampler.epoch, sampler.position = sampler.epoch + 1, 0


def terminal_window_indices(clips: ClipDataset) -> list[int]:
    """Indices of the windows whose last transition is its episode's real end.

    That is the termination (the first terminal step, before any terminal tail) or, for an episode that
    never terminates, its last transition (a truncation). In T-frame windows that is ~1 in (episode
    length - T + 2) windows, so terminal transitions are rare in training.
    """
    T = clips.clip_len
    end = {int(e): live_steps(clips._steps[int(e)].terminations) for e in np.unique(clips.index[:, 0])}
    return [i for i, (eid, start) in enumerate(clips.index.tolist()) if start + T - 1 == end[int(eid)]]


def with_terminal_windows(clips: ClipDataset, copies: int) -> torch.utils.data.Dataset:
    """``clips`` plus ``copies`` extra copies of its episode-ending windows (``train.terminal_oversample``)."""
    if copies <= 0:
        return clips
    if copies > 1000:
        raise ValueError(f"train.terminal_oversample={copies}: expected a small number of extra copies (0..1000)")
    terminal = terminal_window_indices(clips)
    if not terminal:
        return clips
    return torch.utils.data.ConcatDataset([clips] + [torch.utils.data.Subset(clips, terminal)] * copies)


# ----------------------------------------------------------------------------------------------
# single transitions for the reward/termination head


class TransitionSet:
    """Every transition of some episodes as a 3-frame window (x_{t-1}, x_t, x_{t+1}), for the pixel
    reward/termination head (``sfv_world.heads``).

    Built on ``ClipDataset(clip_len=3, pad_start=True)``: window (e, s) holds frames s..s+2 and its
    transition of interest is the last one, s+1 -> s+2 (for s = -1, the episode's first transition,
    frame x_{-1} is padding and the head uses x_0 in its place). ``terminal`` lists the windows whose
    transition terminates the episode (the first terminal step; a terminal tail's later steps are not
    listed). Batches are drawn by :meth:`sample`, which depends only on
    (seed, step): no sampler state to save for an exact resume.
    """

    def __init__(self, reader: DatasetReader, episode_ids: list[int], frame_size: int, memory_budget_gb: float,
                 exclude_actions: list[int] | None = None):
        self.clips = ClipDataset(reader, episode_ids, clip_len=3, frame_size=frame_size, pad_start=True,
                                 memory_budget_gb=memory_budget_gb)
        if exclude_actions:
            from sfv_world.datasets.filters import exclude_action_windows

            exclude_action_windows(self.clips, list(exclude_actions))
        index = self.clips.index
        self.windows = np.flatnonzero(index[:, 1] >= -1)  # the last transition is real
        # the real end of each episode: its first terminal step (a terminal tail's later steps are drawn
        # uniformly with the rest, so balancing favours the boundary the dream must find)
        ends = {int(e): live_steps(self.clips._steps[int(e)].terminations) - 1 for e in np.unique(index[:, 0])}
        terminal = [bool(self.clips._steps[int(e)].terminations[int(s) + 1]) and int(s) + 1 == ends[int(e)]
                    for e, s in index[self.windows]]
        self.terminal = self.windows[np.asarray(terminal, dtype=bool)]
        # bool [len(self)]: the window's transition comes at or before its episode's real end (not in a tail)
        self.live = np.asarray([int(s) + 1 <= ends[int(e)] for e, s in index[self.windows]], dtype=bool)

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Windows ``indices`` (of the ClipDataset) stacked: frames uint8 [N, 3, C, H, W], actions [N, 2(, k)],
        rewards float32 [N, 2], terminations bool [N, 2], mask bool [N, 3]."""
        items = [self.clips[int(i)] for i in indices]
        return {k: torch.stack([it[k] for it in items]) for k in ("frames", "actions", "rewards", "terminations", "mask")}

    def sample(self, step: int, batch_size: int, terminal_fraction: float, seed: int, rank: int = 0) -> dict[str, torch.Tensor]:
        """Batch ``step``: round(batch_size * terminal_fraction) terminal windows, the rest uniform over all
        windows, both with replacement, drawn from a generator seeded by (seed, rank, step)."""
        rng = np.random.default_rng([int(seed), int(rank), int(step)])
        n_term = int(round(batch_size * terminal_fraction)) if len(self.terminal) else 0
        picks = [rng.choice(self.terminal, n_term), rng.choice(self.windows, batch_size - n_term)]
        return self.batch(np.concatenate(picks))

    def chunks(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every window once, in order, in batches (evaluation)."""
        for i in range(0, len(self.windows), batch_size):
            yield self.batch(self.windows[i : i + batch_size])


def head_logits(heads: torch.nn.Module, batch: dict[str, torch.Tensor], sigma: float, device: torch.device,
                generator: torch.Generator | None = None, calibrated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``heads`` (a RewardTerminationHead) on a TransitionSet batch, frames noise-augmented like the flow's input:
    -> (reward [N] or [N, 3], termination logit [N]) of each window's last transition."""
    x = batch["frames"].to(device).float() / 127.5 - 1.0  # the IdentityCodec's scaling
    noise = torch.randn(x.shape, generator=generator).to(device) if generator is not None else torch.randn_like(x)
    r, d = heads.transitions(x + sigma * noise, batch["actions"].to(device), batch["mask"].to(device),
                             calibrated=calibrated)
    return r[:, -1], d[:, -1]


# ----------------------------------------------------------------------------------------------
# RNG state


def shift_clips(frames: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each clip horizontally by its own s ~ U{-max_shift..max_shift} pixels (every frame of a clip
    alike), replicating the edge columns: frames [B, T, C, H, W] (any dtype) -> the same shape and dtype.

    ``train.shift_augment``: for scenes whose dynamics do not depend on horizontal position (CartPole's cart
    on its endless track line), it shows the model positions a random policy rarely reaches.
    """
    if max_shift < 0:
        raise ValueError(f"train.shift_augment must be >= 0 (pixels), got {max_shift}")
    if max_shift == 0:
        return frames
    B, W = frames.shape[0], frames.shape[-1]
    s = torch.randint(-max_shift, max_shift + 1, (B,), generator=generator)
    cols = (torch.arange(W)[None, :] - s[:, None]).clamp(0, W - 1)  # [B, W] source column of output column
    idx = cols.view(B, *([1] * (frames.dim() - 2)), W).expand(frames.shape).to(frames.device)
    return torch.gather(frames, -1, idx)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# metrics


def binary_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """F1 of boolean predictions; 1.0 when there are no positives and none predicted."""
    pred, target = pred.astype(bool), target.astype(bool)
    tp = float(np.sum(pred & target))
    fp = float(np.sum(pred & ~target))
    fn = float(np.sum(~pred & target))
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def reward_sign_f1(pred_reward: np.ndarray, target: np.ndarray) -> float:
    """Macro F1 over the reward-sign classes {-1, 0, +1} present in the targets."""
    ps, ts = np.sign(np.round(pred_reward)), np.sign(target)
    classes = np.unique(ts)
    return float(np.mean([binary_f1(ps == c, ts == c) for c in classes])) if len(classes) else 1.0


# ----------------------------------------------------------------------------------------------
# the trainer


@dataclass
class StepResult:
    loss: float
    flow_loss: float
    head_loss: float
    denoiser_loss: float
    grad_norm: float
    skipped: bool
    metrics: dict[str, float]


class Trainer:
    """Trains one WorldModel on one dataset; the run folder is ``cfg.run_dir``.

    Layout of the run folder:
        config.yaml            resolved config
        checkpoints/last.pt    latest checkpoint (atomic)
        train/metrics.csv      one row per logged step; eval rows too
        train/tb/              tensorboard events
        samples/step_*.gif     real | dream | |difference| at each evaluation
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = resolve_device(cfg.device)
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0

        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        seed_everything(int(cfg.seed) + self.rank)

        # data
        self.reader = DatasetReader(cfg.dataset)
        self.splits = split_episodes(
            self.reader.episode_ids, self.tcfg.val_fraction, self.tcfg.test_fraction, seed=int(cfg.seed)
        )
        self.model_config = model_config_for(cfg, self.reader)
        clip_kwargs = dict(
            clip_len=int(self.tcfg.clip_len),
            frame_size=self.model_config.frame_size,
            pad_start=bool(self.tcfg.pad_start),
            memory_budget_gb=float(self.tcfg.memory_budget_gb),
        )
        self.train_set = ClipDataset(self.reader, self.splits["train"], **clip_kwargs)
        self.val_set = ClipDataset(self.reader, self.splits["val"], **clip_kwargs) if self.splits["val"] else None
        if self.tcfg.get("exclude_actions"):  # OOD case (a): windows using these actions are never trained on
            from sfv_world.datasets.filters import exclude_action_windows

            for clips in (self.train_set, self.val_set):
                if clips is not None:
                    exclude_action_windows(clips, list(self.tcfg.exclude_actions))
        if len(self.train_set) < self.tcfg.batch_size * self.world_size:
            raise ValueError(
                f"dataset {cfg.dataset}: only {len(self.train_set)} training windows of {self.tcfg.clip_len} frames, "
                f"fewer than one batch ({self.tcfg.batch_size} x {self.world_size} ranks); collect more episodes"
            )
        self.train_data = with_terminal_windows(self.train_set, int(self.tcfg.get("terminal_oversample", 0)))
        self.sampler = ResumableSampler(self.train_data, seed=int(cfg.seed), rank=self.rank, world_size=self.world_size)
        head_kwargs = dict(frame_size=self.model_config.frame_size, memory_budget_gb=float(self.tcfg.memory_budget_gb),
                           exclude_actions=list(self.tcfg.get("exclude_actions") or []))
        self.head_train = TransitionSet(self.reader, self.splits["train"], **head_kwargs)
        self.head_val = TransitionSet(self.reader, self.splits["val"], **head_kwargs) if self.splits["val"] else None
        frac = float(self.tcfg.head_terminal_fraction)
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"train.head_terminal_fraction={frac}: expected a fraction in [0, 1)")

        # model and optimisers
        self.codec = IdentityCodec()
        self.model = WorldModel(self.model_config).to(self.device)
        betas = tuple(self.tcfg.betas)
        head_ids = {id(p) for p in self.model.flow.heads.parameters()}
        flow_only = [p for p in self.model.flow_parameters() if id(p) not in head_ids]
        head_lr = float(self.tcfg.get("head_lr") or self.tcfg.lr)  # the small pixel head learns faster at a higher rate
        self.flow_opt = torch.optim.AdamW(
            [{"params": flow_only}, {"params": list(self.model.flow.heads.parameters()), "lr": head_lr}],
            lr=self.tcfg.lr, betas=betas, weight_decay=self.tcfg.weight_decay,
        )
        self.den_opt = torch.optim.AdamW(
            self.model.denoiser_parameters(), lr=self.tcfg.denoiser_lr, weight_decay=self.tcfg.weight_decay
        )
        total = int(self.tcfg.steps)
        warm = int(self.tcfg.warmup_steps)
        # train.max_minutes: seconds trained so far (over resumes), and their share of the budget that the
        # schedule follows with train.anneal_to_max_minutes
        self.train_seconds, self.time_progress = 0.0, 0.0
        self.flow_sched = torch.optim.lr_scheduler.LambdaLR(
            self.flow_opt, lambda s: lr_lambda(s, warm, total, self.tcfg.min_lr / self.tcfg.lr, self.time_progress)
        )  # one multiplier for both groups
        self.den_sched = torch.optim.lr_scheduler.LambdaLR(
            self.den_opt,
            lambda s: lr_lambda(s, warm, total, self.tcfg.min_lr / self.tcfg.denoiser_lr, self.time_progress),
        )
        self.flow_net: torch.nn.Module = self.model.flow
        self.denoiser_net: torch.nn.Module = self.model.denoiser
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.flow_net = DDP(self.model.flow, device_ids=ids)
            self.denoiser_net = DDP(self.model.denoiser, device_ids=ids)
        self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.step = 0
        self.skipped_steps = 0

        if self.tcfg.get("init_from") and not (self.tcfg.resume and self.ckpt_path.exists()):
            self.init_from(self.tcfg.init_from)
        if self.tcfg.resume:
            self.resume()

    # -- checkpoints ------------------------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        return {
            "format_version": CHECKPOINT_FORMAT,
            "model_config": self.model_config.to_dict(),
            "model": self.model.state_dict(),
            "dataset": {**self.reader.metadata, "path": str(self.reader.path), "splits": self.splits},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "step": self.step,
            "calibration": None,
            "train": {
                "flow_opt": self.flow_opt.state_dict(),
                "den_opt": self.den_opt.state_dict(),
                "flow_sched": self.flow_sched.state_dict(),
                "den_sched": self.den_sched.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": rng_state(),
                "skipped_steps": self.skipped_steps,
                "train_seconds": self.train_seconds,
            },
        }

    def save(self) -> None:
        if self.is_main:
            save_checkpoint(self.ckpt_path, self.payload())
        if self.distributed:
            dist.barrier()

    def init_from(self, path: str | os.PathLike) -> None:
        """Start from another run's weights (``train.init_from``; fine-tuning on more data): the model and
        its calibrated termination threshold; optimisers, schedule and data order start fresh."""
        payload = load_checkpoint(path, map_location=self.device)
        check_model_config(Path(path), payload["model_config"], self.model_config.to_dict())
        self.model.load_state_dict(payload["model"])
        if self.is_main:
            print(f"train.init_from: weights of {path} (step {payload['step']})")

    def resume(self) -> None:
        """Continue exactly from ``checkpoints/last.pt`` (a fresh run when none exists yet)."""
        if not self.ckpt_path.exists():
            if self.is_main:
                print(f"train.resume=true but {self.ckpt_path} does not exist yet: starting fresh")
            return
        payload = load_checkpoint(self.ckpt_path, map_location=self.device)
        check_model_config(self.ckpt_path, payload["model_config"], self.model_config.to_dict())
        self.model.load_state_dict(payload["model"])
        train = payload.get("train")
        if not train:
            raise CheckpointError(f"checkpoint {self.ckpt_path} holds no training state; it cannot be resumed")
        self.flow_opt.load_state_dict(train["flow_opt"])
        self.den_opt.load_state_dict(train["den_opt"])
        self.flow_sched.load_state_dict(train["flow_sched"])
        self.den_sched.load_state_dict(train["den_sched"])
        self.sampler.load_state_dict(train["sampler"])
        set_rng_state(train["rng"])
        self.skipped_steps = int(train.get("skipped_steps", 0))
        self.train_seconds = float(train.get("train_seconds", 0.0))
        self.step = int(payload["step"])
        if self.is_main:
            print(f"resumed from {self.ckpt_path} at step {self.step}")

    # -- one step ---------------------------------------------------------------------------

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """One optimisation step of flow + heads, then one of the denoiser (``fit`` steps the lr schedules)."""
        cfg, tcfg = self.model_config, self.tcfg
        batch = self.to_device(batch)
        shift = int(tcfg.get("shift_augment", 0) or 0)
        if shift != 0:  # a negative value is rejected by shift_clips
            gen = torch.Generator().manual_seed((int(self.cfg.seed) * 1_000_003 + self.step) * 64 + self.rank + 7)
            batch["frames"] = shift_clips(batch["frames"], shift, gen)
        x = self.codec.encode(batch["frames"])  # [B,T,C,H,W] float in [-1,1]
        mask = batch["mask"]  # [B,T] bool
        x_tilde = (x + cfg.sigma * torch.randn_like(x)).requires_grad_(True)
        drop = torch.rand(x.shape[0], device=self.device) < cfg.cond_drop  # CFG condition dropout

        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.flow_net(x_tilde, batch["actions"], drop_actions=drop, frame_mask=mask, heads=False)
        flow_loss = self.model.flow.flow_loss(out, frame_mask=mask)
        head_loss, head_metrics = self.head_step_loss()
        loss = flow_loss + tcfg.head_weight * head_loss

        self.flow_opt.zero_grad(set_to_none=True)
        self.den_opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            return StepResult(float("nan"), flow_loss.item(), head_loss.item(), float("nan"), float("nan"), True, head_metrics)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.flow_parameters(), tcfg.grad_clip))
        exploding = self.step >= tcfg.grad_skip_after and grad_norm > tcfg.grad_skip_threshold
        skipped = exploding or not math.isfinite(grad_norm)
        if skipped:
            self.skipped_steps += 1
        else:
            self.flow_opt.step()

        # flow score matching: target from the same backward pass, detached from the flow
        g = score_target(x_tilde.grad.detach(), cfg.sigma, self.model.flow.loss_numel(out, mask))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            den_loss = flow_score_matching_loss(self.denoiser_net, x_tilde.detach(), g, batch["actions"], drop_actions=drop)
        den_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.denoiser_parameters(), tcfg.grad_clip)
        self.den_opt.step()
        return StepResult(
            loss=loss.item(), flow_loss=flow_loss.item(), head_loss=head_loss.item(), denoiser_loss=den_loss.item(),
            grad_norm=grad_norm, skipped=skipped, metrics=head_metrics,
        )

    def head_step_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Reward/termination loss on this step's balanced batch of single transitions (TransitionSet)."""
        tcfg = self.tcfg
        hb = self.head_train.sample(self.step, int(tcfg.head_batch_size), float(tcfg.head_terminal_fraction),
                                    int(self.cfg.seed), self.rank)
        gen = torch.Generator().manual_seed((int(self.cfg.seed) * 1_000_003 + self.step) * 64 + self.rank)
        shift = int(tcfg.get("shift_augment", 0) or 0)
        if shift != 0:
            hb = {**hb, "frames": shift_clips(hb["frames"], shift, gen)}
        r, d = head_logits(self.model.flow.heads, hb, self.model_config.sigma, self.device, gen, calibrated=False)
        return self.model.flow.heads.loss(r[:, None], d[:, None], hb["rewards"][:, -1:].to(self.device),
                                          hb["terminations"][:, -1:].to(self.device), None,
                                          float(tcfg.termination_pos_weight))

    @torch.no_grad()
    def calibrate_termination(self) -> dict[str, float]:
        """Set the head's decision threshold to the F1-best one on every validation transition."""
        from sfv_world.heads import f1_threshold

        if self.head_val is None or len(self.head_val) == 0:
            return {}
        gen = torch.Generator().manual_seed(4321)
        logits, labels = [], []
        for hb in self.head_val.chunks(256):
            logits.append(head_logits(self.model.flow.heads, hb, self.model_config.sigma, self.device, gen, calibrated=False)[1].cpu())
            labels.append(hb["terminations"][:, -1])
        threshold, f1 = f1_threshold(torch.cat(logits), torch.cat(labels))
        self.model.flow.heads.termination_offset.fill_(threshold)
        return {"val/termination_f1": f1, "val/termination_threshold": threshold,
                "val/termination_positives": float(torch.cat(labels).sum())}

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation NLL (bits/dim per frame position) and reward on held-out clips; the termination
        threshold calibrated (and its F1 measured) on every validation transition."""
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        self.model.eval()
        term_metrics = self.calibrate_termination()
        cfg = self.model_config
        gen = torch.Generator().manual_seed(1234)  # fixed validation windows and noise
        n = min(len(self.val_set), int(self.tcfg.eval_batches) * int(self.tcfg.batch_size))
        idx = torch.randperm(len(self.val_set), generator=gen)[:n].tolist()
        nll_sum, count = None, None
        rew_pred, rew_true = [], []
        for i in range(0, n, int(self.tcfg.batch_size)):
            items = [self.val_set[j] for j in idx[i : i + int(self.tcfg.batch_size)]]
            batch = self.to_device({k: torch.stack([it[k] for it in items]) for k in items[0]})
            x = self.codec.encode(batch["frames"])
            noise = torch.randn(x.shape, generator=gen).to(self.device)
            out = self.model.flow(x + cfg.sigma * noise, batch["actions"], frame_mask=batch["mask"])
            bpd = nll_to_bits_per_dim(out.nll, cfg)  # [B,T]
            m = batch["mask"].float()
            nll_sum = (bpd * m).sum(0) if nll_sum is None else nll_sum + (bpd * m).sum(0)
            count = m.sum(0) if count is None else count + m.sum(0)
            valid = (batch["mask"][:, :-1] & batch["mask"][:, 1:]).cpu().numpy()
            rew_pred.append(self.model.flow.reward_value(out.reward).cpu().numpy()[valid])
            rew_true.append(batch["rewards"].cpu().numpy()[valid])
        per_pos = (nll_sum / count.clamp(min=1)).cpu().numpy()
        metrics = {f"val/bpd_t{t}": float(v) for t, v in enumerate(per_pos)}
        metrics["val/bpd"] = float(per_pos.mean())
        metrics.update(term_metrics)
        rp, rt = np.concatenate(rew_pred), np.concatenate(rew_true)
        metrics["val/reward_mae"] = float(np.mean(np.abs(rp - rt)))
        metrics["val/reward_sign_f1"] = reward_sign_f1(rp, rt)
        return metrics

    def write_sample_gif(self) -> Path | None:
        """Real | dream | |difference| GIF: 2 real context frames, then the logged actions replayed."""
        if self.val_set is None or len(self.val_set) == 0 or not self.tcfg.sample_gif:
            return None
        from sfv_world.quality import open_loop_rollout, side_by_side_gif

        item = self.val_set[0]
        batch = {k: v.unsqueeze(0) for k, v in item.items()}
        sampler = OmegaConf.to_container(self.cfg.sampler, resolve=True)
        real, dream = open_loop_rollout(self.model, batch, context=2, sampler=sampler, device=self.device, seed=0)
        path = self.run_dir / "samples" / f"step_{self.step:06d}.gif"
        side_by_side_gif(real[0], dream[0], path)
        return path

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        tcfg = self.tcfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
        loader = DataLoader(
            self.train_data, batch_size=int(tcfg.batch_size), sampler=self.sampler, drop_last=True,
            num_workers=int(tcfg.num_workers), persistent_workers=False,
            # its own generator: creating an iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),
        )
        batches = batches_forever(loader, self.sampler, int(tcfg.batch_size))
        logger = RunLogger(self.run_dir / "train") if self.is_main else None
        total = int(tcfg.steps)
        budget_s = 60 * float(tcfg.max_minutes) if tcfg.max_minutes else None
        anneal = bool(tcfg.get("anneal_to_max_minutes", False)) and budget_s is not None
        start, seconds0 = time.time(), self.train_seconds
        if anneal:  # a resumed run goes on where its schedule was
            self.time_progress = min(1.0, self.train_seconds / budget_s)
        frames_per_step = int(tcfg.batch_size) * int(tcfg.clip_len) * self.world_size
        bar = tqdm(total=total, initial=self.step, desc="train", disable=not self.is_main, dynamic_ncols=True)
        last: dict[str, float] = {}
        t0, steps0 = time.time(), self.step
        try:
            while self.step < total:
                result = self.train_step(next(batches))
                self.step += 1
                bar.update(1)
                if self.step % int(tcfg.log_every) == 0 or self.step == total:
                    fps = frames_per_step * (self.step - steps0) / max(1e-9, time.time() - t0)
                    last = {
                        "loss": result.loss, "flow_loss": result.flow_loss, "head_loss": result.head_loss,
                        "denoiser_loss": result.denoiser_loss, "grad_norm": result.grad_norm,
                        "lr": self.flow_sched.get_last_lr()[0], "frames_per_s": fps,
                        "skipped_steps": self.skipped_steps, **result.metrics,
                    }
                    bar.set_postfix(loss=f"{result.loss:.4f}", den=f"{result.denoiser_loss:.3f}", fps=f"{fps:.0f}")
                    if logger:
                        logger.log(self.step, {f"train/{k}": v for k, v in last.items()})
                stop = tcfg.stop_after is not None and self.step >= int(tcfg.stop_after)
                if budget_s is None:
                    self.train_seconds = seconds0 + time.time() - start
                else:  # only a clock-driven run needs the ranks to agree on the time (one broadcast a step)
                    self.train_seconds = self.synced_seconds(seconds0 + time.time() - start)
                    if anneal:
                        self.time_progress = min(1.0, self.train_seconds / budget_s)
                    if self.train_seconds > budget_s:
                        stop = True
                        if self.is_main:
                            tqdm.write(f"train.max_minutes={tcfg.max_minutes} reached at step {self.step}; stopping")
                # the next step's rates, after the clock is read: under anneal_to_max_minutes a run the clock
                # stops leaves min_lr, whatever its last step cost
                self.flow_sched.step()
                self.den_sched.step()
                # evaluate at every eval_every and before the final checkpoint (it holds the calibrated
                # termination threshold)
                if self.step % int(tcfg.eval_every) == 0 or self.step == total or stop:
                    if self.is_main:
                        ev = self.evaluate()
                        if logger and ev:
                            logger.log(self.step, ev)
                        self.write_sample_gif()
                        last.update(ev)
                if self.step % int(tcfg.checkpoint_every) == 0 and not stop:
                    self.save()
                if stop:
                    break
        finally:
            bar.close()
        self.save()
        if logger:
            logger.close()
        return last

    def synced_seconds(self, seconds: float) -> float:
        """Training seconds as rank 0 counts them, on every rank: a clock-driven schedule or stop must not
        differ between DDP ranks (one rank stopping early would hang the others)."""
        if not self.distributed:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class RunLogger:
    """Append-only CSV (one row per ``log`` call, long format: step, key, value) plus tensorboard."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "metrics.csv"
        new = not self.csv_path.exists()
        self.csv_file = open(self.csv_path, "a", newline="")
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["step", "key", "value", "time"])
        self.tb = SummaryWriter(str(folder / "tb"))

    def log(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        for k, v in values.items():
            self.csv.writerow([step, k, v, now])
            self.tb.add_scalar(k, v, step)
        self.csv_file.flush()

    def close(self) -> None:
        self.csv_file.close()
        self.tb.close()


def read_metrics(csv_path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Load a run's metrics.csv as {key: [(step, value), ...]} (later rows win for repeated steps)."""
    series: dict[str, dict[int, float]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            series.setdefault(row["key"], {})[int(row["step"])] = float(row["value"])
    return {k: sorted(v.items()) for k, v in series.items()}
