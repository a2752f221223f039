"""A sweep's results: :func:`summarize_sweep` reads the Tune experiment and writes ``results.csv`` (one row per
trial: status, stop reason, epochs, best val metrics, params, error), ``best_config.yaml``, ``best.json`` and
``sweep.png``; it also writes each trial's Ray Train run artefacts (``best.json``, ``metrics.csv``, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

from koa_ray.config import ConfigError, TrainConfig, save_yaml
from koa_ray.tune.experiment import METRIC, MODE, SWEEP_FILE, TIME_ATTR, trial_name
from koa_ray.tune.plot import plot_sweep
from koa_ray.tune.space import apply_params, plain_value

log = logging.getLogger(__name__)


def _patience_hit(qwks: list[float], patience: int) -> bool:
    """Whether the training loop's own early stopping (``patience``) explains the run ending here."""
    if patience <= 0 or not qwks:
        return False
    best, bad = -math.inf, 0
    for q in qwks:
        if q > best + 1e-6:
            best, bad = q, 0
        else:
            bad += 1
    return bad >= patience


def _error_summary(trial) -> str:
    err = None
    try:
        err = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - a missing/unreadable error file must not break the summary
        pass
    if err is None:
        return "unknown error (see the trial's error.txt)"
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    msg = named[-1] if named else (lines[-1] if lines else type(err).__name__)
    return msg[:500]


def _trial_run_artifacts(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """Write the usual run artefacts (best.json, metrics.csv, ...) into a trial's Train run; None if no checkpoint."""
    from koa_ray.checkpoint import META
    from koa_ray.train.run import write_run_artifacts

    ckpts = sorted(p for p in run_dir.glob("checkpoint_epoch_*") if (p / META).is_file())
    if not ckpts:
        return None
    try:
        return write_run_artifacts(cfg, run_dir, ckpts)
    except Exception as e:  # noqa: BLE001 - a half-written checkpoint of a killed trial must not stop the summary
        log.warning("could not write run artefacts for %s: %s", run_dir, e)
        return None


def summarize_sweep(out: str | Path) -> dict:
    """Read the Tune experiment in ``out`` and (re)write results.csv, best_config.yaml, best.json and sweep.png."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    out_dir = Path(out).resolve()
    settings = json.loads((out_dir / SWEEP_FILE).read_text())
    exp_dir = out_dir / settings["name"]
    analysis = ExperimentAnalysis(str(exp_dir), default_metric=METRIC, default_mode=MODE)
    frames = analysis.trial_dataframes
    keys = list(settings["space"])
    max_epochs = settings["max_epochs"]
    rows, best = [], None
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params = {k: plain_value(trial.config.get(k)) for k in keys}
        df = frames.get(trial.trial_id)
        if df is not None and METRIC in getattr(df, "columns", ()):
            df = df[df[METRIC].notna()]
        else:
            df = None
        row = {"trial_id": trial.trial_id, "status": trial.status, "stop_reason": "", "epochs_run": 0,
               "best_val_qwk": None, "best_epoch": None, "val_accuracy": None, "val_macro_f1": None,
               "last_val_qwk": None}
        cfg = None
        try:
            cfg = apply_params(settings["base"], params, name=trial_name(trial.trial_id))
        except ConfigError:
            pass
        if df is not None and len(df):
            qwks = [float(v) for v in df[METRIC]]
            epochs = df[TIME_ATTR] if TIME_ATTR in df else df["epoch"] + 1
            i = int(max(range(len(qwks)), key=lambda j: (qwks[j], -j)))
            at = df.iloc[i]
            row.update(epochs_run=int(epochs.max()), best_val_qwk=qwks[i], best_epoch=int(at.get("epoch", i)),
                       val_accuracy=_num(at.get("val_accuracy")), val_macro_f1=_num(at.get("val_macro_f1")),
                       last_val_qwk=qwks[-1])
            if trial.status == "TERMINATED" and row["epochs_run"] < max_epochs:
                patience = cfg.patience if cfg else 0
                row["status"] = "STOPPED_EARLY"
                row["stop_reason"] = "patience" if _patience_hit(qwks, patience) else (
                    "asha" if settings["scheduler"] == "asha" else "stopped")
            elif trial.status == "TERMINATED":
                row["stop_reason"] = "completed"
        elif trial.status == "TERMINATED":
            row["stop_reason"] = "no results"
        if trial.status == "ERROR":
            row["stop_reason"] = "error"
        run_dir = out_dir / "runs" / trial_name(trial.trial_id)
        run_best = _trial_run_artifacts(cfg, run_dir) if (cfg is not None and run_dir.is_dir()) else None
        checkpoint = str((run_dir / run_best["checkpoint"]).resolve()) if run_best else ""
        row.update(params)
        row["run_dir"] = str(run_dir) if run_dir.is_dir() else ""
        row["checkpoint"] = checkpoint
        row["error"] = _error_summary(trial) if trial.status == "ERROR" else ""
        rows.append(row)
        if row["best_val_qwk"] is not None and checkpoint and cfg is not None:
            if best is None or row["best_val_qwk"] > best[0]["best_val_qwk"]:
                best = (row, cfg, run_best)

    columns = ["trial_id", "status", "stop_reason", "epochs_run", "best_val_qwk", "best_epoch", "val_accuracy",
               "val_macro_f1", "last_val_qwk", *keys, "run_dir", "checkpoint", "error"]
    table = pd.DataFrame(rows, columns=columns)
    for col in ("epochs_run", "best_epoch"):
        table[col] = table[col].astype("Int64")
    for k in keys:  # lists (e.g. a choice of grade weights) as JSON, so the CSV reads back unambiguously
        table[k] = table[k].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    table.to_csv(out_dir / "results.csv", index=False)

    summary = {"out": str(out_dir), "experiment": str(exp_dir), "results_csv": str(out_dir / "results.csv"),
               "n_trials": len(rows), "status_counts": table["status"].value_counts().to_dict(),
               "unfinished": int((~table["status"].isin(["TERMINATED", "STOPPED_EARLY", "ERROR"])).sum()),
               "best": None}
    for f in ("best_config.yaml", "best.json"):
        (out_dir / f).unlink(missing_ok=True)
    if best is not None:
        row, cfg, run_best = best
        best_cfg = dataclasses.replace(cfg, name="best", epochs=max_epochs)
        save_yaml(best_cfg, out_dir / "best_config.yaml")
        ckpt = Path(row["checkpoint"])
        try:
            rel = str(ckpt.relative_to(out_dir))
        except ValueError:
            rel = str(ckpt)
        best_info = {"trial_id": row["trial_id"], "metric": METRIC, "val_qwk": row["best_val_qwk"],
                     "val_accuracy": row["val_accuracy"], "val_macro_f1": row["val_macro_f1"],
                     "epoch": run_best.get("epoch"), "epochs_run": row["epochs_run"],
                     "params": {k: row[k] for k in keys},
                     "checkpoint": rel, "checkpoint_path": str(ckpt), "run_dir": row["run_dir"],
                     "config": str(out_dir / "best_config.yaml")}
        (out_dir / "best.json").write_text(json.dumps(best_info, indent=2, default=_json_default))
        summary.update(best=best_info, best_config=str(out_dir / "best_config.yaml"),
                       best_json=str(out_dir / "best.json"))
    plot_sweep(table, settings["space"], out_dir / "sweep.png")
    summary["plot"] = str(out_dir / "sweep.png")
    return summary


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _json_default(o):
    v = plain_value(o)
    return v if v is not o else str(o)

