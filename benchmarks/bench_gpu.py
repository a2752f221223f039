"""GPU fast path, side by side: eager vs ``torch.compile``, training and inference img/s at 224 px, batch 128.

    .venv/bin/python benchmarks/bench_gpu.py [--size 224] [--batch 128] [--seconds 8] [--archs koa tv]

Run by ``benchmarks/gpu_check.sh`` on a machine with CUDA (under 5 minutes on one H100/H200). Every configuration
uses what the training loop uses on a GPU: bf16 autocast, channels_last, ``cudnn.benchmark``, AdamW, and the
training step of ``koa_ray.train.loop`` (forward, loss in fp32, backward, step). ``koa`` is the project's
DenseNet121 with SE attention and a 1-channel stem (``--attention`` to change); ``tv`` is plain torchvision
DenseNet121 with 3 channels, the model of the published anchors (timm densenet121: 914 img/s training on an
RTX 3090 with AMP and channels_last; ~3,900 eager / 6,200-6,600 compiled inference on an RTX 4090). Also the
memory-efficient (gradient-checkpointed) DenseNet's training speed and peak memory. Prints a table and writes
``bench_out/gpu.json``. Goal on one H100/H200: >= 2,500 img/s training, >= 8,000 img/s inference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(arch: str, attention: str, memory_efficient: bool = False) -> tuple[torch.nn.Module, int]:
    if arch == "tv":
        import torchvision

        return torchvision.models.densenet121(num_classes=5, memory_efficient=memory_efficient), 3
    from koa_ray.models import build_model

    return build_model(arch="densenet121", attention=attention, in_chans=1, num_classes=5,
                       memory_efficient=memory_efficient), 1


def timed(step, seconds: float, batch: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        step()
        n += batch
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def measure(arch: str, attention: str, mode: str, compiled: bool, a, memory_efficient: bool = False) -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model, chans = build(arch, attention, memory_efficient)
    model = model.to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(a.batch, chans, a.size, a.size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (a.batch,), device=dev)
    run = torch.compile(model) if compiled else model
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), 1e-3, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = run(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        @torch.no_grad()
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                run(x)
    step()  # the first call compiles
    first = time.perf_counter() - t0
    ips = timed(step, a.seconds, a.batch, warmup=3)
    row = {"model": arch if arch == "tv" else f"koa-{attention}", "mode": mode, "compiled": compiled,
           "memory_efficient": memory_efficient, "img_per_s": round(ips, 1), "first_call_s": round(first, 1),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del run, model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration, after warm-up")
    ap.add_argument("--archs", nargs="+", default=["koa", "tv"], choices=["koa", "tv"])
    ap.add_argument("--attention", default="se")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="bench_out/gpu.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.cuda.get_device_name(0)
    print(f"{dev}, torch {torch.__version__}, {a.size} px, batch {a.batch}, bf16 autocast, channels_last", flush=True)
    rows = []
    for arch in a.archs:
        for mode in ("train", "infer"):
            for compiled in (False, True) if not a.no_compile else (False,):
                try:
                    rows.append(measure(arch, a.attention, mode, compiled, a))
                except Exception as e:  # noqa: BLE001 - one failed configuration (e.g. a compiler error) is reported
                    rows.append({"model": arch, "mode": mode, "compiled": compiled, "error": f"{type(e).__name__}: {e}"})
                print(rows[-1], flush=True)
    rows.append(measure("koa", a.attention, "train", False, a, memory_efficient=True))
    print(rows[-1], flush=True)
    print(f"\n{'model':<10}{'mode':<7}{'compiled':<10}{'mem-eff':<9}{'img/s':>9}{'1st call s':>11}{'peak GB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<10}{r['mode']:<7}{str(r['compiled']):<10}{'':<9}  {r['error'][:80]}")
            continue
        print(f"{r['model']:<10}{r['mode']:<7}{str(r['compiled']):<10}{str(r['memory_efficient']):<9}"
              f"{r['img_per_s']:>9.0f}{r['first_call_s']:>11.1f}{r['peak_mem_gb']:>9.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": dev, "torch": torch.__version__, "size": a.size, "batch": a.batch,
                                       "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
