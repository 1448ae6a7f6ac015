"""``sfv-world ood [checkpoint] [ood.*=...]``: calibrate likelihood OOD flags and evaluate them (issue 7).

1. Calibration (``ood.calibrate``: ``auto`` = only when the checkpoint has none for its env; ``true``
   recalibrates; ``false`` never) on the checkpoint's **val** split, written into the checkpoint atomically
   (:func:`sfv_world.ood.compute_calibration`, :func:`sfv_world.ood.write_calibration`).
2. Evaluation (``ood.evaluate``) on the **test** split, which neither training nor calibration saw. Every
   piece has ``segment_len`` frames; steps at positions >= ``min_context`` are scored; anomalies start at
   ``onset = min_context + (L - min_context) // 2``. In-distribution negatives are the clean test steps.

   - (a) held-out action (only when the checkpoint was trained with ``train.exclude_actions``): test pieces
     whose first excluded action leads into the frame at ``onset``; positives are the steps reached by an
     excluded action;
   - (b) perturbed frames from onset: Gaussian noise (``noise_levels``), an occluding patch, a colour
     shift, a horizontal flip, a frozen frame;
   - (c) frames of another environment (``splice_dataset``) spliced in from onset;
   - (d) imagination drift: the dream replays the logged actions from ``min_context`` real frames; a step
     has drifted when its PSNR against the real frame is below ``drift_psnr`` (a number or a list: one
     case per threshold). Positives: drifted steps,
     negatives: faithful imagined steps. Scored two ways: the dream's own sampling-time NLL against the
     imagined band (``gen:*``, what the env reports), and the served frames re-scored teacher-forced
     against the real band (``tf:*``).

   Per case and score: AUROC, AUPR (OOD positive), FPR at 95% TPR, the flag rate at the calibrated
   threshold and the detection delay (steps from onset to the first flag). Also the in-distribution
   false-flag rate of every score on the test split against the calibrated rate.

``ood.cases`` (default all of a, b, c, d) selects cases; re-running a subset on the same checkpoint keeps
the other cases' results in ``ood.output``. Writes ``ood.output`` (JSON; entries are keyed by env id so several checkpoints share one file) plus a
markdown table beside it, and ``report/ood.md`` + ``report/ood_roc.png`` in the checkpoint's run folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sfv_world import ood as O

CASE_B = ("noise", "occlude", "colour_shift", "hflip", "freeze")


def _metrics(neg: np.ndarray, pos: np.ndarray, threshold: float | None, flags: np.ndarray | None = None,
             onset: np.ndarray | int | None = None) -> dict[str, Any]:
    """Detection metrics of one score on one case (NaN-free inputs are selected here)."""
    neg = neg[np.isfinite(neg)]
    pos = pos[np.isfinite(pos)]
    m: dict[str, Any] = {"n_neg": int(neg.size), "n_pos": int(pos.size)}
    if neg.size == 0 or pos.size == 0:
        m.update(auroc=None, aupr=None, fpr95=None, note="no positives or no negatives")
        return m
    m["auroc"] = round(O.auroc(neg, pos), 4)
    m["aupr"] = round(O.aupr(neg, pos), 4)
    m["fpr95"] = round(O.fpr_at_tpr(neg, pos, 0.95), 4)
    if threshold is not None:
        m["threshold"] = round(float(threshold), 5)
        m["tpr_at_threshold"] = round(float(np.mean(pos > threshold)), 4)
        m["fpr_at_threshold"] = round(float(np.mean(neg > threshold)), 4)
    if flags is not None and onset is not None:
        delay, detected = O.detection_delay(flags, onset)
        m["detected_frac"] = round(float(detected.mean()), 4)
        m["delay_mean"] = round(float(delay[detected].mean()), 3) if detected.any() else None
    return m


def _case_metrics(scores: dict[str, np.ndarray], neg_scores: dict[str, np.ndarray], pos_mask: np.ndarray,
                  neg_mask: np.ndarray, thresholds: dict[str, Any], onset, score_mask: np.ndarray,
                  prefix: str = "", rows: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of every score: positives scores[s][pos_mask], negatives neg_scores[s][neg_mask]; detection
    delays over the pieces ``rows`` (default all) from ``onset`` (int or int [N])."""
    out = {}
    rows = np.ones(pos_mask.shape[0], bool) if rows is None else rows
    onset = np.broadcast_to(np.asarray(onset), (pos_mask.shape[0],))[rows]
    for name, s in scores.items():
        if not np.isfinite(s[pos_mask]).any():
            continue
        thr = thresholds.get(name, {}).get("threshold")
        flags = None if thr is None else ((np.nan_to_num(s, nan=-np.inf) > thr) & np.broadcast_to(score_mask, s.shape))[rows]
        m = _metrics(neg_scores[name][neg_mask], s[pos_mask], thr, flags, onset)
        # the first anomalous step of each piece only (a discontinuity is most visible there)
        has = pos_mask.any(1)
        first = s[np.flatnonzero(has), pos_mask[has].argmax(1)]
        neg = neg_scores[name][neg_mask]
        first, neg = first[np.isfinite(first)], neg[np.isfinite(neg)]
        m["auroc_first_step"] = round(O.auroc(neg, first), 4) if first.size and neg.size else None
        out[prefix + name] = m
    return out


