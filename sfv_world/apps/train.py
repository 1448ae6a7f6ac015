"""``sfv-world train [overrides]``: train STARFlow-V on ``cfg.dataset`` into ``cfg.run_dir``.

Multi-process (DDP) training runs the same entry point under torchrun:

    torchrun --nproc_per_node 2 -m sfv_world.apps.train preset=tiny device=cpu dataset=...
"""

from __future__ import annotations

import json
import sys

from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict:
    from sfv_world.train import Trainer

    trainer = Trainer(cfg)
    try:
        metrics = trainer.fit()
    finally:
        trainer.close()
    if trainer.is_main:
        summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items() if "bpd_t" not in k}
        print(f"checkpoint: {trainer.ckpt_path}")
        print(json.dumps({"step": trainer.step, **summary}, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> int:
    from sfv_world.apps.cli import run_module

    return run_module(run, argv)


if __name__ == "__main__":
    sys.exit(main())
