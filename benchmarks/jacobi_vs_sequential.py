"""Video-aware block Jacobi vs exact sequential inversion (STARFLOW_V.md §5.3), same noise.

    .venv/bin/python benchmarks/jacobi_vs_sequential.py [--frames 2] [--repeats 2] [--batches 1 64] [--threads 1]

Model: 64x64x3 frames, patch 4 -> F = 256 tokens of d = 48 per frame; a *small random* STARFlow-V
(no trained checkpoint exists yet): 2 shallow blocks x 1 layer (width 64), deep block 4 layers
(width 128), head_dim 32. Zero-initialised heads would make every block the identity (and Jacobi
trivially exact in one pass), so W_out is drawn N(0, 0.05^2) instead.

Generation: frame 0 from an empty state (first-frame chunks of block_size_first = 16), then frames
1.. with chunks of block_size = 64 and the previous-frame warm start; max_iter 32 (the release's
settings). Both samplers get the same noise v. For each batch size the table reports deep-block
forward passes per frame, shallow passes per frame, wall ms per frame, mean Jacobi iterations per
sample and chunk, and max |x_jacobi - x_sequential| over all generated frames.

speedup = sequential ms / Jacobi ms; pass_ratio = sequential deep passes / Jacobi deep passes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

from sfv_world.model import StarFlowVConfig, WorldModel  # noqa: E402
from sfv_world.sampling import JacobiConfig  # noqa: E402

MODEL = dict(frame_size=64, channels=3, patch_size=4, max_frames=8, shallow_blocks=2, shallow_layers=1,
             shallow_width=64, deep_layers=4, deep_width=128, head_dim=32, soft_clip=4.0, sigma=0.07,
             cond_drop=0.1, denoiser_layers=1, denoiser_width=64, denoiser_lookahead=0,
             reward_mode="regression", action_kind="discrete", action_dim=4)


def build_model(seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    model = WorldModel(StarFlowVConfig.from_dict(MODEL)).eval()
    with torch.no_grad():
        for name, p in model.flow.named_parameters():
            if "proj_out.weight" in name:
                p.normal_(0.0, 0.05)
    return model


def moving_square_clips(B: int, T: int, size: int = 64, generator: torch.Generator | None = None):
    """Synthetic action-driven video: a bright 12x12 square on a dark background, moved 4 px per
    step by the action (0 left, 1 right, 2 up, 3 down). Returns frames [B, T, 3, H, W] in [-1, 1]
    and actions int64 [B, T-1]."""
    a = torch.randint(0, 4, (B, T - 1), generator=generator)
    pos = torch.randint(8, size - 20, (B, 2), generator=generator)
    step = torch.tensor([[0, -4], [0, 4], [-4, 0], [4, 0]])
    frames = torch.full((B, T, 3, size, size), -0.8)
    for t in range(T):
        if t:
            pos = (pos + step[a[:, t - 1]]).clamp(0, size - 12)
        for b in range(B):
            r, c = pos[b].tolist()
            frames[b, t, :, r:r + 12, c:c + 12] = 0.8
    return frames, a


def train_briefly(model: WorldModel, steps: int, batch: int = 4, clip: int = 3, lr: float = 1e-3) -> list[float]:
    """A few Adam steps of the flow loss on `moving_square_clips` (so frames are temporally coherent)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.flow.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        x, a = moving_square_clips(batch, clip, model.config.frame_size, g)
        x = x + model.config.sigma * torch.randn(x.shape, generator=g)
        loss = model.flow.flow_loss(model.flow(x, a))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.inference_mode()
