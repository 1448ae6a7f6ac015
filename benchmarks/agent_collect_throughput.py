"""DIAMOND-loop collection throughput: real frames/s of an imagination agent collecting CartPole data.

    .venv/bin/python benchmarks/agent_collect_throughput.py \
        --checkpoint runs/cpu-demo/checkpoints/last.pt --policy runs/cpu-demo/agent/ppo-latent/policy.zip

The agent acts on ``obs_mode=latent`` observations: the world model's causal features of the real
history, so every real frame costs one world-model call. Rows (same process, same episodes seeds):
  * observe = ``append``: ``WorldRuntime.observe`` (``StarFlowV.append_frame``: one cached forward
    pass over the new frame's tokens);
  * observe = ``re-encode``: the previous implementation, kept here as the reference: the window
    [held frames, new frame] is re-encoded with one forward pass per step (cost grows with the window);
each at ``n_envs`` 1 and 16 (the pipeline's default ``pipeline.collect_envs``), with ``collect_batched`` +
``BatchedImaginationAgentPolicy``. Compares:
frames/s of every row against the batch-1 re-encode row (the collection of sessions before this one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from omegaconf import OmegaConf

from sfv_world.world import WorldRuntime, WorldStep

CARTPOLE = Path(__file__).resolve().parents[1] / "configs" / "env" / "cartpole.yaml"


class ReencodingRuntime(WorldRuntime):
    """``observe`` as it was: re-encode [held frames, new frame] with one forward pass every step."""

    @torch.no_grad()
    def observe(self, frames, actions) -> WorldStep:
        B = self.batch_size
        a = self._actions_to_model(actions, (B,), "actions")
        x = self._frames_to_model(frames, "frames")
        self._ensure_room()
        st = self.state
        n = st.num_frames
        x_all = torch.cat([st.history_x[:, :n], self._noisy(x)[:, None]], 1)
        a_all = torch.cat([st.history_a[:, : n - 1], a[:, None].to(st.history_a.dtype)], 1)
        m_all = torch.cat([st.history_mask[:, :n], torch.ones(B, 1, dtype=torch.bool, device=self.device)], 1)
        self.state, out = self.flow.encode_context(x_all, a_all, m_all, cfg=st.cfg, capacity=self.context_window)
        term = torch.sigmoid(out.termination_logit[:, -1].float())
        return WorldStep(frames=frames, rewards=self.flow.reward_value(out.reward[:, -1]).float().cpu().numpy(),
                         termination_prob=term.cpu().numpy(),
                         termination_logit=out.termination_logit[:, -1].float().cpu().numpy(),
                         terminations=(term > 0.5).cpu().numpy(),
                         log_likelihood=self._bits(out.nll[:, -1]), jacobi_iterations=np.zeros(B, dtype=np.int64),
                         features=out.features[:, -1].float().cpu().numpy(), out_of_range=np.zeros(B, dtype=bool),
                         frame_peak=x_all[:, -1].flatten(1).abs().amax(1).float().cpu().numpy())


def measure(args, n_envs: int, observe: str, folder: Path) -> dict:
    from sfv_world.agents.collection import BatchedImaginationAgentPolicy
    from sfv_world.agents.evaluation import ObservationSpec
    from sfv_world.datasets import collect_batched
    from sfv_world.envs.sources import make_source_env
    from stable_baselines3 import PPO

    cls = WorldRuntime if observe == "append" else ReencodingRuntime
    runtime = cls.from_checkpoint(args.checkpoint, batch_size=n_envs, seed=0)
    spec = ObservationSpec.from_runtime(runtime, "latent", 1)
    env_cfg = OmegaConf.load(CARTPOLE)
    spec.check_env(env_cfg)
    model = PPO.load(args.policy, device="cpu")
    envs = [make_source_env(env_cfg) for _ in range(n_envs)]
    out = folder / f"{observe}-{n_envs}"
    t0 = time.perf_counter()
    policy = BatchedImaginationAgentPolicy(model, envs[0].action_space, spec, n_envs, epsilon=0.1, runtime=runtime)
    stats = collect_batched(envs, out, policy, episodes=args.episodes, frame_size=spec.stored_frame_size, seed=5000,
                            progress=False)
    wall = time.perf_counter() - t0
    for env in envs:
        env.close()
    return {"observe": observe, "n_envs": n_envs, "episodes": stats.episodes, "frames": stats.transitions,
            "mean_return": float(np.mean(stats.returns)), "wall_s": wall, "frames_per_s": stats.transitions / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="world-model checkpoint (.pt) of a CartPole cpu-demo run")
    p.add_argument("--policy", required=True, help="SB3 policy.zip of an obs_mode=latent imagination agent")
    p.add_argument("--episodes", type=int, default=32, help="episodes per row")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    for name in ("checkpoint", "policy"):
        if not Path(getattr(args, name)).is_file():
            p.error(f"--{name} {getattr(args, name)} does not exist")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for observe in ("re-encode", "append"):
            for n_envs in (1, 16):
                rows.append(measure(args, n_envs, observe, Path(tmp)))
                print(rows[-1], flush=True)
    base = rows[0]["frames_per_s"]
    for r in rows:
        r["vs_batch1_reencode"] = r["frames_per_s"] / base
    write_results("agent_collect_throughput", rows,
                  title="Imagination-agent collection throughput (CartPole, obs_mode=latent)",
                  config={"checkpoint": args.checkpoint, "policy": args.policy, "episodes": args.episodes,
                          "threads": args.threads, "epsilon": 0.1, "seed": 5000},
                  compares="real frames/s of the DIAMOND-loop collector (env step + render + resize + world-model "
                           "features + policy + HDF5), each row against batch-1 re-encoding (the collector before "
                           "append_frame and collect_batched), all rows in one process.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
