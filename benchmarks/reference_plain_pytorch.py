"""The plain PyTorch reference that koa-ray's CPU recipe must beat on val (issue 9).

Deliberately simple, no Ray and no koa_ray code: torchvision DenseNet121 from random init with a 1-channel stem,
cross-entropy with sqrt-inverse class weights, horizontal flips and brightness jitter, AdamW with a one-cycle
schedule peaking at 1e-3, batch 32, 128 px, 10 epochs, flip averaging (original + mirrored) at eval. Images are
read straight from ``DATA/{train,val}/{0..4}/*`` and resized once into memory.

    .venv/bin/python benchmarks/reference_plain_pytorch.py --data ../shared/data/knee-kl224 --out bench_out/reference

Writes ``metrics.csv`` (one row per epoch) and ``result.json`` (final and best epoch, wall time, machine) under
``--out``. Tune on val only: the official test split stays held back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from koa_ray.metrics import classification_metrics  # noqa: E402  (pure maths, the same QWK as koa-ray reports)

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the architecture where that file is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_split(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for g in range(5):
        for p in sorted((root / str(g)).iterdir()):
            if p.suffix.lower() in EXTS:
                with Image.open(p) as im:
                    images.append(np.asarray(im.convert("L").resize((size, size), Image.BILINEAR)))
                labels.append(g)
    return np.stack(images), np.asarray(labels, np.int64)


def build_model() -> torch.nn.Module:
    model = torchvision.models.densenet121(weights=None, num_classes=5)
    model.features.conv0 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(x).float() / 255.0 - 0.449) / 0.226).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Horizontal flip (p=0.5) and brightness jitter (x0.8-1.2) on a ``[0, 255]`` uint8 batch, as float."""
    x = x.float()
    flip = torch.rand(len(x), generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    x = x * (0.8 + 0.4 * torch.rand(len(x), 1, 1, generator=gen))
    return ((x.clamp(0, 255) / 255.0 - 0.449) / 0.226).unsqueeze(1)


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch: int = 128) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = to_tensor(x[i:i + batch])
        p = F.softmax(model(xb), 1) + F.softmax(model(xb.flip(-1)), 1)
        out.append((p / 2).numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/knee-kl224")
    ap.add_argument("--out", default="bench_out/reference")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N train and val images (smoke runs)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    xtr, ytr = load_split(Path(args.data) / "train", args.image_size)
    xva, yva = load_split(Path(args.data) / "val", args.image_size)
    if args.limit:
        rng = np.random.default_rng(args.seed)
        tr, va = rng.permutation(len(ytr))[:args.limit], rng.permutation(len(yva))[:args.limit]
        xtr, ytr, xva, yva = xtr[tr], ytr[tr], xva[va], yva[va]
    counts = np.bincount(ytr, minlength=5).astype(np.float64)
    w = 1.0 / np.sqrt(np.maximum(counts, 1))
    weight = torch.tensor(w / w.mean(), dtype=torch.float32)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(ytr) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    rows = []
    print(f"[reference] {len(ytr)} train / {len(yva)} val images at {args.image_size} px, "
          f"{args.threads} threads; loaded in {time.perf_counter() - t_start:.0f} s", flush=True)
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(ytr), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(xtr_t[idx], gen)), ytr_t[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(idx)
        train_s = time.perf_counter() - t0
        m = classification_metrics(yva, predict(model, xva).argmax(1), num_classes=5)
        row = {"epoch": epoch, "train_loss": loss_sum / len(ytr), "train_img_per_s": len(ytr) / train_s,
               "epoch_time_s": time.perf_counter() - t0, "val_accuracy": m["accuracy"], "val_qwk": m["qwk"],
               "val_mae": m["mae"], "val_macro_f1": m["macro_f1"]}
        rows.append(row)
        print(f"[reference] epoch {epoch + 1}/{args.epochs} loss {row['train_loss']:.4f} val acc "
              f"{row['val_accuracy']:.3f} qwk {row['val_qwk']:.3f} mae {row['val_mae']:.3f} f1 "
              f"{row['val_macro_f1']:.3f} ({row['train_img_per_s']:.1f} img/s, {row['epoch_time_s']:.0f} s)",
              flush=True)
        import pandas as pd

        pd.DataFrame(rows).to_csv(out / "metrics.csv", index=False)
    best = max(rows, key=lambda r: r["val_qwk"])
    result = {"final": rows[-1], "best_by_val_qwk": best, "wall_s": time.perf_counter() - t_start,
              "machine": f"{platform.node()} {cpu_model()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}, {args.threads} threads",
              "args": vars(args)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("final", "wall_s")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
