"""Batch-scoring throughput end to end next to the model's bare forward throughput, on the same machine.

    .venv/bin/python benchmarks/bench_score.py [--checkpoint RUN_OR_CKPT] [--input DIR] [--n 256] [--concurrency 1]

End to end = ``koa_ray.infer.score.score`` on image files: listing, decode, ROI, crop, normalise, forward, CSV
(Ray already started, so Ray start-up is not counted; actor start-up and model load are). Bare forward = the same
model on a ready tensor batch of the same size, warm, ``torch.no_grad``. Without --checkpoint a randomly initialised
DenseNet121+CBAM checkpoint at 224 px is written; without --input a synthetic set of --n radiographs is generated.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from compare import bare_forward, random_checkpoint  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--input")
    ap.add_argument("--n", type=int, default=256, help="synthetic images when --input is not given")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--size", type=int, default=224, help="input size of the random checkpoint")
    a = ap.parse_args()

    from koa_ray.checkpoint import read_meta
    from koa_ray.data.ingest import expand_inputs
    from koa_ray.infer.score import score
    from koa_ray.runtime import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    ckpt = a.checkpoint or random_checkpoint(tmp / "ckpt", "densenet121", "cbam", a.size, roi=True)
    data = a.input
    if not data:
        from koa_ray.data.synthetic import make_dataset

        data = str(tmp / "synth")
        make_dataset(data, a.n, size=224, seed=0)
    n_files = len(expand_inputs([data]))

    size = read_meta(ckpt)["preprocess"]["input_size"]
    bare = bare_forward(ckpt, a.batch_size, 20)

    init_ray(num_cpus=2)
    t = time.perf_counter()
    summary = score([data], ckpt, tmp / "scores.csv", batch_size=a.batch_size, concurrency=a.concurrency,
                    tta="none")  # one forward per knee, as the bare forward it is compared with
    e2e = n_files / (time.perf_counter() - t)
    print(f"checkpoint {ckpt} ({size} px), {n_files} files, {summary['n_rows']} rows, {summary['n_errors']} errors")
    print(f"{'bare forward (warm, 1 process, all threads)':<48}{bare:>8.1f} img/s")
    print(f"{f'koa score end to end (concurrency {a.concurrency})':<48}{e2e:>8.1f} img/s  ({e2e / bare:.0%} of bare)")


if __name__ == "__main__":
    main()
