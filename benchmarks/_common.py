"""Shared helpers for benchmarks: machine info and writing results as JSON + a markdown table.

Every benchmark writes ``benchmarks/results/<name>.json`` (machine, config, rows) and
``benchmarks/results/<name>.md`` (the same as a table, with the comparison it makes).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, Python and key library versions."""
    import numpy as np

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numpy": np.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        # the benchmark machines are shared: a load above the core count means contended timings
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for mod in ("torch", "numba", "h5py", "gymnasium", "ale_py"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional, informational only
            pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if abs(v) < 1:
            return f"{v:.3g}"
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict[str, Any]], *, title: str, config: dict[str, Any],
                  compares: str, columns: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md``; print the table; return both paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    payload = {"name": name, "title": title, "machine": machine, "config": config, "compares": compares,
               "rows": list(rows)}
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    table = markdown_table(rows, columns)
    md = [f"# {title}", "", compares, "", table, "",
          f"Machine: {machine['cpu']}, {machine['usable_cores']} usable cores, Python {machine['python']}, "
          f"{machine['platform']}; measured {machine['date_utc']} UTC, 1-min load average "
          f"{machine['load_average_1min']} at the end (shared machine: absolute numbers vary, ratios less).",
          "", "Config: `" + json.dumps(config, default=str) + "`", ""]
    md_path = RESULTS / f"{name}.md"
    md_path.write_text("\n".join(md))
    print(table)
    print(f"\nwrote {json_path} and {md_path}")
    return json_path, md_path


def cartpole_view(runtime, checkpoint: str, why: str):
    """(latent ``ObservationSpec``, real CartPole-v1 env config with the dataset's crop and strips) of a
    ``WorldRuntime``; exits naming ``checkpoint`` if its dataset is not CartPole-v1 (``why`` says what needs it)."""
    from omegaconf import OmegaConf
    from sfv_world.agents.evaluation import ObservationSpec

    env_id = runtime.dataset_meta.get("env_id", "CartPole-v1")
    if env_id != "CartPole-v1":
        raise SystemExit(f"--checkpoint {checkpoint}: trained on {env_id!r}; {why} needs CartPole-v1")
    spec = ObservationSpec.from_runtime(runtime, "latent", 1)
    env_cfg = OmegaConf.create({"name": "cartpole", "id": "CartPole-v1", "frame_source": "render", "kwargs": {},
                                **spec.view_config()})
    return spec, env_cfg


def check_policy_args(args) -> None:
    """Exit naming the argument unless ``args.checkpoint`` (and ``args.policy``, if given) are files and
    ``args.epsilon`` is a probability (the benchmarks that play a saved latent policy with random actions)."""
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
    if args.policy is not None and not Path(args.policy).is_file():
        raise SystemExit(f"--policy {args.policy}: no such file")
    if not 0.0 <= args.epsilon <= 1.0:
        raise SystemExit(f"--epsilon {args.epsilon}: must be a probability in [0, 1]")
