"""Every performance comparison of the project side by side, in one run, on the same data: a table of ratios
against their targets, and JSON.

    .venv/bin/python benchmarks/compare.py [--data ../shared/data/knee-kl224] [--only prepare train score kernels]

Sections (each measured in a fresh process, so no Ray instance, thread setting or cache leaks between them):

- **prepare**: ``koa prepare`` (decode + knee ROI + resize + Parquet write) with Ray on 2 CPUs and on 1 CPU, against
  the plain single-process loop over the same files (``prepare(local=True)``: a ``for`` loop calling the same
  per-file function, one Parquet write per split). Ray start-up is not counted (Ray is started before the clock).
- **train**: steady-state training img/s (second epoch) of the Ray Train path with one worker against a plain
  PyTorch loop: same model (DenseNet121+SE), prepared data, augmentation, batch size, precision (bf16 autocast,
  channels_last on CPU) and threads; the plain loop augments in its own thread, as a loop without a data loader
  does. Also the Ray worker's share of step time spent waiting for data, what validation costs per epoch on a
  val split sized like the real one (1/7 of train), and, to take the difference apart: the plain loop again with
  an idle Ray instance up (what Ray costs at rest, as against at work), the plain loop (data in memory) inside a
  Ray Train worker (what being a worker costs), and the Ray Train path fed from its stream materialized before the
  trainer starts (what the producer tasks running beside the step cost).
- **score**: ``koa score`` end to end on image files (listing, decode, crop, forward, CSV; Ray already started)
  against the bare forward pass of the same model on ready tensors, same machine and threads; where the difference
  goes (the bare forward with Ray idle, the bare forward inside a Ray Data actor, and the job's steady state and
  fixed start-up from scoring the inputs once and three times); and peak RSS of the driver and of the Ray workers
  scoring 2,000 and then 10,000 inputs (must stay flat).
- **kernels**: model-only training img/s, fp32 vs bf16 autocast, contiguous vs channels_last, no attention vs SE vs
  CBAM (``bench_kernels.py``), to show what the recipe keeps.

Writes ``bench_out/compare.json``; ``benchmarks/RESULTS.md`` records the figures with date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "knee-kl224"
SECTIONS = ("prepare", "train", "score", "kernels")
TARGETS = {  # name: (minimum or maximum, bound)
    "prepare: Ray 2 CPUs / plain loop": (">=", 1.7),
    "prepare: Ray 1 CPU / plain loop": (">=", 0.9),
    "train: Ray Train 1 worker / plain loop": (">=", 0.95),
    "train: Ray worker data wait (share of step time)": ("<=", 0.05),
    "train: validation (share of a real-size epoch)": ("<=", 0.10),
    "score: koa score / bare forward": (">=", 0.85),
    "score: driver peak RSS 10k / 2k inputs": ("<=", 1.10),
    "score: workers peak RSS 10k / 2k inputs": ("<=", 1.10),
}


# ------------------------------------------------------------------------------------------------------ helpers
def image_files(root: Path) -> list[tuple[str, int, Path]]:
    """``(split, grade, path)`` of a ``{split}/{grade}/*`` image tree, sorted."""
    exts = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".dcm"}
    return [(p.parent.parent.name, int(p.parent.name), p) for p in sorted(root.glob("*/*/*"))
            if p.suffix.lower() in exts and p.parent.name.isdigit()]


def link_tree(files: list[tuple[str, int, Path]], out: Path, copies: int = 1) -> Path:
    """A ``{split}/{grade}/`` tree of symlinks to ``files`` (``copies`` links each, under new names)."""
    for split, grade, p in files:
        d = out / split / str(grade)
        d.mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            name = p.name if c == 0 else f"{p.stem}_c{c}{p.suffix}"
            (d / name).symlink_to(p.resolve())
    return out


def stratified(files: list[tuple[str, int, Path]], split: str, n: int) -> list[tuple[str, int, Path]]:
    """Every k-th file of ``split`` (files are sorted by grade, so the grade mix is kept)."""
    pool = [f for f in files if f[0] == split]
    step = max(1, len(pool) // max(1, n))
    return pool[::step][:n]


def child(section: str, args: dict, timeout: float = 1800) -> dict:
    """Run ``section`` of this file in a fresh Python process; its last stdout line is its JSON result."""
    r = subprocess.run([sys.executable, __file__, "--child", section, json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{section} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _rss_bytes(pid: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples, every ``every`` s in a thread, the RSS of this process and the summed RSS of Ray's worker processes
    (command line ``ray::*``, read from ``/proc``: Linux); keeps the peaks (bytes)."""

    def __init__(self, every: float = 0.2):
        self.every, self.driver, self.workers = every, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.driver = max(self.driver, _rss_bytes("self"))
            total = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if f.read(5) == b"ray::":
                            total += _rss_bytes(pid)
                except OSError:  # the process ended between listing and reading
                    continue
            self.workers = max(self.workers, total)
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakRss":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------------ children
def run_prepare(a: dict) -> dict:
    from koa_ray.data.prep import PrepConfig, prepare

    if a["mode"] != "local":
        from koa_ray.runtime import init_ray

        init_ray(num_cpus=int(a["mode"]))
    t = time.perf_counter()
    m = prepare(a["data"], a["out"], PrepConfig(image_size=a["size"]), local=a["mode"] == "local", force=True,
                progress=False)
    dt = time.perf_counter() - t
    return {"n": m["n_inputs"], "errors": m["n_errors"], "seconds": dt, "img_per_s": m["n_inputs"] / dt}


def train_config(a: dict, name: str):
    from koa_ray.config import AugmentConfig, BalanceConfig, LossConfig, ModelConfig, TrainConfig

    return TrainConfig(data=a["prep"], out=a["runs"], name=name, image_size=a["size"], epochs=2, batch_size=32,
                       workers=1, cpus_per_worker=1, torch_threads=a["threads"], patience=0, amp="bf16",
                       channels_last=True, mlflow=False, tensorboard=False,
                       model=ModelConfig(arch="densenet121", attention="se", drop_rate=0.2),
                       loss=LossConfig(name="ce", alpha="none"), balance=BalanceConfig(target="none"),
                       augment=AugmentConfig(hflip_p=0.0, clahe_p=0.0, noise_p=0.0, blur_p=0.0))


def run_train_plain(a: dict) -> dict:
    """The plain PyTorch loop: the same pieces as the worker loop, no Ray, no DataLoader."""
    import numpy as np
    import torch

    from koa_ray.data.augment import TrainPreset, normalize
    from koa_ray.data.decode import decode_image_column
    from koa_ray.losses import build_loss
    from koa_ray.models import build_model
    from koa_ray.train.local import read_split
    from koa_ray.train.loop import build_optimizer

    if a.get("ray_up"):  # the same loop while a local Ray instance (daemons, dashboard, driver threads) idles
        from koa_ray.runtime import init_ray

        init_ray(num_cpus=2)
        time.sleep(3)
    cfg = train_config(a, "plain")
    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    df = read_split(cfg.data, "train", columns=("image", "size", "label"))
    images = decode_image_column(df["image"].to_numpy(), df["size"].to_numpy())
    labels = df["label"].to_numpy(np.int64)
    preset = TrainPreset(cfg.augment, cfg.image_size).reseed(0)
    m = cfg.model
    model = build_model(arch=m.arch, attention=m.attention, in_chans=1, num_classes=5, drop_rate=m.drop_rate)
    model = model.to(memory_format=torch.channels_last).train()
    opt = build_optimizer(cfg, model)
    loss_fn = build_loss("ce", gamma=0.0, alpha=None, label_smoothing=cfg.loss.label_smoothing, num_classes=5)
    rng = np.random.default_rng(0)
    per_epoch = []
    for _ in range(cfg.epochs):
        order = rng.permutation(len(labels))
        t, n = time.perf_counter(), 0
        for i in range(0, len(order), cfg.batch_size):
            j = order[i:i + cfg.batch_size]
            x = torch.from_numpy(normalize(preset.augment(images[j], labels[j])))
            x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(labels[j])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(j)
        per_epoch.append(n / (time.perf_counter() - t))
    return {"img_per_s": per_epoch[-1], "epochs": per_epoch, "n_train": int(len(labels))}


def run_train_ray(a: dict) -> dict:
    import pandas as pd

    from koa_ray.runtime import init_ray
    from koa_ray.train.driver import fit

    init_ray(num_cpus=2)
    cfg = train_config(a, "ray1")
    res = fit(cfg)
    m = pd.read_csv(Path(res["run_dir"]) / "metrics.csv").iloc[-1]
    return {"img_per_s": float(m["train_img_per_s"]), "data_wait_share": float(m["data_wait_share"]),
            "val_time_s": float(m["val_time_s"]), "epoch_time_s": float(m["epoch_time_s"]),
            "train_images": int(m["train_images"]), "checkpoint": str(Path(res["run_dir"]) / res["checkpoint"])}


def run_train_ray_drained(a: dict) -> dict:
    """The Ray Train path with the training stream materialized before the trainer starts: the same worker loop and
    ``iter_torch_batches``, but no producer (re-sampling, shuffle, augmentation tasks) running beside the step. The
    augmentation is drawn once for both epochs, which changes nothing for speed."""
    import koa_ray.train.driver as driver

    build = driver.build_datasets

    def drained(cfg, weights):
        datasets = build(cfg, weights)
        return {**datasets, "train": datasets["train"].materialize()}

    driver.build_datasets = drained
    return run_train_ray(a)


def run_train_ray_memory(a: dict) -> dict:
    """The plain loop (data in memory, no Ray Data stream) run inside a Ray Train worker placed as the recipe's:
    what being a Train worker costs, apart from the stream."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from koa_ray.runtime import init_ray

    init_ray(num_cpus=2)

    out = Path(a["runs"]) / "memory.json"  # one node: the worker writes its figures where the driver reads them

    def loop(config):
        out.write_text(json.dumps(run_train_plain(config)))

    Path(a["runs"]).mkdir(parents=True, exist_ok=True)
    TorchTrainer(loop, train_loop_config=a,
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="memory", storage_path=a["runs"])).fit()
    return {"img_per_s": float(json.loads(out.read_text())["img_per_s"])}


def bare_forward(checkpoint: str, batch: int, seconds: float) -> float:
    """img/s of the checkpoint's model alone on a ready tensor batch (warm, ``no_grad``, this process's threads)."""
    import torch

    from koa_ray.infer.predictor import Predictor

    pred = Predictor(checkpoint, device="cpu")
    pre = pred.meta["preprocess"]
    x = torch.randn(batch, pre["in_chans"], pre["input_size"], pre["input_size"])
    with torch.no_grad():
        for _ in range(2):
            pred.model(x)
        t, seen = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            pred.model(x)
            seen += len(x)
    return seen / (time.perf_counter() - t)


def run_score(a: dict) -> dict:
    """``koa score`` end to end on ``a['input']`` vs the bare forward pass of the same checkpoint."""
    import torch

    from koa_ray.data.ingest import expand_inputs
    from koa_ray.infer.score import score
    from koa_ray.runtime import init_ray

    n_files = len(expand_inputs([a["input"]]))
    torch.set_num_threads(a["threads"])
    bare = bare_forward(a["checkpoint"], a["batch"], a["bare_s"])
    init_ray(num_cpus=2)
    time.sleep(3)
    bare_ray_up = bare_forward(a["checkpoint"], a["batch"], a["bare_s"])
    in_actor = actor_forward(a["checkpoint"], a["batch"], a["bare_s"])
    t = time.perf_counter()
    s = score([a["input"]], a["checkpoint"], Path(a["tmp"]) / "scores.csv", batch_size=a["batch"], tta="none")
    dt = time.perf_counter() - t
    # the same job on three copies of the inputs: the extra time is the steady state, without the fixed start-up
    n_many = len(expand_inputs([a["input_x3"]]))
    t = time.perf_counter()
    score([a["input_x3"]], a["checkpoint"], Path(a["tmp"]) / "scores-x3.csv", batch_size=a["batch"], tta="none")
    per_image = max(time.perf_counter() - t - dt, 1e-9) / (n_many - n_files)  # steady-state seconds per input
    return {"bare_img_per_s": bare, "bare_ray_up_img_per_s": bare_ray_up, "actor_img_per_s": in_actor,
            "score_img_per_s": n_files / dt, "marginal_img_per_s": 1 / per_image,
            "startup_s": dt - n_files * per_image, "n_files": n_files, "n_errors": s["n_errors"],
            "n_rows": s["n_rows"]}


class _ForwardActor:
    """:func:`bare_forward` inside a Ray Data actor, placed as ``koa score`` places its model actor."""

    def __init__(self, checkpoint: str, batch: int, seconds: float, threads: int):
        from koa_ray.runtime import set_actor_threads

        set_actor_threads(threads)
        self.args = (checkpoint, batch, seconds)

    def __call__(self, batch):
        import pandas as pd

        return pd.DataFrame({"img_per_s": [bare_forward(*self.args)]})


def actor_forward(checkpoint: str, batch: int, seconds: float) -> float:
    """img/s of the bare forward pass run by one Ray Data actor with ``koa score``'s defaults (0.5 CPU reserved,
    :func:`koa_ray.runtime.actor_threads` torch threads)."""
    import pandas as pd
    import ray

    from koa_ray.runtime import actor_threads

    ds = ray.data.from_pandas(pd.DataFrame({"x": [0]})).map_batches(
        _ForwardActor, fn_constructor_kwargs={"checkpoint": checkpoint, "batch": batch, "seconds": seconds,
                                              "threads": actor_threads(1)},
        batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    return float(ds.to_pandas()["img_per_s"].iloc[0])


def run_score_rss(a: dict) -> dict:
    from koa_ray.infer.score import score
    from koa_ray.runtime import init_ray

    init_ray(num_cpus=2)
    t = time.perf_counter()
    with PeakRss() as rss:
        s = score([a["input"]], a["checkpoint"], Path(a["tmp"]) / f"rss-{a['n']}.csv", batch_size=a["batch"],
                  tta="none")
    return {"n_files": a["n"], "n_rows": s["n_rows"], "seconds": time.perf_counter() - t,
            "driver_peak_mb": rss.driver / 2**20, "workers_peak_mb": rss.workers / 2**20}


def run_kernels(a: dict) -> dict:
    out = Path(a["tmp"]) / "kernels.json"
    subprocess.run([sys.executable, str(HERE / "bench_kernels.py"), "--steps", str(a["steps"]), "--out", str(out)],
                   check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


CHILDREN = {"prepare": run_prepare, "train-plain": run_train_plain, "train-ray": run_train_ray,
            "train-ray-memory": run_train_ray_memory, "train-ray-drained": run_train_ray_drained,
            "score": run_score, "score-rss": run_score_rss, "kernels": run_kernels}


# ------------------------------------------------------------------------------------------------------ sections
def random_checkpoint(directory: Path, arch: str, attention: str, size: int, roi: bool) -> str:
    """A randomly initialised checkpoint in the real format (for scoring speed and memory, weights do not matter)."""
    from koa_ray.checkpoint import save_checkpoint
    from koa_ray.config import TrainConfig, to_dict
    from koa_ray.data.augment import GRAY_MEAN, GRAY_STD
    from koa_ray.data.prep import PrepConfig
    from koa_ray.data.roi import RoiConfig
    from koa_ray.models import build_model

    model = build_model(arch=arch, attention=attention, in_chans=1, num_classes=5)
    prep = PrepConfig(image_size=size, roi=RoiConfig(enabled=roi)).to_dict()
    meta = {"model": dict(model.build_config),
            "preprocess": {"prep": prep, "input_size": size, "mean": GRAY_MEAN, "std": GRAY_STD, "in_chans": 1},
            "train_config": to_dict(TrainConfig(image_size=size)), "epoch": 0, "metrics": {}, "history": []}
    return str(save_checkpoint(directory, model, meta))


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def ratio_row(name: str, value: float, baseline: float, note: str) -> dict:
    """One row of the table: ``value`` against ``baseline`` (the target and verdict are added by name later)."""
    return {"name": name, "value": value, "baseline": baseline, "ratio": value / baseline, "note": note}


def two_plain_processes(ctx: dict) -> float:
    """The machine's own 2-core scaling: two plain loops at once, each on half the files; aggregate img/s."""
    files = image_files(Path(ctx["prepare_data"]))
    halves = [link_tree(files[i::2], ctx["tmp"] / f"half-{i}") for i in (0, 1)]
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "prepare",
                               json.dumps({"mode": "local", "data": str(h), "size": 224,
                                           "out": str(ctx["tmp"] / f"prep-half-{i}")})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, h in enumerate(halves)]
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"two plain processes failed:\n{err[-3000:]}")
    shutil.rmtree(ctx["tmp"] / "half-0"), shutil.rmtree(ctx["tmp"] / "half-1")
    return len(files) / (time.perf_counter() - t)


def section_prepare(ctx: dict) -> list[dict]:
    res: dict[str, list[float]] = {"local": [], "1": [], "2": [], "2x local": []}
    n = 0
    for rep in range(ctx["repeats"]):  # interleaved, so a slow phase of a shared machine hits every mode
        for mode in ("local", "1", "2"):
            r = child("prepare", {"mode": mode, "data": ctx["prepare_data"], "size": 224,
                                  "out": str(ctx["tmp"] / f"prep-{mode}")})
            n = r["n"]
            res[mode].append(r["img_per_s"])
            print(f"  prepare {mode:>5}: {r['img_per_s']:.1f} img/s ({r['n']} files)", flush=True)
        res["2x local"].append(two_plain_processes(ctx))
        print(f"  two plain loops at once (each half the files): {res['2x local'][-1]:.1f} img/s", flush=True)
    m = {k: median(v) for k, v in res.items()}
    base = m["local"]
    note = (f"{n} files, 224 px, ROI on; plain loop {base:.1f} img/s; median of {ctx['repeats']} interleaved runs "
            f"(local {res['local']}, 1 CPU {res['1']}, 2 CPUs {res['2']})")
    return [ratio_row("prepare: Ray 2 CPUs / plain loop", m["2"], base, note),
            ratio_row("prepare: Ray 1 CPU / plain loop", m["1"], base, note),
            ratio_row("prepare: 2 plain processes at once / plain loop", m["2x local"], base,
                      "two independent plain loops on halves of the files: what 2 cores give here without Ray")]


# the train section's modes, run in this order within each repeat (interleaved, so a slow phase of the shared
# machine hits every mode): name -> (child, extra args, console label)
TRAIN_MODES = {
    "plain": ("train-plain", {}, "plain loop"),
    "idle": ("train-plain", {"ray_up": True}, "plain loop, Ray up and idle"),
    "in_worker": ("train-ray-memory", {}, "plain loop inside a Ray Train worker"),
    "ray": ("train-ray", {}, "Ray Train 1 worker"),
    "drained": ("train-ray-drained", {}, "Ray Train 1 worker, stream materialized first"),
}


def section_train(ctx: dict) -> list[dict]:
    a = {"prep": str(ctx["prep128"]), "size": 128, "threads": ctx["threads"]}
    runs: dict[str, list[dict]] = {mode: [] for mode in TRAIN_MODES}
    for rep in range(ctx["repeats"]):
        for mode, (section, extra, label) in TRAIN_MODES.items():
            r = child(section, {**a, **extra, "runs": str(ctx["tmp"] / f"runs-{mode}-{rep}")})
            runs[mode].append(r)
            wait = f" (data wait {r['data_wait_share']:.1%})" if "data_wait_share" in r else ""
            print(f"  train {label}: {r['img_per_s']:.1f} img/s{wait}", flush=True)
    rates = {mode: [round(r["img_per_s"], 1) for r in rs] for mode, rs in runs.items()}
    med = {mode: median([r["img_per_s"] for r in rs]) for mode, rs in runs.items()}
    rays = runs["ray"]
    ray = {k: median([r[k] for r in rays]) for k in ("data_wait_share", "val_time_s", "epoch_time_s")}
    base = med["plain"]
    ctx["trained_checkpoint"] = rays[-1]["checkpoint"]
    # validation's cost per epoch at the real split's proportions: val time scales with val images, train time with
    # train images; the subset keeps train:val at the real set's ratio
    val_share = ray["val_time_s"] / ray["epoch_time_s"]
    note = (f"{runs['plain'][0]['n_train']} train images at 128 px, batch 32, DenseNet121+SE, bf16, channels_last, "
            f"{ctx['threads']} threads; median of {ctx['repeats']} interleaved runs (plain "
            f"{rates['plain']}, Ray {rates['ray']})")
    return [ratio_row("train: Ray Train 1 worker / plain loop", med["ray"], base, note),
            ratio_row("train: plain loop, Ray idle / no Ray", med["idle"], base,
                      "the plain loop in a process that has started a local Ray instance (daemons, dashboard) "
                      f"that does nothing else: {rates['idle']}"),
            ratio_row("train: plain loop in a Ray Train worker / no Ray", med["in_worker"], base,
                      "the plain loop (data in memory, no Ray Data stream) as a Ray Train worker with 1 CPU "
                      f"reserved: {rates['in_worker']}"),
            ratio_row("train: Ray Train, stream materialized first / no Ray", med["drained"], base,
                      "the Ray Train path fed from the same stream materialized before the trainer starts (no "
                      f"producer tasks beside the step): {rates['drained']}"),
            {"name": "train: Ray worker data wait (share of step time)", "value": ray["data_wait_share"],
             "ratio": ray["data_wait_share"], "note": "time blocked on the next batch / training time"},
            {"name": "train: validation (share of a real-size epoch)", "value": ray["val_time_s"],
             "ratio": val_share, "note": f"val {ray['val_time_s']:.1f} s of a {ray['epoch_time_s']:.1f} s epoch, "
                                         "val:train = 1:7 as in knee-kl224"}]


def section_score(ctx: dict) -> list[dict]:
    ckpt = ctx.get("trained_checkpoint") or random_checkpoint(ctx["tmp"] / "ckpt-se", "densenet121", "se", 128,
                                                              roi=not ctx["real"])
    x3 = link_tree([f for f in ctx["all_files"] if Path(ctx["score_input"]) in f[2].parents],
                   ctx["tmp"] / "score-x3", copies=3)
    a = {"checkpoint": ckpt, "input": str(ctx["score_input"]), "input_x3": str(x3), "batch": 32,
         "threads": ctx["threads"], "bare_s": 15, "tmp": str(ctx["tmp"])}
    s = child("score", a)
    print(f"  score: {s['score_img_per_s']:.1f} img/s end to end, bare forward {s['bare_img_per_s']:.1f} "
          f"(with Ray idle {s['bare_ray_up_img_per_s']:.1f}, in a Ray Data actor {s['actor_img_per_s']:.1f}); "
          f"steady state {s['marginal_img_per_s']:.1f} img/s after {s['startup_s']:.1f} s of start-up", flush=True)
    bare = s["bare_img_per_s"]
    rows = [ratio_row("score: koa score / bare forward", s["score_img_per_s"], bare,
                      f"{s['n_files']} files, 128 px DenseNet121+SE, fp32, {ctx['threads']} threads"),
            ratio_row("score: koa score steady state / bare forward", s["marginal_img_per_s"], bare,
                      f"(3n - n) inputs / (t(3n) - t(n)): the job without its {s['startup_s']:.1f} s of start-up "
                      "(actor process, imports, checkpoint load, first batch)"),
            ratio_row("score: bare forward, Ray idle / no Ray", s["bare_ray_up_img_per_s"], bare,
                      "the same forward in the same process once a local Ray instance is up and idle"),
            ratio_row("score: bare forward in a Ray Data actor / no Ray", s["actor_img_per_s"], bare,
                      "the same forward inside a Ray Data actor placed as koa score places its model")]
    tiny = random_checkpoint(ctx["tmp"] / "ckpt-tiny", "densenet_tiny", "cbam", 64, roi=not ctx["real"])
    rss = {}
    for n in (2000, 10000):
        files = ctx["all_files"]
        tree = link_tree(files, ctx["tmp"] / f"rss-{n}", copies=-(-n // len(files)))
        for extra in sorted(tree.glob("*/*/*"))[n:]:  # exactly n inputs (deterministic: the last in sorted order)
            extra.unlink()
        rss[n] = child("score-rss", {"checkpoint": tiny, "input": str(tree), "batch": 64, "n": n,
                                     "tmp": str(ctx["tmp"])})
        print(f"  score RSS at {n} inputs: driver {rss[n]['driver_peak_mb']:.0f} MB, workers "
              f"{rss[n]['workers_peak_mb']:.0f} MB ({rss[n]['seconds']:.0f} s)", flush=True)
    for who in ("driver", "workers"):
        lo, hi = rss[2000][f"{who}_peak_mb"], rss[10000][f"{who}_peak_mb"]
        rows.append(ratio_row(f"score: {who} peak RSS 10k / 2k inputs", hi, lo,
                              f"{lo:.0f} MB -> {hi:.0f} MB (densenet_tiny, 64 px: the pipeline's memory, not the "
                              "model's)"))
    return rows


def section_kernels(ctx: dict) -> list[dict]:
    k = child("kernels", {"tmp": str(ctx["tmp"]), "steps": 3})
    rows = []
    for r in k["rows"]:
        rows.append({"name": f"kernels: {r['attention']} {r['precision']}"
                             f"{' channels_last' if r['channels_last'] else ''}",
                     "value": r["train_img_per_s"], "ratio": r["ratio"],
                     "note": "training img/s, ratio to fp32 contiguous without attention"})
    return rows


# ------------------------------------------------------------------------------------------------------ main
def verdict(row: dict) -> str:
    if row["name"] not in TARGETS:
        return ""
    op, bound = TARGETS[row["name"]]
    ok = row["ratio"] >= bound if op == ">=" else row["ratio"] <= bound
    return "ok" if ok else "MISS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="a {split}/{grade}/ image tree (default: knee-kl224; "
                    "a synthetic set when absent)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--train-n", type=int, default=448, help="training images of the train comparison")
    ap.add_argument("--prepare-n", type=int, default=0, help="files for the prepare comparison (0 = all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per mode (medians are reported)")
    ap.add_argument("--out", default="bench_out/compare.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        section, args = a.child
        print(json.dumps(CHILDREN[section](json.loads(args))), flush=True)
        return

    from koa_ray.data.prep import PrepConfig, prepare
    from koa_ray.data.roi import RoiConfig

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    data = Path(a.data)
    real = data.is_dir() and bool(image_files(data))
    if not real:
        from koa_ray.data.synthetic import make_dataset

        data = tmp / "synth"
        make_dataset(data, 600, size=224, seed=0)
    files = image_files(data)
    print(f"data: {data} ({len(files)} files{'' if real else ', synthetic'}); scratch {tmp}", flush=True)
    ctx = {"tmp": tmp, "real": real, "threads": a.threads, "all_files": files, "repeats": a.repeats}
    ctx["prepare_data"] = str(data if not a.prepare_n else link_tree(
        [f for s in ("train", "val", "test") for f in stratified(files, s, a.prepare_n // 2)][:a.prepare_n],
        tmp / "prepare-subset"))
    n_val = max(8, a.train_n // 7)
    subset = link_tree(stratified(files, "train", a.train_n) + stratified(files, "val", n_val), tmp / "train-subset")
    # the training comparison reads prepared crops at 128 px (real crops: no ROI, as configs/kl224-cpu.yaml)
    ctx["prep128"] = tmp / "prep128"
    prepare(subset, ctx["prep128"], PrepConfig(image_size=128, roi=RoiConfig(enabled=not real)), local=True,
            progress=False)
    ctx["score_input"] = data / "val" if (data / "val").is_dir() else data

    rows: list[dict] = []
    for name in a.only:
        print(f"[{name}]", flush=True)
        rows += globals()[f"section_{name}"](ctx)
    for r in rows:
        r["target"] = " ".join(map(str, TARGETS[r["name"]])) if r["name"] in TARGETS else ""
        r["verdict"] = verdict(r)

    print(f"\n{'comparison':<52}{'value':>10}{'baseline':>10}{'ratio':>8}{'target':>9}  verdict")
    for r in rows:
        base = f"{r['baseline']:.1f}" if "baseline" in r else ""
        print(f"{r['name']:<52}{r['value']:>10.2f}{base:>10}{r['ratio']:>8.3f}{r['target']:>9}  {r['verdict']}")
    from reference_plain_pytorch import cpu_model  # benchmarks/ is this script's folder, first on sys.path

    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{cpu_model()}, "
           f"{os.cpu_count()} CPUs", "threads": a.threads, "data": str(data), "real_data": real,
           "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {a.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
