"""Hyper-parameter sweeps: Ray Tune over Ray Train V2 runs, with ASHA early stopping on validation QWK.

Every trial is one Ray Train run: the Tune trainable is a small *driver function* that builds the trial's
:class:`~koa_ray.config.TrainConfig` (base config + sampled parameters), builds a ``TorchTrainer`` with
:func:`koa_ray.train.driver.build_trainer` (run name ``trial_<trial_id>``) and fits it. A
``TuneReportCallback`` forwards every epoch's metrics from the Train controller to Tune, so ASHA can stop weak
trials after any epoch (``metric="val_qwk"``, ``mode="max"``, time attribute ``epochs_done``).

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

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from koa_ray.config import AugmentConfig, ConfigError, TrainConfig, from_dict, load_train_config, save_yaml, \
    set_dotted, to_dict

log = logging.getLogger(__name__)

METRIC, MODE = "val_qwk", "max"
TIME_ATTR = "epochs_done"  # 1-based epoch counter added to every report (Train's ``epoch`` is 0-based)
MINORITY_KEY = "augment.minority_multiplier"
MINORITY_GRADES = (1, 3, 4)
PARAM_TYPES = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
SPEC_FIELDS = {"type", "low", "high", "q", "values"}
# Set by the sweep itself, never searched.
RESERVED_KEYS = {"data": "--data", "out": "--out", "name": "--name", "epochs": "--max-epochs",
                 "address": "--address", "storage_path": "--out"}
DEFAULT_DRIVER_CPUS = 0.1
SWEEP_FILE = "sweep.json"

DEFAULT_SPACE: dict[str, dict] = {
    "loss.gamma": {"type": "uniform", "low": 0.0, "high": 5.0},
    "loss.alpha": {"type": "choice", "values": ["none", "inverse", "effective"]},
    "loss.label_smoothing": {"type": "uniform", "low": 0.0, "high": 0.2},
    "optim.lr": {"type": "loguniform", "low": 1e-5, "high": 3e-3},
    "optim.weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-2},
    "augment.rotate_deg": {"type": "uniform", "low": 0.0, "high": 20.0},
    "augment.brightness": {"type": "uniform", "low": 0.0, "high": 0.4},
    "augment.contrast": {"type": "uniform", "low": 0.0, "high": 0.4},
    "augment.clahe_p": {"type": "uniform", "low": 0.0, "high": 0.6},
    "augment.noise_p": {"type": "uniform", "low": 0.0, "high": 0.5},
    # grade-aware augmentation (MINORITY_KEY) is opt-in through a space file: a per-grade strength is a label cue
    "decode": {"type": "choice", "values": ["argmax", "expected"]},
    "balance.target": {"type": "choice", "values": ["none", "sqrt", "uniform"]},
    "balance.strength": {"type": "uniform", "low": 0.0, "high": 1.0},
}


# ------------------------------------------------------------------------------------------------ search space
def _leaf_type(key: str):
    """Type hint of dotted TrainConfig ``key``; :class:`ConfigError` naming the key if it is not a value."""
    if key == MINORITY_KEY:
        return float
    if not isinstance(key, str) or not key:
        raise ConfigError(f"search space: parameter names must be dotted TrainConfig keys, got {key!r}")
    parts = key.split(".")
    cls, tp = TrainConfig, None
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "TrainConfig"
            known = sorted(hints) + ([MINORITY_KEY.split(".")[1]] if cls is AugmentConfig else [])
            raise ConfigError(f"search space: {key}: unknown TrainConfig key ({where} has no {part!r}); "
                              f"known: {known}")
        tp = hints[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"search space: {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        cls = tp
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"search space: {key}: is a section; name one of its keys, e.g. "
                          f"{key}.{dataclasses.fields(tp)[0].name}")
    return tp


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain(v):
    """numpy scalars (from Tune/Optuna sampling) to Python values."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str)):
        try:
            return v.item()
        except (AttributeError, ValueError):
            return v
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _coerce(key: str, value, tp=None):
    value = _plain(value)
    tp = tp if tp is not None else _leaf_type(key)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalize_spec(key: str, spec) -> dict:
    """Check one parameter spec's shape (no TrainConfig semantics yet); returns a clean copy."""
    if not isinstance(spec, dict):
        raise ConfigError(f"search space: {key}: expected a mapping like {{type: uniform, low: 0, high: 1}}, "
                          f"got {spec!r}")
    unknown = sorted(set(spec) - SPEC_FIELDS)
    if unknown:
        raise ConfigError(f"search space: {key}: unknown field(s) {unknown}; allowed: {sorted(SPEC_FIELDS)}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"search space: {key}: type={kind!r}: supported: {', '.join(PARAM_TYPES)}")
    out: dict = {"type": kind}
    if kind in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, (list, tuple)):
            raise ConfigError(f"search space: {key}: type {kind} needs 'values: [...]', got {values!r}")
        if not values:
            raise ConfigError(f"search space: {key}: 'values' is empty; give at least one value")
        extra = sorted(set(spec) - {"type", "values"})
        if extra:
            raise ConfigError(f"search space: {key}: type {kind} takes only 'values', not {extra}")
        out["values"] = [_plain(v) for v in values]
        return out
    if "values" in spec:
        raise ConfigError(f"search space: {key}: type {kind} takes low/high, not 'values'")
    for bound in ("low", "high"):
        if bound not in spec:
            raise ConfigError(f"search space: {key}: type {kind} needs '{bound}'")
        if not _is_number(spec[bound]):
            raise ConfigError(f"search space: {key}: {bound}={spec[bound]!r}: expected a number")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise ConfigError(f"search space: {key}: low={low} must be < high={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search space: {key}: loguniform needs low > 0, got low={low}")
    if kind == "randint":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"search space: {key}: randint needs integer low/high, got {low}, {high}")
        low, high = int(low), int(high)
    if kind == "quniform":
        q = spec.get("q")
        if not _is_number(q) or q <= 0:
            raise ConfigError(f"search space: {key}: quniform needs a step 'q' > 0, got {q!r}")
        out["q"] = q
    elif "q" in spec:
        raise ConfigError(f"search space: {key}: 'q' only applies to quniform")
    out.update(low=low, high=high)
    return out


