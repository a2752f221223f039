"""``sweep.png``: every trial's best validation QWK against each searched parameter."""

from __future__ import annotations

import json
import math
from pathlib import Path


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

