"""Class re-balancing of the training stream: over-sample minority grades, under-sample the majority.

The target distribution mixes the natural one with a target (uniform, square-root of counts, or explicit shares)::

    p = (1 - strength) * natural + strength * target

Each row of grade ``c`` is emitted ``floor(w_c) + Bernoulli(frac(w_c))`` times with ``w_c = p_c * epoch_size *
N / n_c``, so the expected epoch matches ``p`` (``w_c < 1`` under-samples, ``w_c > 1`` over-samples with repeated,
differently augmented copies). The draw is made inside the Ray Data stream, so it is fresh every epoch, and Ray
Train's equal streaming split still gives every worker the same number of batches.
"""

from __future__ import annotations

import numpy as np

from koa_ray.config import BalanceConfig

NUM_CLASSES = 5


def target_distribution(counts, cfg: BalanceConfig) -> np.ndarray:
    """Shares per grade that an epoch should have; grades absent from the data get 0."""
    counts = np.asarray(counts, np.float64)
    if counts.shape != (NUM_CLASSES,) or counts.sum() <= 0:
        raise ValueError(f"counts={counts.tolist()}: need {NUM_CLASSES} non-negative counts with a positive sum")
    natural = counts / counts.sum()
    present = counts > 0
    if isinstance(cfg.target, list):
        target = np.asarray(cfg.target, np.float64)
    elif cfg.target == "uniform":
        target = present.astype(np.float64)
    elif cfg.target == "sqrt":
        target = np.sqrt(counts)
    else:  # "none"
        target = natural.copy()
    target = np.where(present, target, 0.0)
    if target.sum() <= 0:
        raise ValueError(f"balance.target={cfg.target!r} gives no weight to any grade present in the data")
    target /= target.sum()
    return (1 - cfg.strength) * natural + cfg.strength * target


def sampling_weights(counts, cfg: BalanceConfig) -> np.ndarray:
    """Expected number of copies of each row of each grade per epoch (``w_c`` above)."""
    counts = np.asarray(counts, np.float64)
    p = target_distribution(counts, cfg)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(counts > 0, p * cfg.epoch_size * counts.sum() / counts, 0.0)
    return w


def sampled_counts(counts, cfg: BalanceConfig) -> np.ndarray:
    """Expected number of rows of each grade in one re-sampled epoch: the distribution the model actually sees.

    Loss weights (``loss.alpha``) are computed from these, not from the natural counts, so that re-sampling and
    weighting never silently correct the same imbalance twice.
    """
    counts = np.asarray(counts, np.float64)
    return sampling_weights(counts, cfg) * counts


def draw_copies(labels: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Number of copies of each row: ``floor(w) + Bernoulli(frac(w))``."""
    w = np.asarray(weights)[np.asarray(labels, np.int64)]
    base = np.floor(w)
    return (base + (rng.random(len(w)) < (w - base))).astype(np.int64)


class Resample:
    """Ray Data ``map_batches`` body that repeats/drops rows by grade; fresh randomness each epoch."""

    def __init__(self, weights, seed: int | None = None):
        self.weights = np.asarray(weights, np.float64)
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        rng = np.random.default_rng(self.seed)
        idx = np.repeat(np.arange(len(batch["label"])), draw_copies(batch["label"], self.weights, rng))
        return {k: np.asarray(v)[idx] for k, v in batch.items()}


def epoch_indices(labels: np.ndarray, weights, rng: np.random.Generator) -> np.ndarray:
    """Local-mode equivalent of :class:`Resample`: shuffled row indices for one epoch."""
    idx = np.repeat(np.arange(len(labels)), draw_copies(labels, weights, rng))
    rng.shuffle(idx)
    return idx
