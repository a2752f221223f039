"""Helpers shared by test modules (not tests themselves)."""

from __future__ import annotations

import torch

from koa_ray.config import ModelConfig, OptimConfig

# the small model of the same code, at 64 px: seconds per epoch on 2 CPU cores
# (MLflow off: tests that check tracking turn it on)
TINY = dict(image_size=64, batch_size=32, eval_batch_size=64, patience=0, model=ModelConfig(arch="densenet_tiny"),
            optim=OptimConfig(lr=3e-3), mlflow=False)


def val_predictions(ckpt, prepared):
    """Reload a checkpoint (weights_only) and predict the prepared val split in-process, without Ray."""
    from koa_ray.checkpoint import load_checkpoint
    from koa_ray.data.augment import EvalPreset
    from koa_ray.data.decode import decode_image_column
    from koa_ray.train.local import read_split

    model, meta = load_checkpoint(ckpt)
    val = read_split(prepared, "val")
    pre = meta["preprocess"]
    x = EvalPreset(pre["input_size"], pre["mean"], pre["std"], pre["in_chans"]).transform(
        decode_image_column(val["image"].tolist(), val["size"].to_numpy()))
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return val["label"].to_numpy(), pred, meta


def chromium() -> str | None:
    """A headless-capable Chromium on this machine, or None (CI machines may have none: the browser checks skip)."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def render_in_browser(page, screenshot=None, width: int = 1200, height: int = 3000) -> dict:
    """Open an HTML file in headless Chromium: count its images and those that failed to load (after the load event),
    and optionally save a screenshot. Returns ``{"images", "broken", "title"}``."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    page = Path(page)
    probe = page.with_name(f".probe-{page.name}")
    script = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
              "document.body.setAttribute('data-images',im.length);"
              "document.body.setAttribute('data-broken',im.filter(i=>!i.complete||i.naturalWidth===0).length);});"
              "</script>")
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", "--virtual-time-budget=5000"]
    try:
        dom = subprocess.run([chromium(), *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        if screenshot is not None:
            subprocess.run([chromium(), *flags, f"--screenshot={screenshot}", f"--window-size={width},{height}",
                            page.as_uri()], capture_output=True, timeout=120)
    finally:
        probe.unlink(missing_ok=True)
    body = re.search(r"<body[^>]*>", dom)
    attrs = dict(re.findall(r'data-(images|broken)="(\d+)"', body.group(0))) if body else {}
    title = re.search(r"<title>(.*?)</title>", dom)
    return {"images": int(attrs.get("images", -1)), "broken": int(attrs.get("broken", -1)),
            "title": title.group(1) if title else ""}


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TensorBoard event files under ``logdir`` (TFRecord framing read by
    hand, events decoded with tensorboardX's protobuf classes)."""
    import struct
    from pathlib import Path

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out
