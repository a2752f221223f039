"""Pieces shared by the Ray Train driver and local mode: data facts, run-directory artefacts."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from koa_ray.checkpoint import BEST_POINTER, META
from koa_ray.config import ConfigError, TrainConfig, save_yaml
from koa_ray.data.balance import sampled_counts, sampling_weights
from koa_ray.data.prep import MANIFEST, load_manifest
from koa_ray.plots import plot_confusion, plot_curves
from koa_ray.train.card import write_model_card
from koa_ray.train.loop import NUM_CLASSES, DataInfo


def data_info(cfg: TrainConfig, manifest: dict | None = None) -> tuple[DataInfo, np.ndarray]:
    """Facts about the prepared data and the per-grade re-sampling weights."""
    manifest = manifest or load_manifest(cfg.data)
    if "train" not in manifest["counts"]:
        raise ValueError(f"{cfg.data}: prepared data has no 'train' split (splits: {manifest['splits']})")
    counts = np.array([manifest["counts"]["train"].get(str(g), 0) for g in range(NUM_CLASSES)], np.int64)
    weights = sampling_weights(counts, cfg.balance)
    seen = sampled_counts(counts, cfg.balance)
    info = DataInfo(train_counts=tuple(int(c) for c in counts), n_train=int(counts.sum()), prep=manifest["prep"],
                    epoch_samples=int(round(float(seen.sum()))), epoch_counts=tuple(float(c) for c in seen))
    return info, weights


def check_inputs(cfg: TrainConfig) -> None:
    """Fail before Ray (or a model) starts, with one line naming the field: the prepared data must exist and hold a
    manifest and a train split, and the run folder (``storage_path`` or ``out``; URIs are not probed) must be
    writable.

    Raises:
        ConfigError: missing or unprepared ``data``, or an output folder that cannot be created or written.
    """
    data = Path(cfg.data) if cfg.data else None
    if data is None:
        raise ConfigError("data: no prepared data given; run `koa prepare IMAGES --out PREP`, then --data PREP")
    if not data.is_dir():
        raise ConfigError(f"data={cfg.data!r}: no such folder; run `koa prepare IMAGES --out {cfg.data}` first")
    if not (data / MANIFEST).is_file():
        raise ConfigError(f"data={cfg.data!r}: not prepared data (no {MANIFEST}); run `koa prepare IMAGES --out "
                          f"{cfg.data}` first")
    if not (data / "train").is_dir():
        raise ConfigError(f"data={cfg.data!r}: prepared data without a train split (no {data / 'train'})")
    storage = cfg.storage_path or cfg.out
    if "://" in storage:
        return
    key = "storage_path" if cfg.storage_path else "out"
    try:
        Path(storage).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".koa-write-check-", dir=storage)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}={storage!r}: not writable ({e.strerror or e})") from e


def check_resources(cfg: TrainConfig, cluster: dict) -> None:
    """Fail before a trainer is built when the cluster (``ray.cluster_resources()``) can never host the workers.

    Raises:
        ConfigError: ``gpu`` with fewer GPUs than ``workers``, or ``workers x cpus_per_worker`` beyond its CPUs.
    """
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if cfg.gpu and gpus < cfg.workers:
        raise ConfigError(f"gpu=true with workers={cfg.workers}: the Ray cluster has {gpus:g} GPUs (one per worker "
                          "is needed); drop --gpu, lower --workers, or join a GPU cluster with --address")
    need = cfg.workers * cfg.cpus_per_worker
    if need > cpus:
        raise ConfigError(f"workers x cpus_per_worker = {cfg.workers} x {cfg.cpus_per_worker:g} = {need:g} CPUs, "
                          f"the Ray cluster has {cpus:g}; lower workers or cpus_per_worker (leave CPU for Ray Data)")


def owns_row(path: str, knee: int, rank: int, world_size: int) -> bool:
    """Deterministic, order-independent assignment of validation rows to workers."""
    return (zlib.crc32(f"{path}#{knee}".encode()) % world_size) == rank


def run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out).resolve() / cfg.name


def write_run_artifacts(cfg: TrainConfig, directory: Path, checkpoints: list[str | Path],
                        wall_s: float | None = None) -> dict:
    """Write ``config.yaml``, ``metrics.csv``, ``curves.png``, ``best.json`` (best checkpoint by val QWK), the best
    epoch's ``confusion_matrix_val.png`` and ``MODEL_CARD.md``.

    Returns the ``best.json`` content.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, directory / "config.yaml")
    metas = []
    for c in checkpoints:
        p = Path(c)
        if (p / META).is_file():
            metas.append((p, json.loads((p / META).read_text())))
    if not metas:
        raise RuntimeError(f"training finished without any checkpoint under {directory}")
    latest = max(metas, key=lambda t: t[1]["epoch"])
    history = pd.DataFrame(latest[1]["history"])
    history.to_csv(directory / "metrics.csv", index=False)
    plot_curves(history, directory / "curves.png")

    def score(t):
        m = t[1]["metrics"]
        return (m.get("val_qwk", -m.get("train_loss", 0.0)), -t[1]["epoch"])

    best_path, best_meta = max(metas, key=score)
    try:
        rel = best_path.resolve().relative_to(directory.resolve())
        target = str(rel)
    except ValueError:
        target = str(best_path.resolve())
    best = {"checkpoint": target, "epoch": best_meta["epoch"],
            "val_qwk": best_meta["metrics"].get("val_qwk"), "val_accuracy": best_meta["metrics"].get("val_accuracy"),
            "val_macro_f1": best_meta["metrics"].get("val_macro_f1"), "epochs_run": len(history)}
    tmp = directory / (BEST_POINTER + ".tmp")
    tmp.write_text(json.dumps(best, indent=2))
    tmp.replace(directory / BEST_POINTER)
    val = best_meta["metrics"].get("val")
    if val:
        plot_confusion(np.array(val["confusion_matrix"]), directory / "confusion_matrix_val.png")
    write_model_card(directory, best_meta["train_config"], best_meta, wall_s)
    return best


