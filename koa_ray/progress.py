"""What a user sees while a job runs: Ray's own logs kept quiet, one line per epoch, a progress bar within epochs.

Training workers do not print. Rank 0 sends small events (``start``, ``step``, ``epoch``, ``message``) through a
:class:`ProgressQueue` (a Ray queue actor, no CPU) to the driver, where :class:`Console` renders them: one line per
epoch (loss, val QWK / accuracy / macro-F1, img/s, time, ETA), a tqdm bar within the epoch on a terminal, and at most
one progress line a minute within long epochs elsewhere (``ray job logs``, CI). Local mode hands the same events to
the same :class:`Console` directly. The driver is the only process that writes to the console, so a line is never
printed twice, and ``ray job submit`` logs read like a local run.

Ray's INFO logs, per-epoch dataset plans and worker output stay off unless ``--verbose`` (``KOA_VERBOSE=1``), which
restores them all. They are always in Ray's log folder (``/tmp/ray/session_latest/logs``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Callable, TextIO

VERBOSE_ENV = "KOA_VERBOSE"

# Ray log records that mislead koa users. The CPU one fires when an earlier stage's actors still hold the CPUs they
# are about to release (the job does not hang); the token one is informational (a local instance is token-protected).
NOISE = ("does not have any available CPUs", "Token authentication is enabled", "Progress bars disabled",
         "Progress bars for operators disabled")


def verbose() -> bool:
    """True when the user asked for Ray's own logs (``--verbose`` sets ``KOA_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a record that cannot format is not ours to judge
            return True
        return not any(n in msg for n in NOISE)


def quiet_ray_logs() -> None:
    """Lower Ray's driver-side logging to warnings without the :data:`NOISE` records, and turn Ray Data's
    per-dataset execution banners off; one progress bar per Ray Data job, only on a terminal. No-op when
    :func:`verbose`."""
    if verbose():
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = sys.stdout.isatty()
    ctx.enable_operator_progress_bars = False  # one bar per job, not one per operator
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        lg = logging.getLogger(name)
        if name != "ray":
            lg.setLevel(logging.WARNING)
        for target in (lg, *lg.handlers):
            if not any(isinstance(f, _DropNoise) for f in target.filters):
                target.addFilter(_DropNoise())


def fmt_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def epoch_line(m: dict, epochs: int, eta_s: float | None, best: bool) -> str:
    """One line for a finished epoch: ``epoch 3/10  loss 1.036  val QWK 0.726 acc 0.628 F1 0.604  20.9 img/s
    5m02s  ETA 35m14s``, with ``*`` when val QWK is the best so far."""
    parts = [f"epoch {int(m['epoch']) + 1:>{len(str(epochs))}}/{epochs}", f"loss {m['train_loss']:.4f}"]
    if "val_qwk" in m:
        parts.append(f"val QWK {m['val_qwk']:.3f} acc {m['val_accuracy']:.3f} F1 {m['val_macro_f1']:.3f}")
    parts.append(f"{m['train_img_per_s']:.1f} img/s")
    parts.append(fmt_duration(m["epoch_time_s"]))
    if eta_s is not None:
        parts.append(f"ETA {fmt_duration(eta_s)}")
    return "  ".join(parts) + ("  *" if best else "")