def generate(model: WorldModel, noise: torch.Tensor, actions: torch.Tensor, method: str, jc: JacobiConfig):
    """noise [B, T, F, d] -> (frames [B, T, C, H, W], per-frame stats, seconds per frame)."""
    B, T = noise.shape[:2]
    state = model.flow.empty_state(B, capacity=T)
    frames, stats = [], []
    t0 = time.perf_counter()
    for t in range(T):
        s = model.flow.generate_frame(state, actions[:, t - 1] if t else None, noise=noise[:, t], method=method,
                                      jacobi=jc)
        frames.append(s.x_tilde)
        chunks = -(-noise.shape[2] // (jc.block_size_first if t == 0 else jc.block_size))
        stats.append((s.passes, s.shallow_passes, float(s.iterations.float().mean()) / chunks))
    return torch.stack(frames, 1), stats, (time.perf_counter() - t0) / T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[1e-3, 1e-6])
    ap.add_argument("--criteria", nargs="+", default=["token", "mean"], help="JacobiConfig.criterion values")
    ap.add_argument("--checkpoint", default=None,
                    help="a trained sfv-world checkpoint (.pt) instead of the small random model")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="first train the small model this many Adam steps on synthetic moving-square video")
    ap.add_argument("--weights", default=None,
                    help="with --train-steps: load the trained weights from here if present, else save them")
    ap.add_argument("--name", default="jacobi_vs_sequential", help="results file stem")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from sfv_world.checkpoint import load_world_model

        model = load_world_model(args.checkpoint)[0].eval()
    else:
        model = build_model()
    losses = []
    if args.train_steps and args.weights and Path(args.weights).exists():
        model.load_state_dict(torch.load(args.weights))  # re-use a previous run's briefly trained weights
    elif args.train_steps:
        losses = train_briefly(model, args.train_steps)
        if args.weights:
            torch.save(model.state_dict(), args.weights)
    if losses:
        print(f"trained {args.train_steps} steps: flow loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f}")
    c = model.config
    rows, summary = [], {"speedup": {}, "pass_ratio": {}, "max_abs_diff": {}}
    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        noise = torch.randn(B, args.frames, c.tokens_per_frame, c.token_dim, generator=g)
        actions = torch.randint(0, c.action_dim, (B, args.frames), generator=g)
        settings = [("sequential", JacobiConfig(16, 64, 0.0, 32, False))]
        settings += [("jacobi", JacobiConfig(16, 64, tau, 32, True, crit)) for crit in args.criteria
                     for tau in args.thresholds]
        results = {}
        for method, jc in settings:
            best = None
            for _ in range(args.repeats):
                x, stats, sec = generate(model, noise, actions, method, jc)
                best = sec if best is None else min(best, sec)
            results[(method, jc.threshold, jc.criterion)] = (x, stats, best)
        x_seq, st_seq, sec_seq = results[("sequential", 0.0, "token")]
        seq_passes = sum(s[0] for s in st_seq) / len(st_seq)
        for (method, tau, crit), (x, stats, sec) in results.items():
            passes = sum(s[0] for s in stats) / len(stats)
            row = {
                "batch": B, "method": method, "tau": tau if method == "jacobi" else "-",
                "criterion": crit if method == "jacobi" else "-",
                "deep_passes_per_frame": passes,
                "shallow_passes_per_frame": sum(s[1] for s in stats) / len(stats),
                "iters_per_chunk": sum(s[2] for s in stats) / len(stats) if method == "jacobi" else "-",
                "ms_per_frame": 1e3 * sec,
                "speedup": sec_seq / sec, "pass_ratio": seq_passes / passes,
                "max_abs_diff": float((x - x_seq).abs().max()),
                "deep_passes_by_frame": [s[0] for s in stats],
                "max_abs_diff_by_frame": [float(v) for v in (x - x_seq).abs().amax((0, 2, 3, 4))],
            }
            rows.append(row)
            if method == "jacobi" and tau == args.thresholds[0] and crit == args.criteria[0]:
                for k in summary:
                    summary[k][f"batch_{B}"] = row[k]
        print(rows[-len(results):])
    trained = "checkpoint" if args.checkpoint else (f"{args.train_steps} steps on moving squares" if args.train_steps
                                                      else "random")
    config = {"model": c.to_dict(), "weights": trained, "checkpoint": args.checkpoint,
              "train_loss_last10": sum(losses[-10:]) / 10 if losses else None,
              "w_out_std_init": None if args.checkpoint else 0.05, "frames": args.frames,
              "repeats (min taken)": args.repeats, "block_size_first": 16, "block_size": 64, "max_iter": 32,
              "criteria": args.criteria, "summary": "speedup/pass_ratio/max_abs_diff: first tau, first criterion",
              "warm_start": True, "torch_threads": torch.get_num_threads()}
    columns = [k for k in rows[0] if not k.endswith("_by_frame")]
    write_results(
        args.name, rows, columns=columns,
        title=f"Block Jacobi vs sequential inversion, {c.frame_size}x{c.frame_size} ({trained} model)",
        compares="Video-aware block Jacobi (first-frame chunks 16, later chunks 64, warm start) against exact "
                 "sequential inversion with KV caches, same noise. speedup = sequential wall time / Jacobi wall "
                 "time per frame; pass_ratio = sequential / Jacobi deep-block forward passes per frame. "
                 + (f"Trained model {args.checkpoint}." if args.checkpoint else
                    f"The small model of the module docstring, briefly trained ({trained}): frames are "
                    "temporally coherent, unlike a random model's." if args.train_steps else
                    "A small random model (W_out ~ N(0, 0.05^2)), not a trained one."),
        config=config,
    )
    import json
    path = RESULTS / f"{args.name}.json"
    payload = json.loads(path.read_text())
    payload.update(summary)  # top-level speedup / pass_ratio / max_abs_diff per batch (tau = first threshold)
    path.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
