"""Grading metrics for KL classification, in pure numpy.

Definitions follow scikit-learn (``zero_division=0``) so the numbers match
``sklearn.metrics`` without importing it:

* precision / recall / F1 of a class with no predicted / true samples are 0, and
  macro averages run over all ``num_classes`` grades;
* balanced accuracy is the mean recall over the grades present in ``y_true``;
* quadratic weighted kappa (Cohen 1968, "Weighted kappa", Psychol. Bull. 70(4))::

      kappa = 1 - sum(W * O) / sum(W * E),  W_ij = (i - j)^2 / (K - 1)^2,
      O = confusion matrix,  E = outer(row sums, column sums) / n.

  When ``sum(W * E) == 0`` (truth and prediction are one and the same grade for every
  sample) the agreement is perfect and kappa is defined as ``1.0``; scikit-learn
  returns NaN there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from koa_ray import DECODINGS

__all__ = [
    "calibration",
    "classification_metrics",
    "confusion_matrix",
    "decode_grades",
    "expected_grade",
    "quadratic_weighted_kappa",
]

METRIC_KEYS: tuple[str, ...] = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "qwk",
    "mae",
    "per_class",
    "confusion_matrix",
)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int = 5) -> np.ndarray:
    """``(K, K)`` int64 counts; rows are the true grade, columns the predicted grade.

    Raises:
        ValueError: if the inputs are not 1-D of equal length, or hold values that
            are not integers in ``[0, num_classes)``.
    """
    t, p = _check_labels(y_true, y_pred, num_classes)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def quadratic_weighted_kappa(y_true: Any, y_pred: Any, num_classes: int = 5) -> float:
    """Cohen's kappa with quadratic weights (see the module docstring).

    Returns ``1.0`` when the expected disagreement is zero (a single grade, always
    predicted correctly).

    Raises:
        ValueError: on empty or invalid inputs (see :func:`confusion_matrix`).
    """
    return _qwk(confusion_matrix(y_true, y_pred, num_classes))


def expected_grade(probs: Any) -> np.ndarray:
    """Expected KL grade ``sum_k k * p_k`` of ``(N, K)`` (or ``(K,)``) class probabilities.

    Raises:
        ValueError: if ``probs`` is not 1-D or 2-D.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim not in (1, 2):
        raise ValueError(f"probs must have shape (K,) or (N, K), got {p.shape}.")
    return p @ np.arange(p.shape[-1], dtype=np.float64)


def decode_grades(probs: Any, how: str = "argmax") -> np.ndarray:
    """Predicted grade per row of ``(N, K)`` probabilities.

    ``argmax`` takes the most probable grade; ``expected`` rounds the expected grade ``sum_k k * p_k`` (an ordinal
    decoding: it trades exact hits for near misses, which quadratic weighted kappa rewards).

    Raises:
        ValueError: on an unknown ``how`` (listing the choices) or probabilities that are not 2-D.
    """
    if how not in DECODINGS:
        raise ValueError(f"how={how!r}: supported: {', '.join(DECODINGS)}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, K), got {p.shape}.")
    if how == "argmax":
        return p.argmax(1).astype(np.int64)
    return np.clip(np.rint(expected_grade(p)), 0, p.shape[1] - 1).astype(np.int64)


