"""Classification losses and class-imbalance weights for KL grading.

* Focal loss: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017
  (https://arxiv.org/abs/1708.02002), multi-class form on logits.
* Effective-number class weights: Cui et al., "Class-Balanced Loss Based on Effective
  Number of Samples", CVPR 2019 (https://arxiv.org/abs/1901.05555).

With label smoothing ``eps`` over ``K`` classes the target distribution is
``q = (1 - eps) * onehot(y) + eps / K`` and the per-sample focal loss is::

    loss_i = sum_k  q_ik * alpha_k * (1 - p_ik) ** gamma * (-log p_ik)

With ``gamma = 0`` this is exactly ``F.cross_entropy(weight=alpha, label_smoothing=eps,
reduction="none")``; ``reduction="mean"`` divides the sum by ``sum_i alpha_{y_i}`` (the
weighted mean PyTorch's cross-entropy uses), so ``gamma = 0`` matches it for every
reduction.  Because ``(1 - p) ** gamma <= 1`` the focal loss never exceeds that
cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "REDUCTIONS",
    "WEIGHT_SCHEMES",
    "FocalLoss",
    "build_loss",
    "class_weights",
    "focal_loss",
    "loss_shares",
]

#: Loss names accepted by :func:`build_loss`.
LOSSES: tuple[str, ...] = ("focal", "ce")
#: Reductions accepted by :func:`focal_loss` / :class:`FocalLoss`.
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
#: Named schemes accepted by :func:`class_weights` (or pass an explicit list of weights).
WEIGHT_SCHEMES: tuple[str, ...] = ("none", "inverse", "effective")

AlphaLike = Sequence[float] | torch.Tensor | np.ndarray | None


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: AlphaLike = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Multi-class focal loss on logits (Lin et al. 2017); see the module docstring.

    Computed in float32 whatever the logits dtype (e.g. under bf16 autocast).

    Args:
        logits: ``(N, K)`` unnormalised scores.
        target: ``(N,)`` integer class indices in ``[0, K)``.
        gamma: focusing parameter, ``>= 0``; ``0`` gives cross-entropy.
        alpha: optional ``(K,)`` non-negative per-class weights (tensor or sequence).
        reduction: ``"mean"`` (alpha-weighted mean: ``sum_i loss_i / sum_i alpha_{y_i}``,
            the plain mean without alpha), ``"sum"`` or ``"none"`` (``(N,)`` tensor).
        label_smoothing: ``eps`` in ``[0, 1)``.

    Raises:
        ValueError: on bad shapes or an argument out of range.
    """
    _check_gamma(gamma)
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"Expected logits (N, K) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}."
        )
    num_classes = logits.shape[1]
    if alpha is not None and not isinstance(alpha, torch.Tensor):
        alpha = torch.as_tensor(alpha, dtype=torch.float32)
    if alpha is not None and alpha.shape != (num_classes,):
        raise ValueError(f"alpha must have shape ({num_classes},), got {tuple(alpha.shape)}.")

    log_p = F.log_softmax(logits.float(), dim=1)
    # q = (1 - eps) * onehot + eps / K
    q = F.one_hot(target.long(), num_classes).to(log_p.dtype)
    if label_smoothing > 0:
        q = q * (1.0 - label_smoothing) + label_smoothing / num_classes
    # (1 - p) ** gamma; clamped so d/dp stays finite for gamma < 1 when p rounds to 1.
    if gamma > 0:
        one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).eps)
        q = q * one_minus_p.pow(gamma)
    if alpha is not None:
        q = q * alpha.to(log_p)
    loss = -(q * log_p).sum(dim=1)

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if alpha is None:
        return loss.mean()
    return loss.sum() / alpha.to(log_p)[target.long()].sum()


class FocalLoss(nn.Module):
    """Multi-class focal loss module (Lin et al. 2017), see :func:`focal_loss`.

    Args:
        gamma: focusing parameter, ``>= 0``; ``gamma = 0`` equals
            ``nn.CrossEntropyLoss(weight=alpha, label_smoothing=label_smoothing)``.
        alpha: ``None`` or ``num_classes`` non-negative per-class weights (sequence,
            numpy array or tensor), e.g. from :func:`class_weights`.  Stored as a buffer.
        reduction: ``"mean"`` (alpha-weighted mean ``sum_i loss_i / sum_i alpha_{y_i}``),
            ``"sum"`` or ``"none"``.
        label_smoothing: in ``[0, 1)``.
        num_classes: number of classes ``K`` (checks the length of ``alpha``).

    Raises:
        ValueError: naming the bad value, if ``gamma < 0``, ``len(alpha) != num_classes``,
            an ``alpha`` entry is negative or not finite, ``reduction`` is unknown or
            ``label_smoothing`` is outside ``[0, 1)``.
    """

    alpha: torch.Tensor | None

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: AlphaLike = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        num_classes: int = 5,
    ) -> None:
        super().__init__()
        _check_gamma(gamma)
        _check_reduction(reduction)
        _check_label_smoothing(label_smoothing)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.num_classes = num_classes
        self.register_buffer("alpha", _alpha_tensor(alpha, num_classes))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target, self.gamma, self.alpha, self.reduction, self.label_smoothing)

    def extra_repr(self) -> str:
        alpha = None if self.alpha is None else [round(a, 4) for a in self.alpha.tolist()]
        return (
            f"gamma={self.gamma}, alpha={alpha}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}"
        )


