"""``sfv-world quality [checkpoint]``: open-loop prediction quality on held-out episodes.

From k real context frames, the logged actions are replayed for H steps with the configured sampler
(block Jacobi by default). Reported per horizon step: PSNR of the model and of the copy-last-frame
baseline;

PSNR definition: ``psnr_model`` / ``psnr_copy_last`` are 10 log10(255^2 / MSE) with the MSE averaged over
every held-out window at that horizon step. The mean of per-frame PSNRs is ill-defined here: at 32x32 many
consecutive CartPole frames are pixel-identical (infinite PSNR for copy-last), so it is reported separately
(``*_framewise_mean``, each frame capped at 100 dB) for transparency.
Also reported per frame position: held-out NLL in bits/dim (teacher-forced); and reward/termination F1
(teacher-forced, every held-out transition). Written to ``quality.output`` (JSON) plus a markdown table
beside it, and to ``<run_dir>/quality.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from sfv_world.autoencoder import IdentityCodec
from sfv_world.checkpoint import load_world_model
from sfv_world.datasets import ClipDataset, DatasetReader
from sfv_world.model import nll_to_bits_per_dim
from sfv_world.quality import mse, open_loop_rollout, psnr_from_mse, side_by_side_gif, to_hwc_uint8
from sfv_world.train import TransitionSet, binary_f1, head_logits, resolve_device, reward_sign_f1


def evenly_spaced(n_items: int, k: int) -> list[int]:
    """k indices spread evenly over range(n_items) (all of them when k >= n_items)."""
    if k >= n_items:
        return list(range(n_items))
    return np.linspace(0, n_items - 1, k).round().astype(int).tolist()


@torch.no_grad()
def evaluate_quality(cfg: DictConfig) -> dict:
    q = cfg.quality
    device = resolve_device(cfg.device)
    model, payload = load_world_model(cfg.checkpoint, device=device)
    mcfg = model.config
    dataset_path = q.dataset or payload["dataset"]["path"]
    reader = DatasetReader(dataset_path)
    test_ids = payload["dataset"]["splits"]["test"]
    episodes = OmegaConf.select(cfg, "quality.episodes", default=None)
    if episodes is not None:  # explicit episodes, e.g. only those an agent collected
        test_ids = [int(e) for e in episodes]
        missing = sorted(set(test_ids) - set(int(e) for e in reader.episode_ids))
        if missing:
            raise ValueError(f"quality.episodes: {dataset_path} has no episode {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} (it holds {reader.num_episodes})")
    if not test_ids:
        raise ValueError(f"checkpoint {cfg.checkpoint}: its dataset split has no test episodes"
                         if episodes is None else "quality.episodes is empty")
    T = int(q.context) + int(q.horizon)
    clips = ClipDataset(reader, test_ids, clip_len=T, frame_size=mcfg.frame_size, pad_start=False)
    if len(clips) == 0:
        raise ValueError(f"no test episode of {dataset_path} has {T} frames (context {q.context} + horizon {q.horizon})")
    idx = evenly_spaced(len(clips), int(q.max_windows))
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    codec = IdentityCodec()
    gen = torch.Generator().manual_seed(int(q.seed))

    temperatures = [float(t) for t in q.temperatures]
    if not temperatures:
        raise ValueError("quality.temperatures is empty: give at least one sampling temperature")
    mse_model = {t: [] for t in temperatures}
    mse_copy, nll_rows = [], []
    term_pred, term_true, rew_pred, rew_true = [], [], [], []
    gif_done = False
    t0 = time.time()
    for start in tqdm(range(0, len(idx), int(q.batch_size)), desc="quality", unit="batch"):
        items = [clips[j] for j in idx[start : start + int(q.batch_size)]]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        for t in temperatures:
            real, dream = open_loop_rollout(model, batch, int(q.context), {**sampler, "temperature": t},
                                            device=device, seed=int(q.seed) + start)
            mse_model[t].append(mse(dream, real))  # [B,H]
            if not gif_done:
                side_by_side_gif(real[0], dream[0], Path(cfg.run_dir) / "report" / f"quality_rollout_t{t:g}.gif")
        gif_done = True
        last_ctx = to_hwc_uint8(batch["frames"][:, int(q.context) - 1])  # [B,H,W,C]
        mse_copy.append(mse(np.broadcast_to(last_ctx[:, None], real.shape), real))
        # teacher-forced likelihood and heads on the same windows
        frames = batch["frames"].to(device)
        x = codec.encode(frames)
        x_tilde = x + mcfg.sigma * torch.randn(x.shape, generator=gen).to(device)
        out = model.flow(x_tilde, batch["actions"].to(device))
        nll_rows.append(nll_to_bits_per_dim(out.nll, mcfg).cpu().numpy())  # [B,T]
    # reward/termination: every transition of the test episodes, real frames (teacher-forced), the
    # checkpoint's calibrated termination threshold
    transitions = TransitionSet(reader, test_ids, mcfg.frame_size, memory_budget_gb=4.0)
    for hb in transitions.chunks(256):
        r, d = head_logits(model.flow.heads, hb, mcfg.sigma, device, gen)
        term_pred.append((d > 0).cpu().numpy())
        term_true.append(hb["terminations"][:, -1].numpy())
        rew_pred.append(model.flow.reward_value(r).cpu().numpy())
        rew_true.append(hb["rewards"][:, -1].numpy())
    elapsed = time.time() - t0

    ems = {t: np.concatenate(v) for t, v in mse_model.items()}  # [N, H] per temperature
    em, ec = ems[temperatures[0]], np.concatenate(mse_copy)
    pm, pc = psnr_from_mse(em.mean(0)), psnr_from_mse(ec.mean(0))
    tp, tt = np.concatenate(term_pred), np.concatenate(term_true)
    rp, rt = np.concatenate(rew_pred), np.concatenate(rew_true)
    result = {
        "checkpoint": str(cfg.checkpoint),
        "dataset": str(dataset_path),
        "test_episodes": len(test_ids),
        "windows": int(em.shape[0]),
        "context": int(q.context),
        "horizon": int(q.horizon),
        "sampler": sampler,
        "psnr_definition": "10*log10(255^2 / MSE), MSE averaged over all windows at each horizon step",
        "psnr_model": pm.round(3).tolist(),
        "psnr_copy_last": pc.round(3).tolist(),
        "beats_copy_last_at_every_step": bool(np.all(pm > pc)),
        "temperature": temperatures[0],
        "psnr_model_by_temperature": {f"{t:g}": psnr_from_mse(e.mean(0)).round(3).tolist() for t, e in ems.items()},
        "psnr_model_framewise_mean": np.minimum(psnr_from_mse(em), 100).mean(0).round(3).tolist(),
        "psnr_copy_last_framewise_mean": np.minimum(psnr_from_mse(ec), 100).mean(0).round(3).tolist(),
        "identical_copy_last_frames": int((ec == 0).sum()),
        "nll_bpd_per_position": np.concatenate(nll_rows).mean(0).round(4).tolist(),
        "termination_f1": round(binary_f1(tp, tt), 4),
        "termination_positives": int(tt.sum()),
        "termination_transitions": int(tt.size),
        # up to each episode's real end: a terminal tail's later steps are easy positives (collect.terminal_tail)
        "termination_f1_to_end": round(binary_f1(tp[transitions.live], tt[transitions.live]), 4),
        "termination_positives_to_end": int(tt[transitions.live].sum()),
        "reward_mae": round(float(np.mean(np.abs(rp - rt))), 5),
        "reward_sign_f1": round(reward_sign_f1(rp, rt), 4),
        "train_step": int(payload["step"]),
        "eval_seconds": round(elapsed, 1),
    }
    return result


def markdown_table(result: dict) -> str:
    lines = [
        f"Open-loop prediction on {result['windows']} held-out windows ({result['test_episodes']} test episodes), "
        f"{result['context']} context frames, sampler `{result['sampler']['method']}`; PSNR from the MSE "
        "pooled over windows at each step.",
        "",
    ]
    temps = list(result["psnr_model_by_temperature"])
    lines.append("| horizon step | " + " | ".join(f"PSNR model, temperature {t} (dB)" for t in temps) + " | PSNR copy-last (dB) |")
    lines.append("|---" * (len(temps) + 2) + "|")
    for h, c in enumerate(result["psnr_copy_last"]):
        row = " | ".join(f"{result['psnr_model_by_temperature'][t][h]:.2f}" for t in temps)
        lines.append(f"| {h + 1} | {row} | {c:.2f} |")
    to_end = result.get("termination_f1_to_end")  # absent from results written before terminal tails
    lines += [
        "",
        f"Termination F1 {result['termination_f1']:.3f} ({result['termination_positives']} positives in "
        f"{result.get('termination_transitions', '?')} test transitions; up to each episode's real end, without "
        f"a terminal tail's later steps: {'n/a' if to_end is None else f'{to_end:.3f}'}); "
        f"reward MAE {result['reward_mae']:.4f}; held-out NLL per position (bits/dim): "
        + ", ".join(f"{v:.3f}" for v in result["nll_bpd_per_position"]),
    ]
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> dict:
    result = evaluate_quality(cfg)
    text = json.dumps(result, indent=1)
    for path in {Path(cfg.quality.output), Path(cfg.run_dir) / "quality.json"}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.with_suffix(".md").write_text(markdown_table(result))
    print(markdown_table(result))
    return result
