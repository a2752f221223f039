"""``koa evaluate``: metrics, plots and a one-page HTML report for a checkpoint on a labelled split.

``data`` may be a prepared dataset (``koa prepare`` output: the stored crops are used) or a raw labelled folder /
manifest (decoded and ROI-cropped with the checkpoint's recorded preprocessing). Predictions run on a Ray Data actor
pool; metrics are pure maths from :mod:`koa_ray.metrics`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from koa_ray import CLASS_NAMES
from koa_ray.metrics import classification_metrics

PRED_COLUMNS = ["path", "label", "status", "error", "grade", "p0", "p1", "p2", "p3", "p4", "expected_grade", "side"]


class EvalActor:
    """Ray Data actor for evaluation: prepared crops (``image`` column) or raw files (``path`` column)."""

    def __init__(self, checkpoint: str, tta: bool = False, use_gpu: bool = False):
        from koa_ray.inference import Predictor

        self.p = Predictor(checkpoint, device="cuda" if use_gpu else "cpu")
        self.tta = tta

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if "image" in batch:
            from koa_ray.data.decode import decode_image_column

            crops = decode_image_column(batch["image"].tolist(), batch["size"].to_numpy())
            probs = self.p.predict(crops, tta=self.tta)
            return _rows(batch["path"], batch["label"], probs, batch.get("side", pd.Series([""] * len(batch))),
                         self.p.grades(probs))
        from koa_ray.score import score_rows

        scored = score_rows(self.p, batch["path"].tolist(), self.tta, batch.get("side"))
        labels = dict(zip(batch["path"], batch["label"]))
        scored["label"] = scored["path"].map(labels).astype(int)
        return scored.rename(columns={})[[c for c in PRED_COLUMNS]]


def _rows(paths, labels, probs, sides, grades) -> pd.DataFrame:
    df = pd.DataFrame({"path": list(paths), "label": np.asarray(labels, int), "status": "ok", "error": "",
                       "grade": np.asarray(grades, int)})
    for g in range(5):
        df[f"p{g}"] = probs[:, g]
    df["expected_grade"] = probs @ np.arange(5)
    df["side"] = list(sides)
    return df[PRED_COLUMNS]


def predict_split(checkpoint: str, data: str | Path, split: str, tta: bool, batch_size: int, concurrency: int,
                  use_gpu: bool | None, address: str | None) -> pd.DataFrame:
    import ray

    from koa_ray.data.ingest import discover
    from koa_ray.runtime import cluster_gpus, frame_blocks, init_ray
    from koa_ray.train.checkpoint import resolve_checkpoint

    data = Path(data)
    ckpt = str(resolve_checkpoint(checkpoint).resolve())
    init_ray(address)
    gpu = bool(cluster_gpus() > 0) if use_gpu is None else use_gpu
    if (data / "manifest.json").is_file():
        if not (data / split).is_dir():
            raise ValueError(f"{data} has no prepared split {split!r}")
        ds = ray.data.read_parquet(str(data / split)).select_columns(["image", "size", "label", "path", "side"])
    else:
        from koa_ray.data.ingest import WHOLE

        rows = discover(data, make_split=False)
        side_from_manifest = bool(rows.attrs.get("side_from_manifest"))
        rows = rows[rows["label"] >= 0]
        if (rows["split"] == WHOLE).all() and not rows.empty:
            # no split in the input (e.g. DIR/{0..4}/*): an external test set, evaluated whole, never re-split
            print(f"[koa] {data} has no split folders: evaluating all {len(rows)} labelled images "
                  f"(--split {split} does not apply)", flush=True)
        else:
            rows = rows[rows["split"] == split]
        if rows.empty:
            raise ValueError(f"{data} has no labelled images in split {split!r}")
        # a manifest's side column decides mirroring as it did at prepare time; otherwise the checkpoint's regex
        rows = rows.assign(side=rows["side"] if side_from_manifest else "")
        ds = ray.data.from_pandas(frame_blocks(rows[["path", "label", "side"]], batch_size))
    ds = ds.map_batches(EvalActor, fn_constructor_kwargs={"checkpoint": ckpt, "tta": tta, "use_gpu": gpu},
                        batch_size=batch_size, batch_format="pandas", concurrency=concurrency,
                        num_gpus=1 if gpu else 0, num_cpus=0.5 if not gpu else 1)
    return ds.to_pandas().sort_values("path", kind="stable").reset_index(drop=True)


def plot_confusion(cm: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _png_b64(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def gradcam_examples(checkpoint: str, preds: pd.DataFrame, data: Path, per_grade: int) -> list[tuple[int, str, str]]:
    """A few Grad-CAM overlays per true grade, computed in-process: ``[(grade, caption, png_b64)]``."""
    from koa_ray.data.decode import decode_image_column
    from koa_ray.explain.gradcam import compute_cams, overlay
    from koa_ray.inference import Predictor

    p = Predictor(checkpoint, device="cpu")
    picks = preds[preds.status == "ok"].groupby("label", group_keys=False).head(per_grade)
    if picks.empty:
        return []
    if (data / "manifest.json").is_file():
        import pyarrow.parquet as pq

        split_dirs = [d for d in data.iterdir() if d.is_dir()]
        table = pd.concat([pq.read_table(str(d), columns=["path", "image", "size"]).to_pandas() for d in split_dirs])
        table = table.drop_duplicates("path").set_index("path").loc[picks["path"]]
        crops = decode_image_column(table["image"].tolist(), table["size"].to_numpy())
    else:
        crops = np.stack([p.knees_from_file(path)[0].crop for path in picks["path"]])
    probs = p.predict(crops)
    maps = compute_cams(p.model, p.inputs(crops), list(probs.argmax(1)))
    out = []
    for (row, crop, cam, pr) in zip(picks.itertuples(), crops, maps, probs):
        pred = int(pr.argmax())
        cap = f"true KL{row.label} pred KL{pred} p={pr[pred]:.2f}"
        out.append((int(row.label), cap, _png_b64(overlay(crop, cam, cap))))
    return out


def evaluate(checkpoint: str, data: str | Path, out: str | Path, *, split: str = "test", tta: bool = False,
             batch_size: int = 64, concurrency: int = 1, use_gpu: bool | None = None, address: str | None = None,
             gradcam_per_grade: int = 3) -> dict:
    """Evaluate and write ``metrics.json``, ``per_class.csv``, ``predictions.csv``, ``confusion_matrix.png`` and
    ``report.html`` to ``out``; returns the metrics dict."""
    from koa_ray.train.checkpoint import read_meta, resolve_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data)
    ckpt = resolve_checkpoint(checkpoint)
    preds = predict_split(str(ckpt), data, split, tta, batch_size, concurrency, use_gpu, address)
    preds.to_csv(out / "predictions.csv", index=False)
    ok = preds[preds.status == "ok"]
    if ok.empty:
        raise RuntimeError(f"no image of split {split!r} could be scored; see {out / 'predictions.csv'}")
    metrics = classification_metrics(ok["label"].to_numpy(), ok["grade"].to_numpy(), num_classes=5)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    per_class = pd.DataFrame([{"grade": int(g), "name": CLASS_NAMES[int(g)], **v} for g, v in metrics["per_class"].items()])
    per_class.to_csv(out / "per_class.csv", index=False)
    plot_confusion(np.array(metrics["confusion_matrix"]), out / "confusion_matrix.png")
    examples = gradcam_examples(str(ckpt), ok, data, gradcam_per_grade) if gradcam_per_grade > 0 else []
    meta = read_meta(ckpt)
    write_report(out / "report.html", metrics, per_class, examples, ckpt, meta, split, tta,
                 n_errors=int((preds.status == "error").sum()))
    return metrics


def write_report(path: Path, metrics: dict, per_class: pd.DataFrame, examples, ckpt: Path, meta: dict, split: str,
                 tta: bool, n_errors: int) -> None:
    cm_b64 = base64.b64encode((path.parent / "confusion_matrix.png").read_bytes()).decode()
    summary = "".join(f"<tr><th>{k}</th><td>{metrics[k]:.4f}</td></tr>" for k in
                      ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "qwk", "mae"))
    cam_html = ""
    for g in range(5):
        figs = [f"<figure><img src='data:image/png;base64,{b}'><figcaption>{html.escape(c)}</figcaption></figure>"
                for grade, c, b in examples if grade == g]
        if figs:
            cam_html += f"<h3>KL{g}</h3>" + "".join(figs)
    model = meta["model"]
    doc = f"""<html><head><meta charset="utf-8"><title>koa-ray evaluation</title><style>
body{{font-family:sans-serif;max-width:1100px;margin:auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} figure{{display:inline-block;margin:4px}}
img{{max-width:100%}} figure img{{width:180px}} figcaption{{font-size:11px}}</style></head><body>
<h1>Evaluation: {html.escape(ckpt.parent.name)}/{html.escape(ckpt.name)}</h1>
<p>split <b>{html.escape(split)}</b>, n = {metrics['n']}{' (flip TTA)' if tta else ''}; unreadable inputs: {n_errors};
model {html.escape(model['arch'])} + {html.escape(model['attention'])}, input {meta['preprocess']['input_size']} px,
epoch {meta.get('epoch')}</p>
<table>{summary}</table>
<h2>Confusion matrix</h2><img src="data:image/png;base64,{cm_b64}">
<h2>Per grade</h2>{per_class.to_html(index=False, float_format=lambda v: f'{v:.3f}')}
<h2>Grad-CAM examples (by true grade)</h2>{cam_html or '<p>none</p>'}
</body></html>"""
    path.write_text(doc)
