"""CPU/GPU kernel choices side by side: precision (fp32 / bf16 autocast) x memory format x attention block.

    .venv/bin/python benchmarks/bench_kernels.py [--size 128] [--batch 32] [--threads 2] [--steps 4]

Times full training steps (forward, backward, AdamW) of the same DenseNet121 on random tensors, so the figures are
the model's cost alone, without the data pipeline. Prints a table of img/s and the ratio to plain fp32 / no
attention, and writes ``bench_out/kernels.json``. On a CPU with AMX or AVX-512-BF16 (``lscpu | grep amx``) bf16
autocast is where the CPU recipe's speed comes from (``configs/kl224-cpu.yaml``: ``amp: bf16``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def train_img_per_s(attention: str, bf16: bool, channels_last: bool, *, size: int, batch: int, steps: int,
                    device: torch.device) -> float:
    from koa_ray.models import build_model

    torch.manual_seed(0)
    model = build_model(arch="densenet121", attention=attention, in_chans=1, num_classes=5).to(device)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 5, (batch,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: oneDNN / cuDNN kernel selection
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--attention", nargs="+", default=["none", "se", "cbam"])
    ap.add_argument("--out", default="bench_out/kernels.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for attention in a.attention:
        for bf16 in (False, True):
            for cl in (False, True):
                ips = train_img_per_s(attention, bf16, cl, size=a.size, batch=a.batch, steps=a.steps, device=device)
                rows.append({"attention": attention, "precision": "bf16" if bf16 else "fp32",
                             "channels_last": cl, "train_img_per_s": round(ips, 2)})
                print(f"{attention:5s} {rows[-1]['precision']} channels_last={cl!s:5s} {ips:7.1f} img/s", flush=True)
    base = next(r["train_img_per_s"] for r in rows
                if r["attention"] == a.attention[0] and r["precision"] == "fp32" and not r["channels_last"])
    print(f"\n{device.type}, {a.threads} threads, {a.size} px, batch {a.batch} "
          f"(ratio to {a.attention[0]}/fp32/contiguous)")
    print(f"{'attention':9s} {'precision':9s} {'ch_last':7s} {'img/s':>7s} {'ratio':>6s}")
    for r in rows:
        r["ratio"] = round(r["train_img_per_s"] / base, 3)
        print(f"{r['attention']:9s} {r['precision']:9s} {r['channels_last']!s:7s} {r['train_img_per_s']:7.1f} "
              f"{r['ratio']:6.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device.type, "threads": a.threads, "size": a.size, "batch": a.batch,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
