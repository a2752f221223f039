"""Typed, frozen configuration with YAML loading and dotted CLI overrides.

Every section is a frozen dataclass; :func:`from_dict` builds one from plain data and fails on unknown keys or values
of the wrong type, naming the full dotted key (``loss.gamma``), before anything expensive (Ray) starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from koa_ray import ARCHS, ATTENTIONS, DECODINGS, TTA_MODES


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


# ----------------------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelConfig:
    arch: str = "densenet121"
    attention: str = "cbam"
    reduction: int = 16
    drop_rate: float = 0.2
    pretrained: str | None = None  # "imagenet" or None
    weights: str | None = None  # local weights file
    memory_efficient: bool = False  # gradient-checkpoint the dense layers: less GPU memory, ~20 % slower

    def validate(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch={self.arch!r}: supported: {sorted(ARCHS)}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"model.attention={self.attention!r}: supported: {', '.join(ATTENTIONS)}")
        if self.reduction < 1:
            raise ConfigError(f"model.reduction={self.reduction}: must be >= 1")
        if not 0 <= self.drop_rate < 1:
            raise ConfigError(f"model.drop_rate={self.drop_rate}: must be in [0, 1)")
        if self.pretrained not in (None, "imagenet"):
            raise ConfigError(f"model.pretrained={self.pretrained!r}: supported: imagenet or null")


@dataclass(frozen=True)
class LossConfig:
    name: str = "focal"  # focal | ce
    gamma: float = 2.0
    # Per-grade weights, computed from the grade distribution the model *sees* (after ``balance`` re-sampling), so
    # re-sampling and alpha never correct the same imbalance twice unknowingly. Default ``none``: the re-sampling
    # alone corrects it (``koa_ray.losses.loss_shares`` gives the resulting per-grade share of the loss).
    alpha: str | list[float] = "none"  # none | inverse | effective | [w0..w4]
    beta: float = 0.999  # effective-number beta (Cui et al. 2019)
    label_smoothing: float = 0.0

    def validate(self):
        if self.name not in ("focal", "ce"):
            raise ConfigError(f"loss.name={self.name!r}: supported: focal, ce")
        if self.gamma < 0:
            raise ConfigError(f"loss.gamma={self.gamma}: must be >= 0")
        if isinstance(self.alpha, str) and self.alpha not in ("none", "inverse", "effective"):
            raise ConfigError(f"loss.alpha={self.alpha!r}: supported: none, inverse, effective, or a list of 5 weights")
        if isinstance(self.alpha, list) and (len(self.alpha) != 5 or min(self.alpha) < 0):
            raise ConfigError(f"loss.alpha={self.alpha!r}: a list must hold 5 non-negative weights")
        if not 0 < self.beta < 1:
            raise ConfigError(f"loss.beta={self.beta}: must be in (0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing={self.label_smoothing}: must be in [0, 1)")


@dataclass(frozen=True)
class BalanceConfig:
    """Per-epoch re-sampling of the training stream towards a target grade distribution.

    ``target``: ``none`` (natural distribution), ``uniform``, ``sqrt`` (proportional to sqrt of counts), or a list
    of 5 shares. ``strength`` interpolates between natural (0) and target (1). ``epoch_size`` is the number of
    samples drawn per epoch as a multiple of the training set size.
    """

    target: str | list[float] = "sqrt"
    strength: float = 1.0
    epoch_size: float = 1.0

    def validate(self):
        if isinstance(self.target, str) and self.target not in ("none", "uniform", "sqrt"):
            raise ConfigError(f"balance.target={self.target!r}: supported: none, uniform, sqrt, or a list of 5 shares")
        if isinstance(self.target, list) and (len(self.target) != 5 or min(self.target) < 0 or sum(self.target) <= 0):
            raise ConfigError(f"balance.target={self.target!r}: a list must hold 5 non-negative shares")
        if not 0 <= self.strength <= 1:
            raise ConfigError(f"balance.strength={self.strength}: must be in [0, 1]")
        if not 0 < self.epoch_size <= 10:
            raise ConfigError(f"balance.epoch_size={self.epoch_size}: must be in (0, 10]")


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation (albumentations), label-safe by default.

    Every grade gets the same pipeline unless ``grade_strength`` asks otherwise (a per-grade strength is a cue the
    model can learn and that never appears at test time). ``hflip_p`` is 0: prepared knees are mirrored to one
    canonical (right-knee) orientation, which a random flip would undo; set it only for data prepared with
    ``roi.mirror_left=false``. Affine zoom is biased outwards (at most ``scale / 2`` in), so the joint margins
    where osteophytes decide KL1 vs KL2 stay in the crop.
    """

    hflip_p: float = 0.0
    rotate_deg: float = 10.0
    scale: float = 0.10
    translate: float = 0.06
    brightness: float = 0.2
    contrast: float = 0.2
    clahe_p: float = 0.2
    gamma_p: float = 0.3
    noise_p: float = 0.2
    blur_p: float = 0.1
    grade_strength: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])

    def validate(self):
        for name in ("hflip_p", "clahe_p", "gamma_p", "noise_p", "blur_p"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"augment.{name}={v}: a probability must be in [0, 1]")
        for name in ("rotate_deg", "scale", "translate", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name}={getattr(self, name)}: must be >= 0")
        if len(self.grade_strength) != 5 or min(self.grade_strength) < 0:
            raise ConfigError(f"augment.grade_strength={self.grade_strength}: must hold 5 non-negative numbers")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    # Weight EMA (Polyak averaging, koa_ray.train.ema): 0 = off; e.g. 0.999. When on, validation, the best-checkpoint
    # choice and model.pt use the averaged weights; the raw weights travel in train_state.pt for resume.
    ema_decay: float = 0.0

    def validate(self):
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"optim.optimizer={self.optimizer!r}: supported: adam, adamw, sgd")
        if not 0 < self.lr < 1:
            raise ConfigError(f"optim.lr={self.lr}: must be in (0, 1)")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay, optim.warmup_epochs and optim.grad_clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay={self.ema_decay}: must be in [0, 1) (0 = no weight EMA)")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; saved resolved beside every checkpoint."""

    data: str = ""
    out: str = "runs"
    name: str = "koa"
    image_size: int = 224
    in_chans: int = 1
    epochs: int = 20
    batch_size: int = 32
    eval_batch_size: int = 64
    workers: int = 2
    gpu: bool = False
    cpus_per_worker: float = 0.5
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Train workers across nodes)
    address: str | None = None
    storage_path: str | None = None
    seed: int = 0
    patience: int = 5
    keep_best: int = 2
    max_failures: int = 1  # Ray Train restarts after a worker crash, from the latest checkpoint (-1: unlimited)
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 (any device; ~2x on AMX CPUs) | fp16 (CUDA) | off
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (GPU fast path; benchmarks/gpu_check.sh measures it)
    max_steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (per worker); None = whole epoch
    torch_threads: int | None = None  # intra-op threads per worker; None = max(1, int(cpus_per_worker))
    decode: str = "argmax"  # argmax | expected: grade = round(sum_k k * p_k), the ordinal (QWK-friendly) decoding
    tta: str = "none"  # none | flip | shift: views averaged in validation and, by default, evaluate/score (data.tta)
    mlflow: bool = True  # track the run in MLflow (koa_ray.tracking)
    mlflow_uri: str | None = None  # tracking URI; None = sqlite:///<run folder>/mlflow.db
    mlflow_experiment: str = "koa"
    tensorboard: bool = True  # TensorBoard event files in <run folder>/tensorboard
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> "TrainConfig":
        checks = [
            ("image_size", self.image_size >= 32, "must be >= 32"),
            ("in_chans", self.in_chans in (1, 3), "must be 1 or 3"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "must be >= 1"),
            ("workers", self.workers >= 1, "must be >= 1"),
            ("cpus_per_worker", 0 < self.cpus_per_worker <= 64, "must be in (0, 64]"),
            ("placement_strategy", self.placement_strategy in PLACEMENT_STRATEGIES,
             f"supported: {', '.join(PLACEMENT_STRATEGIES)}"),
            ("patience", self.patience >= 0, "must be >= 0 (0 disables early stopping)"),
            ("keep_best", self.keep_best >= 1, "must be >= 1"),
            ("max_failures", self.max_failures >= -1, "must be >= -1"),
            ("max_steps_per_epoch", self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
             "must be >= 1 or null"),
            ("torch_threads", self.torch_threads is None or self.torch_threads >= 1, "must be >= 1 or null"),
            ("decode", self.decode in DECODINGS, f"supported: {', '.join(DECODINGS)}"),
            ("tta", self.tta in TTA_MODES, f"supported: {', '.join(TTA_MODES)}"),
            ("tta", self.tta != "flip" or self.augment.hflip_p > 0,
             "flip averaging needs training with flips (augment.hflip_p > 0, on data prepared with --no-mirror)"),
            ("amp", self.amp in ("auto", "bf16", "fp16", "off"), "supported: auto, bf16, fp16, off"),
            ("name", bool(self.name) and "/" not in self.name, "must be a non-empty name without '/'"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {why}")
        for section in (self.model, self.loss, self.balance, self.augment, self.optim):
            section.validate()
        return self


# ----------------------------------------------------------------------------------------------- dict <-> dataclass
def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _check_type(key, value, arm)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r}: expected {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r}: expected null")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        (inner,) = typing.get_args(tp)
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}={value!r}: expected one of {typing.get_args(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys or wrong types raise :class:`ConfigError`."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}")
    kwargs = {k: _check_type(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "loss.gamma", 1.5)`` sets ``d["loss"]["gamma"]``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.gamma=1.5"`` → ``("loss.gamma", 1.5)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. loss.gamma=1.5")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_train_config(path: str | Path | None = None, overrides: dict | None = None, sets: list[str] = ()) -> TrainConfig:
    """Merge YAML file < ``overrides`` (dotted keys, e.g. from CLI flags) < ``sets`` (``KEY=VALUE`` strings)."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at top level")
        data = loaded
    for k, v in (overrides or {}).items():
        if v is not None:
            set_dotted(data, k, v)
    for s in sets:
        set_dotted(data, *parse_override(s))
    return from_dict(TrainConfig, data).validate()


def save_yaml(obj, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=False))
