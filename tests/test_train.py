"""Training: Ray Train (2 CPU workers) and local mode, checkpoints, resume, config validation."""

import json
import re
import subprocess
import sys

import cv2

import numpy as np
import pandas as pd
import pytest
import torch

from koa_ray.checkpoint import META, WEIGHTS, resolve_checkpoint
from koa_ray.config import ConfigError, OptimConfig, TrainConfig, load_train_config
from koa_ray.metrics import classification_metrics

try:
    from helpers import TINY, read_tensorboard_scalars, val_predictions
except ImportError:  # tests/ imported as a package
    from tests.helpers import TINY, read_tensorboard_scalars, val_predictions


@pytest.mark.slow
def test_ray_train_two_workers_resume_and_reload(ray_session, prepared, tmp_path):
    from koa_ray.train.driver import fit

    cfg = TrainConfig(data=str(prepared), out=str(tmp_path / "runs"), name="t2", workers=2, cpus_per_worker=0.5,
                      epochs=1, keep_best=2, **{**TINY, "mlflow": True})
    first = fit(cfg)
    run = tmp_path / "runs" / "t2"
    assert first["epochs_run"] == 1
    # same name again with more epochs resumes from the latest checkpoint instead of starting over
    second = fit(TrainConfig(**{**cfg.__dict__, "epochs": 2}))
    history = pd.read_csv(run / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1]
    assert second["epochs_run"] == 2
    # the run folder's files say what happened: the resolved config, a curves picture, and best.json pointing at
    # the checkpoint with the highest val QWK of the history
    assert load_train_config(run / "config.yaml").epochs == 2
    assert cv2.imread(str(run / "curves.png")) is not None
    best = json.loads((run / "best.json").read_text())
    assert best["val_qwk"] == pytest.approx(history["val_qwk"].max())
    assert json.loads((run / best["checkpoint"] / META).read_text())["epoch"] == best["epoch"]
    # both workers trained: the all-reduced effective class counts cover the whole (re-sampled) epoch
    counts = history[[f"train_count_{g}" for g in range(5)]].sum(axis=1)
    assert (counts == history["train_images"]).all() and (counts > 0).all()
    # the best checkpoint reloads (weights_only) and reproduces its logged validation metrics
    ckpt = resolve_checkpoint(run)
    assert torch.load(ckpt / WEIGHTS, weights_only=True)
    y, pred, meta = val_predictions(ckpt, prepared)
    m = classification_metrics(y, pred)
    assert m["n"] == meta["metrics"]["val"]["n"] == len(y)
    assert m["confusion_matrix"] == meta["metrics"]["val_confusion_matrix"]
    assert m["qwk"] == pytest.approx(meta["metrics"]["val_qwk"], abs=1e-9)
    assert meta["model"]["arch"] == "densenet_tiny" and meta["preprocess"]["input_size"] == 64
    assert meta["train_config"]["workers"] == 2
    # MLflow, read back with its own client: one run across the resume, its params the resolved config, one
    # val_qwk point per epoch equal to metrics.csv, the best checkpoint and the run's files as artifacts
    from mlflow.tracking import MlflowClient

    assert second["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=second["mlflow"]["tracking_uri"])
    mrun = client.get_run(second["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "t2"
    assert float(mrun.data.params["optim.lr"]) == cfg.optim.lr and mrun.data.params["workers"] == "2"
    points = sorted(client.get_metric_history(mrun.info.run_id, "val_qwk"), key=lambda m: m.step)
    assert [m.step for m in points] == [0, 1]
    assert [m.value for m in points] == pytest.approx(history["val_qwk"].tolist(), abs=1e-9)
    assert mrun.data.metrics["best_val_qwk"] == pytest.approx(best["val_qwk"])
    arts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"curves.png", "metrics.csv", "MODEL_CARD.md", "best_checkpoint", "confusion_matrix_val.png"} <= arts
    assert {a.path for a in client.list_artifacts(mrun.info.run_id, "best_checkpoint")} >= {
        "best_checkpoint/model.pt", "best_checkpoint/koa.json"}
    # TensorBoard event files carry the same per-epoch figures
    tb = read_tensorboard_scalars(run / "tensorboard")
    assert [s for s, _ in tb["val_qwk"]] == [0, 1]
    assert [v for _, v in tb["val_qwk"]] == pytest.approx(history["val_qwk"].tolist(), abs=1e-6)
    # the model card states the best epoch's val figures, per grade, as the checkpoint holds them
    card = (run / "MODEL_CARD.md").read_text()
    val = meta["metrics"]["val"]
    assert f"QWK **{val['qwk']:.3f}**" in card and f"(n = {val['n']})" in card
    for g in range(5):
        pc = val["per_class"][str(g)]
        assert f"| {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | {pc['support']} |" in card
    assert cv2.imread(str(run / "confusion_matrix_val.png")) is not None


def test_local_mode_is_reproducible(prepared, tmp_path):
    """Same seed, same machine: identical losses and metrics (re-sampling, augmentation and init are all seeded);
    another seed gives another run."""
    from koa_ray.train.local import fit_local

    def history(name, seed):
        cfg = TrainConfig(data=str(prepared), out=str(tmp_path), name=name, epochs=2, seed=seed, **TINY)
        fit_local(cfg)
        return pd.read_csv(tmp_path / name / "metrics.csv")[["epoch", "train_loss", "val_loss", "val_qwk"]]

    a, b, c = history("a", 0), history("b", 0), history("c", 1)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert not np.allclose(a["train_loss"], c["train_loss"])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="loss.gama"):
        load_train_config(sets=["loss.gama=1.0"])
    with pytest.raises(ConfigError, match="loss.gamma"):
        load_train_config(sets=["loss.gamma=-1"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_train_config(sets=["optim.lr=fast"])
    with pytest.raises(ConfigError, match="model.arch"):
        load_train_config(overrides={"model.arch": "resnet"})
    with pytest.raises(ConfigError, match="tta='flip': flip averaging needs training with flips"):
        load_train_config(sets=["tta=flip", "augment.hflip_p=0"])
    with pytest.raises(ConfigError, match="tta='rotate': supported: none, flip, shift"):
        load_train_config(sets=["tta=rotate"])
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 3\nloss: {name: ce, label_smoothing: 0.1}\naugment: {rotate_deg: 5}\n")
    cfg = load_train_config(y, {"epochs": 4})
    assert cfg.epochs == 4 and cfg.loss.name == "ce" and cfg.augment.rotate_deg == 5.0
    # the CLI fails before Ray starts, with the key in the message
    r = subprocess.run([sys.executable, "-m", "koa_ray.cli", "train", "--data", "x", "--set", "balance.bogus=1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "balance.bogus" in r.stderr and "ray" not in r.stderr.lower()


def test_warmup_cosine_schedule():
    from koa_ray.train.loop import warmup_cosine

    s = [warmup_cosine(i, 100, 10, 0.01) for i in range(100)]
    assert s[0] == pytest.approx(0.1) and s[9] == pytest.approx(1.0)
    assert max(s) == pytest.approx(1.0) and s[-1] < 0.02
    assert all(a >= b for a, b in zip(s[10:], s[11:]))


def test_multi_node_run_without_shared_storage_fails_early(ray_session, tmp_path, monkeypatch):
    """A local --storage-path must be visible from every node; the error names the node and the fixes."""
    import ray

    from koa_ray.train import driver

    driver.check_shared_storage(str(tmp_path / "one-node"))  # one node: nothing to check
    real = [n for n in ray.nodes() if n["Alive"]][0]
    fake = {**real, "NodeManagerAddress": "10.9.9.9"}  # same node id, so the probe tasks can run
    monkeypatch.setattr(ray, "nodes", lambda: [real, fake])
    driver.check_shared_storage(str(tmp_path / "shared"))  # both "nodes" see the marker file
    assert not list((tmp_path / "shared").iterdir())  # and it is cleaned up
    monkeypatch.setattr(ray, "get", lambda refs: [True, False])  # the second node cannot see it
    with pytest.raises(RuntimeError, match=r"nodes \['10\.9\.9\.9'\] cannot see.*s3:// or gs://"):
        driver.check_shared_storage(str(tmp_path / "local"))
    driver.check_shared_storage("s3://bucket/koa-runs")  # URIs are trusted


def test_local_ray_pins_its_own_state_api(ray_session):
    """Workers of a local instance reach their own dashboard's State API (Ray Train's placement-group cleaner uses
    it); with several Ray instances on one machine an unpinned client may ask the wrong one."""
    import os

    import ray
    from ray.util.state import list_nodes

    url = os.environ["RAY_API_SERVER_ADDRESS"]
    assert url.startswith("http://127.0.0.1:")

    @ray.remote(num_cpus=0)
    def seen() -> str | None:
        return os.environ.get("RAY_API_SERVER_ADDRESS")

    assert ray.get(seen.remote()) == url
    assert [n.node_id for n in list_nodes()] == [ray.get_runtime_context().get_node_id()]


def test_max_steps_per_epoch_caps_training_steps(prepared, tmp_path):
    from koa_ray.train.local import fit_local

    cfg = TrainConfig(data=str(prepared), out=str(tmp_path), name="cap", epochs=1, max_steps_per_epoch=2,
                      **{**TINY, "batch_size": 8})
    fit_local(cfg)
    history = pd.read_csv(tmp_path / "cap" / "metrics.csv")
    assert history["train_images"].tolist() == [16]
    assert {"val_qwk_argmax", "val_qwk_expected", "val_accuracy_expected"} <= set(history.columns)


@pytest.mark.parametrize("name", ["kl224-cpu.yaml", "kl224.yaml"])
def test_shipped_recipes_load_and_validate(name):
    from pathlib import Path

    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.model.arch == "densenet121" and cfg.loss.alpha == "none" and cfg.augment.hflip_p == 0.0
    assert cfg.augment.grade_strength == [1.0] * 5


def test_mixed_precision_choice_per_device():
    """auto: bf16 on CUDA only; bf16 on any device; fp16 on a CPU fails with the fix in the message; validation on
    the CPU stays fp32 (the precision evaluate/score use)."""
    from koa_ray.train.loop import autocast_dtype, eval_autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(TrainConfig(amp="auto"), cpu) is None
    assert autocast_dtype(TrainConfig(amp="auto"), cuda) is torch.bfloat16
    assert autocast_dtype(TrainConfig(amp="bf16"), cpu) is torch.bfloat16
    assert autocast_dtype(TrainConfig(amp="off"), cuda) is None
    assert autocast_dtype(TrainConfig(amp="fp16"), cuda) is torch.float16
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device.*bf16"):
        autocast_dtype(TrainConfig(amp="fp16"), cpu)
    assert eval_autocast_dtype(torch.bfloat16, cpu) is None
    assert eval_autocast_dtype(torch.bfloat16, cuda) is torch.bfloat16


def test_bf16_cpu_training_learns_and_checkpoint_matches_fp32_inference(prepared, tmp_path):
    """amp=bf16 on the CPU (the CPU recipe) trains, and the val figures it logs are the fp32 figures that the saved
    checkpoint reproduces."""
    from koa_ray.train.local import fit_local

    cfg = TrainConfig(data=str(prepared), out=str(tmp_path), name="bf16", epochs=1, amp="bf16", channels_last=True,
                      **TINY)
    fit_local(cfg)
    history = pd.read_csv(tmp_path / "bf16" / "metrics.csv")
    assert np.isfinite(history["train_loss"]).all()
    ckpt = resolve_checkpoint(tmp_path / "bf16")
    y, pred, meta = val_predictions(ckpt, prepared)
    assert meta["train_config"]["amp"] == "bf16"
    m = classification_metrics(y, pred)
    assert m["confusion_matrix"] == meta["metrics"]["val_confusion_matrix"]


def test_flip_averaged_validation_is_what_the_checkpoint_predicts_by_default(prepared, tmp_path):
    """``tta: flip`` (with training flips) validates on the mean of each knee and its mirror image; the checkpoint
    records it, so a :class:`Predictor` (evaluate, score, gradcam) averages the flips by default and reproduces the
    logged val figures and loss; ``tta="none"`` still gives the single view."""
    from koa_ray.config import AugmentConfig
    from koa_ray.data.decode import decode_image_column
    from koa_ray.infer.predictor import Predictor
    from koa_ray.train.local import fit_local, read_split

    cfg = TrainConfig(data=str(prepared), out=str(tmp_path), name="tta", epochs=3, tta="flip",
                      augment=AugmentConfig(hflip_p=0.5), **{**TINY, "optim": OptimConfig(lr=1e-2)})
    fit_local(cfg)
    history = pd.read_csv(tmp_path / "tta" / "metrics.csv")
    p = Predictor(resolve_checkpoint(tmp_path / "tta"), device="cpu")
    assert p.tta == p.meta["tta"] == "flip"
    val = read_split(prepared, "val")
    crops = decode_image_column(val["image"].tolist(), val["size"].to_numpy())
    probs = p.predict(crops)
    single = p.predict(crops, tta="none")
    mirrored = p.predict(crops[:, :, ::-1].copy(), tta="none")
    assert np.abs(mirrored - single).max() > 1e-4  # the mirror image is another view for this model
    np.testing.assert_allclose(probs, 0.5 * (single + mirrored), rtol=0, atol=1e-6)
    labels = val["label"].to_numpy()
    m = classification_metrics(labels, p.grades(probs))
    assert m["confusion_matrix"] == p.meta["metrics"]["val_confusion_matrix"]
    nll = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert p.meta["metrics"]["val_loss"] == pytest.approx(nll, rel=1e-5)
    assert history.loc[history["epoch"] == p.meta["epoch"], "val_loss"].item() == pytest.approx(nll, rel=1e-5)
    assert "averaged over the test-time views 'flip'" in (tmp_path / "tta" / "MODEL_CARD.md").read_text()


def test_weight_ema_is_the_exponential_average_of_the_weights():
    """One update is ``d * ema + (1 - d) * w`` with the warmed-up decay, for parameters and BN statistics alike;
    integer buffers are copied; the average is a separate copy that training does not touch."""
    from koa_ray.train.ema import ModelEma, ema_decay_at

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 10**6) == 0.999
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEma(model, decay=0.999)
    model.train()
    model(torch.randn(8, 3)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    w1 = model.state_dict()
    ema.update(model)
    avg = ema.module.state_dict()
    for k in w0:
        if w0[k].dtype.is_floating_point:
            assert torch.allclose(avg[k], 0.1 * w0[k] + 0.9 * w1[k]), k
        else:
            assert int(avg[k]) == int(w1[k]) == 1, k
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay=1.0"):
        ModelEma(model, 1.0)
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        load_train_config(sets=["optim.ema_decay=1.5"])


def test_local_training_with_weight_ema_saves_and_resumes_both_weights(prepared, tmp_path):
    """With ``optim.ema_decay``, model.pt is the average (and reproduces the logged val metrics), train_state.pt
    carries the raw weights, and a resumed run continues from both."""
    from koa_ray.checkpoint import TRAIN_STATE
    from koa_ray.train.local import fit_local

    cfg = TrainConfig(data=str(prepared), out=str(tmp_path), name="ema", epochs=2,
                      **{**TINY, "optim": OptimConfig(lr=3e-3, ema_decay=0.99)})
    fit_local(cfg)
    ckpt = sorted((tmp_path / "ema").glob("checkpoint_epoch_*"))[-1]
    averaged = torch.load(ckpt / WEIGHTS, weights_only=True)
    state = torch.load(ckpt / TRAIN_STATE, weights_only=True)
    per_epoch = np.ceil(pd.read_csv(tmp_path / "ema" / "metrics.csv")["train_images"] / 32).astype(int).tolist()
    assert state["ema"]["updates"] == sum(per_epoch)
    differs = [k for k in averaged if averaged[k].dtype.is_floating_point
               and not torch.allclose(averaged[k], state["model"][k])]
    assert len(differs) > len(averaged) // 2
    y, pred, meta = val_predictions(ckpt, prepared)
    assert classification_metrics(y, pred)["confusion_matrix"] == meta["metrics"]["val_confusion_matrix"]
    fit_local(TrainConfig(**{**cfg.__dict__, "epochs": 3}))
    assert pd.read_csv(tmp_path / "ema" / "metrics.csv")["epoch"].tolist() == [0, 1, 2]
    per_epoch = np.ceil(pd.read_csv(tmp_path / "ema" / "metrics.csv")["train_images"] / 32).astype(int).tolist()
    last = torch.load(sorted((tmp_path / "ema").glob("checkpoint_epoch_*"))[-1] / TRAIN_STATE, weights_only=True)
    assert len(per_epoch) == 3 and last["ema"]["updates"] == sum(per_epoch)  # the count went on from the saved one


@pytest.mark.parametrize("sets, field", [
    (["optim.lr=-0.001"], "optim.lr"),
    (["model.attention=eca"], "model.attention"),
    (["loss.alpha=[1, 2, 3]"], "loss.alpha"),
    (["data=/nonexistent/prep"], "data='/nonexistent/prep': no such folder"),
    (["data={tmp}"], "not prepared data (no manifest.json)"),
    (["out=/proc/koa-runs"], "out='/proc/koa-runs': not writable"),
    (["workers=3", "cpus_per_worker=64"], "workers x cpus_per_worker = 3 x 64 = 192 CPUs"),
    (["gpu=true"] if not torch.cuda.is_available() else ["workers=64", "gpu=true"], "gpu=true with workers="),
])
def test_bad_train_settings_fail_before_ray_starts(prepared, tmp_path, monkeypatch, capsys, sets, field):
    """Each bad setting ends `koa train` with exit code 2 and one line naming the field, before Ray is started."""
    from koa_ray import cli, runtime

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `koa train` process
    argv = ["train", "--data", str(prepared), "--out", str(tmp_path / "runs"), "--name", "bad"]
    for s in sets:
        argv += ["--set", s.format(tmp=tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.slow
def test_ray_train_worker_crash_restarts_from_the_last_checkpoint(ray_session, prepared, tmp_path):
    """One of two Train workers killed hard mid-epoch (``os._exit`` before step 1 of epoch 2): with the default
    ``max_failures=1`` the worker group restarts from the latest checkpoint the controller had registered (it polls
    workers every 2 s, so the epoch-1 report may or may not have reached it; epoch 0's has), trains no epoch before
    that checkpoint again, and ends with a valid checkpoint."""
    from koa_ray.train.driver import fit
    from koa_ray.train.loop import FaultPlan

    marker = tmp_path / "crashed"
    cfg = TrainConfig(data=str(prepared), out=str(tmp_path / "runs"), name="crash", workers=2, cpus_per_worker=0.5,
                      epochs=4, keep_best=4, **TINY)
    assert cfg.max_failures == 1
    fit(cfg, fault=FaultPlan(epoch=2, step=1, marker=str(marker), rank=1))
    assert marker.read_text().startswith("crashed at epoch 2 step 1 rank 1")  # the fault did fire
    history = pd.read_csv(tmp_path / "runs" / "crash" / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    resumed_at = int(history["start_epoch"].iloc[-1])
    assert resumed_at in (1, 2), history["start_epoch"].tolist()
    assert history["start_epoch"].tolist() == [0] * resumed_at + [resumed_at] * (4 - resumed_at)
    ckpt = resolve_checkpoint(tmp_path / "runs" / "crash")
    y, pred, meta = val_predictions(ckpt, prepared)
    assert classification_metrics(y, pred)["confusion_matrix"] == meta["metrics"]["val_confusion_matrix"]


def test_local_training_killed_resumes_from_the_last_complete_checkpoint(prepared, tmp_path):
    """SIGKILL of `koa train --local` mid-run, then the same command: it says it resumes, from the latest complete
    checkpoint (never a half-copied one), and repeats no finished epoch."""
    import signal
    import time

    from koa_ray.checkpoint import TRAIN_STATE

    run = tmp_path / "runs" / "kill"
    cmd = [sys.executable, "-m", "koa_ray.cli", "train", "--local", "--data", str(prepared), "--out",
           str(tmp_path / "runs"), "--name", "kill", "--epochs", "4", "--image-size", "64", "--arch", "densenet_tiny",
           "--set", "patience=0", "--set", "optim.lr=0.003"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoint_epoch_0001" / TRAIN_STATE).is_file():
        assert p.poll() is None and time.time() < deadline, "training ended or hung before its second checkpoint"
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    last = max(int(d.name[-4:]) for d in run.glob("checkpoint_epoch_*") if not d.name.endswith(".tmp")
               and (d / TRAIN_STATE).is_file())
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run / f'checkpoint_epoch_{last:04d}'} at epoch {last + 1}" in r.stdout, r.stdout[-2000:]
    history = pd.read_csv(run / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert history["start_epoch"].tolist() == [0] * (last + 1) + [last + 1] * (3 - last)
    assert not list(run.glob("*.tmp"))


def test_local_checkpoints_ignore_an_unfinished_copy(prepared, tmp_path):
    """A ``.tmp`` copy left by a kill during ``report`` (even one that already holds koa.json) is never taken as a
    checkpoint, and the next run removes it and says so."""
    import shutil as _shutil

    from koa_ray.train.local import LocalSession, fit_local
    from koa_ray.train.run import data_info

    cfg = TrainConfig(data=str(prepared), out=str(tmp_path), name="tmpcopy", epochs=1, **TINY)
    fit_local(cfg)
    run = tmp_path / "tmpcopy"
    (done,) = [d for d in run.glob("checkpoint_epoch_*")]
    session = LocalSession(cfg, data_info(cfg)[1], run)
    half = run / "checkpoint_epoch_0001.tmp"
    half.mkdir()
    _shutil.copy(done / META, half / META)  # metadata copied, weights not yet
    assert session.checkpoints() == [done]
    LocalSession(cfg, data_info(cfg)[1], run)  # the next run clears it away
    assert not half.exists()


@pytest.mark.slow
def test_ray_training_killed_resumes_from_the_last_checkpoint(prepared, tmp_path):
    """SIGKILL of `koa train` on Ray (the driver and the local Ray instance it started, as when a laptop's terminal
    is killed), then the same command: Ray Train restores the run from its storage folder, resumes after the last
    registered checkpoint, and trains no finished epoch again."""
    import os
    import signal
    import time

    from koa_ray.checkpoint import TRAIN_STATE

    run = tmp_path / "runs" / "rkill"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    cmd = [sys.executable, "-m", "koa_ray.cli", "train", "--data", str(prepared), "--out", str(tmp_path / "runs"),
           "--name", "rkill", "--workers", "1", "--epochs", "5", "--image-size", "64", "--arch", "densenet_tiny",
           "--set", "patience=0", "--set", "optim.lr=0.003", "--set", "keep_best=5"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 400
    try:
        # kill as soon as the third checkpoint is written: the earlier reports have had time to be registered
        while not any((d / TRAIN_STATE).is_file() for d in run.glob("checkpoint_epoch_0002*")):
            assert p.poll() is None and time.time() < deadline, "training ended or hung before its third checkpoint"
            time.sleep(0.1)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        p.wait()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    history = pd.read_csv(run / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3, 4]
    resumed_at = int(history["start_epoch"].iloc[-1])
    assert 1 <= resumed_at <= 3, history["start_epoch"].tolist()  # after a checkpoint, not from scratch
    assert history["start_epoch"].tolist() == [0] * resumed_at + [resumed_at] * (5 - resumed_at)
    assert f"resuming from" in r.stdout + r.stderr
    # what the user sees: koa's own lines only (no Ray worker/controller output, no dataset plans), each epoch once
    out = r.stdout
    assert "(RayTrainWorker" not in out and "TrainController" not in out and "Execution plan" not in out, out
    for e in range(resumed_at + 1, 6):
        assert len(re.findall(rf"^\[koa\] epoch {e}/5  loss ", out, flags=re.M)) == 1, out
    assert "best checkpoint" in out and "MODEL_CARD.md" in out
    assert len(out.splitlines()) <= 30, out
