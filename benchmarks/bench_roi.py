"""Benchmark knee-joint ROI detection: throughput on ONE CPU core and accuracy (IoU against known joint boxes).

Run from the repository root:  python benchmarks/bench_roi.py [--seconds 2.0]

Inputs per size (224 / 512 / 1000 px image height):
  * 224: real 224 px OAI crops from ../shared/data/knee-kl224 (synthetic ``render_knee`` crops if absent);
  * 512, 1000: synthetic bilateral radiographs (``render_bilateral``, width 1.6-2.2x height) and real crops embedded
    in a square-ish canvas of that size (``embed_in_canvas``), when ../shared exists.
Held-out films (tests/films.py, generators the detector was not tuned on): real crops stitched into legs, and drawn
anatomy incl. long-leg films, 400-3000 px, 8/16-bit, with rulers, calibration spheres and burned-in text; mean IoU
for single and bilateral films, the share of bilateral films found as two knees, and img/s on 1000 px films.
Throughput is wall-clock images/s of ``detect_knees`` with OpenCV limited to 1 thread and the process pinned to one
CPU; IoU is the mean over the same images. The "test sets" section repeats exactly the accuracy checks of
tests/test_roi.py.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from koa_ray.data.roi import box_iou, detect_knees  # noqa: E402
from koa_ray.data.synthetic import embed_in_canvas, render_bilateral, render_knee  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from films import held_out_scores, held_out_set  # noqa: E402  (held-out generators, not used to tune the detector)

REAL = ROOT / ".." / "shared" / "data" / "knee-kl224"


def real_sample(n_per_grade: int, seed: int, splits=("val",)) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(5):
        files = sorted(p for s in splits for p in (REAL / s / str(g)).glob("*.jpg"))
        out += [files[i] for i in rng.choice(len(files), n_per_grade, replace=False)]
    return out


def read(p: Path) -> np.ndarray:
    return cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)


def throughput(images: list[np.ndarray], seconds: float) -> tuple[float, float]:
    """(images/s wall clock, ms CPU per image) of detect_knees over ``images``, repeated for ~``seconds``."""
    detect_knees(images[0])
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        for im in images:
            detect_knees(im)
        n += len(images)
        if time.perf_counter() - t0 >= seconds:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, 1000 * cpu / n


def mean_iou(images, truths) -> float:
    ious = []
    for im, tr in zip(images, truths):
        boxes = detect_knees(im)
        if isinstance(tr, list):  # bilateral: [{x0..}, {x0..}]
            ious += [box_iou(b, (t["x0"], t["y0"], t["x1"], t["y1"])) for b, t in zip(boxes, tr)]
        else:
            ious.append(box_iou(boxes[0], tr))
    return float(np.mean(ious))


def central_third(paths: list[Path]) -> tuple[int, int]:
    inside = 0
    for p in paths:
        img = read(p)
        cx, cy = detect_knees(img)[0].center
        h, w = img.shape
        inside += (w / 3 <= cx <= 2 * w / 3) and (h / 3 <= cy <= 2 * h / 3)
    return inside, len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing duration per input set")
    ap.add_argument("--n", type=int, default=12, help="images per input set")
    ap.add_argument("--held-out", type=int, default=40, help="films per kind and held-out generator")
    ap.add_argument("--json", default="bench_out/roi.json", help="held-out figures as JSON ('' for none)")
    ap.add_argument("--all-real", action="store_true", help="also check that all 6,604 real crops stay one knee (~40 s)")
    args = ap.parse_args()

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    have_real = REAL.is_dir()
    t_start = time.perf_counter()
    rows = []

    # --- 224 px: real crops (joint-centred, no box GT: report the central-third rate) or synthetic crops
    if have_real:
        paths = real_sample(max(1, args.n // 5) + 1, seed=7)
        ims = [read(p) for p in paths]
        inside, total = central_third(paths)
        rows.append(("224", "real crop", ims, None, f"centre in central third {inside}/{total}"))
    synth = [render_knee(i % 5, np.random.default_rng(i)) for i in range(args.n)]
    rows.append(("224", "synthetic crop", [a for a, _ in synth], [b for _, b in synth], None))
    # --- 512 / 1000 px: bilateral radiographs and embedded real crops
    for size in (512, 1000):
        bil = [render_bilateral((i % 5, (i * 3 + 1) % 5), np.random.default_rng(100 + i), height=size)
               for i in range(args.n)]
        rows.append((str(size), "synthetic bilateral", [a for a, _ in bil], [b for _, b in bil], None))
        if have_real:
            crops = [read(p) for p in real_sample(max(1, args.n // 5) + 1, seed=size)]
            scale = (1.0, 2.0) if size == 512 else (1.0, 3.0)
            emb = [embed_in_canvas(c, np.random.default_rng(i), scale_range=scale, canvas_range=(size, size))
                   for i, c in enumerate(crops)]
            rows.append((str(size), "embedded real crop", [a for a, _ in emb], [b for _, b in emb], None))

    print(f"detect_knees on one CPU core (cv2 threads=1, pinned); {'with' if have_real else 'WITHOUT'} real crops\n")
    print(f"{'size':>5}  {'input':<20} {'HxW (median)':>13} {'n':>3}  {'img/s':>7}  {'CPU ms/img':>10}  accuracy")
    for size, name, ims, truths, note in rows:
        ips, cpu_ms = throughput(ims, args.seconds)
        hw = f"{int(np.median([i.shape[0] for i in ims]))}x{int(np.median([i.shape[1] for i in ims]))}"
        acc = note if truths is None else f"mean IoU {mean_iou(ims, truths):.3f}"
        print(f"{size:>5}  {name:<20} {hw:>13} {len(ims):>3}  {ips:7.1f}  {cpu_ms:10.1f}  {acc}")

    # --- held-out films (tests/films.py): generators the detector was not tuned on
    print(f"\nheld-out films, {args.held_out} single + {args.held_out} bilateral per generator, 400-3000 px, "
          "a quarter 16-bit, rulers / spheres / text (targets: IoU >= 0.85, two-knee >= 95 %):")
    results = {}
    for gen in (["stitched"] if have_real else []) + ["drawn"]:
        r = held_out_scores(held_out_set(gen, args.held_out, seed=9000, real=REAL), detect_knees)
        thousand = [im for im, _ in held_out_set(gen, 6, seed=9100, real=REAL, height=1000)]
        r["img_per_s_1000px"], r["cpu_ms_1000px"] = throughput(thousand, args.seconds)
        results[gen] = r
        print(f"  {gen:<9} single IoU {r['single_iou']:.3f}  bilateral IoU {r['bilateral_iou']:.3f}  "
              f"two-knee {100 * r['two_knee_rate']:.0f} %  R/L order {100 * r['sides_rl']:.0f} %  "
              f"single kept whole {100 * r['single_kept_whole']:.0f} %  | 1000 px: {r['img_per_s_1000px']:.1f} img/s")
        m = held_out_scores(held_out_set(gen, args.held_out // 2, seed=9200, real=REAL, implants=True), detect_knees)
        r["implants"] = {k: m[k] for k in ("implants_flagged", "false_implant_flags", "two_knee_rate", "single_iou",
                                            "bilateral_iou")}
        print(f"  {'':<9} with a knee replacement (image-left knee): flagged {100 * m['implants_flagged']:.0f} %, "
              f"other knee flagged {100 * m['false_implant_flags']:.0f} %, films without metal flagged "
              f"{100 * r['false_implant_flags']:.0f} %; two-knee {100 * m['two_knee_rate']:.0f} %, "
              f"IoU {m['single_iou']:.3f} / {m['bilateral_iou']:.3f}")
    if args.all_real and have_real:  # every real single-knee crop must stay one knee
        files = sorted(REAL.rglob("*.jpg"))
        counts = [detect_knees(read(p), side_hint=p.stem[-1]) for p in files]
        split = [str(p) for p, b in zip(files, counts) if len(b) != 1]
        n_fb = sum(k.fallback for b in counts for k in b)
        metal = [str(p) for p, b in zip(files, counts) if any(k.implant for k in b)]
        results["all_real_crops"] = {"n": len(files), "not_one_box": split, "fallbacks": n_fb, "implant": metal}
        print(f"  all {len(files)} real crops: {len(files) - len(split)} one box, {len(split)} not {split}, "
              f"{n_fb} fallbacks, {len(metal)} flagged as implants {metal}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(__import__("json").dumps(results, indent=2))

    # --- the accuracy sets of tests/test_roi.py
    print("\ntest sets (tests/test_roi.py):")
    ims, truths = [], []
    for i in range(30):
        rng = np.random.default_rng(1000 + i)
        grades = (int(rng.integers(5)), int(rng.integers(5)))
        im, tr = render_bilateral(grades, rng, height=(256, 512, 1000)[i % 3])
        ims.append(im)
        truths.append(tr)
    print(f"  synthetic bilateral, 30 images / 60 knees:   mean IoU {mean_iou(ims, truths):.3f}")
    if have_real:
        paths = real_sample(8, seed=1)
        emb = [embed_in_canvas(read(p), np.random.default_rng(i)) for i, p in enumerate(paths)]
        print(f"  real crops embedded in canvases, 40 images: mean IoU "
              f"{mean_iou([a for a, _ in emb], [b for _, b in emb]):.3f}")
        inside, total = central_third(real_sample(10, seed=2))
        print(f"  real 224 px crops, joint centre in central third: {inside}/{total}")
    else:
        print("  (../shared/data/knee-kl224 absent: real-crop checks skipped)")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
