"""The Ray Train path users take: its training stream is shuffled, and it learns as well as local mode."""

import json

import numpy as np
import pandas as pd
import pytest

from koa_ray.checkpoint import META
from koa_ray.config import TrainConfig

try:
    from helpers import TINY
except ImportError:  # tests/ imported as a package
    from tests.helpers import TINY


def majority_share(labels: np.ndarray, batch_size: int) -> float:
    """Mean over full batches of the share of the batch's most common grade."""
    n = len(labels) // batch_size * batch_size
    b = np.asarray(labels[:n]).reshape(-1, batch_size)
    return float(np.mean([np.bincount(r, minlength=5).max() / batch_size for r in b]))


def test_ray_train_stream_batches_have_the_epoch_grade_mix(ray_session, prepared):
    """The stream exactly as the driver builds it (prepared Parquet is written grade by grade): per batch, the most
    common grade's share matches a uniformly shuffled order of the same labels, and each epoch has a new order."""
    import pyarrow.parquet as pq

    from koa_ray.train.driver import build_datasets
    from koa_ray.train.run import data_info

    stored = pq.read_table(str(prepared / "train"), columns=["label"]).column("label").to_numpy()
    bs = 8
    assert majority_share(stored, bs) > 0.8  # the input really is sorted: a stream that keeps it fails below
    cfg = TrainConfig(data=str(prepared), workers=2, **TINY).validate()
    _, weights = data_info(cfg)
    train = build_datasets(cfg, weights)["train"]
    epochs = [np.concatenate([b["label"] for b in train.iter_batches(batch_size=bs, batch_format="numpy")])
              for _ in range(3)]
    rng = np.random.default_rng(0)
    # excess of the batches' majority share over a uniform shuffle of the same labels: about +0.4 for the stored
    # (grade-sorted) order, 0 +- 0.026 per epoch for a uniform shuffle here. Ray's shuffle mixes grades a little
    # *more* than uniformly (about -0.02 per epoch, once -0.08: each reduce task concatenates a random share of every
    # block), which cannot hurt SGD or BatchNorm; clustering is what must not come back.
    excess = [majority_share(labels, bs) - np.mean([majority_share(rng.permutation(labels), bs) for _ in range(200)])
              for labels in epochs]
    assert max(excess) < 0.08 and np.mean(excess) < 0.04, excess
    assert np.mean(excess) > -0.12, excess  # and still about a uniform shuffle, not a strict grade round-robin
    assert not any(len(a) == len(b) and (a == b).all() for a, b in zip(epochs, epochs[1:]))


@pytest.mark.slow
def test_ray_and_local_learn_the_synthetic_task_alike(ray_session, tmp_path):
    """Same data, same seed, same recipe: 2 Ray Train workers and local mode both learn (best val QWK well above
    chance, ~0) and land close to each other."""
    from koa_ray.data.prep import PrepConfig, prepare
    from koa_ray.data.synthetic import make_dataset
    from koa_ray.train.driver import fit
    from koa_ray.train.local import fit_local

    make_dataset(tmp_path / "s", 360, size=96, seed=0, splits=("train", "val"), split_fractions=(0.65, 0.35))
    prepare(tmp_path / "s", tmp_path / "p", PrepConfig(image_size=64), local=True, progress=False)
    cfg = TrainConfig(data=str(tmp_path / "p"), out=str(tmp_path / "runs"), epochs=16, keep_best=1, workers=2,
                      cpus_per_worker=0.5, **{**TINY, "batch_size": 16})
    local = fit_local(TrainConfig(**{**cfg.__dict__, "name": "local"}))
    ray_run = fit(TrainConfig(**{**cfg.__dict__, "name": "ray"}))
    assert local["val_qwk"] > 0.5 and ray_run["val_qwk"] > 0.5, (local, ray_run)
    assert abs(local["val_qwk"] - ray_run["val_qwk"]) < 0.2, (local, ray_run)
    # local mode keeps the best N + the latest checkpoint, like Ray Train, and best.json points at the best one
    run = tmp_path / "runs" / "local"
    kept = sorted(p.name for p in run.glob("checkpoint_epoch_*"))
    assert len(kept) <= 2 and "checkpoint_epoch_0015" in kept
    history = pd.read_csv(run / "metrics.csv")
    meta = json.loads((run / local["checkpoint"] / META).read_text())
    assert meta["metrics"]["val_qwk"] == pytest.approx(history["val_qwk"].max())
