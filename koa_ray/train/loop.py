"""The training loop shared by Ray Train workers and local mode.

``train_loop(cfg, data, session)`` only prepares the model, iterates its shard and reports; where the batches come
from, how the model is wrapped (DDP or not) and where checkpoints go are the session's business
(:class:`koa_ray.train.driver.RayTrainSession`, :class:`koa_ray.train.local.LocalSession`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
import torch

from koa_ray.checkpoint import TRAIN_STATE, WEIGHTS, load_tensors, save_checkpoint, unwrap
from koa_ray.config import TrainConfig, to_dict
from koa_ray.data.augment import GRAY_MEAN, GRAY_STD
from koa_ray.data.tta import tta_probs
from koa_ray.losses import build_loss, class_weights
from koa_ray.metrics import DECODINGS, classification_metrics, decode_grades
from koa_ray.progress import Reporter
from koa_ray.train.ema import ModelEma

NUM_CLASSES = 5


@dataclass(frozen=True)
class DataInfo:
    """What the loop needs to know about the prepared data (from its ``manifest.json``)."""

    train_counts: tuple[int, ...]
    n_train: int
    prep: dict  # PrepConfig.to_dict() of the prepared data
    epoch_samples: int  # expected samples per epoch after re-balancing
    epoch_counts: tuple[float, ...]  # expected samples per grade per epoch (what the model sees)


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def train_batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...
    def val_batches(self) -> Iterable[tuple[np.ndarray, np.ndarray]]: ...
    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None: ...
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...


def checkpoint_meta(cfg: TrainConfig, model_cfg: dict, data: DataInfo, epoch: int, metrics: dict,
                    history: list[dict]) -> dict:
    return {
        "model": model_cfg,
        "preprocess": {"prep": data.prep, "input_size": cfg.image_size, "mean": GRAY_MEAN, "std": GRAY_STD,
                       "in_chans": cfg.in_chans},
        "decode": cfg.decode,  # how probabilities become a grade (argmax | expected)
        "tta": cfg.tta,  # the test-time views validation averaged (koa_ray.data.tta); inference does the same
        "train_config": to_dict(cfg),
        "epoch": epoch,
        "metrics": metrics,
        "history": history,
    }


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    if o.optimizer == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=0.9, nesterov=True)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for the training forward pass, or ``None`` for fp32.

    ``auto``: bf16 on CUDA, fp32 elsewhere. ``bf16``: bf16 on every device; on a CPU with AMX / AVX-512-BF16
    (oneDNN) DenseNet121 trains about 2x faster than fp32 (``benchmarks/bench_kernels.py``). ``fp16``: CUDA only
    (with a gradient scaler).

    Raises:
        ValueError: ``amp='fp16'`` on a device other than CUDA.
    """
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device, this worker has {device.type!r}; use amp: bf16 "
                             "(CPU with AVX-512-BF16/AMX) or amp: off")
        return torch.float16
    return torch.bfloat16  # auto on CUDA, and bf16


def eval_autocast_dtype(amp: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """Validation precision: the training one on CUDA; fp32 on CPU, the precision ``evaluate``/``score`` use, so
    the val figures logged during training are the ones a user gets from the checkpoint."""
    return amp if device.type == "cuda" else None


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], device: torch.device,
                     loss_fn, amp: torch.dtype | None, channels_last: bool, tta: str = "none"
                     ) -> tuple[dict, float, int]:
    """Confusion matrices (one per decoding in ``DECODINGS``), summed loss and count over ``batches``; with a
    ``tta`` mode the probabilities are averaged over its views (:func:`koa_ray.data.tta.tta_probs`) and the loss
    is the negative log-likelihood of the averaged probabilities."""
    model.eval()
    cms = {how: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64) for how in DECODINGS}
    loss_sum, n = 0.0, 0
    for x, y in batches:
        xt = torch.as_tensor(np.array(x, np.float32), device=device)
        if channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        yt = torch.as_tensor(np.array(y, np.int64), device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if tta == "none":
                logits = model(xt).float()
            else:  # CE of these log-probabilities = NLL of the averaged probabilities
                logits = torch.log(tta_probs(model, xt, tta).clamp_min(1e-12))
        loss_sum += float(loss_fn(logits, yt)) * len(y)
        probs = torch.softmax(logits, 1).cpu().numpy()
        for how, cm in cms.items():
            np.add.at(cm, (np.asarray(y), decode_grades(probs, how)), 1)
        n += len(y)
    return cms, loss_sum, n


def metrics_from_confusion(cm: np.ndarray) -> dict:
    """All classification metrics from a confusion matrix (rows = true grade)."""
    t, p = np.nonzero(cm)
    counts = cm[t, p]
    y_true, y_pred = np.repeat(t, counts), np.repeat(p, counts)
    return classification_metrics(y_true, y_pred, num_classes=NUM_CLASSES)


def flat_metrics(prefix: str, m: dict) -> dict:
    out = {f"{prefix}_{k}": float(m[k]) for k in
           ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "qwk", "mae")}
    for g, pc in m["per_class"].items():
        out[f"{prefix}_f1_{g}"] = float(pc["f1"])
    return out


