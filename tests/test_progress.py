"""The console: one line per epoch with its figures and ETA, sparse progress lines off a terminal, a broken channel
that never stops training, and the calibration maths behind the evaluate report."""

from __future__ import annotations

import io

import numpy as np
import pytest

from koa_ray.metrics import calibration
from koa_ray.progress import Console, Reporter, epoch_line, fmt_duration, verbose


def _epoch(e, qwk, best, t=100.0):
    return {"kind": "epoch", "epochs": 4, "metrics": {
        "epoch": e, "train_loss": 1.0 - 0.1 * e, "val_qwk": qwk, "val_accuracy": 0.5, "val_macro_f1": 0.4,
        "train_img_per_s": 20.0, "epoch_time_s": t, "best_val_qwk": best}}


def test_console_prints_one_line_per_epoch_with_eta_and_best_marker():
    out = io.StringIO()
    c = Console(stream=out, tty=False)
    c.handle({"kind": "message", "text": "worker 0/1 on node abc (cpu)"})
    c.handle({"kind": "start", "epoch": 0, "epochs": 4, "steps": 10})
    for s in range(1, 11):  # within a minute: no progress lines off a terminal
        c.handle({"kind": "step", "epoch": 0, "epochs": 4, "step": s, "steps": 10, "img_per_s": 20.0})
    c.handle(_epoch(0, 0.50, 0.50, t=100))
    c.handle({"kind": "start", "epoch": 1, "epochs": 4, "steps": 10})
    c.handle(_epoch(1, 0.40, 0.50, t=200))  # the run's best stays epoch 1's
    c.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[koa] worker 0/1 on node abc (cpu)"
    assert len(lines) == 3
    # epoch 1 of 4 took 100 s: 3 left -> ETA 300 s; then mean(100, 200) = 150 s x 2 left = 300 s
    assert lines[1] == ("[koa] epoch 1/4  loss 1.0000  val QWK 0.500 acc 0.500 F1 0.400  20.0 img/s  1m40s  "
                        "ETA 5m00s  *")
    assert lines[2].startswith("[koa] epoch 2/4  loss 0.9000  val QWK 0.400") and lines[2].endswith("ETA 5m00s")


def test_console_writes_progress_lines_within_long_epochs_off_a_terminal():
    out = io.StringIO()
    c = Console(stream=out, tty=False, line_every_s=0.0)
    c.handle({"kind": "start", "epoch": 2, "epochs": 4, "steps": 200})
    c.handle({"kind": "step", "epoch": 2, "epochs": 4, "step": 50, "steps": 200, "img_per_s": 31.5})
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("[koa]   epoch 3/4: 25% (50/200 steps, 31.5 img/s,") and "left in this epoch" in line


def test_last_epoch_has_no_eta_and_durations_read_well():
    line = epoch_line({"epoch": 3, "train_loss": 0.5, "train_img_per_s": 9.0, "epoch_time_s": 3725}, 4, None, False)
    assert line == "epoch 4/4  loss 0.5000  9.0 img/s  1h02m"  # no val split: no val figures
    assert [fmt_duration(s) for s in (0, 59.4, 60, 75, 3600)] == ["0s", "59s", "1m00s", "1m15s", "1h00m"]


def test_reporter_survives_a_dead_channel(capsys):
    calls = []

    def sink(ev):
        calls.append(ev)
        raise ConnectionError("queue actor died")

    r = Reporter(sink, step_every_s=0.0)
    r.message("a")
    r.message("b")  # not sent: the channel is marked broken after the first failure
    r.step(0, 1, 1, 1, 1.0)
    assert len(calls) == 1
    assert "progress events stopped (ConnectionError: queue actor died); training goes on" in capsys.readouterr().err


def test_reporter_throttles_step_events():
    got = []
    r = Reporter(got.append, step_every_s=3600)
    for s in range(50):
        r.step(0, 1, s + 1, 50, 1.0)
    assert len(got) == 1 and got[0]["step"] == 1


def test_verbose_switch(monkeypatch):
    monkeypatch.delenv("KOA_VERBOSE", raising=False)
    assert not verbose()
    monkeypatch.setenv("KOA_VERBOSE", "1")
    assert verbose()
    monkeypatch.setenv("KOA_VERBOSE", "0")
    assert not verbose()


# ------------------------------------------------------------------------------------------------ calibration maths
def test_calibration_identities():
    y = np.array([0, 1, 2, 3, 4])
    # always right with probability 1: perfectly calibrated
    assert calibration(np.eye(5)[y], y)["ece"] == 0.0
    # always wrong with probability 1: ECE = MCE = 1
    wrong = calibration(np.eye(5)[(y + 1) % 5], y)
    assert wrong["ece"] == 1.0 and wrong["mce"] == 1.0


def test_calibration_by_hand():
    # two samples at confidence 0.6 (one right), two at 0.9 (both right), 10 bins
    p = np.array([[0.6, 0.4, 0, 0, 0], [0.6, 0.4, 0, 0, 0], [0, 0.9, 0.1, 0, 0], [0, 0, 0.9, 0.1, 0]])
    y = np.array([0, 1, 1, 2])
    cal = calibration(p, y, n_bins=10)
    assert cal["ece"] == pytest.approx(0.5 * abs(0.5 - 0.6) + 0.5 * abs(1.0 - 0.9))
    assert cal["mce"] == pytest.approx(0.1)
    counts = [b["count"] for b in cal["bins"]]
    assert counts[6] == 2 and counts[9] == 2 and sum(counts) == 4
    assert cal["bins"][0]["accuracy"] is None  # an empty bin


def test_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="n_bins=0"):
        calibration(np.eye(5), np.arange(5), n_bins=0)
    with pytest.raises(ValueError, match="rows"):
        calibration(np.eye(5), np.arange(4))
    with pytest.raises(ValueError, match="outside"):
        calibration(np.eye(5), np.array([0, 1, 2, 3, 7]))


def test_a_failing_event_handler_is_dropped_and_the_others_go_on(capsys):
    from koa_ray.train.run import fan_out

    got = []

    def tracker(ev):
        raise OSError("store gone")

    h = fan_out(got.append, tracker, None)
    h({"kind": "message", "text": "a"})
    h({"kind": "message", "text": "b"})
    assert [e["text"] for e in got] == ["a", "b"]
    err = capsys.readouterr().err
    assert err.count("failed (OSError: store gone)") == 1 and "training goes on" in err