def build_loss(
    name: str,
    *,
    gamma: float = 2.0,
    alpha: AlphaLike = None,
    label_smoothing: float = 0.0,
    num_classes: int = 5,
    reduction: str = "mean",
) -> nn.Module:
    """Build a loss by name.

    Args:
        name: ``"focal"`` (:class:`FocalLoss`) or ``"ce"`` (:class:`torch.nn.CrossEntropyLoss`
            with ``weight=alpha``); case-insensitive.
        gamma: focal focusing parameter (ignored by ``ce``).
        alpha: optional per-class weights (``weight`` of cross-entropy).
        label_smoothing: in ``[0, 1)``.
        num_classes: number of classes (length of ``alpha``).
        reduction: ``mean | sum | none``.

    Raises:
        ValueError: on an unknown ``name`` (listing the choices) or invalid arguments.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "focal":
        return FocalLoss(gamma, alpha, reduction, label_smoothing, num_classes)
    if key == "ce":
        _check_reduction(reduction)
        _check_label_smoothing(label_smoothing)
        return nn.CrossEntropyLoss(
            weight=_alpha_tensor(alpha, num_classes), reduction=reduction, label_smoothing=float(label_smoothing)
        )
    raise ValueError(f"Unknown loss {name!r}; choose one of {', '.join(LOSSES)}.")


def class_weights(
    counts: Sequence[int] | np.ndarray,
    scheme: str | Sequence[float] = "inverse",
    *,
    beta: float = 0.999,
) -> list[float] | None:
    """Per-class loss weights from training-set class counts.

    Schemes (all named weights are normalised to average 1 over the classes):

    * ``"none"``: returns ``None`` (no weighting).
    * ``"inverse"``: ``w_k ∝ 1 / n_k``.
    * ``"effective"``: ``w_k ∝ (1 - beta) / (1 - beta ** n_k)``, the inverse effective
      number of samples (Cui et al. 2019).
    * an explicit sequence of ``K`` non-negative finite weights: returned as floats.

    A class with zero count is treated as having one sample (the largest weight, no
    inf / NaN); it contributes no loss term anyway while absent from the data.

    Args:
        counts: ``K`` non-negative class counts (index = grade).
        scheme: a name above or explicit weights.
        beta: ``beta`` of the effective number, in ``[0, 1)``.

    Returns:
        ``K`` python floats, or ``None`` for ``"none"``.

    Raises:
        ValueError: on an unknown scheme (listing the choices), counts that are empty /
            negative / not finite / all zero, an explicit list of the wrong length or with
            negative / non-finite entries, or ``beta`` outside ``[0, 1)``.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got {counts!r}.")
    if not np.all(np.isfinite(n)) or np.any(n < 0) or not np.any(n > 0):
        raise ValueError(f"counts must be finite, non-negative and not all zero, got {counts!r}.")

    if not isinstance(scheme, str):
        weights = np.asarray(scheme, dtype=np.float64)
        if weights.shape != n.shape:
            raise ValueError(f"Explicit class weights must have {n.size} entries (one per class), got {scheme!r}.")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not np.any(weights > 0):
            raise ValueError(f"Explicit class weights must be finite, >= 0 and not all zero, got {scheme!r}.")
        return weights.tolist()
    key = scheme.strip().lower()
    if key == "none":
        return None
    n = np.maximum(n, 1.0)
    if key == "inverse":
        raw = 1.0 / n
    elif key == "effective":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}.")
        raw = (1.0 - beta) / (1.0 - np.power(beta, n))
    else:
        raise ValueError(
            f"Unknown class-weight scheme {scheme!r}; choose one of {', '.join(WEIGHT_SCHEMES)} "
            "or pass a list of weights."
        )
    return (raw * raw.size / raw.sum()).tolist()


# --------------------------------------------------------------------------- validation


def _alpha_tensor(alpha: AlphaLike, num_classes: int) -> torch.Tensor | None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    if alpha is None:
        return None
    if isinstance(alpha, str):
        raise ValueError(f"alpha must be a sequence of {num_classes} numbers, got the string {alpha!r}.")
    t = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()
    if t.ndim != 1 or t.numel() != num_classes:
        raise ValueError(f"alpha must have num_classes={num_classes} entries, got {list(t.reshape(-1).tolist())}.")
    if not torch.all(torch.isfinite(t)) or torch.any(t < 0) or not torch.any(t > 0):
        raise ValueError(f"alpha entries must be finite, >= 0 and not all zero, got {t.tolist()}.")
    return t


def _check_gamma(gamma: float) -> None:
    if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}.")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}.")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")


def loss_shares(seen_counts: Sequence[float] | np.ndarray, alpha: AlphaLike = None) -> np.ndarray:
    """Expected share of the training loss carried by each class, before focal modulation.

    A class seen ``n_k`` times per epoch with weight ``alpha_k`` contributes ``n_k * alpha_k`` (times its mean
    per-sample loss, which is what training changes); the shares are those products normalised to sum to 1.
    ``alpha=None`` means no weighting. Use it to see how strongly re-sampling plus weighting favour rare grades.

    Raises:
        ValueError: counts that are negative or all zero, or ``alpha`` of the wrong length.
    """
    n = np.asarray(seen_counts, dtype=np.float64)
    if n.ndim != 1 or np.any(n < 0) or not np.any(n > 0):
        raise ValueError(f"seen_counts must be non-negative and not all zero, got {seen_counts!r}.")
    a = np.ones_like(n) if alpha is None else np.asarray(alpha, dtype=np.float64).reshape(-1)
    if a.shape != n.shape:
        raise ValueError(f"alpha has {a.size} entries for {n.size} classes.")
    w = n * a
    return w / w.sum()