class Console:
    """Renders training events on the driver.

    Args:
        stream: where lines go (default ``sys.stdout``).
        tty: draw a tqdm bar within epochs (default: whether ``stream`` is a terminal). Off a terminal, a long epoch
            gets one progress line every ``line_every_s`` seconds instead.
        line_every_s: seconds between progress lines within an epoch, off a terminal.
        prefix: put before every line.
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, line_every_s: float = 60.0,
                 prefix: str = "[koa] "):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.line_every_s, self.prefix = line_every_s, prefix
        self._bar = None
        self._epoch_t0 = self._last_line = 0.0
        self._times: list[float] = []
        self._prev_best: float | None = None

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.clear()
        print(self.prefix + text, file=self.stream, flush=True)
        if self._bar is not None:
            self._bar.refresh()

    def handle(self, ev: dict) -> None:
        kind = ev.get("kind")
        if kind == "message":
            self.write(str(ev["text"]))
        elif kind == "start":
            self._close_bar()
            self._epoch_t0 = self._last_line = time.monotonic()
            if self.tty:
                from tqdm import tqdm

                self._bar = tqdm(total=int(ev["steps"]), desc=f"epoch {int(ev['epoch']) + 1}/{ev['epochs']}",
                                 unit="step", leave=False, file=self.stream, dynamic_ncols=True)
        elif kind == "step":
            if self._bar is not None:
                self._bar.n = min(int(ev["step"]), self._bar.total or int(ev["step"]))
                self._bar.set_postfix_str(f"{ev.get('img_per_s', 0.0):.1f} img/s", refresh=False)
                self._bar.refresh()
            elif time.monotonic() - self._last_line >= self.line_every_s:
                self._last_line = time.monotonic()
                steps, step = int(ev["steps"]), int(ev["step"])
                left = (time.monotonic() - self._epoch_t0) / max(step, 1) * max(steps - step, 0)
                self.write(f"  epoch {int(ev['epoch']) + 1}/{ev['epochs']}: {100 * step / max(steps, 1):.0f}% "
                           f"({step}/{steps} steps, {ev.get('img_per_s', 0.0):.1f} img/s, "
                           f"{fmt_duration(left)} left in this epoch)")
        elif kind == "epoch":
            self._close_bar()
            m, epochs = ev["metrics"], int(ev["epochs"])
            self._times.append(float(m["epoch_time_s"]))
            left = epochs - int(m["epoch"]) - 1
            eta = sum(self._times) / len(self._times) * left if left > 0 else None
            # the loop's running best covers the epochs before a resume too; a tie with it is not a new best
            run_best = m.get("best_val_qwk", m.get("val_qwk"))
            best = ("val_qwk" in m and m["val_qwk"] >= run_best - 1e-9
                    and (self._prev_best is None or run_best > self._prev_best + 1e-9))
            self._prev_best = run_best
            self.write(epoch_line(m, epochs, eta, best))

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._close_bar()


class ProgressQueue:
    """A Ray queue actor (``num_cpus=0``) that carries worker events to the driver's :class:`Console`.

    Use as a context manager on the driver: ``with ProgressQueue(console.handle) as pq: trainer = ...(pq.queue)``;
    a thread drains the queue while the trainer runs, and everything left is rendered on exit.
    """

    def __init__(self, handle: Callable[[dict], None], poll_s: float = 2.0):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._handle, self._poll_s = handle, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="koa-progress", daemon=True)

    def __enter__(self) -> "ProgressQueue":
        self._thread.start()
        return self

    def _drain(self, block: bool) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                ev = self.queue.get(block=block, timeout=self._poll_s if block else None)
            except Empty:
                return
            except Exception:  # the queue actor is gone (Ray shut down): nothing more will come
                self._stop.set()
                return
            self._handle(ev)
            block = False

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._drain(block=True)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()  # returns within poll_s once the event in hand is handled
        self._drain(block=False)
        try:
            self.queue.shutdown()
        except Exception:
            pass  # Ray already shut down: the actor went with it


class Reporter:
    """Sends events from the training loop: straight to a :class:`Console` (local mode) or into a
    :class:`ProgressQueue` (Ray Train worker). A queue that has gone away (driver killed) is reported once on stderr
    and then ignored: training does not depend on its console.

    Args:
        sink: ``Console.handle`` or a ``ray.util.queue.Queue``.
        step_every_s: minimum seconds between ``step`` events.
    """

    def __init__(self, sink, step_every_s: float = 2.0):
        self.sink, self.step_every_s = sink, step_every_s
        self._last_step = -math.inf
        self._broken = False

    def send(self, kind: str, **payload) -> None:
        if self._broken:
            return
        ev = {"kind": kind, **payload}
        try:
            if callable(self.sink):
                self.sink(ev)
            else:
                self.sink.put_nowait(ev)
        except Exception as e:
            self._broken = True
            print(f"[koa] progress events stopped ({type(e).__name__}: {e}); training goes on", file=sys.stderr,
                  flush=True)

    def message(self, text: str) -> None:
        self.send("message", text=text)

    def step(self, epoch: int, epochs: int, step: int, steps: int, img_per_s: float) -> None:
        now = time.monotonic()
        if now - self._last_step >= self.step_every_s:
            self._last_step = now
            self.send("step", epoch=epoch, epochs=epochs, step=step, steps=steps, img_per_s=img_per_s)


def train_summary(result: dict, cfg) -> str:
    """The lines printed when training ends: the best epoch and where each output of the run is."""
    from pathlib import Path

    run = str(result.get("run_dir", ""))
    head = f"[koa] done in {fmt_duration(float(result.get('wall_s', float('nan'))))}"
    if result.get("epoch") is not None:
        head += f": best epoch {int(result['epoch']) + 1}/{cfg.epochs}"
        if result.get("val_qwk") is not None:
            head += (f", val QWK {result['val_qwk']:.3f} accuracy {result['val_accuracy']:.3f} "
                     f"macro-F1 {result['val_macro_f1']:.3f}")
    rows = [("run folder", run)]
    if result.get("checkpoint"):
        rows.append(("best checkpoint", str(Path(run) / result["checkpoint"]) if "://" not in run else
                     result["checkpoint"]))
    for label, name in (("metrics", "metrics.csv"), ("curves", "curves.png"), ("model card", "MODEL_CARD.md")):
        if "://" in run or (Path(run) / name).is_file():
            rows.append((label, f"{run.rstrip('/')}/{name}"))
    if result.get("tensorboard"):
        rows.append(("TensorBoard", f"tensorboard --logdir {result['tensorboard']}"))
    if result.get("mlflow"):
        rows.append(("MLflow", f"{result['mlflow']['tracking_uri']} run {result['mlflow']['run_id']} "
                               f"(mlflow ui --backend-store-uri {result['mlflow']['tracking_uri']})"))
    width = max(len(k) for k, _ in rows)
    lines = [head] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"  next: koa evaluate --checkpoint {run} --data {cfg.data} --split val --out {run}/eval")
    return "\n".join(lines)