def _probe_values(spec: dict) -> list:
    """Values that stand for a spec's whole range when validating it against TrainConfig."""
    kind = spec["type"]
    if kind in ("choice", "grid"):
        return spec["values"]
    if kind == "randint":
        return [spec["low"], spec["high"] - 1]  # high is exclusive
    if kind == "quniform":
        q = spec["q"]
        return [round(spec["low"] / q) * q, round(spec["high"] / q) * q]
    return [spec["low"], spec["high"]]


def validate_space(space: dict[str, dict], base: TrainConfig | dict | None = None, search: str = "random") -> dict:
    """Validate a whole space (keys, spec shapes, every bound or choice against ``base``); returns it normalised.

    Raises:
        ConfigError: naming the dotted key: unknown TrainConfig key, reserved key, bad spec type or field,
            low >= high, empty choice, a value of the wrong type, a range bound that ``TrainConfig.validate()``
            rejects, or a spec that ``search`` cannot use. A choice/grid value of the right type that
            ``TrainConfig.validate()`` rejects only logs a warning: the trials sampling it are recorded as ERROR.
    """
    if not isinstance(space, dict):
        raise ConfigError(f"search space: expected a mapping of dotted keys to specs, got {type(space).__name__}")
    if not space:
        raise ConfigError("search space is empty: give at least one parameter")
    base_dict = to_dict(base) if dataclasses.is_dataclass(base) else copy.deepcopy(base or {})
    out = {}
    for key, spec in space.items():
        top = key.split(".")[0] if isinstance(key, str) else key
        if key in RESERVED_KEYS or top in ("data", "out", "name", "epochs", "address", "storage_path"):
            raise ConfigError(f"search space: {key}: set by the sweep itself ({RESERVED_KEYS.get(top, top)}), "
                              "it cannot be searched")
        tp = _leaf_type(key)
        spec = normalize_spec(key, spec)
        kind = spec["type"]
        if tp is int and kind in ("uniform", "loguniform"):
            raise ConfigError(f"search space: {key}: is an integer; use randint, quniform or choice, not {kind}")
        if kind not in ("choice", "grid") and tp not in (int, float) and not _accepts_number(tp):
            raise ConfigError(f"search space: {key}: is not numeric ({_type_name(tp)}); use choice")
        if search == "optuna":
            if kind == "grid":
                raise ConfigError(f"search space: {key}: grid is not supported with --search optuna; use choice")
            if kind == "choice" and not all(v is None or isinstance(v, (bool, int, float, str))
                                            for v in spec["values"]):
                raise ConfigError(f"search space: {key}: optuna choices must be numbers, strings, booleans or "
                                  "null (no lists)")
        if key == MINORITY_KEY:
            for v in _probe_values(spec):
                if not _is_number(v) or v < 0:
                    raise ConfigError(f"search space: {key}: {v!r}: must be a number >= 0")
        rejected = []
        for v in _probe_values(spec):
            try:
                cfg = apply_params(base_dict, {key: v}, validate=False)  # wrong types always fail here
            except ConfigError as e:
                raise ConfigError(f"search space: {key}: value {v!r} is invalid: {e}") from None
            try:
                cfg.validate()
            except ConfigError as e:
                if kind not in ("choice", "grid"):  # a range must lie inside what TrainConfig accepts
                    raise ConfigError(f"search space: {key}: value {v!r} is invalid: {e}") from None
                rejected.append((v, e))
        if rejected and len(rejected) == len(spec["values"] if "values" in spec else ()):
            v, e = rejected[0]
            raise ConfigError(f"search space: {key}: every value is invalid, e.g. {v!r}: {e}")
        for v, e in rejected:  # one bad choice does not sink the sweep: trials sampling it error, the others run
            log.warning("search space: %s: value %r fails TrainConfig validation (%s); trials that sample it "
                        "will be recorded as ERROR", key, v, e)
        out[key] = spec
    return out


