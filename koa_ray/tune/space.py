"""The search space: dotted ``TrainConfig`` keys mapped to parameter specs, validated before Ray starts.

A spec is ``{type: uniform|loguniform|quniform|randint|choice|grid, low, high, q, values}``. :func:`load_space`
extends or replaces :data:`DEFAULT_SPACE` from a YAML file; :func:`validate_space` checks every key and every bound
or choice against the base config; :func:`apply_params` turns a sampled point into a validated ``TrainConfig``;
:func:`tune_domain` gives the Ray Tune domain of a spec.

One derived key, ``augment.minority_multiplier`` (:data:`MINORITY_KEY`), scales ``augment.grade_strength`` of the
minority grades 1, 3 and 4.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import typing
from pathlib import Path

import yaml

from koa_ray.config import AugmentConfig, ConfigError, TrainConfig, from_dict, set_dotted, to_dict

log = logging.getLogger(__name__)

MINORITY_KEY = "augment.minority_multiplier"
MINORITY_GRADES = (1, 3, 4)
PARAM_TYPES = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
SPEC_FIELDS = {"type", "low", "high", "q", "values"}
# Set by the sweep itself, never searched.
RESERVED_KEYS = {"data": "--data", "out": "--out", "name": "--name", "epochs": "--max-epochs",
                 "address": "--address", "storage_path": "--out"}

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


def plain_value(v):
    """numpy scalars (from Tune/Optuna sampling) to Python values."""
    if hasattr(v, "item") and not isinstance(v, (list, tuple, dict, str)):
        try:
            return v.item()
        except (AttributeError, ValueError):
            return v
    if isinstance(v, tuple):
        return [plain_value(x) for x in v]
    if isinstance(v, list):
        return [plain_value(x) for x in v]
    return v


def _coerce(key: str, value, tp=None):
    value = plain_value(value)
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
        out["values"] = [plain_value(v) for v in values]
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
            mult = plain_value(value)
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

