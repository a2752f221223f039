"""The sweep driver: :func:`run_sweep` validates its settings, starts (or restores) a Ray Tune experiment of Ray
Train runs with ASHA early stopping on validation QWK, and summarises it (:mod:`koa_ray.tune.summary`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import yaml

from koa_ray.config import ConfigError, TrainConfig, from_dict, load_train_config, save_yaml, to_dict
from koa_ray.tune.experiment import METRIC, MODE, SWEEP_FILE, TIME_ATTR, trial_name
from koa_ray.tune.space import load_space, tune_domain
from koa_ray.tune.summary import summarize_sweep
from koa_ray.tune.trial import DEFAULT_DRIVER_CPUS, auto_concurrency, fit_trial_cpus, make_trainable

log = logging.getLogger(__name__)


def run_sweep(*, data: str | None = None, out: str, num_samples: int = 10, max_epochs: int = 10,
              search: str = "random", scheduler: str = "asha", workers_per_trial: int | None = None,
              gpus_per_trial: float | None = None, cpus_per_worker: float | None = None,
              space: str | Path | dict | None = None, image_size: int | None = None, config: str | None = None,
              resume: bool = False, name: str = "sweep", sets: list[str] | tuple = (), seed: int = 0,
              address: str | None = None, max_concurrent_trials: int | None = None,
              driver_cpus: float = DEFAULT_DRIVER_CPUS, reduction_factor: float = 4, verbose: int = 1,
              stop=None, callbacks: list | None = None) -> dict:
    """Run (or ``resume``) a sweep of Ray Train runs with Ray Tune; writes the files listed in the module doc.

    Args:
        data: prepared dataset (needs a ``val`` split); not needed with ``resume``.
        out: sweep folder. num_samples: trials (times the size of any ``grid`` parameters).
        max_epochs: epochs per trial (``TrainConfig.epochs``) and ASHA's ``max_t``.
        search: ``random`` (Tune's BasicVariantGenerator, seeded) or ``optuna`` (OptunaSearch, TPE).
        scheduler: ``asha`` (grace period 1 epoch, on ``val_qwk``) or ``none``.
        workers_per_trial, gpus_per_trial, cpus_per_worker: Train workers of every trial; ``gpus_per_trial`` is
            split evenly over the workers (0.5 with 1 worker = two trials share a GPU).
        space: YAML file or dict (see :func:`load_space`); None = :data:`DEFAULT_SPACE`.
        image_size, config, sets: base TrainConfig (YAML file < flags < ``KEY=VALUE`` strings).
        resume: continue ``out/<name>`` (``Tuner.restore``) with the settings saved in ``out/sweep.json``;
            finished and errored trials are not re-run, unfinished ones continue.
        seed: seed of the search algorithm. address: Ray cluster to join (default: RAY_ADDRESS or local).
        max_concurrent_trials: default: as many as fit while leaving >= 1 CPU to Ray Data (1 on 2 CPUs).
        driver_cpus: CPUs held by each trial's driver function. reduction_factor: ASHA's.
        verbose: Tune console verbosity (0-3). stop: extra Tune stop criteria (``RunConfig.stop``: dict or Stopper;
            note that a criterion ending the whole experiment marks unstarted trials finished, unlike an interruption).
        callbacks: extra ``ray.tune.Callback`` objects. ``stop`` and ``callbacks`` are saved with the experiment and
            restored by ``resume`` (the arguments are then ignored).

    Interrupting the sweep (Ctrl+C / SIGINT, or SIGUSR1) saves its state; ``resume=True`` continues it.

    Returns:
        summary dict: paths of the outputs, trial counts per status, ``best`` (content of ``best.json``).
    """
    from ray import tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig

    from koa_ray.runtime import cluster_cpus, cluster_gpus, init_ray

    sets = list(sets or [])
    out_dir = Path(out).resolve()
    if not name or "/" in name:
        raise ConfigError(f"name={name!r}: must be a non-empty name without '/'")
    exp_dir = out_dir / name
    settings_file = out_dir / SWEEP_FILE

    if resume:
        if not settings_file.is_file():
            raise ConfigError(f"nothing to resume: {settings_file} not found (start the sweep without --resume)")
        settings = json.loads(settings_file.read_text())
        if settings["name"] != name:
            name, exp_dir = settings["name"], out_dir / settings["name"]
        ignored = {k: v for k, v in dict(data=data, space=space, config=config, image_size=image_size,
                                          workers_per_trial=workers_per_trial, gpus_per_trial=gpus_per_trial,
                                          sets=sets or None).items() if v is not None}
        if ignored:
            log.warning("resume: using the settings saved in %s; ignoring %s", settings_file, sorted(ignored))
    else:
        settings = _new_settings(data=data, out_dir=out_dir, name=name, num_samples=num_samples,
                                 max_epochs=max_epochs, search=search, scheduler=scheduler,
                                 workers_per_trial=workers_per_trial, gpus_per_trial=gpus_per_trial,
                                 cpus_per_worker=cpus_per_worker, space=space, image_size=image_size,
                                 config=config, sets=sets, seed=seed, driver_cpus=driver_cpus,
                                 reduction_factor=reduction_factor)
        if exp_dir.exists() and any(exp_dir.glob("experiment_state*.json")):
            raise ConfigError(f"{exp_dir} already holds a Tune experiment: pass --resume to continue it, or "
                              "choose another --out/--name")

    init_ray(address)
    from koa_ray.train.driver import check_shared_storage

    runs_dir = str(out_dir / "runs")
    check_shared_storage(str(out_dir))
    cpus, gpus = cluster_cpus(), cluster_gpus()
    if not resume:
        settings["base"] = fit_trial_cpus(settings["base"], settings["driver_cpus"], cpus,
                                          explicit=settings.pop("explicit_cpus_per_worker"))
    base = from_dict(TrainConfig, settings["base"]).validate()
    per_trial_cpus = settings["driver_cpus"] + base.workers * base.cpus_per_worker
    gpu_per_worker = settings["gpus_per_worker"]
    if gpu_per_worker and gpu_per_worker * base.workers > gpus:
        log.warning("one trial needs %.2f GPUs but the cluster has %.1f now: trials wait until it grows",
                    gpu_per_worker * base.workers, gpus)
    concurrency = max_concurrent_trials or auto_concurrency(cpus, gpus, per_trial_cpus,
                                                             gpu_per_worker * base.workers)
    if cpus - concurrency * per_trial_cpus < 1 - 1e-9:
        log.warning("%d concurrent trials of %.2f CPUs leave less than 1 CPU of %.1f for Ray Data tasks: "
                    "trials may hang", concurrency, per_trial_cpus, cpus)
    setup = {"base": settings["base"], "runs_dir": runs_dir, "driver_cpus": settings["driver_cpus"],
             "scaling_resources": {"GPU": gpu_per_worker} if gpu_per_worker else None}
    trainable = make_trainable(setup)

    if resume and exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir)):
        log.info("resuming %s", exp_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        if resume:
            log.warning("resume: %s holds no restorable experiment; starting it", exp_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=2))
        save_yaml({"mode": "replace", "params": settings["space"]}, out_dir / "space.yaml")
        param_space = {k: tune_domain(s) for k, s in settings["space"].items()}
        searcher, limit = _search_alg(settings["search"], settings["seed"], concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=TuneConfig(
                metric=METRIC, mode=MODE, num_samples=settings["num_samples"], search_alg=searcher,
                scheduler=_scheduler(settings), max_concurrent_trials=limit, reuse_actors=False,
                trial_name_creator=lambda t: trial_name(t.trial_id),
                trial_dirname_creator=lambda t: trial_name(t.trial_id)),
            run_config=RunConfig(
                name=settings["name"], storage_path=str(out_dir), verbose=verbose, stop=stop,
                callbacks=list(callbacks or []) + _tracking_callbacks(base, out_dir, settings["name"]),
                failure_config=FailureConfig(max_failures=0, fail_fast=False),  # a bad trial errors, others go on
                checkpoint_config=CheckpointConfig(num_to_keep=1)),  # checkpoints live in the Train runs
        )
    grid = tuner.fit()
    if grid.errors:
        log.warning("%d of %d trials failed; see results.csv", len(grid.errors), len(grid))
    return summarize_sweep(out_dir)


def _tracking_callbacks(base: TrainConfig, out_dir: Path, name: str) -> list:
    """One MLflow run per trial (:func:`koa_ray.tracking.tune_callback`), unless the base config turns MLflow off."""
    if not base.mlflow:
        return []
    from koa_ray.tracking import tune_callback

    return [tune_callback(out_dir, f"koa-tune-{name}", base.mlflow_uri)]


def _new_settings(*, data, out_dir: Path, name, num_samples, max_epochs, search, scheduler, workers_per_trial,
                  gpus_per_trial, cpus_per_worker, space, image_size, config, sets, seed, driver_cpus,
                  reduction_factor) -> dict:
    """Validate everything up front (before Ray starts) and return the JSON-able sweep settings."""
    if search not in ("random", "optuna"):
        raise ConfigError(f"search={search!r}: supported: random, optuna")
    if scheduler not in ("asha", "none"):
        raise ConfigError(f"scheduler={scheduler!r}: supported: asha, none")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples={num_samples!r}: must be an integer >= 1")
    if not isinstance(max_epochs, int) or max_epochs < 1:
        raise ConfigError(f"max_epochs={max_epochs!r}: must be an integer >= 1")
    if gpus_per_trial is not None and gpus_per_trial < 0:
        raise ConfigError(f"gpus_per_trial={gpus_per_trial}: must be >= 0")
    if not 0 < driver_cpus <= 64:
        raise ConfigError(f"driver_cpus={driver_cpus}: must be in (0, 64]")
    if reduction_factor <= 1:
        raise ConfigError(f"reduction_factor={reduction_factor}: must be > 1")
    overrides = {"data": str(Path(data).resolve()) if data else None, "image_size": image_size,
                 "workers": workers_per_trial, "epochs": max_epochs, "cpus_per_worker": cpus_per_worker,
                 "gpu": (gpus_per_trial > 0) if gpus_per_trial is not None else None}
    base = load_train_config(config, overrides, list(sets))
    if not base.data:
        raise ConfigError("data: a prepared dataset is required (--data or 'data:' in --config)")
    prep = Path(base.data).resolve()
    if not (prep / "manifest.json").is_file():
        raise ConfigError(f"data={base.data}: not a prepared dataset (no manifest.json; run koa prepare)")
    if not (prep / "val").is_dir():
        raise ConfigError(f"data={base.data}: a sweep needs a 'val' split to score trials on {METRIC}")
    replace = {"data": str(prep), "name": "best", "storage_path": None, "address": None}
    if base.model.weights and Path(base.model.weights).exists():
        replace["model"] = dataclasses.replace(base.model, weights=str(Path(base.model.weights).resolve()))
    base = dataclasses.replace(base, **replace).validate()
    resolved_space = load_space(space, base, search)
    if gpus_per_trial:
        gpus_per_worker = float(gpus_per_trial) / base.workers
    else:
        gpus_per_worker = 1.0 if base.gpu else 0.0
    return {"name": name, "out": str(out_dir), "num_samples": num_samples, "max_epochs": max_epochs,
            "search": search, "scheduler": scheduler, "seed": seed, "driver_cpus": float(driver_cpus),
            "reduction_factor": reduction_factor, "gpus_per_worker": gpus_per_worker, "metric": METRIC,
            "mode": MODE, "base": to_dict(base), "space": resolved_space,
            "explicit_cpus_per_worker": cpus_per_worker is not None or _sets_key(config, sets, "cpus_per_worker")}


def _sets_key(config: str | None, sets, key: str) -> bool:
    """Whether the user set top-level ``key`` in the YAML config or a ``KEY=VALUE`` override."""
    if any(str(s).split("=", 1)[0].strip() == key for s in sets):
        return True
    if config and Path(config).is_file():
        doc = yaml.safe_load(Path(config).read_text()) or {}
        return isinstance(doc, dict) and key in doc
    return False


def _search_alg(search: str, seed: int, concurrency: int):
    """(search_alg, TuneConfig.max_concurrent_trials)."""
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed), concurrency  # Tune wraps it in a ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency), None


def _scheduler(settings: dict):
    if settings["scheduler"] == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=TIME_ATTR, grace_period=1, max_t=settings["max_epochs"],
                         reduction_factor=settings["reduction_factor"])

