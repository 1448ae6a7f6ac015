"""``sfv-world rollout [checkpoint] [rollout.mode=...]``: replay logged data through a world model.

Modes (``rollout.mode``), all writing into ``rollout.output`` (default ``<run_dir>/rollout/<mode>``):

- ``replay`` (default): ``rollout.episodes`` held-out episodes (the checkpoint's test split, else val);
  k = ``rollout.context`` real frames, then the logged actions replayed open-loop for H =
  ``rollout.horizon`` steps in one batch. Writes ``generated/`` (the rollouts as an HDF5 dataset in the
  dataset format), ``videos/episode_<id>.mp4|gif`` (real | dream | difference), ``plots/<metric>.png``
  (PSNR, SSIM, NLL, reward, termination, Jacobi iterations against the horizon step, with the
  copy-last-frame baseline), ``summary.json`` and ``summary.md``.
- ``counterfactual``: one held-out episode (``rollout.episode`` or the first long enough), a window of up
  to ``max_frames`` frames from ``rollout.start``, inverted to its noise and regenerated under its own
  actions and under actions altered from ``rollout.cf_step`` on (``rollout.cf_actions``: flip | random
  | constant:<a>). Writes ``counterfactual.mp4|gif`` (real | reconstruction | counterfactual | diff),
  ``counterfactual/`` (HDF5) and ``summary.json``.
- ``image``: ``rollout.image`` (any picture file) as a one-frame context for ``rollout.episodes``
  worlds; ``free``: the first k frames of held-out episodes. Both run ``rollout.horizon`` steps with
  ``rollout.policy`` (``random`` or a saved SB3 ``.zip``) and write videos, ``generated/`` and
  ``summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sfv_world import rollout as R
from sfv_world.train import resolve_device
from sfv_world.video import write_video
from sfv_world.world import WorldRuntime

MODES = ("replay", "counterfactual", "image", "free")


def _sampler(cfg: DictConfig) -> dict[str, Any]:
    return dict(OmegaConf.to_container(cfg.sampler, resolve=True)) if "sampler" in cfg else {}


def _output(cfg: DictConfig) -> Path:
    r = cfg.rollout
    out = Path(r.output) if r.get("output") else Path(cfg.run_dir) / "rollout" / str(r.mode)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _dataset_and_ids(cfg: DictConfig, meta: dict[str, Any]) -> tuple[str, list[int], str]:
    r = cfg.rollout
    if r.get("dataset"):
        candidates = [str(r.dataset)]  # explicit: no fallback
    else:  # the checkpoint's dataset, else the config's top-level `dataset` (a checkpoint moved between machines)
        candidates = [c for c in (meta.get("path"), cfg.get("dataset")) if c]
    dataset = next((c for c in candidates if Path(c).exists()), None)
    if dataset is None:
        raise FileNotFoundError(f"rollout.dataset: no dataset folder at {candidates} (the checkpoint's is "
                                f"{meta.get('path')!r}); pass rollout.dataset=<folder>")
    if r.get("episode_ids"):
        return str(dataset), [int(e) for e in r.episode_ids], "explicit"
    ids, split = R.held_out_ids(meta, str(r.split))
    return str(dataset), ids, split


def _long_enough(dataset: str, ids: list[int], frames_needed: int, count: int) -> list[int]:
    """The first ``count`` of ``ids`` whose episodes have at least ``frames_needed`` frames."""
    from sfv_world.datasets import DatasetReader

    with DatasetReader(dataset) as reader:
        missing = [e for e in ids if e not in reader.episode_lengths]
        if missing:
            raise ValueError(f"rollout: episodes {missing[:5]} are not in {dataset}")
        ok = [e for e in ids if reader.episode_lengths[e] + 1 >= frames_needed]
    if not ok:
        raise ValueError(f"rollout: no episode of {dataset} among {len(ids)} held-out ones has {frames_needed} frames")
    return ok[: int(count)]


def _sampler_dict(s) -> dict[str, Any]:
    from dataclasses import asdict

    return {"method": s.method, "cfg": s.cfg, "temperature": s.temperature, "denoise": s.denoise,
            **asdict(s.jacobi)}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))


# ----------------------------------------------------------------------------------------------


def run_replay(cfg: DictConfig, out: Path) -> dict[str, Any]:
    r = cfg.rollout
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    probe = WorldRuntime.from_checkpoint(cfg.checkpoint, batch_size=1, device=device, sampler=_sampler(cfg))
    meta = probe.dataset_meta
    dataset, ids, split = _dataset_and_ids(cfg, meta)
    k, H = int(r.context), int(r.horizon)
    ids = _long_enough(dataset, ids, int(r.start) + k + 1, int(r.episodes))
    batch, _ = R.load_replay_batch(dataset, ids, k, H, probe.frame_shape[0], start=int(r.start))
    runtime = R.teacher_runtime(probe, len(batch), seed=int(r.seed))
    t_load = time.perf_counter()
    result = R.replay_open_loop(runtime, batch, seed=int(r.seed))
    summary = R.summarize_replay(result)
    t_model = time.perf_counter()
    gen = R.write_episodes(out / "generated", meta, R.replay_episodes(result),
                           info={"source": "sfv-world rollout (replay)", "checkpoint": str(cfg.checkpoint),
                                 "source_dataset": dataset, "source_episodes": batch.episode_ids, "context": k})
    videos = R.replay_videos(result, out / "videos", int(r.videos), fps=float(r.fps), scale=int(r.scale))
    plots = R.plot_metrics(summary, out / "plots", title=str(meta.get("sfv_world", {}).get("env_id") or ""))
    t_end = time.perf_counter()
    summary.update({
        "mode": "replay", "checkpoint": str(cfg.checkpoint), "dataset": dataset, "split": split,
        "sampler": _sampler_dict(runtime.sampler),
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "generated_dataset": str(gen), "videos": [str(p) for p in videos],
        "plots": {k_: str(p) for k_, p in plots.items()},
    })
    summary["seconds"].update({"load": round(t_load - t0, 3), "model_total": round(t_model - t_load, 3),
                               "write_outputs": round(t_end - t_model, 3), "total": round(t_end - t0, 3)})
    _write_json(out / "summary.json", summary)
    table = (f"Open-loop replay of {summary['episodes']} held-out episodes ({split} split), k={k} context frames, "
             f"H={H}; {summary['seconds']['total']:.1f} s in total "
             f"({summary['seconds']['model_total']:.1f} s model) on {device}.\n\n" + R.markdown_table(summary))
    (out / "summary.md").write_text(table)
    print(table)
    return summary


def run_counterfactual(cfg: DictConfig, out: Path) -> dict[str, Any]:
    r = cfg.rollout
    device = resolve_device(cfg.device)
    from sfv_world.checkpoint import load_world_model

    model, payload = load_world_model(cfg.checkpoint, device=device)
    meta = payload["dataset"]
    dataset, ids, _ = _dataset_and_ids(cfg, meta)
    start = int(r.start)
    if r.get("episode") is not None:
        ids = [int(r.episode)]
    eid = _long_enough(dataset, ids, start + 2, 1)[0]
    L = int(model.config.max_frames)
    batch, _ = R.load_replay_batch(dataset, [eid], 1, L - 1, model.config.frame_size, start=start)
    n = int(batch.valid[0].sum())
    frames, actions = batch.frames[:, :n], batch.actions[:, : n - 1]
    c = model.config
    low, high = -1.0, 1.0
    if c.action_kind == "box":
        sp = json.loads(meta["action_space"]) if isinstance(meta["action_space"], str) else meta["action_space"]
        low, high = float(np.min(sp["low"])), float(np.max(sp["high"]))
    altered = R.alter_actions(actions, int(r.cf_step), str(r.cf_actions), c.action_kind, c.action_dim,
                              seed=int(r.seed), low=low, high=high)
    cf = R.counterfactual(model, frames, actions, altered, int(r.cf_step), seed=int(r.seed))
    video = R.counterfactual_video(cf, out / "counterfactual.mp4", fps=float(r.fps), scale=int(r.scale))
    T = n - 1
    ep = {"observations": cf.counterfactual[0], "actions": altered[0], "rewards": np.zeros(T, np.float32),
          "terminations": np.zeros(T, bool), "truncations": np.arange(T) == T - 1}
    gen = R.write_episodes(out / "counterfactual", meta, [ep],
                           info={"source": "sfv-world rollout (counterfactual)", "checkpoint": str(cfg.checkpoint),
                                 "source_dataset": dataset, "source_episode": eid, "start": start,
                                 "cf_step": int(r.cf_step), "cf_actions": str(r.cf_actions)})
    summary = {
        "mode": "counterfactual", "checkpoint": str(cfg.checkpoint), "dataset": dataset, "episode": eid,
        "start": start, "frames": n, "cf_step": int(r.cf_step), "cf_actions": str(r.cf_actions),
        "reconstruction_max_abs_error_model_units": cf.reconstruction_error,
        "reconstruction_vs_denoised_real_max_abs_u8": int(np.abs(cf.reconstruction.astype(int) - cf.denoised_real).max()),
        "psnr_reconstruction_vs_real": R.psnr(cf.reconstruction[0], cf.real[0]).round(3).tolist(),
        "psnr_counterfactual_vs_reconstruction": R.psnr(cf.counterfactual[0], cf.reconstruction[0]).round(3).tolist(),
        "video": str(video), "dataset_out": str(gen), "seconds": round(cf.seconds, 3),
    }
    _write_json(out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("psnr")}, indent=1))
    return summary


def _policy(cfg: DictConfig, runtime, batch: int):
    r = cfg.rollout
    if str(r.policy) == "random":
        return R.RandomActions(runtime.dataset_meta, batch, seed=int(r.seed)), "random"
    from sfv_world.apps.policy_io import WorldPolicy

    policy = WorldPolicy(str(r.policy), runtime.frame_shape, runtime.feature_dims, device=str(runtime.device))
    runtime.features = policy.latent_features  # the runtime's feature vectors are what the policy was trained on
    return policy, str(r.policy)


def run_free(cfg: DictConfig, out: Path, from_image: bool) -> dict[str, Any]:
    r = cfg.rollout
    device = resolve_device(cfg.device)
    B = int(r.episodes)
    runtime = WorldRuntime.from_checkpoint(cfg.checkpoint, batch_size=B, device=device, sampler=_sampler(cfg),
                                           seed=int(r.seed))
    h, w, C = runtime.frame_shape
    if from_image:
        if not r.get("image"):
            raise ValueError("rollout.mode=image needs rollout.image=<picture file>")
        img = R.load_image_frame(r.image, h, C)
        ctx, ctx_a = np.broadcast_to(img, (B, 1, h, w, C)).copy(), np.zeros((B, 0), np.int64)
        if runtime.config.action_kind == "box":
            ctx_a = np.zeros((B, 0, runtime.config.action_dim), np.float32)
        source = {"image": str(r.image)}
    else:
        dataset, ids, split = _dataset_and_ids(cfg, runtime.dataset_meta)
        k = int(r.context)
        ids = _long_enough(dataset, ids, k, B)
        ids = (ids * B)[:B]
        from sfv_world.datasets import DatasetReader, area_resize

        with DatasetReader(dataset) as reader:
            ctx = np.stack([area_resize(reader.read_frames(e, 0, k), h) for e in ids])
            ctx_a = np.stack([reader.load_episode(e, observations=False).actions[: k - 1] for e in ids])
        source = {"dataset": dataset, "split": split, "episodes": ids}
    policy, policy_name = _policy(cfg, runtime, B)
    if hasattr(policy, "reset"):
        policy.reset(ctx)
    run = R.free_run(runtime, ctx, ctx_a, int(r.horizon), policy)
    videos = [write_video(run.frames[i], out / "videos" / f"world_{i}.mp4", float(r.fps), int(r.scale))
              for i in range(min(int(r.videos), B))]
    gen = R.write_episodes(out / "generated", runtime.dataset_meta, R.free_run_episodes(run),
                           info={"source": f"sfv-world rollout ({r.mode})", "checkpoint": str(cfg.checkpoint),
                                 "policy": policy_name, **source})
    summary = {
        "mode": str(r.mode), "checkpoint": str(cfg.checkpoint), "policy": policy_name, "worlds": B,
        "horizon": int(r.horizon), **source,
        "log_likelihood_bpd_per_step": run.log_likelihood.mean(0).round(4).tolist(),
        "jacobi_iterations_per_step": run.jacobi_iterations.mean(0).round(2).tolist(),
        "predicted_return_mean": float(run.rewards.sum(1).mean()),
        "terminated": run.terminations.any(1).astype(int).tolist(),
        "videos": [str(p) for p in videos], "generated_dataset": str(gen), "seconds": round(run.seconds, 3),
    }
    _write_json(out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if "per_step" not in k}, indent=1))
    return summary


def run(cfg: DictConfig) -> dict[str, Any]:
    mode = str(cfg.rollout.mode)
    if mode not in MODES:
        raise ValueError(f"rollout.mode must be one of {MODES}, got {mode!r}")
    out = _output(cfg)
    if mode == "replay":
        return run_replay(cfg, out)
    if mode == "counterfactual":
        return run_counterfactual(cfg, out)
    return run_free(cfg, out, from_image=(mode == "image"))
