"""One trial of a sweep: a Tune trainable that runs one Ray Train V2 run, and the resources a trial may hold.

The trainable is a small *driver function* (:func:`make_trainable`): it builds the trial's
:class:`~koa_ray.config.TrainConfig` (base config + sampled parameters), builds a ``TorchTrainer`` with
:func:`koa_ray.train.driver.build_trainer` (run name ``trial_<trial_id>``) and fits it. A ``TuneReportCallback``
forwards every epoch's metrics from the Train controller to Tune, so ASHA can stop weak trials after any epoch.
"""

from __future__ import annotations

import copy
import logging
import math

from koa_ray.config import ConfigError
from koa_ray.tune.experiment import TIME_ATTR, trial_name
from koa_ray.tune.space import apply_params

log = logging.getLogger(__name__)

DEFAULT_DRIVER_CPUS = 0.1


def _report_callback():
    """``TuneReportCallback`` that adds the 1-based ``epochs_done`` and drops bulky per-epoch lists."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = {k: v for k, v in metrics[0].items() if k != "val_confusion_matrix"}
            if "epoch" in first:
                first[TIME_ATTR] = int(first["epoch"]) + 1
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReportCallback()


def _trial_driver(config: dict, setup: dict) -> None:
    """Tune trainable: one Ray Train V2 run named ``trial_<trial_id>`` under ``setup['runs_dir']``.

    Holds only a fraction of a CPU; the Train workers get their own placement group. Re-running a trial (resume)
    re-uses the run name, so Ray Train continues from that run's latest checkpoint.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_params(setup["base"], config, name=trial_name(trial_id))  # validates every sampled config

    import ray.data  # heavy imports (torch, albumentations) only once the config is known to be valid

    from koa_ray.train.driver import build_trainer

    ray.data.DataContext.get_current().enable_progress_bars = False
    # A trial that ASHA stops takes its Train controller down with it; Ray Train's own placement-group cleaner then
    # frees the workers' CPUs (it needs the dashboard's State API, which init_ray starts and pins).
    trainer = build_trainer(cfg, storage_path=setup["runs_dir"], callbacks=[_report_callback()],
                            scaling_resources=setup.get("scaling_resources"))
    trainer.fit()  # raises on a failed run -> the trial is recorded as ERROR, the sweep goes on


def make_trainable(setup: dict):
    """The Tune trainable of a sweep: :func:`_trial_driver` bound to ``setup``, holding ``driver_cpus`` CPUs."""
    from ray import tune

    fn = tune.with_parameters(_trial_driver, setup=setup)
    return tune.with_resources(fn, {"CPU": float(setup["driver_cpus"])})


def fit_trial_cpus(base: dict, driver_cpus: float, cpus: float, explicit: bool) -> dict:
    """Make one trial leave >= 1 whole CPU free: Ray Data tasks (1 CPU each) feed the Train workers.

    Without that the workers wait for batches that can never be produced and the sweep hangs. An unset
    ``cpus_per_worker`` is lowered to fit (it is a scheduling reservation; torch threads stay >= 1); an explicit one
    that cannot fit raises :class:`ConfigError`.
    """
    workers, per_worker = base["workers"], base["cpus_per_worker"]
    if driver_cpus + workers * per_worker <= cpus - 1 + 1e-9:
        return base
    fit = math.floor((cpus - 1 - driver_cpus) / workers * 20 + 1e-9) / 20  # multiples of 0.05
    if explicit or fit < 0.05:
        raise ConfigError(
            f"a trial of {workers} workers x {per_worker} CPUs + {driver_cpus} CPU for its driver leaves less than "
            f"1 of the cluster's {cpus:g} CPUs for Ray Data, so it would hang: lower --workers-per-trial or "
            "cpus_per_worker")
    log.warning("cpus_per_worker %s -> %s so that a trial leaves 1 of %g CPUs to Ray Data", per_worker, fit, cpus)
    out = copy.deepcopy(base)
    out["cpus_per_worker"] = fit
    return out


def auto_concurrency(cpus: float, gpus: float, per_trial_cpus: float, per_trial_gpus: float) -> int:
    """Trials that fit at once while leaving >= 1 CPU (or a quarter of the cluster) to Ray Data."""
    reserve = max(1.0, 0.25 * cpus)
    n = max(1, int((cpus - reserve + 1e-9) // max(per_trial_cpus, 1e-9)))
    if per_trial_gpus > 0:
        n = min(n, max(1, int((gpus + 1e-9) // per_trial_gpus)))
    return n

