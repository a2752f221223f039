"""Figures shared by training and evaluation: learning curves, confusion matrices, reliability diagrams.

Matplotlib with the Agg backend (no display); every function writes one PNG and closes its figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from koa_ray import CLASS_NAMES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, path: Path) -> None:
    plt = _plt()
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, mat, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised (recall)", ".2f")):
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=mat.max() if mat.max() > 0 else 1)
        for i in range(5):
            for j in range(5):
                v = mat[i, j]
                ax.text(j, i, format(v, fmt), ha="center", va="center",
                        color="white" if v > 0.6 * (mat.max() or 1) else "black", fontsize=9)
        ax.set_xticks(range(5), CLASS_NAMES)
        ax.set_yticks(range(5), CLASS_NAMES)
        ax.set_xlabel("predicted grade")
        ax.set_ylabel("true grade")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(history["epoch"], history["train_loss"], "o-", label="train loss")
    if "val_loss" in history:
        axes[0].plot(history["epoch"], history["val_loss"], "o-", label="val loss (CE)")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for key in ("val_qwk", "val_accuracy", "val_macro_f1", "val_balanced_accuracy"):
        if key in history:
            axes[1].plot(history["epoch"], history[key], "o-", label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylim(-0.05, 1.0)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(cal: dict, path: Path) -> None:
    """Reliability diagram of :func:`koa_ray.metrics.calibration`: per confidence bin, accuracy (filled bar) and
    mean confidence (outline; above the fill = over-confident), the diagonal of perfect calibration, and the share
    of samples per bin below."""
    plt = _plt()
    bins = cal["bins"]
    width = bins[0]["hi"] - bins[0]["lo"]
    centers = [b["lo"] + width / 2 for b in bins]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    acc = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    conf = [b["confidence"] if b["count"] else 0.0 for b in bins]
    ax.bar(centers, acc, width=width * 0.9, color="#4c78a8", label="accuracy")
    ax.bar(centers, conf, width=width * 0.9, fill=False, edgecolor="#e45756", lw=1.5, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability (top label): ECE {cal['ece']:.3f}, MCE {cal['mce']:.3f}, n = {cal['n']}")
    ax.legend(loc="upper left", fontsize=8)
    ax2.bar(centers, [b["count"] / max(cal["n"], 1) for b in bins], width=width * 0.95, color="#999")
    ax2.set_xlabel("confidence (top probability)")
    ax2.set_ylabel("share")
    ax2.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