def _roc(scores, neg_scores, pos_mask, neg_mask, prefix=""):
    curves = {}
    for name, s in scores.items():
        pos, neg = s[pos_mask], neg_scores[name][neg_mask]
        pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
        if pos.size and neg.size:
            fpr, tpr, _ = O.roc_curve(neg, pos)
            keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().astype(int))
            curves[prefix + name] = (fpr[keep].round(4).tolist(), tpr[keep].round(4).tolist())
    return curves


def held_out_action_picks(dataset, episode_ids, length: int, onset: int, exclude: list[int]) -> list[tuple[int, int]]:
    """(episode, start) of pieces whose first excluded action leads into the frame at ``onset``."""
    from sfv_world.datasets import DatasetReader

    excl = np.asarray(exclude, dtype=np.int64)
    picks = []
    with DatasetReader(dataset) as reader:
        for e in episode_ids:
            acts = reader.load_episode(int(e), observations=False).actions
            n_frames = reader.episode_lengths[int(e)] + 1
            for u in np.flatnonzero(np.isin(acts, excl)):
                s = int(u) + 1 - onset
                if s < 0 or s + length > n_frames or np.isin(acts[s:u], excl).any():
                    continue
                picks.append((int(e), s))
    return picks


def evaluate_ood(model, payload: dict[str, Any], entry: dict[str, Any], ocfg: dict[str, Any],
                 settings: O.CalibrationSettings, progress: bool = True) -> dict[str, Any]:
    """The evaluation protocol of the module docstring; returns the result dict (JSON-able)."""
    meta = payload["dataset"]
    dataset = meta["path"]
    test_ids = (meta.get("splits") or {}).get("test") or []
    if not test_ids:
        raise ValueError("the checkpoint's dataset split has no test episodes to evaluate on")
    L = int(entry["segment_len"])
    c = int(settings.min_context)
    onset = c + (L - c) // 2
    excl = list(entry.get("exclude_actions") or [])
    fsize = model.config.frame_size
    seed = int(settings.seed) + 1  # other noise draws / picks than calibration
    kw = {"noise_draws": settings.noise_draws, "seed": seed, "batch_size": settings.batch_size}
    stride = settings.stride or max(L // 2, 1)
    real_band, im_band = entry["bands"]["real"], entry["bands"]["imagined"]
    thr_real, thr_im = entry["scores"]["real"], entry["scores"]["imagined"]
    t = np.arange(L)
    log = (lambda msg: print(f"[ood] {msg}", flush=True)) if progress else (lambda msg: None)

    segs = O.read_segments(dataset, test_ids, L, fsize, settings.max_segments, excl, seed, stride=stride)
    log(f"{len(segs)} in-distribution test pieces of {L} frames, onset {onset}")
    fs_id = O.score_frames(model, segs.frames, segs.actions, **kw)
    sc_id = O.derive_scores(fs_id, real_band, settings.window, c)
    N = len(segs)
    neg_mask = np.broadcast_to(t >= c, (N, L))
    after = np.broadcast_to(t >= onset, (N, L))
    score_mask = t >= c  # [L], broadcast over pieces

    result: dict[str, Any] = {"cases": {}, "roc": {}}
    ff = {}
    for name, s in sc_id.items():
        if name in thr_real:
            v = s[neg_mask]
            ff[name] = round(float(np.mean(v[np.isfinite(v)] > thr_real[name]["threshold"])), 4)
    result["id_false_flag_rate"] = ff
    result["id_false_flag_ok"] = {k: bool(v <= 2 * settings.fpr) for k, v in ff.items()}

    def run_case(key: str, frames: np.ndarray, actions: np.ndarray, pos_mask: np.ndarray, onsets) -> None:
        fs = O.score_frames(model, frames, actions, **kw)
        sc = O.derive_scores(fs, real_band, settings.window, c)
        result["cases"][key] = _case_metrics(sc, sc_id, pos_mask, neg_mask, thr_real, onsets, score_mask)
        result["roc"][key] = _roc(sc, sc_id, pos_mask, neg_mask)

    cases = {str(x) for x in (ocfg.get("cases") or ("a", "b", "c", "d"))}
    unknown = cases - {"a", "b", "c", "d"}
    if unknown:
        raise ValueError(f"ood.cases: unknown cases {sorted(unknown)} (a, b, c, d)")
    # (a) held-out action
    if excl and "a" in cases:
        picks = O.subsample(held_out_action_picks(dataset, test_ids, L, onset, excl), settings.max_segments, seed)
        if picks:
            segs_case = O.load_segments(dataset, picks, L, fsize)
            act_in = np.zeros((len(picks), L), bool)
            act_in[:, 1:] = np.isin(segs_case.actions, excl)
            pos_mask = act_in & (t >= onset)
            log(f"(a) held-out actions {excl}: {len(picks)} pieces, {int(pos_mask.sum())} positive steps")
            run_case("a_held_out_action", segs_case.frames, segs_case.actions, pos_mask, onset)
        else:
            result["cases"]["a_held_out_action"] = {"note": f"no test piece uses actions {excl} after a clean context"}
    # (b) perturbations
    pert = {} if "b" not in cases else O.perturbations(segs.frames, onset, tuple(ocfg.get("noise_levels", (4, 12, 32))),
                           float(ocfg.get("patch_frac", 0.33)), float(ocfg.get("colour_shift", 48)), seed)
    for name, frames in pert.items():
        log(f"(b) {name}")
        run_case(f"b_{name}", frames, segs.actions, after, onset)
    # (c) another environment spliced in
    other = ocfg.get("splice_dataset")
    if "c" not in cases:
        pass
    elif other:
        oseg = O.read_segments(other, None, L - onset, fsize, N, (), seed)
        log(f"(c) splice {len(oseg)} pieces of {other}")
        run_case("c_splice", O.splice(segs.frames, onset, oseg.frames), segs.actions, after, onset)
        result["splice_dataset"] = str(other)
    else:
        result["cases"]["c_splice"] = {"note": "ood.splice_dataset not set"}
    # (d) imagination drift
    if "d" in cases:
        _drift_cases(result, model, payload, meta, segs, c, L, t, settings, ocfg, kw, real_band, im_band, thr_real,
                     thr_im, seed, log)
    result["pieces"] = {"test_in_distribution": N, "segment_len": L, "min_context": c, "onset": onset}
    result["best"] = best_scores(result["cases"])
    return result


def best_scores(cases: dict[str, Any]) -> dict[str, Any]:
    """The score with the highest AUROC in every case."""
    best = {}
    for case, ms in cases.items():
        ranked = [(m["auroc"], k) for k, m in ms.items() if isinstance(m, dict) and m.get("auroc") is not None]
        if ranked:
            a, k = max(ranked)
            best[case] = {"score": k, "auroc": a}
    return best


def _drift_cases(result, model, payload, meta, segs, c, L, t, settings, ocfg, kw, real_band, im_band, thr_real,
                 thr_im, seed, log) -> None:
    """Case (d) at every PSNR threshold of ``ood.drift_psnr`` (one number or a list)."""
    N = len(segs)
    log("(d) imagination")
    im = O.imagine(model, meta, segs, c, O.run_sampler_settings(payload), seed=seed, batch_size=settings.batch_size)
    mse = np.mean((im.frames.astype(np.float64) - segs.frames.astype(np.float64)) ** 2, axis=(2, 3, 4))
    with np.errstate(divide="ignore"):
        psnr = 10 * np.log10(255.0 ** 2 / mse)
    gen_steps = np.broadcast_to(t >= c, (N, L))
    sc_gen = O.derive_scores(O.imagined_frame_scores(im), im_band, settings.window, c)
    sc_gen.pop("action_ratio")
    fs_tf = O.score_frames(model, im.frames, segs.actions, **kw)
    sc_tf = O.derive_scores(fs_tf, real_band, settings.window, c)
    levels = ocfg.get("drift_psnr", 20.0)
    levels = [float(x) for x in (levels if isinstance(levels, (list, tuple)) else [levels])]
    fin = np.where(np.isfinite(psnr), psnr, 100.0)[:, c:]
    result["drift"] = {"psnr_thresholds": levels, "imagined_steps": int(gen_steps.sum()), "drifted_steps": {},
                       "psnr_mean_per_step": [None] * c + np.round(fin.mean(0), 2).tolist(),
                       "psnr_quantiles": {q: round(float(np.quantile(fin, q)), 2) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}}
    for level in levels:
        key = "d_imagination_drift" if len(levels) == 1 else f"d_imagination_drift_psnr<{level:g}"
        drifted = (psnr < level) & gen_steps
        faithful = (~drifted) & gen_steps
        first = np.where(drifted.any(1), drifted.argmax(1), L)
        rows = drifted.any(1)
        d = {}
        d.update(_case_metrics(sc_gen, sc_gen, drifted, faithful, thr_im, first, gen_steps, "gen:", rows))
        d.update(_case_metrics(sc_tf, sc_tf, drifted, faithful, thr_real, first, gen_steps, "tf:", rows))
        for m in d.values():  # delays only over pieces that drift
            if "detected_frac" in m:
                m["pieces_drifting"] = int(rows.sum())
        result["cases"][key] = d
        result["roc"][key] = {**_roc(sc_gen, sc_gen, drifted, faithful, "gen:"),
                              **_roc(sc_tf, sc_tf, drifted, faithful, "tf:")}
        result["drift"]["drifted_steps"][f"{level:g}"] = int(drifted.sum())


# --------------------------------------------------------------------------------------------------
# reporting


def markdown(res: dict[str, Any]) -> str:
    ev = res.get("evaluation") or {}
    cal = res["calibration"]
    lines = [
        f"### OOD flags: {res.get('label') or res['env_id']} ({res['env_id']}, checkpoint step {res['train_step']})",
        "",
        (f"Calibration on {cal['segments']} val pieces of {cal['segment_len']} frames "
         f"(fpr {cal['settings']['fpr']}, {cal['settings']['noise_draws']} noise draws, window {cal['settings']['window']}, "
         f"min context {cal['settings']['min_context']}); excluded actions in training: {cal['exclude_actions'] or 'none'}."),
        "",
    ]
    if not ev:
        return "\n".join(lines) + "\n"
    p = ev["pieces"]
    lines += [f"Test split: {p['test_in_distribution']} in-distribution pieces, anomaly onset at step {p['onset']}.", "",
              ("In-distribution false-flag rate on the test split (calibrated rate "
               f"{cal['settings']['fpr']}; acceptance <= {2 * cal['settings']['fpr']}):"), "",
              "| score | false-flag rate | within 2x |", "|---|---|---|"]
    for k, v in ev["id_false_flag_rate"].items():
        lines.append(f"| {k} | {v:.4f} | {'yes' if ev['id_false_flag_ok'][k] else 'NO'} |")
    lines += ["", ("AUROC/AUPR/FPR@95TPR over every anomalous step; AUROC 1st: the first anomalous step of each piece "
                   "only; TPR@thr: flag rate at the calibrated threshold; delay: mean steps from onset to the first "
                   "flag over detected pieces; detected: fraction of pieces flagged at or after onset."), "",
              "| case | score | AUROC | AUROC 1st | AUPR | FPR@95TPR | TPR@thr | delay (steps) | detected | n_pos / n_neg |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for case, ms in ev["cases"].items():
        if "note" in ms and len(ms) == 1:
            lines.append(f"| {case} | – | {ms['note']} | | | | | | | |")
            continue
        best = ev["best"].get(case, {}).get("score")
        for k, m in ms.items():
            if m.get("auroc") is None:
                lines.append(f"| {case} | {k} | {m.get('note', '–')} | | | | | | | {m['n_pos']} / {m['n_neg']} |")
                continue
            name = f"**{k}**" if k == best else k
            delay = "–" if m.get("delay_mean") is None else f"{m['delay_mean']:.2f}"
            det = "–" if m.get("detected_frac") is None else f"{m['detected_frac']:.2f}"
            af = "–" if m.get("auroc_first_step") is None else f"{m['auroc_first_step']:.3f}"
            lines.append(f"| {case} | {name} | {m['auroc']:.3f} | {af} | {m['aupr']:.3f} | {m['fpr95']:.3f} | "
                         f"{m.get('tpr_at_threshold', float('nan')):.3f} | {delay} | {det} | {m['n_pos']} / {m['n_neg']} |")
    dr = ev.get("drift")
    if dr:
        steps = dr["drifted_steps"]
        if not isinstance(steps, dict):  # a single threshold, as written before thresholds became a list
            steps = {f"{dr.get('psnr_threshold')}": steps}
        counts = ", ".join(f"{n} below {k} dB" for k, n in steps.items())
        lines += ["", (f"Imagination drift (case d): of {dr['imagined_steps']} imagined steps, {counts} (PSNR against "
                       f"the real frame under the same actions; PSNR quantiles {dr.get('psnr_quantiles')})."), ""]
    return "\n".join(lines) + "\n"


def plot_roc(res: dict[str, Any], path: Path) -> Path | None:
    """One panel per case, one ROC curve per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roc = (res.get("evaluation") or {}).get("roc") or {}
    cases = [c for c, v in roc.items() if v]
    if not cases:
        return None
    cols = 4
    rows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, case in zip(axes.ravel(), cases):
        for name, (fpr, tpr) in roc[case].items():
            m = res["evaluation"]["cases"][case].get(name, {})
            ax.plot(fpr, tpr, label=f"{name} ({m.get('auroc', float('nan')):.2f})", lw=1.2)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("FPR", fontsize=8)
        ax.set_ylabel("TPR", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    for ax in axes.ravel()[len(cases):]:
        ax.axis("off")
    fig.suptitle(f"OOD ROC: {res['env_id']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _report_dir(cfg: DictConfig) -> Path:
    ck = Path(cfg.checkpoint)
    if ck.parent.name == "checkpoints":
        return ck.parent.parent / "report"
    return Path(cfg.run_dir) / "report"


def run(cfg: DictConfig) -> dict[str, Any]:
    from sfv_world.checkpoint import load_world_model
    from sfv_world.train import resolve_device

    ocfg = OmegaConf.to_container(cfg.ood, resolve=True)
    settings = O.CalibrationSettings.from_dict(ocfg)
    device = resolve_device(cfg.device)
    ckpt = Path(cfg.checkpoint)
    model, payload = load_world_model(ckpt, device=device)
    env_id = O.env_id_of(payload.get("dataset") or {})
    entry = O.calibration_entry(payload.get("calibration"), env_id) if payload.get("calibration") else None
    mode = str(ocfg.get("calibrate", "auto")).lower()
    if mode not in ("auto", "true", "false"):
        raise SystemExit(f"sfv-world ood: ood.calibrate must be auto, true or false, got {ocfg.get('calibrate')!r}")
    t0 = time.time()
    if mode == "true" or (mode == "auto" and entry is None):
        print(f"[ood] calibrating {ckpt} on its val split ...", flush=True)
        entry = O.compute_calibration(model, payload, settings)
        O.write_calibration(ckpt, entry)
        print(f"[ood] calibration written into {ckpt} ({time.time() - t0:.0f} s)", flush=True)
    elif entry is None:
        raise SystemExit(f"sfv-world ood: {ckpt} holds no calibration for {env_id}; run with ood.calibrate=true")
    res: dict[str, Any] = {
        "env_id": env_id, "checkpoint": str(ckpt), "train_step": int(payload["step"]),
        "calibration": {k: entry[k] for k in ("segments", "segment_len", "exclude_actions", "settings", "episodes")},
        "calibrated_thresholds": {band: {k: v["threshold"] for k, v in entry["scores"][band].items()}
                                  for band in ("real", "imagined")},
    }
    res["calibration"]["episodes"] = len(entry["episodes"])
    out = Path(ocfg.get("output") or "benchmarks/results/ood.json")
    merged = json.loads(out.read_text()) if out.exists() else {}
    runs = merged.get("runs", {}) if isinstance(merged, dict) else {}
    key = str(ocfg.get("label") or env_id)  # entry name in ood.output: several checkpoints of one env need labels
    res["label"] = key
    if bool(ocfg.get("evaluate", True)):
        ev = evaluate_ood(model, payload, entry, ocfg, settings)
        prev = (runs.get(key) or {}).get("evaluation")
        if ocfg.get("cases") and prev and prev.get("pieces") == ev["pieces"] and \
                (runs[key].get("checkpoint"), runs[key].get("train_step")) == (str(ckpt), res["train_step"]):
            # a subset of cases was re-run on the same checkpoint: keep the other cases' results
            for k in ("cases", "roc"):
                prev[k] = {**{c: v for c, v in prev.get(k, {}).items()
                              if not (c.startswith("d_") and any(n.startswith("d_") for n in ev[k]))}, **ev[k]}
            for k, v in ev.items():
                if k not in ("cases", "roc"):
                    prev[k] = v
            prev["best"] = best_scores(prev["cases"])
            ev = prev
        res["evaluation"] = ev
    res["wall_s"] = round(time.time() - t0, 1)
    report = _report_dir(cfg)
    report.mkdir(parents=True, exist_ok=True)
    png = plot_roc(res, report / "ood_roc.png")
    text = markdown(res) + (f"\n![ROC]({png.name})\n" if png else "")
    (report / "ood.md").write_text(text)
    (report / "ood.json").write_text(json.dumps(res, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    # the benchmark file keeps the numbers; ROC curve points stay in the run report (report/ood.json + png)
    runs[key] = {**res, "evaluation": {k: v for k, v in (res.get("evaluation") or {}).items() if k != "roc"}}
    out.write_text(json.dumps({"runs": runs}, indent=1))
    if png:
        import shutil

        shutil.copyfile(png, out.parent / f"ood_roc_{''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in key)}.png")
    md = ["# OOD flags (sfv-world ood)", "",
          "Generated by `sfv-world ood`; scores are defined in `sfv_world/ood.py`. Best score per case in bold.", ""]
    md += [markdown(r) for r in runs.values()]
    out.with_suffix(".md").write_text("\n".join(md))
    print(text)
    return res
