"""Hyper-parameter sweeps: Ray Tune over Ray Train V2 runs, with ASHA early stopping on validation QWK.

Every trial is one Ray Train run (:mod:`~koa_ray.tune.trial`); ASHA can stop weak trials after any epoch
(``metric="val_qwk"``, ``mode="max"``, time attribute ``epochs_done``: :mod:`~koa_ray.tune.experiment`).

Modules, in the order a sweep uses them:

    experiment   the metric, time attribute, settings file and trial names every part agrees on
    space        search-space specs: parsing, validation against TrainConfig, sampled point -> TrainConfig
    trial        the Tune trainable (one Ray Train run per trial) and the CPUs a trial may hold
    sweep        run_sweep: settings, search algorithm, scheduler, Tuner (new or restored)
    summary      results.csv, best_config.yaml, best.json from the finished experiment
    plot         sweep.png

Layout of ``out``::

    results.csv        one row per trial: status, stop reason, epochs run, best val QWK/accuracy/macro-F1, params, error
    best_config.yaml   the best trial's full TrainConfig (``koa train --config best_config.yaml`` accepts it as-is)
    best.json          best trial id, params, metrics and its best checkpoint (``koa evaluate OUT`` resolves it)
    sweep.png          best val QWK of every trial against each searched parameter
    space.yaml         the resolved search space (reusable with ``--space``, ``mode: replace``)
    sweep.json         settings of the sweep, used by ``resume=True``
    <name>/            the Tune experiment (``Tuner.restore`` path), one ``trial_<id>`` folder per trial
    runs/trial_<id>/   the Ray Train run of each trial: checkpoints, config.yaml, metrics.csv, curves.png, best.json

Search spaces are keyed by dotted ``TrainConfig`` keys (``loss.gamma``) plus one derived key,
``augment.minority_multiplier``, which scales ``augment.grade_strength`` of the minority grades 1, 3 and 4.
"""

from koa_ray.tune.experiment import METRIC, MODE, SWEEP_FILE, TIME_ATTR, trial_name
from koa_ray.tune.plot import plot_sweep
from koa_ray.tune.space import (DEFAULT_SPACE, MINORITY_KEY, apply_params, load_space, normalize_spec, tune_domain,
                                validate_space)
from koa_ray.tune.summary import summarize_sweep
from koa_ray.tune.sweep import run_sweep
from koa_ray.tune.trial import DEFAULT_DRIVER_CPUS, auto_concurrency, fit_trial_cpus, make_trainable

__all__ = [
    "DEFAULT_DRIVER_CPUS", "DEFAULT_SPACE", "METRIC", "MINORITY_KEY", "MODE", "SWEEP_FILE", "TIME_ATTR",
    "apply_params", "auto_concurrency", "fit_trial_cpus", "load_space", "make_trainable", "normalize_spec",
    "plot_sweep", "run_sweep", "summarize_sweep", "trial_name", "tune_domain", "validate_space",
]
