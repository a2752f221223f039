"""Where a sweep trial's time goes on this machine: trial start-up vs epochs.

    python benchmarks/bench_tune.py --data PREP [--trials 2] [--epochs 2] [--workers 2] [--out /tmp/bench_tune]

Runs a small random sweep without a scheduler and prints, per trial, the seconds until its first epoch was reported
(trial actor + imports + Ray Data materialisation + Train worker group start-up + first epoch), the later epochs,
and the gap between trials. On a 2-core box the fixed start-up (~45-60 s) dominates tiny trials.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="/tmp/bench_tune")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--arch", default="densenet_tiny")
    a = p.parse_args()

    from koa_ray.tune import run_sweep

    shutil.rmtree(a.out, ignore_errors=True)
    space = {"mode": "replace", "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}}
    t0 = time.time()
    summary = run_sweep(data=a.data, out=a.out, num_samples=a.trials, max_epochs=a.epochs, scheduler="none",
                        workers_per_trial=a.workers, space=space, image_size=a.image_size,
                        sets=[f"model.arch={a.arch}"], verbose=0)
    wall = time.time() - t0
    rows = []
    for f in sorted(Path(a.out, "sweep").glob("trial_*/result.json")):
        results = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        first = results[0]
        rows.append({"trial": f.parent.name, "first_report_s": round(first["time_this_iter_s"], 1),
                     "first_epoch_train_s": round(first.get("epoch_time_s", float("nan")), 1),
                     "later_epochs_s": [round(r["time_this_iter_s"], 1) for r in results[1:]],
                     "end": results[-1]["timestamp"]})
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"trials": summary["n_trials"], "status": summary["status_counts"], "wall_s": round(wall, 1),
                      "per_trial_s": round(wall / max(1, summary["n_trials"]), 1)}))


if __name__ == "__main__":
    main()
