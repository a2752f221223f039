"""Grade mix of the Ray Train stream: how single-grade are its batches, against a shuffled stream?

Iterates one or more epochs of the training stream exactly as ``koa_ray.train.driver.build_datasets`` builds it
(re-sampling, global shuffle, augmentation) and reports, per batch, the share of its most common grade; the
reference is the same statistic for the same labels in a uniformly random order. Also times each epoch.

    .venv/bin/python benchmarks/bench_stream_mix.py --data prep/kl224 --epochs 2 [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def majority_share(labels: np.ndarray, batch_size: int) -> float:
    """Mean over full batches of the share of the batch's most common grade."""
    n = len(labels) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"fewer than {batch_size} labels")
    b = np.asarray(labels[:n]).reshape(-1, batch_size)
    return float(np.mean([np.bincount(r, minlength=5).max() / batch_size for r in b]))


def shuffled_reference(labels: np.ndarray, batch_size: int, draws: int = 50, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([majority_share(rng.permutation(labels), batch_size) for _ in range(draws)]))


def stream_labels(cfg, epochs: int, batch_size: int) -> tuple[list[np.ndarray], list[float]]:
    """Labels of each epoch of the train stream, in stream order, and each epoch's wall time."""
    from koa_ray.train.driver import build_datasets
    from koa_ray.train.run import data_info

    _, weights = data_info(cfg)
    train = build_datasets(cfg, weights)["train"]
    out, secs = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        labels = [b["label"] for b in train.iter_batches(batch_size=batch_size, batch_format="numpy")]
        secs.append(time.perf_counter() - t0)
        out.append(np.concatenate(labels))
    return out, secs


def main(argv=None) -> int:
    from koa_ray.config import TrainConfig
    from koa_ray.runtime import init_ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="prepared dataset (koa prepare output)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args(argv)
    init_ray(num_cpus=2)
    cfg = TrainConfig(data=args.data, image_size=args.image_size, batch_size=args.batch_size, workers=1).validate()
    epochs, secs = stream_labels(cfg, args.epochs, args.batch_size)
    rows = [{"epoch": i, "n": int(len(lab)), "majority_share": majority_share(lab, args.batch_size),
             "shuffled_reference": shuffled_reference(lab, args.batch_size), "epoch_s": round(s, 1),
             "same_order_as_previous_epoch": bool(i and len(lab) == len(epochs[i - 1])
                                                  and (lab == epochs[i - 1]).all())}
            for i, (lab, s) in enumerate(zip(epochs, secs))]
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
