"""Prepare throughput side by side: --local (one process), Ray Data with 1 CPU, Ray Data with 2 CPUs.

    .venv/bin/python benchmarks/bench_prepare.py [--data ../shared/data/knee-kl224] [--image-size 224]

Without --data (or when it is absent) a 600-image synthetic set is generated. Each Ray run is a fresh process with
Ray already started, so the figure is pipeline throughput, not Ray start-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = """
import json, sys, time
from koa_ray.data.prep import PrepConfig, prepare
mode, data, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode != "local":
    from koa_ray.runtime import init_ray
    init_ray(num_cpus=int(mode))
t = time.perf_counter()
m = prepare(data, out, PrepConfig(image_size=size), local=mode == "local", force=True, progress=False)
dt = time.perf_counter() - t
print(json.dumps({"n": m["n_inputs"], "errors": m["n_errors"], "fallback": m["n_roi_fallback"], "seconds": dt}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--modes", nargs="+", default=["local", "1", "2"])
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    data = a.data
    if not data or not Path(data).is_dir():
        from koa_ray.data.synthetic import make_dataset

        data = str(tmp / "synth")
        make_dataset(data, 600, size=224, seed=0)
    print(f"data: {data}")
    print(f"{'mode':<12}{'images':>8}{'errors':>8}{'fallback':>10}{'seconds':>10}{'images/s':>10}")
    for mode in a.modes:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", RUN, mode, data, str(tmp / f"out-{mode}"), str(a.image_size)],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:])
            raise SystemExit(f"mode {mode} failed")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        label = "--local" if mode == "local" else f"ray {mode} CPU"
        print(f"{label:<12}{res['n']:>8}{res['errors']:>8}{res['fallback']:>10}{res['seconds']:>10.1f}"
              f"{res['n'] / res['seconds']:>10.1f}   (process wall {time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