def _accepts_number(tp) -> bool:
    return any(a in (int, float) for a in typing.get_args(tp))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def load_space(path: str | Path | dict | None, base: TrainConfig | dict | None = None,
               search: str = "random") -> dict[str, dict]:
    """The sweep's search space: :data:`DEFAULT_SPACE`, extended or replaced by a YAML file (or dict).

    File format::

        mode: extend            # extend (default): update the default space; replace: use only these params
        params:
          loss.gamma: {type: uniform, low: 0.5, high: 3}
          optim.optimizer: {type: choice, values: [adamw, sgd]}
          model.drop_rate: {type: quniform, low: 0.0, high: 0.5, q: 0.1}
          augment.noise_p: null  # extend mode: drop a default parameter
    """
    if path is None:
        return validate_space(copy.deepcopy(DEFAULT_SPACE), base, search)
    if isinstance(path, dict):
        doc, where = path, "search space"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"space file {p} not found")
        try:
            doc = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"space file {p}: not valid YAML: {e}") from None
        where = f"space file {p}"
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping with 'params' (and optional 'mode') at top level")
    unknown = sorted(set(doc) - {"mode", "params"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; expected 'mode' and 'params'")
    mode = doc.get("mode", "extend")
    if mode not in ("extend", "replace"):
        raise ConfigError(f"{where}: mode={mode!r}: supported: extend, replace")
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: 'params' must map dotted keys to specs, got {type(params).__name__}")
    space = copy.deepcopy(DEFAULT_SPACE) if mode == "extend" else {}
    for key, spec in params.items():
        if spec is None:
            if mode == "replace":
                raise ConfigError(f"search space: {key}: null (drop a default) only makes sense with mode: extend")
            _leaf_type(key)
            space.pop(key, None)
        else:
            space[key] = spec
    return validate_space(space, base, search)


def tune_domain(spec: dict):
    """The Ray Tune search domain for a validated spec."""
    from ray import tune

    kind = spec["type"]
    if kind == "uniform":
        return tune.uniform(spec["low"], spec["high"])
    if kind == "loguniform":
        return tune.loguniform(spec["low"], spec["high"])
    if kind == "quniform":
        return tune.quniform(spec["low"], spec["high"], spec["q"])
    if kind == "randint":
        return tune.randint(spec["low"], spec["high"])
    if kind == "choice":
        return tune.choice(spec["values"])
    return tune.grid_search(spec["values"])


def apply_params(base: TrainConfig | dict, params: dict, validate: bool = True, **fixed) -> TrainConfig:
    """``base`` with sampled ``params`` (dotted keys) and ``fixed`` top-level fields applied, validated.

    Types are always checked (:func:`from_dict`); ``validate=False`` skips ``TrainConfig.validate()``.

    ``augment.minority_multiplier`` multiplies ``augment.grade_strength`` of grades 1, 3 and 4 (after any direct
    ``augment.grade_strength`` parameter).
    """
    data = to_dict(base) if dataclasses.is_dataclass(base) else copy.deepcopy(base)
    mult = None
    for key, value in params.items():
        if key == MINORITY_KEY:
            mult = _plain(value)
            continue
        set_dotted(data, key, _coerce(key, value))
    if mult is not None:
        if not _is_number(mult) or mult < 0:
            raise ConfigError(f"{MINORITY_KEY}={mult!r}: must be a number >= 0")
        strength = data.get("augment", {}).get("grade_strength", AugmentConfig().grade_strength)
        if not isinstance(strength, list) or len(strength) != 5:
            raise ConfigError(f"augment.grade_strength={strength!r}: {MINORITY_KEY} needs 5 numbers")
        set_dotted(data, "augment.grade_strength",
                   [float(s) * float(mult) if g in MINORITY_GRADES else float(s) for g, s in enumerate(strength)])
    for key, value in fixed.items():
        set_dotted(data, key, value)
    cfg = from_dict(TrainConfig, data)
    return cfg.validate() if validate else cfg


# ------------------------------------------------------------------------------------------------------ trials
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


def trial_name(trial_id: str) -> str:
    return f"trial_{trial_id}"


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


def _trainable(setup: dict):
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


# ------------------------------------------------------------------------------------------------------- sweep
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
    trainable = _trainable(setup)

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


# ----------------------------------------------------------------------------------------------------- results
def _patience_hit(qwks: list[float], patience: int) -> bool:
    """Whether the training loop's own early stopping (``patience``) explains the run ending here."""
    if patience <= 0 or not qwks:
        return False
    best, bad = -math.inf, 0
    for q in qwks:
        if q > best + 1e-6:
            best, bad = q, 0
        else:
            bad += 1
    return bad >= patience


def _error_summary(trial) -> str:
    err = None
    try:
        err = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - a missing/unreadable error file must not break the summary
        pass
    if err is None:
        return "unknown error (see the trial's error.txt)"
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    msg = named[-1] if named else (lines[-1] if lines else type(err).__name__)
    return msg[:500]


def _trial_run_artifacts(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """Write the usual run artefacts (best.json, metrics.csv, ...) into a trial's Train run; None if no checkpoint."""
    from koa_ray.checkpoint import META
    from koa_ray.train.run import write_run_artifacts

    ckpts = sorted(p for p in run_dir.glob("checkpoint_epoch_*") if (p / META).is_file())
    if not ckpts:
        return None
    try:
        return write_run_artifacts(cfg, run_dir, ckpts)
    except Exception as e:  # noqa: BLE001 - a half-written checkpoint of a killed trial must not stop the summary
        log.warning("could not write run artefacts for %s: %s", run_dir, e)
        return None


def summarize_sweep(out: str | Path) -> dict:
    """Read the Tune experiment in ``out`` and (re)write results.csv, best_config.yaml, best.json and sweep.png."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    out_dir = Path(out).resolve()
    settings = json.loads((out_dir / SWEEP_FILE).read_text())
    exp_dir = out_dir / settings["name"]
    analysis = ExperimentAnalysis(str(exp_dir), default_metric=METRIC, default_mode=MODE)
    frames = analysis.trial_dataframes
    keys = list(settings["space"])
    max_epochs = settings["max_epochs"]
    rows, best = [], None
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params = {k: _plain(trial.config.get(k)) for k in keys}
        df = frames.get(trial.trial_id)
        if df is not None and METRIC in getattr(df, "columns", ()):
            df = df[df[METRIC].notna()]
        else:
            df = None
        row = {"trial_id": trial.trial_id, "status": trial.status, "stop_reason": "", "epochs_run": 0,
               "best_val_qwk": None, "best_epoch": None, "val_accuracy": None, "val_macro_f1": None,
               "last_val_qwk": None}
        cfg = None
        try:
            cfg = apply_params(settings["base"], params, name=trial_name(trial.trial_id))
        except ConfigError:
            pass
        if df is not None and len(df):
            qwks = [float(v) for v in df[METRIC]]
            epochs = df[TIME_ATTR] if TIME_ATTR in df else df["epoch"] + 1
            i = int(max(range(len(qwks)), key=lambda j: (qwks[j], -j)))
            at = df.iloc[i]
            row.update(epochs_run=int(epochs.max()), best_val_qwk=qwks[i], best_epoch=int(at.get("epoch", i)),
                       val_accuracy=_num(at.get("val_accuracy")), val_macro_f1=_num(at.get("val_macro_f1")),
                       last_val_qwk=qwks[-1])
            if trial.status == "TERMINATED" and row["epochs_run"] < max_epochs:
                patience = cfg.patience if cfg else 0
                row["status"] = "STOPPED_EARLY"
                row["stop_reason"] = "patience" if _patience_hit(qwks, patience) else (
                    "asha" if settings["scheduler"] == "asha" else "stopped")
            elif trial.status == "TERMINATED":
                row["stop_reason"] = "completed"
        elif trial.status == "TERMINATED":
            row["stop_reason"] = "no results"
        if trial.status == "ERROR":
            row["stop_reason"] = "error"
        run_dir = out_dir / "runs" / trial_name(trial.trial_id)
        run_best = _trial_run_artifacts(cfg, run_dir) if (cfg is not None and run_dir.is_dir()) else None
        checkpoint = str((run_dir / run_best["checkpoint"]).resolve()) if run_best else ""
        row.update(params)
        row["run_dir"] = str(run_dir) if run_dir.is_dir() else ""
        row["checkpoint"] = checkpoint
        row["error"] = _error_summary(trial) if trial.status == "ERROR" else ""
        rows.append(row)
        if row["best_val_qwk"] is not None and checkpoint and cfg is not None:
            if best is None or row["best_val_qwk"] > best[0]["best_val_qwk"]:
                best = (row, cfg, run_best)

    columns = ["trial_id", "status", "stop_reason", "epochs_run", "best_val_qwk", "best_epoch", "val_accuracy",
               "val_macro_f1", "last_val_qwk", *keys, "run_dir", "checkpoint", "error"]
    table = pd.DataFrame(rows, columns=columns)
    for col in ("epochs_run", "best_epoch"):
        table[col] = table[col].astype("Int64")
    for k in keys:  # lists (e.g. a choice of grade weights) as JSON, so the CSV reads back unambiguously
        table[k] = table[k].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    table.to_csv(out_dir / "results.csv", index=False)

    summary = {"out": str(out_dir), "experiment": str(exp_dir), "results_csv": str(out_dir / "results.csv"),
               "n_trials": len(rows), "status_counts": table["status"].value_counts().to_dict(),
               "unfinished": int((~table["status"].isin(["TERMINATED", "STOPPED_EARLY", "ERROR"])).sum()),
               "best": None}
    for f in ("best_config.yaml", "best.json"):
        (out_dir / f).unlink(missing_ok=True)
    if best is not None:
        row, cfg, run_best = best
        best_cfg = dataclasses.replace(cfg, name="best", epochs=max_epochs)
        save_yaml(best_cfg, out_dir / "best_config.yaml")
        ckpt = Path(row["checkpoint"])
        try:
            rel = str(ckpt.relative_to(out_dir))
        except ValueError:
            rel = str(ckpt)
        best_info = {"trial_id": row["trial_id"], "metric": METRIC, "val_qwk": row["best_val_qwk"],
                     "val_accuracy": row["val_accuracy"], "val_macro_f1": row["val_macro_f1"],
                     "epoch": run_best.get("epoch"), "epochs_run": row["epochs_run"],
                     "params": {k: row[k] for k in keys},
                     "checkpoint": rel, "checkpoint_path": str(ckpt), "run_dir": row["run_dir"],
                     "config": str(out_dir / "best_config.yaml")}
        (out_dir / "best.json").write_text(json.dumps(best_info, indent=2, default=_json_default))
        summary.update(best=best_info, best_config=str(out_dir / "best_config.yaml"),
                       best_json=str(out_dir / "best.json"))
    plot_sweep(table, settings["space"], out_dir / "sweep.png")
    summary["plot"] = str(out_dir / "sweep.png")
    return summary


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _json_default(o):
    v = _plain(o)
    return v if v is not o else str(o)


def plot_sweep(table, space: dict[str, dict], path: Path) -> None:
    """Scatter of every trial's best val QWK against each searched parameter (log axis for loguniform)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(space)
    n = max(1, len(keys))
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    ok = table[table["best_val_qwk"].notna()]
    colors = {"TERMINATED": "tab:blue", "STOPPED_EARLY": "tab:orange"}
    for ax, key in zip(axes.flat, keys):
        spec = space[key]
        if spec["type"] in ("choice", "grid"):
            labels = [json.dumps(v) if isinstance(v, (list, dict)) else str(v) for v in spec["values"]]
            uniq = list(dict.fromkeys(labels))
            xs = [uniq.index(json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                  if (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) in uniq else np.nan
                  for v in ok[key]]
            xs = np.asarray(xs, float) + np.random.default_rng(0).uniform(-0.08, 0.08, len(xs))
            ax.set_xticks(range(len(uniq)))
            ax.set_xticklabels(uniq, rotation=30, fontsize=7)
            ax.set_xlim(-0.5, len(uniq) - 0.5)
        else:
            xs = np.asarray(pd_numeric(ok[key]), float)
            if spec["type"] == "loguniform":
                ax.set_xscale("log")
        ax.scatter(xs, ok["best_val_qwk"].astype(float), c=[colors.get(s, "tab:gray") for s in ok["status"]],
                   s=22, alpha=0.85)
        lo = float(ok["best_val_qwk"].min()) if len(ok) else 0.0
        ax.set_ylim(min(-0.05, lo - 0.05), 1.0)
        ax.set_title(key, fontsize=9)
        ax.set_ylabel("best val QWK", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=s) for s, c in colors.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(f"val QWK per trial ({len(ok)} with results, {len(table)} trials)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pd_numeric(series):
    import pandas as pd

    return pd.to_numeric(series, errors="coerce")

