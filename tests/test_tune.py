"""Tests for koa_ray.tune: search-space validation (no Ray) and a small ASHA sweep of Ray Train V2 runs.

The sweep tests share one 4-trial sweep on tiny synthetic data (2 epochs, densenet_tiny, 64 px): it is interrupted
after its first finished trial (SIGUSR1, the path Ctrl+C takes), resumed, and then checked: resume did not re-run
the finished trial, the 2 trials with an invalid ``loss.alpha`` are recorded as ERROR while the others finish, and
``best_config.yaml`` reproduces the best trial and trains with ``koa train --config``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ray.tune import Callback

from koa_ray.config import ConfigError, TrainConfig, load_train_config
from koa_ray.tune import (DEFAULT_SPACE, MINORITY_KEY, apply_params, auto_concurrency, fit_trial_cpus, load_space,
                          validate_space)
from koa_ray.tune.summary import _patience_hit

MAX_EPOCHS = 2
WORKERS = 1
BAD_ALPHAS = ["bogus", "inverze"]  # right type, rejected by TrainConfig.validate() when a trial builds its config
GOOD_ALPHAS = ["none", "effective"]
BASE_SETS = ["model.arch=densenet_tiny", "batch_size=32", "eval_batch_size=64", "keep_best=1"]
SWEEP_SPACE = {
    "mode": "replace",
    "params": {
        "loss.gamma": {"type": "uniform", "low": 0.0, "high": 3.0},
        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
        MINORITY_KEY: {"type": "uniform", "low": 1.0, "high": 2.0},
        # grid values run in order: 2 healthy trials, then 2 that raise (invalid values the space forces). Only 2
        # real trials because each costs ~45-70 s of fixed start-up on 2 cores (see benchmarks/bench_tune.py).
        "loss.alpha": {"type": "grid", "values": [*GOOD_ALPHAS, *BAD_ALPHAS]},
    },
}


# ------------------------------------------------------------------------------------------ space (no Ray)
def test_default_space_is_valid_and_covers_the_issue():
    space = load_space(None, TrainConfig())
    assert set(space) == set(DEFAULT_SPACE)
    for key in ("loss.gamma", "loss.alpha", "optim.lr", "optim.weight_decay", "loss.label_smoothing",
                "augment.rotate_deg", "augment.brightness", "augment.contrast", "augment.clahe_p", "augment.noise_p",
                "decode", "balance.target", "balance.strength"):
        assert key in space
    assert MINORITY_KEY not in space  # grade-aware augmentation is opt-in (a space file can add it)
    assert space["loss.gamma"] == {"type": "uniform", "low": 0.0, "high": 5.0}
    assert space["optim.lr"]["type"] == "loguniform"
    assert space["loss.alpha"]["values"] == ["none", "inverse", "effective"]


def test_space_file_extend_replace_and_drop(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump({"params": {"optim.optimizer": {"type": "choice", "values": ["adamw", "sgd"]},
                                            "loss.gamma": {"type": "uniform", "low": 0.5, "high": 1.5},
                                            "augment.noise_p": None}}))
    space = load_space(f, TrainConfig())
    assert space["optim.optimizer"]["values"] == ["adamw", "sgd"]
    assert space["loss.gamma"]["low"] == 0.5
    assert "augment.noise_p" not in space and "optim.lr" in space  # extend keeps the other defaults

    f.write_text(yaml.safe_dump({"mode": "replace", "params": {
        "model.drop_rate": {"type": "quniform", "low": 0.0, "high": 0.5, "q": 0.1},
        "batch_size": {"type": "randint", "low": 16, "high": 65}}}))
    assert set(load_space(f, TrainConfig())) == {"model.drop_rate", "batch_size"}


@pytest.mark.parametrize("params, message", [
    ({"loss.gama": {"type": "uniform", "low": 0, "high": 1}}, "loss.gama: unknown TrainConfig key"),
    ({"nope": {"type": "uniform", "low": 0, "high": 1}}, "nope: unknown TrainConfig key"),
    ({"loss": {"type": "uniform", "low": 0, "high": 1}}, "loss: is a section"),
    ({"loss.gamma.x": {"type": "uniform", "low": 0, "high": 1}}, "loss.gamma is a value, not a section"),
    ({"loss.gamma": {"type": "normal", "low": 0, "high": 1}}, "loss.gamma: type='normal'"),
    ({"loss.gamma": {"low": 0, "high": 1}}, "loss.gamma: type=None"),
    ({"loss.gamma": {"type": "uniform", "low": 3, "high": 1}}, "loss.gamma: low=3 must be < high=1"),
    ({"loss.gamma": {"type": "uniform", "low": 1, "high": 1}}, "low=1 must be < high=1"),
    ({"loss.gamma": {"type": "uniform", "low": 0}}, "loss.gamma: type uniform needs 'high'"),
    ({"loss.gamma": {"type": "uniform", "low": "a", "high": 1}}, "loss.gamma: low='a': expected a number"),
    ({"loss.gamma": {"type": "uniform", "low": 0, "hgih": 1}}, "loss.gamma: unknown field(s) ['hgih']"),
    ({"loss.gamma": [0, 1]}, "loss.gamma: expected a mapping"),
    ({"optim.lr": {"type": "loguniform", "low": 0, "high": 1e-2}}, "optim.lr: loguniform needs low > 0"),
    ({"loss.alpha": {"type": "choice", "values": []}}, "loss.alpha: 'values' is empty"),
    ({"loss.alpha": {"type": "choice"}}, "loss.alpha: type choice needs 'values: [...]'"),
    ({"loss.alpha": {"type": "choice", "values": ["weird", "odd"]}}, "loss.alpha: every value is invalid"),
    ({"model.attention": {"type": "choice", "values": [1, 2]}}, "model.attention: value 1 is invalid"),
    ({"loss.label_smoothing": {"type": "uniform", "low": 0, "high": 1.5}},
     "loss.label_smoothing: value 1.5 is invalid"),
    ({"augment.clahe_p": {"type": "uniform", "low": -0.1, "high": 0.5}}, "augment.clahe_p: value -0.1 is invalid"),
    ({"batch_size": {"type": "uniform", "low": 8, "high": 64}}, "batch_size: is an integer"),
    ({"batch_size": {"type": "randint", "low": 8.5, "high": 64}}, "randint needs integer low/high"),
    ({"model.drop_rate": {"type": "quniform", "low": 0, "high": 0.5}}, "quniform needs a step 'q' > 0"),
    ({"model.arch": {"type": "uniform", "low": 0, "high": 1}}, "model.arch: is not numeric"),
    ({"epochs": {"type": "randint", "low": 1, "high": 5}}, "epochs: set by the sweep itself (--max-epochs)"),
    ({"data": {"type": "choice", "values": ["a"]}}, "data: set by the sweep itself"),
    ({MINORITY_KEY: {"type": "uniform", "low": -1, "high": 2}}, f"{MINORITY_KEY}: -1: must be a number >= 0"),
])
def test_space_errors_name_the_key(params, message):
    with pytest.raises(ConfigError) as e:
        validate_space(params, TrainConfig())
    assert message in str(e.value)


def test_choice_value_rejected_by_validate_only_warns(caplog):
    """A choice of the right type that TrainConfig.validate() rejects errors only the trials that sample it."""
    space = validate_space({"loss.alpha": {"type": "choice", "values": ["none", "weird"]}}, TrainConfig())
    assert space["loss.alpha"]["values"] == ["none", "weird"]
    assert "loss.alpha: value 'weird' fails TrainConfig validation" in caplog.text
    with pytest.raises(ConfigError, match="loss.alpha='weird'"):
        apply_params(TrainConfig(), {"loss.alpha": "weird"})


def test_space_errors_specific_to_optuna():
    grid = {"loss.gamma": {"type": "grid", "values": [1.0, 2.0]}}
    validate_space(grid, TrainConfig(), search="random")
    with pytest.raises(ConfigError, match="loss.gamma: grid is not supported with --search optuna"):
        validate_space(grid, TrainConfig(), search="optuna")
    lists = {"balance.target": {"type": "choice", "values": ["sqrt", [1, 1, 1, 1, 1]]}}
    validate_space(lists, TrainConfig(), search="random")
    with pytest.raises(ConfigError, match="balance.target: optuna choices"):
        validate_space(lists, TrainConfig(), search="optuna")


def test_space_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    f = tmp_path / "s.yaml"
    for doc, message in [({"mode": "merge", "params": {}}, "mode='merge'"),
                         ({"param": {}}, "unknown top-level key(s) ['param']"),
                         ({"params": [1]}, "'params' must map dotted keys"),
                         ({"mode": "replace", "params": {}}, "search space is empty"),
                         ({"mode": "replace", "params": {"loss.gamma": None}}, "only makes sense with mode: extend"),
                         ({"params": {"loss.gama": None}}, "loss.gama: unknown TrainConfig key")]:
        f.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError) as e:
            load_space(f, TrainConfig())
        assert message in str(e.value), (doc, str(e.value))
    f.write_text("params: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(f)


def test_apply_params_validates_and_derives():
    base = TrainConfig()
    cfg = apply_params(base, {"loss.gamma": np.float64(1.5), MINORITY_KEY: 2.0, "batch_size": 48.0,
                              "workers": np.int64(3)}, name="trial_x")
    assert cfg.loss.gamma == 1.5 and cfg.name == "trial_x"
    assert cfg.batch_size == 48 and isinstance(cfg.batch_size, int) and cfg.workers == 3
    g = base.augment.grade_strength
    assert cfg.augment.grade_strength == pytest.approx([g[0], 2 * g[1], g[2], 2 * g[3], 2 * g[4]])
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        apply_params(base, {"loss.label_smoothing": 1.2})


def test_resource_helpers():
    assert auto_concurrency(2, 0, 0.1 + 2 * 0.45, 0) == 1
    assert auto_concurrency(16, 0, 1.1, 0) == 10  # 4 CPUs stay free for Ray Data
    assert auto_concurrency(16, 2, 1.1, 1) == 2
    base = {"workers": 2, "cpus_per_worker": 0.5}
    assert fit_trial_cpus(base, 0.1, 2.0, explicit=False)["cpus_per_worker"] == pytest.approx(0.45)
    assert fit_trial_cpus(base, 0.1, 8.0, explicit=False) == base
    with pytest.raises(ConfigError, match="would hang"):
        fit_trial_cpus(base, 0.1, 2.0, explicit=True)
    with pytest.raises(ConfigError, match="would hang"):
        fit_trial_cpus({"workers": 8, "cpus_per_worker": 0.5}, 0.1, 1.0, explicit=False)


def test_patience_rule_matches_training_loop():
    assert not _patience_hit([0.1, 0.2, 0.3], 2)
    assert _patience_hit([0.3, 0.2, 0.25], 2)
    assert not _patience_hit([0.3, 0.2, 0.25], 0)


def test_run_sweep_validates_before_ray(tmp_path, prepared):
    from koa_ray.tune import run_sweep

    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sweep(out=str(tmp_path / "none"), resume=True)
    with pytest.raises(ConfigError, match="search='grid'"):
        run_sweep(data=str(prepared), out=str(tmp_path / "a"), search="grid")
    with pytest.raises(ConfigError, match="unknown config key"):
        run_sweep(data=str(prepared), out=str(tmp_path / "a"), sets=["nope=1"])
    no_val = tmp_path / "noval"
    no_val.mkdir()
    (no_val / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="needs a 'val' split"):
        run_sweep(data=str(no_val), out=str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------ sweep (Ray)
INTERRUPT_AFTER = {"n": None}  # read at call time: the copy Tune restores on resume interrupts nothing


class InterruptAfterFinishedTrials(Callback):
    """Simulates Ctrl+C once ``INTERRUPT_AFTER['n']`` trials finished: SIGUSR1 is Tune's interruption signal.

    Defined at module level so Tune pickles it by reference (a by-value copy would freeze ``INTERRUPT_AFTER``).
    """

    def __init__(self):
        self.finished: set[str] = set()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        if INTERRUPT_AFTER["n"] is not None and len(self.finished) >= INTERRUPT_AFTER["n"]:
            os.kill(os.getpid(), signal.SIGUSR1)


def _trial_state(out: Path, trial_id: str) -> dict:
    """What re-running a trial would change: its Tune results and its Train checkpoints."""
    tune_dir = out / "sweep" / f"trial_{trial_id}"
    results = (tune_dir / "result.json").read_text().strip().splitlines() if (tune_dir / "result.json").is_file() \
        else []
    run = out / "runs" / f"trial_{trial_id}"
    ckpts = {p.name: p.joinpath("koa.json").stat().st_mtime_ns for p in sorted(run.glob("checkpoint_epoch_*"))}
    return {"results": len(results), "checkpoints": ckpts}


@pytest.fixture(scope="module")
def sweep(ray_session, prepared, tmp_path_factory):
    """Interrupted (SIGUSR1) after the first finished trial, then resumed to the end; returns what each phase saw."""
    from koa_ray.tune import run_sweep

    out = tmp_path_factory.mktemp("sweep") / "out"
    t0 = time.perf_counter()
    INTERRUPT_AFTER["n"] = 1
    try:
        first = run_sweep(data=str(prepared), out=str(out), num_samples=1, max_epochs=MAX_EPOCHS,
                          search="random", scheduler="asha", workers_per_trial=WORKERS, space=SWEEP_SPACE,
                          image_size=64, sets=BASE_SETS, seed=3, verbose=0,
                          callbacks=[InterruptAfterFinishedTrials()])
    finally:
        INTERRUPT_AFTER["n"] = None
    t1 = time.perf_counter()
    first_rows = pd.read_csv(out / "results.csv")
    done_ids = [t for t, n in zip(first_rows["trial_id"], first_rows["epochs_run"]) if n > 0]
    before = {t: _trial_state(out, t) for t in done_ids}
    final = run_sweep(out=str(out), resume=True, verbose=0)
    t2 = time.perf_counter()
    after = {t: _trial_state(out, t) for t in done_ids}
    print(f"\nsweep timings: interrupted part {t1 - t0:.1f}s, resume {t2 - t1:.1f}s")
    return {"out": out, "first": first, "first_rows": first_rows, "done_ids": done_ids, "before": before,
            "after": after, "final": final, "rows": pd.read_csv(out / "results.csv"),
            "times": (t1 - t0, t2 - t1)}


@pytest.mark.slow
def test_interrupted_sweep_stops_after_first_trial(sweep):
    rows = sweep["first_rows"]
    assert sweep["first"]["unfinished"] == len(rows) - 1
    assert len(sweep["done_ids"]) == 1, rows[["trial_id", "status", "epochs_run"]]
    finished = rows[rows["trial_id"].isin(sweep["done_ids"])]
    assert set(finished["status"]) <= {"TERMINATED", "STOPPED_EARLY"}
    assert (rows.loc[~rows["trial_id"].isin(sweep["done_ids"]), "status"] != "TERMINATED").all()
    assert all(s["results"] >= 1 and s["checkpoints"] for s in sweep["before"].values())


@pytest.mark.slow
def test_resume_does_not_rerun_finished_trials(sweep):
    assert sweep["after"] == sweep["before"]  # same Tune results, same (untouched) checkpoints
    rows = sweep["rows"]
    assert len(rows) == len(GOOD_ALPHAS) + len(BAD_ALPHAS) and rows["trial_id"].is_unique
    assert set(sweep["done_ids"]) < set(rows["trial_id"])


@pytest.mark.slow
def test_results_csv_statuses_and_errors(sweep):
    rows = sweep["rows"]
    assert list(rows.columns[:9]) == ["trial_id", "status", "stop_reason", "epochs_run", "best_val_qwk",
                                      "best_epoch", "val_accuracy", "val_macro_f1", "last_val_qwk"]
    for key in SWEEP_SPACE["params"]:
        assert key in rows.columns
    errored = rows[rows["status"] == "ERROR"]
    assert sorted(errored["loss.alpha"]) == sorted(BAD_ALPHAS)
    for alpha, error, epochs in zip(errored["loss.alpha"], errored["error"], errored["epochs_run"]):
        assert f"loss.alpha={alpha!r}" in error and epochs == 0
    ok = rows[rows["status"] != "ERROR"]
    assert len(ok) == 2 and set(ok["status"]) <= {"TERMINATED", "STOPPED_EARLY"}
    assert sorted(ok["loss.alpha"]) == sorted(GOOD_ALPHAS)
    assert ok["best_val_qwk"].notna().all() and ok["val_accuracy"].notna().all() and ok["val_macro_f1"].notna().all()
    assert ((ok["epochs_run"] >= 1) & (ok["epochs_run"] <= MAX_EPOCHS)).all()
    assert (ok.loc[ok["status"] == "STOPPED_EARLY", "epochs_run"] < MAX_EPOCHS).all()
    assert (ok.loc[ok["status"] == "TERMINATED", "stop_reason"] == "completed").all()
    for path in ok["checkpoint"]:
        assert (Path(path) / "koa.json").is_file()
    final = sweep["final"]
    assert final["n_trials"] == len(GOOD_ALPHAS) + len(BAD_ALPHAS)
    assert final["status_counts"].get("ERROR") == len(BAD_ALPHAS)


@pytest.mark.slow
def test_best_config_reproduces_best_trial(sweep):
    out, rows = sweep["out"], sweep["rows"]
    best = json.loads((out / "best.json").read_text())
    ok = rows[rows["status"] != "ERROR"]
    assert best["val_qwk"] == pytest.approx(ok["best_val_qwk"].max())
    row = rows[rows["trial_id"] == best["trial_id"]].iloc[0]
    cfg = load_train_config(out / "best_config.yaml")
    assert cfg.epochs == MAX_EPOCHS and cfg.name == "best" and cfg.workers == WORKERS
    assert cfg.model.arch == "densenet_tiny" and cfg.image_size == 64 and Path(cfg.data).is_dir()
    assert cfg.loss.gamma == pytest.approx(row["loss.gamma"])
    assert cfg.loss.alpha == row["loss.alpha"]
    assert cfg.optim.lr == pytest.approx(row["optim.lr"])
    base = TrainConfig().augment.grade_strength
    m = row[MINORITY_KEY]
    assert cfg.augment.grade_strength == pytest.approx([base[0], base[1] * m, base[2], base[3] * m, base[4] * m])
    for k, v in best["params"].items():
        assert (v is None and (isinstance(row[k], float) and math.isnan(row[k]))) or v == pytest.approx(row[k]) \
            or v == row[k]
    # the sweep folder resolves to the best checkpoint, like a run folder
    from koa_ray.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(out) == (out / best["checkpoint"])
    assert Path(best["checkpoint_path"]).is_dir()
    assert (out / "sweep.png").stat().st_size > 1000
    assert (out / "space.yaml").is_file() and (out / "sweep.json").is_file()


@pytest.mark.slow
def test_best_config_trains_with_koa_train(sweep, tmp_path, capsys):
    from koa_ray.cli import main

    rc = main(["train", "--config", str(sweep["out"] / "best_config.yaml"), "--local", "--epochs", "1",
               "--out", str(tmp_path / "runs")])
    assert rc == 0
    best = json.loads((tmp_path / "runs" / "best" / "best.json").read_text())
    assert best["epochs_run"] == 1 and (tmp_path / "runs" / "best" / best["checkpoint"] / "model.pt").is_file()


@pytest.mark.slow
def test_no_placement_group_left_behind(sweep, ray_session):
    """ASHA kills trials; their Train worker placement groups must not keep CPUs reserved."""
    import ray

    deadline = time.time() + 30
    while True:
        live = [p for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]
        if not live or time.time() > deadline:
            break
        time.sleep(1)
    assert not live, live


@pytest.mark.slow
def test_resume_of_finished_sweep_is_a_no_op(sweep):
    out = sweep["out"]
    states = {t: _trial_state(out, t) for t in sweep["rows"]["trial_id"]}
    summary = __import__("koa_ray.tune", fromlist=["run_sweep"]).run_sweep(out=str(out), resume=True, verbose=0)
    assert summary["n_trials"] == len(GOOD_ALPHAS) + len(BAD_ALPHAS)
    assert {t: _trial_state(out, t) for t in sweep["rows"]["trial_id"]} == states


def test_default_space_converts_for_tune_and_optuna():
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float

    from koa_ray.tune import tune_domain

    space = load_space(None, TrainConfig(), search="optuna")
    domains = {k: tune_domain(s) for k, s in space.items()}
    assert isinstance(domains["loss.gamma"], Float) and isinstance(domains["loss.alpha"], Categorical)
    dists = dict(OptunaSearch.convert_search_space(domains))
    assert set(dists) == set(space)
    assert dists["optim.lr"].log and dists["loss.alpha"].choices == ("none", "inverse", "effective")


def test_tune_cli_parses_flags_and_reports_errors(tmp_path, capsys, monkeypatch):
    import koa_ray.tune as tune_mod
    from koa_ray.cli import build_parser, main

    a = build_parser().parse_args(["tune", "--data", "d", "--out", "o", "--num-samples", "4", "--max-epochs", "3",
                                   "--search", "optuna", "--scheduler", "none", "--workers-per-trial", "2",
                                   "--gpus-per-trial", "0.5", "--space", "s.yaml", "--image-size", "64",
                                   "--config", "c.yaml", "--resume", "--name", "n", "--set", "seed=1"])
    assert (a.num_samples, a.max_epochs, a.search, a.gpus_per_trial, a.set) == (4, 3, "optuna", 0.5, ["seed=1"])
    assert main(["tune", "--out", str(tmp_path / "o")]) == 2  # no --data and no --resume
    assert "--data is required" in capsys.readouterr().err
    assert main(["tune", "--out", str(tmp_path / "o"), "--resume"]) == 2  # nothing to resume
    assert "nothing to resume" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(tune_mod, "run_sweep", lambda **kw: seen.update(kw) or {"n_trials": 0})
    assert main(["tune", "--data", "d", "--out", "o", "--set", "seed=1", "--set", "loss.gamma=1"]) == 0
    assert seen["data"] == "d" and seen["sets"] == ["seed=1", "loss.gamma=1"] and seen["scheduler"] == "asha"


def test_jobs_tune_entrypoint_is_the_cli(tmp_path):
    import subprocess
    import sys

    job = Path(__file__).resolve().parents[1] / "jobs" / "tune.py"
    r = subprocess.run([sys.executable, str(job), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "koa tune: error: --data is required" in r.stderr


@pytest.mark.slow
def test_sweep_trials_are_mlflow_runs(sweep):
    """Every trial that trained is an MLflow run of the sweep's experiment (Ray's MLflowLoggerCallback), whose
    val_qwk history peaks at the trial's best_val_qwk in results.csv."""
    from mlflow.tracking import MlflowClient

    from koa_ray.tracking import default_uri

    client = MlflowClient(tracking_uri=default_uri(sweep["out"]))
    exp = client.get_experiment_by_name("koa-tune-sweep")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    rows = sweep["rows"]
    trained = rows[rows["epochs_run"] > 0]
    for r in trained.itertuples():
        mine = [m for m in runs if r.trial_id in m.data.tags.get("trial_name", "")]
        assert mine, f"no MLflow run for trial {r.trial_id}"
        peak = max(p.value for m in mine for p in client.get_metric_history(m.info.run_id, "val_qwk"))
        assert peak == pytest.approx(r.best_val_qwk, abs=1e-6)
        assert any("optim.lr" in m.data.params for m in mine)