class Trackers:
    """The run's experiment trackers, as one progress-event handler: MLflow (:class:`koa_ray.tracking.MlflowRun`,
    unless ``cfg.mlflow`` is off) and TensorBoard event files (unless ``cfg.tensorboard`` is off)."""

    def __init__(self, cfg: TrainConfig, directory: Path):
        from koa_ray.tracking import MlflowRun, TensorBoardLog

        self.mlflow = MlflowRun(cfg, directory, cfg.mlflow_uri, cfg.mlflow_experiment) if cfg.mlflow else None
        self.tensorboard = TensorBoardLog(directory) if cfg.tensorboard else None
        self.handlers = [t.on_event for t in (self.mlflow, self.tensorboard) if t is not None]

    def finish(self, best: dict | None) -> dict:
        """Close every tracker (MLflow logs the run's files first); returns what the summary shows."""
        out = {}
        if self.tensorboard is not None:
            self.tensorboard.close()
            out["tensorboard"] = str(self.tensorboard.path)
        if self.mlflow is not None:
            self.mlflow.finish(best)
            out["mlflow"] = self.mlflow.info()
        return out

    def fail(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.fail()


@contextlib.contextmanager
def watched(cfg: TrainConfig, directory: Path):
    """The console and the trackers of a training run, for :func:`~koa_ray.train.driver.fit` and
    :func:`~koa_ray.train.local.fit_local`: yields ``(handle, trackers)``, ``handle`` taking the loop's progress
    events. The console is closed on the way out; if training raised, the trackers are marked failed."""
    from koa_ray.progress import Console

    trackers, console = Trackers(cfg, directory), Console()
    try:
        yield fan_out(console.handle, *trackers.handlers), trackers
    except BaseException:
        trackers.fail()
        raise
    finally:
        console.close()


def fan_out(*handlers):
    """One progress-event handler that calls each of ``handlers`` (``None`` entries skipped). A handler that raises
    (e.g. an MLflow store that went away) is reported once on stderr and dropped; the others, and training, go on."""
    import sys

    live = [h for h in handlers if h is not None]

    def handle(ev: dict) -> None:
        for h in list(live):
            try:
                h(ev)
            except Exception as e:  # noqa: BLE001 - reported, and the handler is dropped
                live.remove(h)
                print(f"[koa] warning: {getattr(h, '__qualname__', h)} failed ({type(e).__name__}: {e}); "
                      "it gets no more events, training goes on", file=sys.stderr, flush=True)

    return handle
