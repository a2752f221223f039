"""Experiment tracking with MLflow: one MLflow run per koa training run.

The driver owns the MLflow run: it creates it (or finds it again when a run of the same folder resumes), logs the
resolved config as params, logs every epoch's metrics as they arrive from rank 0 through the progress events
(:mod:`koa_ray.progress`), and at the end the curves, metrics table, confusion matrix, model card and best checkpoint
as artifacts. Workers never open the store: a store under the run folder then works on a multi-node cluster with
no shared disk, and a tracking server (``--mlflow-uri http://...``) needs to be reachable from the driver only.

Default store: ``sqlite:///<run folder>/mlflow.db`` with artifacts in ``<run folder>/mlartifacts`` (MLflow's default
backend since 3.7; the file store is legacy). Browse it with ``mlflow ui --backend-store-uri <that URI>``.
Ray Tune sweeps log one MLflow run per trial with Ray's ``MLflowLoggerCallback`` (:func:`tune_callback`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

RUN_DIR_TAG = "koa.run_dir"


def _quiet_mlflow() -> None:
    """Keep MLflow's and Alembic's INFO lines (store creation, schema migrations) off the console, unless
    ``--verbose``; call before importing mlflow."""
    import logging
    import os

    from koa_ray.progress import verbose

    if verbose():
        return
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_uri(run_dir: str | Path) -> str:
    """The local store of a run folder: ``sqlite:///<run_dir>/mlflow.db``."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.001}}`` -> ``{"optim.lr": "0.001"}``; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def scalar_metrics(m: dict) -> dict[str, float]:
    """The finite numeric entries of an epoch's metrics (MLflow metrics are scalars)."""
    out = {}
    for k, v in m.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k == "epoch":
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class MlflowRun:
    """The MLflow run of one training run, driven from the driver.

    Args:
        cfg: the resolved :class:`koa_ray.config.TrainConfig` (its fields become params).
        run_dir: the run folder (a resumed run with the same folder continues the same MLflow run).
        tracking_uri: an MLflow tracking URI; default :func:`default_uri` of ``run_dir``.
        experiment: MLflow experiment name.

    Raises:
        RuntimeError: MLflow is not installed (``pip install mlflow-skinny``), or the store cannot be opened.
    """

    def __init__(self, cfg, run_dir: str | Path, tracking_uri: str | None = None, experiment: str = "koa"):
        _quiet_mlflow()
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise RuntimeError("experiment tracking needs MLflow: pip install mlflow-skinny (or pass --no-mlflow)") \
                from e
        from koa_ray.config import to_dict

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri or default_uri(self.run_dir)
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                loc = (self.run_dir / "mlartifacts").resolve().as_uri() if tracking_uri is None else None
                exp_id = self.client.create_experiment(experiment, artifact_location=loc)
            key = str(self.run_dir.resolve())
            found = [] if "'" in key else self.client.search_runs(  # (a quote cannot go into the filter)
                [exp_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{key}'", max_results=1,
                order_by=["attributes.start_time DESC"])
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                self.resumed = True
            else:
                run = self.client.create_run(exp_id, run_name=cfg.name, tags={RUN_DIR_TAG: key, "koa.arch":
                                             cfg.model.arch, "koa.attention": cfg.model.attention})
                self.run_id = run.info.run_id
                self.resumed = False
                self._log_params(flat_params(to_dict(cfg)))
        except Exception as e:
            raise RuntimeError(f"MLflow store {self.tracking_uri}: {type(e).__name__}: {e}") from e
        self.experiment_id = exp_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_epoch(self, metrics: dict) -> None:
        from mlflow.entities import Metric

        ts, step = int(time.time() * 1000), int(metrics["epoch"])
        items = [Metric(k, v, ts, step) for k, v in sorted(scalar_metrics(metrics).items())]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def on_event(self, ev: dict) -> None:
        """A :mod:`koa_ray.progress` event: epochs are logged, the rest ignored."""
        if ev.get("kind") == "epoch":
            self.log_epoch(ev["metrics"])

    def finish(self, best: dict | None, status: str = "FINISHED") -> None:
        """Log the run folder's outputs (and the best checkpoint) as artifacts, then close the run. A store error is
        reported on stderr, not raised: the training run it describes has finished and is on disk."""
        try:
            self._finish(best, status)
        except Exception as e:  # noqa: BLE001 - reported; the run folder holds everything
            import sys

            print(f"[koa] MLflow: could not finish run {self.run_id} ({type(e).__name__}: {e}); the run folder "
                  f"{self.run_dir} has every output", file=sys.stderr, flush=True)

    def _finish(self, best: dict | None, status: str) -> None:
        try:
            if best is not None:
                for name in ("config.yaml", "metrics.csv", "curves.png", "best.json", "MODEL_CARD.md",
                             "confusion_matrix_val.png"):
                    if (self.run_dir / name).is_file():
                        self.client.log_artifact(self.run_id, str(self.run_dir / name))
                ckpt = self.run_dir / best["checkpoint"]
                if ckpt.is_dir():
                    self.client.log_artifacts(self.run_id, str(ckpt), artifact_path="best_checkpoint")
                # (best_val_qwk is already there: the loop logs the running best every epoch)
                for k in ("val_accuracy", "val_macro_f1"):
                    if best.get(k) is not None:
                        self.client.log_metric(self.run_id, f"best_{k}", float(best[k]), step=int(best["epoch"]))
                self.client.set_tag(self.run_id, "koa.best_epoch", str(best["epoch"]))
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def fail(self) -> None:
        """Mark the run FAILED (training raised); a store error here is reported, never raised over the original."""
        try:
            self.client.set_terminated(self.run_id, status="FAILED")
        except Exception as e:  # noqa: BLE001 - the training error that brought us here is the one to raise
            import sys

            print(f"[koa] MLflow: could not mark run {self.run_id} failed ({type(e).__name__}: {e})", file=sys.stderr)

    def info(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id}


class TensorBoardLog:
    """TensorBoard event files of a run (``<run folder>/tensorboard``, ``tensorboard --logdir`` on it): every epoch's
    scalar metrics, step = epoch, from the same progress events as MLflow. tensorboardX comes with ``ray[train]``."""

    def __init__(self, run_dir: str | Path):
        from tensorboardX import SummaryWriter

        self.path = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(logdir=str(self.path))

    def on_event(self, ev: dict) -> None:
        if ev.get("kind") == "epoch":
            step = int(ev["metrics"]["epoch"])
            for k, v in sorted(scalar_metrics(ev["metrics"]).items()):
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tune_callback(out_dir: str | Path, experiment: str, tracking_uri: str | None = None):
    """Ray Tune's ``MLflowLoggerCallback``: one MLflow run per trial (params = the trial's sampled config, metrics =
    every report), in ``sqlite:///<out_dir>/mlflow.db`` by default."""
    _quiet_mlflow()
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=tracking_uri or default_uri(out_dir), experiment_name=experiment,
                                save_artifact=False)
