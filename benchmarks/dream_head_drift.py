"""Why the dream's termination head fires with the pole upright: its logit against the pole angle, on dreamed frames.

    python benchmarks/dream_head_drift.py --checkpoint runs/cpu-demo/checkpoints/last.pt \
        --dataset runs/cpu-demo/data/cartpole --agent runs/cpu-demo/agent/ppo-latent/seed0/policy.zip

``dream_endings.py`` finds that many dreamed episodes end while a pixel->state probe reads the pole as
upright. This runs one latent policy (sampled actions, the preset's action noise) in ``n_envs`` dream worlds
for ``--steps`` steps *without* ending them, and records every step's termination logit, the probe's pole
angle and cart position of the dreamed frame, and whether the frame was clamped (``out_of_range``). A
*twin* runtime is teacher-forced on the dream's own decoded uint8 frames (``WorldRuntime.observe``, as real
frames are seen), so its logit is the head's verdict on what the dream shows rather than on the latent
sample it committed. A world's steps after the probe first reads a real fall (|theta| > 12 degrees) are left out.

Rows: per probe-angle bin, the steps, the share whose head probability passes the preset's threshold in
the dream and in the twin, and their median logits. The JSON's ``summary`` (also in the markdown) adds:
the fire rate on upright frames (probe |theta| < ``--upright-deg``, |x| < 1.8) with and without clamping,
how often an upright fire is followed by another fire on the next step, each world's first upright fire
(median step and angle, and how many came on or after a clamped frame), the worlds whose dreamed pole the probe
reads past 12 degrees (a fall; median step), and the correlation of the dream's and the twin's logits.
Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results

BINS = ((0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12))


def record(model, checkpoint: str, dataset: str, probe, agent: dict, steps: int, seed: int, progress) -> dict:
    """Arrays [steps, N]: dream_logit, twin_logit (float32), theta_deg, x (float64, the probe's), clamped (bool)."""
    from dream_endings import act
    from sfv_world.agents.imagination import AgentSettings, dream_vec_env

    n = int(agent["n_envs"])
    venv = dream_vec_env(checkpoint, AgentSettings.from_config(agent, dataset=dataset), obs_mode="latent",
                         horizon=steps + 1, termination="threshold",
                         termination_threshold=1.0 - 1e-12)  # the head never ends a world here
    core, rng = venv.core, np.random.default_rng(seed)
    core.seed(seed)  # the context draw and the dream's sampling (reset_rows below bypasses the VecEnv's seeding)
    frames, actions = core.pool.sample(core.rng, n)
    core.reset_rows(np.arange(n), {"frames": frames, "actions": actions})
    twin = core.runtime.sibling(n, seed=seed + 1)
    twin.reset(frames, actions)
    obs = core.observations()
    out: dict[str, list] = {k: [] for k in ("dream_logit", "twin_logit", "theta_deg", "x", "clamped")}
    for _ in range(steps):
        a = act(model, obs, float(agent["action_noise"]), rng, deterministic=False)
        obs, _, _, _, info = core.step(core.validate_actions(a))
        shown = core.frames()  # uint8 [N, h, w, C], the decoded dream
        state = probe(shown)
        out["dream_logit"].append(info["termination_logit"])
        out["twin_logit"].append(twin.observe(shown, a).termination_logit)
        out["theta_deg"].append(np.degrees(np.abs(state[:, 2])))
        out["x"].append(np.abs(state[:, 0]))
        out["clamped"].append(info["out_of_range"])
        progress()
    return {k: np.stack(v) for k, v in out.items()}


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two float arrays, None where either is constant (or empty)."""
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return round(float(np.corrcoef(a, b)[0, 1]), 4)


def analyse(rec: dict, threshold: float, upright_deg: float) -> tuple[list[dict], dict]:
    """(rows per angle bin, summary) from :func:`record`'s arrays."""
    logit_t = float(np.log(threshold / (1.0 - threshold)))
    dream_fire, twin_fire = rec["dream_logit"] > logit_t, rec["twin_logit"] > logit_t
    theta = rec["theta_deg"]
    kept = np.cumsum(theta > 12.0, 0) == 0  # before the probe's first real fall
    rows = []
    for lo, hi in BINS:
        m = kept & (theta >= lo) & (theta < hi)
        if not m.any():
            continue
        rows.append({"theta_deg": f"{lo}-{hi}", "steps": int(m.sum()),
                     "dream_fire": round(float(dream_fire[m].mean()), 3), "twin_fire": round(float(twin_fire[m].mean()), 3),
                     "dream_logit_median": round(float(np.median(rec["dream_logit"][m])), 1),
                     "twin_logit_median": round(float(np.median(rec["twin_logit"][m])), 1)})
    upright = kept & (theta < upright_deg) & (rec["x"] < 1.8)
    spurious = upright & dream_fire
    follows = spurious[:-1] & dream_fire[1:]
    clamped = rec["clamped"]
    first = []  # per world with an upright fire: (its step index, probe angle, a clamp on or before it)
    for i in np.flatnonzero(spurious.any(0)):
        t = int(np.argmax(spurious[:, i]))
        first.append((t, float(theta[t, i]), bool(clamped[: t + 1, i].any())))
    fell = (theta > 12.0).any(0)  # [N]: worlds whose dreamed pole the probe reads past the real limit

    def rate(mask):
        return round(float(dream_fire[mask].mean()), 3) if mask.any() else None

    summary = {
        "upright_steps": int(upright.sum()), "upright_fire": rate(upright),
        "upright_fire_clamped": rate(upright & clamped), "upright_fire_unclamped": rate(upright & ~clamped),
        "twin_upright_fire": round(float(twin_fire[upright].mean()), 3) if upright.any() else None,
        "fire_again_next_step": round(float(follows.sum() / max(int(spurious[:-1].sum()), 1)), 3),
        "worlds_with_upright_fire": f"{len(first)} of {theta.shape[1]}",
        "first_upright_fire_step_median": float(np.median([f[0] for f in first]) + 1) if first else None,
        "first_upright_fire_theta_median": round(float(np.median([f[1] for f in first])), 2) if first else None,
        "first_upright_fire_after_a_clamp": f"{sum(f[2] for f in first)} of {len(first)}",
        "worlds_fallen": f"{int(fell.sum())} of {theta.shape[1]}",
        "first_fall_step_median": float(np.median(np.argmax(theta[:, fell] > 12.0, 0)) + 1) if fell.any() else None,
        "dream_twin_logit_corr": correlation(rec["dream_logit"][kept], rec["twin_logit"][kept]),
    }
    return rows, summary


def main(argv: list[str] | None = None) -> None:
    import torch
    from latent_oracle import preset_agent
    from stable_baselines3 import PPO
    from tqdm import tqdm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True, help="the checkpoint's CartPole dataset folder (probe + dream contexts)")
    p.add_argument("--agent", required=True, help="an SB3 PPO latent policy .zip")
    p.add_argument("--preset", default="cpu-demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an agent setting")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--upright-deg", type=float, default=6.0)
    p.add_argument("--probe-episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="dream_head_drift")
    args = p.parse_args(argv)
    for flag, path, ok in (("--checkpoint", args.checkpoint, Path(args.checkpoint).is_file()),
                           ("--dataset", args.dataset, Path(args.dataset).is_dir()),
                           ("--agent", args.agent, Path(args.agent).is_file())):
        if not ok:
            raise SystemExit(f"{flag} {path}: not found")
    if args.steps < 2 or args.probe_episodes < 2:
        raise SystemExit("--steps and --probe-episodes must be >= 2")
    agent = preset_agent(args.preset, args.set)

    from dream_physics import cartpole_probe
    from sfv_world.checkpoint import load_checkpoint

    frame_size = int(load_checkpoint(args.checkpoint)["model_config"]["frame_size"])
    probe = cartpole_probe(args.dataset, args.probe_episodes, frame_size)
    model = PPO.load(args.agent, device="cpu")
    torch.manual_seed(args.seed)  # the policy samples its actions with torch's global generator
    with tqdm(total=args.steps, desc="dream steps", unit="step") as bar:
        rec = record(model, args.checkpoint, args.dataset, probe, agent, args.steps, args.seed, lambda: bar.update(1))
    threshold = float(agent["termination_threshold"])
    rows, summary = analyse(rec, threshold, args.upright_deg)
    print(summary, flush=True)
    write_results(
        args.name, rows, title="The dream's termination head against the pole angle read off dreamed frames",
        config={**vars(args), "termination_threshold": threshold, "n_envs": agent["n_envs"],
                "action_noise": agent["action_noise"], "probe_r2_theta": round(float(probe.r2[2]), 4),
                "summary": summary},
        compares=(f"{agent['n_envs']} dream worlds, {args.steps} steps, never ended; the policy's sampled actions "
                  f"with action noise {agent['action_noise']}. dream_fire / twin_fire: share of steps whose head "
                  f"probability passes {threshold} in the dream / in a twin runtime teacher-forced on the dream's "
                  f"decoded frames; theta_deg: the probe's |theta| of the dreamed frame (held-out R^2 "
                  f"{probe.r2[2]:.3f}). Summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()) + "."))


if __name__ == "__main__":
    main()
