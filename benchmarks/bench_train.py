"""Training throughput side by side: local mode vs 2 Ray Train CPU workers, DenseNet121+CBAM, at 128 and 224 px.

    .venv/bin/python benchmarks/bench_train.py [--sizes 128 224] [--n 160] [--arch densenet121]

Each configuration trains 2 short epochs on synthetic data; the figure is the second (warm) epoch's training
images/s as logged in metrics.csv (all workers together).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--arch", default="densenet121")
    ap.add_argument("--modes", nargs="+", default=["local", "ray2"])
    a = ap.parse_args()

    from koa_ray.config import BalanceConfig, ModelConfig, TrainConfig
    from koa_ray.data.prep import PrepConfig, prepare
    from koa_ray.data.synthetic import make_dataset
    from koa_ray.runtime import init_ray
    from koa_ray.train.driver import fit
    from koa_ray.train.local import fit_local

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    make_dataset(tmp / "synth", a.n, size=224, seed=0)
    prepare(tmp / "synth", tmp / "prep", PrepConfig(image_size=224), local=True, progress=False)
    init_ray(num_cpus=2)
    rows = []
    for size in a.sizes:
        for mode in a.modes:
            cfg = TrainConfig(data=str(tmp / "prep"), out=str(tmp / "runs"), name=f"{mode}-{size}", image_size=size,
                              epochs=2, batch_size=16, workers=2, cpus_per_worker=0.5 if mode == "ray2" else 1,
                              patience=0, model=ModelConfig(arch=a.arch, attention="cbam"),
                              balance=BalanceConfig(target="none"))
            fit_local(cfg) if mode == "local" else fit(cfg)
            m = pd.read_csv(tmp / "runs" / cfg.name / "metrics.csv")
            rows.append({"mode": mode, "size": size, "img_per_s": round(float(m["train_img_per_s"].iloc[-1]), 2),
                         "epoch_s": round(float(m["epoch_time_s"].iloc[-1]), 1)})
            print(rows[-1], flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