def classification_metrics(
    y_true: Any,
    y_pred: Any = None,
    num_classes: int = 5,
    probs: Any = None,
) -> dict[str, Any]:
    """All grading metrics in one JSON-serialisable dict.

    Args:
        y_true: ``(N,)`` true grades.
        y_pred: ``(N,)`` predicted grades; if ``None``, ``argmax(probs)``.
        num_classes: number of grades ``K``.
        probs: optional ``(N, K)`` class probabilities, only used (and then validated) to
            derive ``y_pred`` when it is not given.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "macro_precision", "macro_recall",
        "macro_f1", "qwk", "mae", "per_class", "confusion_matrix"}`` with python
        floats / ints; ``per_class`` maps ``"0".."K-1"`` to ``{"precision", "recall",
        "f1", "support"}`` and ``confusion_matrix`` is a list of lists (rows = truth).

    Raises:
        ValueError: on empty inputs, neither ``y_pred`` nor ``probs``, a ``probs``
            shape other than ``(N, K)``, or invalid labels.
    """
    if y_pred is None:
        if probs is None:
            raise ValueError("Pass y_pred or probs.")
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != num_classes:
            raise ValueError(f"probs must have shape (N, {num_classes}), got {p.shape}.")
        y_pred = p.argmax(axis=1)
    t, p = _check_labels(y_true, y_pred, num_classes)
    if t.size == 0:
        raise ValueError("Cannot compute metrics on empty inputs.")
    cm = confusion_matrix(t, p, num_classes)

    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, support + predicted)

    return {
        "n": int(t.size),
        "accuracy": float(tp.sum() / t.size),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "qwk": _qwk(cm),
        "mae": float(np.abs(t - p).mean()),
        "per_class": {
            str(k): {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k in range(num_classes)
        },
        "confusion_matrix": cm.tolist(),
    }


def calibration(probs: Any, y_true: Any, n_bins: int = 10) -> dict[str, Any]:
    """Top-label calibration: expected and maximum calibration error and the reliability-diagram bins.

    Guo et al. 2017, "On Calibration of Modern Neural Networks" (ICML): the confidence of a prediction is its top
    probability ``max_k p_k``, it is correct when ``argmax_k p_k`` is the true grade; samples are binned by
    confidence into ``n_bins`` equal-width bins over ``[0, 1]`` (the last bin closed), and

        ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|,   MCE = max_b |accuracy_b - confidence_b|.

    Args:
        probs: ``(N, K)`` class probabilities (rows summing to 1).
        y_true: ``(N,)`` true grades.
        n_bins: number of confidence bins (>= 1).

    Returns:
        ``{"ece", "mce", "n", "bins": [{"lo", "hi", "count", "confidence", "accuracy"}]}``; empty bins have
        ``count`` 0 and ``None`` confidence/accuracy.

    Raises:
        ValueError: ``n_bins < 1``, ``probs`` not 2-D, or lengths that differ, or empty inputs.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins}: must be >= 1")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, K), got {p.shape}")
    t = _as_grades(y_true, "y_true", p.shape[1])
    if len(t) != len(p):
        raise ValueError(f"probs has {len(p)} rows, y_true {len(t)}")
    if len(t) == 0:
        raise ValueError("Cannot compute calibration on empty inputs.")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    idx = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
    bins, ece, mce = [], 0.0, 0.0
    for b in range(n_bins):
        sel = idx == b
        n_b = int(sel.sum())
        if n_b:
            c, a = float(conf[sel].mean()), float(correct[sel].mean())
            ece += n_b / len(t) * abs(a - c)
            mce = max(mce, abs(a - c))
        else:
            c = a = None
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n_b, "confidence": c, "accuracy": a})
    return {"ece": float(ece), "mce": float(mce), "n": int(len(t)), "bins": bins}


# --------------------------------------------------------------------------- helpers


def _qwk(cm: np.ndarray) -> float:
    k = cm.shape[0]
    n = cm.sum()
    if n == 0:
        raise ValueError("Quadratic weighted kappa is undefined for empty inputs.")
    grades = np.arange(k, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2 / (k - 1) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    expected_disagreement = float((weights * expected).sum())
    if expected_disagreement == 0.0:
        # O is supported where E is, so observed disagreement is 0 too: perfect agreement.
        return 1.0
    return float(1.0 - (weights * cm).sum() / expected_disagreement)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den == 0`` (sklearn's ``zero_division=0``)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _check_labels(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    t = _as_grades(y_true, "y_true", num_classes)
    p = _as_grades(y_pred, "y_pred", num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}.")
    return t, p


def _as_grades(y: Any, name: str, num_classes: int) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}.")
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype.kind not in "iuf" or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
        raise ValueError(f"{name} must hold integer grades, got dtype {a.dtype} / values {np.unique(a)[:10]}.")
    a = a.astype(np.int64)
    bad = a[(a < 0) | (a >= num_classes)]
    if bad.size:
        raise ValueError(f"{name} holds grades outside [0, {num_classes}): {np.unique(bad)[:10].tolist()}.")
    return a
