"""Checkpoints as directories: weights beside everything needed to rebuild model and preprocessing.

The contract between training and inference: :mod:`koa_ray.train` writes checkpoints with :func:`save_checkpoint`,
:mod:`koa_ray.infer` reads them with :func:`load_checkpoint`; this module imports only the models, so neither side
reaches into the other.

Layout of a checkpoint directory::

    model.pt         state dict of the bare model (no DDP prefix); ``torch.load(path, weights_only=True)`` safe;
                     with weight EMA (``optim.ema_decay``) the averaged weights, the ones validated and served
    koa.json         format, model build config, preprocessing (prep + input size + normalisation), class names,
                     the resolved training config, the epoch, its validation metrics and the run history
    train_state.pt   optimizer/scheduler/early-stopping state for resuming (optional); with weight EMA also the
                     raw weights (``model``) and the EMA's update count (``ema``)

A *run directory* holds ``best.json`` pointing at its best checkpoint; every loader accepts either.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from koa_ray import CLASS_NAMES, __version__

FORMAT = "koa-ray-checkpoint/1"
WEIGHTS = "model.pt"
META = "koa.json"
TRAIN_STATE = "train_state.pt"
BEST_POINTER = "best.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside ``torch.compile`` (``_orig_mod``) and DDP / DataParallel (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def load_tensors(path: str | Path):
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Only tensors and plain containers are unpickled: a file carrying other Python objects (a pickle that could run
    code) is refused, never executed.

    Raises:
        ValueError: the file holds other objects than tensors and plain containers, or is truncated or corrupt.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: it holds Python objects other than tensors, which could run code when "
                         f"loaded (weights_only); re-save it as a plain state dict ({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch file (truncated or corrupt?): {e}") from e


def save_checkpoint(directory: str | Path, model: torch.nn.Module, meta: dict, train_state: dict | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    torch.save(state, d / WEIGHTS)
    full = {"format": FORMAT, "package_version": __version__, "class_names": list(CLASS_NAMES), **meta}
    (d / META).write_text(json.dumps(full, indent=2, default=float))
    if train_state is not None:
        torch.save(train_state, d / TRAIN_STATE)
    return d


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (→ its best checkpoint), to a checkpoint directory.

    Raises:
        FileNotFoundError: neither a checkpoint (``koa.json`` + ``model.pt``) nor a run with ``best.json``.
    """
    p = Path(path)
    if (p / META).is_file() and (p / WEIGHTS).is_file():
        return p
    if (p / BEST_POINTER).is_file():
        best = json.loads((p / BEST_POINTER).read_text())
        target = Path(best["checkpoint"])
        if not target.is_absolute():
            target = p / target
        if (target / META).is_file():
            return target
        raise FileNotFoundError(f"{p / BEST_POINTER} points at {target}, which is not a checkpoint directory")
    raise FileNotFoundError(f"{p} is neither a checkpoint directory ({META} + {WEIGHTS}) nor a run directory "
                            f"with {BEST_POINTER}")


def model_id(checkpoint_dir: str | Path) -> str:
    """How outputs name the model of a checkpoint directory: ``RUN/CHECKPOINT`` (its last two path parts)."""
    p = Path(checkpoint_dir)
    return f"{p.parent.name}/{p.name}"


def read_meta(path: str | Path) -> dict:
    meta = json.loads((resolve_checkpoint(path) / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r}; expected {FORMAT}")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from ``koa.json`` and load ``model.pt``; returns ``(model.eval(), meta)``."""
    from koa_ray.models import build_model

    d = resolve_checkpoint(path)
    meta = read_meta(d)
    model = build_model(**meta["model"])
    state = load_tensors(d / WEIGHTS)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