@dataclass(frozen=True)
class FaultPlan:
    """A crash to inject, for fault-tolerance tests: the worker of rank ``rank`` exits hard (``os._exit``, as an OOM
    kill would: no exception handling, no clean-up) before training step ``step`` of epoch ``epoch``, once: the
    ``marker`` file it writes first keeps the restarted worker from crashing again."""

    epoch: int
    step: int
    marker: str
    rank: int = 0

    def maybe_crash(self, epoch: int, step: int, rank: int) -> None:
        if (epoch, step, rank) == (self.epoch, self.step, self.rank) and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"crashed at epoch {epoch} step {step} rank {rank}\n")
            os._exit(17)


def train_loop(cfg: TrainConfig, data: DataInfo, session: Session, fault: FaultPlan | None = None,
               progress: Reporter | None = None) -> None:
    """Train ``cfg.epochs`` epochs (or until early stopping), reporting metrics and a checkpoint every epoch.

    Resumes from ``session.latest_checkpoint()`` when there is one; every epoch's metrics record ``start_epoch``,
    the epoch this process started (or resumed) at, so a restarted run shows that no finished epoch was repeated.
    ``progress`` (rank 0) gets the console events (:mod:`koa_ray.progress`); without one, rank 0 prints its lines.
    ``fault`` injects a crash (tests only)."""
    from koa_ray.models import build_model

    def say(text: str) -> None:
        if session.rank != 0:
            return
        if progress is not None:
            progress.message(text)
        else:
            print(f"[koa] {text}", flush=True)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + session.rank)
    device = session.device
    m = cfg.model
    model = build_model(arch=m.arch, attention=m.attention, reduction=m.reduction, in_chans=cfg.in_chans,
                        num_classes=NUM_CLASSES, drop_rate=m.drop_rate, pretrained=m.pretrained, weights=m.weights,
                        memory_efficient=m.memory_efficient)
    model_cfg = dict(model.build_config)
    # channels_last helps cuDNN and oneDNN alike (CPU, DenseNet121+SE: bf16 32 -> 41 img/s, fp32 19 -> 23; bench_kernels.py)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels once
    model = session.prepare_model(model)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(cfg, model)
    steps_per_epoch = max(1, math.ceil(data.epoch_samples / session.world_size / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup, cfg.optim.min_lr_ratio))
    alpha_scheme = cfg.loss.alpha
    alpha = None if alpha_scheme == "none" else class_weights(  # from the distribution the model sees
        data.epoch_counts, alpha_scheme if isinstance(alpha_scheme, str) else list(alpha_scheme), beta=cfg.loss.beta)
    loss_fn = build_loss(cfg.loss.name, gamma=cfg.loss.gamma, alpha=alpha, label_smoothing=cfg.loss.label_smoothing,
                         num_classes=NUM_CLASSES).to(device)
    eval_loss = torch.nn.CrossEntropyLoss()
    amp = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    start_epoch, best_qwk, bad_epochs, history = 0, -math.inf, 0, []
    ema = None
    with session.latest_checkpoint() as ckpt:
        if ckpt is not None and not (Path(ckpt) / TRAIN_STATE).is_file():
            say(f"{ckpt} has no {TRAIN_STATE} (optimizer state): it cannot be resumed, training starts at epoch 0")
        if ckpt is not None and (Path(ckpt) / TRAIN_STATE).is_file():
            state = load_tensors(Path(ckpt) / TRAIN_STATE)
            saved = load_tensors(Path(ckpt) / WEIGHTS)
            # with weight EMA, model.pt holds the average and train_state.pt the raw weights
            unwrap(model).load_state_dict(state.get("model", saved))
            if cfg.optim.ema_decay > 0:
                ema = ModelEma(unwrap(model), cfg.optim.ema_decay)
                ema.module.load_state_dict(saved)
                ema.load_state_dict(state.get("ema", {"updates": 0}))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, best_qwk, bad_epochs = state["epoch"] + 1, state["best_qwk"], state["bad_epochs"]
            import json

            history = json.loads(state["history_json"])
            say(f"resuming from {ckpt} at epoch {start_epoch}")
    if ema is None and cfg.optim.ema_decay > 0:
        ema = ModelEma(unwrap(model), cfg.optim.ema_decay)
    eval_model = ema.module if ema is not None else model  # what is validated, ranked and saved as model.pt
    first_epoch = start_epoch

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        seen = torch.zeros(NUM_CLASSES, dtype=torch.float64)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        steps = min(steps_per_epoch, cfg.max_steps_per_epoch or steps_per_epoch)
        if progress is not None:
            progress.send("start", epoch=epoch, epochs=cfg.epochs, steps=steps)
        data_wait, t_ready = 0.0, time.perf_counter()
        for step, (x, y) in enumerate(session.train_batches(epoch)):
            data_wait += time.perf_counter() - t_ready  # blocked on the input pipeline for this batch
            if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
                break
            if fault is not None:
                fault.maybe_crash(epoch, step, session.rank)
            x = x.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True).long()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(unwrap(model))
            seen += torch.bincount(y.cpu(), minlength=NUM_CLASSES).double()
            loss_sum += float(loss.detach()) * len(y)
            if progress is not None:
                progress.step(epoch, cfg.epochs, step + 1, steps,
                              float(seen.sum()) * session.world_size / max(time.perf_counter() - t0, 1e-9))
            t_ready = time.perf_counter()
        train_time = time.perf_counter() - t0
        seen = session.all_reduce(seen)
        loss_sum = session.all_reduce(loss_sum)
        n_seen = float(seen.sum())

        t_val = time.perf_counter()
        cms, val_loss_sum, n_val = evaluate_batches(eval_model, session.val_batches(), device, eval_loss,
                                                    eval_autocast_dtype(amp, device), cfg.channels_last, cfg.tta)
        cms = {how: session.all_reduce(torch.as_tensor(c, dtype=torch.float64)).numpy().astype(np.int64)
               for how, c in cms.items()}
        val_loss_sum = float(session.all_reduce(torch.tensor([val_loss_sum], dtype=torch.float64)))
        cm = cms[cfg.decode]
        by_decode = {how: metrics_from_confusion(c) for how, c in cms.items()} if cm.sum() else {}
        val = by_decode.get(cfg.decode)

        metrics = {"epoch": epoch, "start_epoch": first_epoch, "train_loss": float(loss_sum) / max(n_seen, 1),
                   "lr": scheduler.get_last_lr()[0],
                   "train_images": int(n_seen), "train_img_per_s": n_seen / max(train_time, 1e-9),
                   "epoch_time_s": time.perf_counter() - t0, "val_time_s": time.perf_counter() - t_val,
                   "data_wait_share": data_wait / max(train_time, 1e-9)}
        metrics.update({f"train_count_{g}": int(seen[g]) for g in range(NUM_CLASSES)})
        if val is not None:
            metrics["val_loss"] = val_loss_sum / max(int(cm.sum()), 1)
            metrics.update(flat_metrics("val", val))
            for how, m_how in by_decode.items():  # both decodings, to choose between them on val
                metrics[f"val_qwk_{how}"], metrics[f"val_accuracy_{how}"] = m_how["qwk"], m_how["accuracy"]
            metrics["val_confusion_matrix"] = val["confusion_matrix"]
        qwk = metrics.get("val_qwk", -metrics["train_loss"])
        if qwk > best_qwk + 1e-6:
            best_qwk, bad_epochs = qwk, 0
        else:
            bad_epochs += 1
        metrics["best_val_qwk"] = best_qwk
        history.append({k: v for k, v in metrics.items() if k != "val_confusion_matrix"})
        if session.rank == 0 and progress is not None:
            progress.send("epoch", epochs=cfg.epochs, metrics={k: v for k, v in metrics.items()
                                                               if k != "val_confusion_matrix"})
        elif session.rank == 0:
            from koa_ray.progress import epoch_line

            print("[koa] " + epoch_line(metrics, cfg.epochs, None, False), flush=True)

        stop = cfg.patience > 0 and bad_epochs >= cfg.patience
        with tempfile.TemporaryDirectory(prefix="koa-ckpt-") as tmp:
            ckpt_dir = None
            if session.rank == 0:
                import json

                ckpt_dir = Path(tmp)
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                         "best_qwk": best_qwk, "bad_epochs": bad_epochs, "history_json": json.dumps(history)}
                if ema is not None:
                    state["model"] = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
                    state["ema"] = ema.state_dict()
                save_checkpoint(ckpt_dir, eval_model, checkpoint_meta(cfg, model_cfg, data, epoch,
                                                                 {**metrics, "val": val}, history), state)
            session.report(metrics, ckpt_dir)
        if stop:
            say(f"early stopping at epoch {epoch}: val_qwk has not improved for {bad_epochs} epochs")
            break


def batched(arrays: tuple[np.ndarray, ...], batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    n = len(arrays[0])
    for i in range(0, n, batch_size):
        yield tuple(a[i:i + batch_size] for a in arrays)


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
