"""Local mode: the same training loop in one process, on one GPU if present else CPU, without Ray.

For single-GPU users and debugging. Reads the prepared Parquet with pyarrow, re-samples and augments with the same
functions the Ray Data stream uses (in a torch ``DataLoader`` so augmentation can use worker processes), and keeps
checkpoints in the run directory with the same layout and best-N policy as Ray Train.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from koa_ray.checkpoint import META, TRAIN_STATE, WEIGHTS
from koa_ray.config import TrainConfig
from koa_ray.data.augment import EvalPreset, TrainPreset
from koa_ray.data.balance import epoch_indices
from koa_ray.data.decode import decode_image_column
from koa_ray.progress import Reporter
from koa_ray.train.loop import FaultPlan, batched, train_loop
from koa_ray.train.run import check_inputs, data_info, run_dir, watched, write_run_artifacts


def read_split(prep: str | Path, split: str, columns=("image", "size", "label", "path", "knee")) -> pd.DataFrame:
    import pyarrow.parquet as pq

    d = Path(prep) / split
    if not d.is_dir():
        return pd.DataFrame(columns=list(columns))
    return pq.read_table(str(d), columns=list(columns)).to_pandas()


class _EpochDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, order: np.ndarray, preset: TrainPreset):
        self.images, self.labels, self.order, self.preset = images, labels, order, preset

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        j = self.order[i]
        y = self.labels[j:j + 1]
        x = self.preset.augment(self.images[j:j + 1], y)
        from koa_ray.data.augment import normalize

        return torch.from_numpy(normalize(x, self.preset.mean, self.preset.std, self.preset.in_chans)[0]), int(y[0])


class LocalSession:
    rank, world_size = 0, 1

    def __init__(self, cfg: TrainConfig, weights: np.ndarray, directory: Path, loader_workers: int = 0):
        self.cfg, self.weights, self.dir, self.loader_workers = cfg, weights, directory, loader_workers
        for stale in sorted(directory.glob("checkpoint_epoch_*.tmp")):  # a copy a killed run did not finish
            print(f"[koa] removing {stale.name}: an incomplete checkpoint copy left by an interrupted run", flush=True)
            shutil.rmtree(stale)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        train = read_split(cfg.data, "train", ("image", "size", "label"))
        self.train_images = decode_image_column(train["image"].tolist(), train["size"].to_numpy())
        self.train_labels = train["label"].to_numpy(np.int64)
        val = read_split(cfg.data, "val", ("image", "size", "label"))
        self.val_x = EvalPreset(cfg.image_size, in_chans=cfg.in_chans).transform(
            decode_image_column(val["image"].tolist(), val["size"].to_numpy())) if len(val) else None
        self.val_y = val["label"].to_numpy(np.int64)
        self.preset = TrainPreset(cfg.augment, cfg.image_size, in_chans=cfg.in_chans)

    def prepare_model(self, model):
        return model.to(self.device)

    def train_batches(self, epoch):
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = epoch_indices(self.train_labels, self.weights, rng)
        ds = _EpochDataset(self.train_images, self.train_labels, order,
                           self.preset.reseed(self.cfg.seed * 1000 + epoch))
        loader = torch.utils.data.DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False,
                                             num_workers=self.loader_workers, pin_memory=self.device.type == "cuda",
                                             worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(
                                                 self.cfg.seed * 1000 + epoch))
        yield from loader

    def val_batches(self):
        if self.val_x is None:
            return iter(())
        return batched((self.val_x, self.val_y), self.cfg.eval_batch_size)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first: ``checkpoint_epoch_NNNN`` folders with weights, metadata and train
        state; never the ``.tmp`` copy that :meth:`report` renames into place (a kill can leave one behind)."""
        return sorted(p for p in self.dir.glob("checkpoint_epoch_*") if not p.name.endswith(".tmp")
                      and all((p / f).is_file() for f in (META, WEIGHTS, TRAIN_STATE)))

    @contextlib.contextmanager
    def latest_checkpoint(self):
        ckpts = self.checkpoints()
        yield ckpts[-1] if ckpts else None

    def report(self, metrics, checkpoint_dir):
        dest = self.dir / f"checkpoint_epoch_{metrics['epoch']:04d}"
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        self._prune(latest=dest)

    def _prune(self, latest: Path):
        """Keep the best ``keep_best`` checkpoints by val QWK, plus the latest (for resume), like Ray Train."""
        def score(p):
            m = json.loads((p / META).read_text())["metrics"]
            return m.get("val_qwk", m.get("best_val_qwk", 0.0))

        ranked = sorted(self.checkpoints(), key=score, reverse=True)
        for p in ranked[self.cfg.keep_best:]:
            if p != latest:
                shutil.rmtree(p)

    def all_reduce(self, t):
        return t


def _seed_worker(worker_id: int) -> None:
    """Each loader worker gets its own reproducible stream, derived from the loader's per-epoch generator."""
    seed = torch.initial_seed() % 2**31
    np.random.seed(seed)
    import random

    random.seed(seed)
    torch.utils.data.get_worker_info().dataset.preset.reseed(seed)


def fit_local(cfg: TrainConfig, loader_workers: int = 0, fault: FaultPlan | None = None) -> dict:
    """Train in this process; same checkpoints and run artefacts as :func:`koa_ray.train.driver.fit`."""
    import time

    t0 = time.perf_counter()
    cfg = cfg.validate()
    check_inputs(cfg)
    info, weights = data_info(cfg)
    directory = run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    session = LocalSession(cfg, weights, directory, loader_workers)
    with watched(cfg, directory) as (handle, trackers):
        train_loop(cfg, info, session, fault=fault, progress=Reporter(handle))
        best = write_run_artifacts(cfg, directory, session.checkpoints(), wall_s=time.perf_counter() - t0)
    out = {**best, "run_dir": str(directory), "device": str(session.device)}
    out.update(trackers.finish(best))  # a store error is reported, not raised
    out["wall_s"] = time.perf_counter() - t0
    return out
