"""``koa evaluate``: metrics, plots and a one-page HTML report for a checkpoint on a labelled split.

``data`` may be a prepared dataset (``koa prepare`` output: the stored crops are used) or a raw labelled folder /
manifest (decoded and ROI-cropped with the checkpoint's recorded preprocessing). Predictions run on a Ray Data actor
pool; metrics are pure maths from :mod:`koa_ray.metrics`. The report's examples (Grad-CAM overlays, worst errors)
are selected and computed here; the page itself is rendered by :mod:`koa_ray.infer.report`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from koa_ray import CLASS_NAMES
from koa_ray.infer.report import png_b64, upscale_gray, write_report
from koa_ray.metrics import calibration, classification_metrics
from koa_ray.plots import plot_confusion, plot_reliability

PRED_COLUMNS = ["path", "label", "status", "error", "grade", "p0", "p1", "p2", "p3", "p4", "expected_grade", "side"]


class EvalActor:
    """Ray Data actor for evaluation: prepared crops (``image`` column) or raw files (``path`` column)."""

    def __init__(self, checkpoint: str, tta: str | None = None, use_gpu: bool = False, threads: int = 1):
        from koa_ray.infer.predictor import Predictor
        from koa_ray.runtime import set_actor_threads

        set_actor_threads(threads)
        self.p = Predictor(checkpoint, device="cuda" if use_gpu else "cpu")
        self.tta = tta

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if "image" in batch:
            from koa_ray.data.decode import decode_image_column

            crops = decode_image_column(batch["image"].tolist(), batch["size"].to_numpy())
            probs = self.p.predict(crops, tta=self.tta)
            return _rows(batch["path"], batch["label"], probs, batch.get("side", pd.Series([""] * len(batch))),
                         self.p.grades(probs))
        from koa_ray.infer.score import score_rows

        scored = score_rows(self.p, batch["path"].tolist(), self.tta, batch.get("side"))
        labels = dict(zip(batch["path"], batch["label"]))
        scored["label"] = scored["path"].map(labels).astype(int)
        return scored[PRED_COLUMNS]


def _rows(paths, labels, probs, sides, grades) -> pd.DataFrame:
    df = pd.DataFrame({"path": list(paths), "label": np.asarray(labels, int), "status": "ok", "error": "",
                       "grade": np.asarray(grades, int)})
    for g in range(5):
        df[f"p{g}"] = probs[:, g]
    df["expected_grade"] = probs @ np.arange(5)
    df["side"] = list(sides)
    return df[PRED_COLUMNS]


def predict_split(checkpoint: str, data: str | Path, split: str, tta: str | None, batch_size: int, concurrency: int,
                  use_gpu: bool | None, address: str | None) -> pd.DataFrame:
    import ray

    from koa_ray.checkpoint import resolve_checkpoint
    from koa_ray.data.ingest import discover
    from koa_ray.runtime import actor_threads, cluster_gpus, frame_blocks, init_ray

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
    ds = ds.map_batches(EvalActor, fn_constructor_kwargs={"checkpoint": ckpt, "tta": tta, "use_gpu": gpu,
                                                          "threads": actor_threads(concurrency)},
                        batch_size=batch_size, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=concurrency),
                        num_gpus=1 if gpu else 0, num_cpus=0.5 if not gpu else 1)
    return ds.to_pandas().sort_values("path", kind="stable").reset_index(drop=True)


def _examples_input(p, picks: pd.DataFrame, data: Path, split: str) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """The crops the model saw for ``picks`` and, for each, the whole image with its knee box drawn (``None`` when
    the original file is gone): from the prepared Parquet of ``split`` (crop and box as stored; only the rows of
    ``picks`` are read) or from the raw files."""
    from koa_ray.data.decode import decode_image_column
    from koa_ray.data.roi import KneeBox, draw_boxes

    films: list[np.ndarray | None] = []
    if (data / "manifest.json").is_file():
        import pyarrow.parquet as pq

        cols = ["path", "image", "size", "x0", "y0", "x1", "y1", "roi_score", "roi_fallback", "side"]
        table = pq.read_table(str(data / split), columns=cols,
                              filters=[("path", "in", sorted(set(picks["path"])))]).to_pandas()
        table["side"] = table["side"].fillna("").astype(str)
        # a bilateral film has one row per knee: the (path, side) pair picks this knee's crop and box
        keys = list(zip(picks["path"], picks["side"].fillna("").astype(str)))
        table = table.drop_duplicates(["path", "side"]).set_index(["path", "side"]).loc[keys].reset_index()
        crops = decode_image_column(table["image"].tolist(), table["size"].to_numpy())
        for r in table.itertuples():
            path = r.path
            try:
                img = p.read(str(path))
            except Exception:  # noqa: BLE001 - the original file may have moved since prepare; the crop is enough
                films.append(None)
                continue
            box = KneeBox(int(r.x0), int(r.y0), int(r.x1), int(r.y1), str(r.side or "U"), float(r.roi_score),
                          bool(r.roi_fallback))
            films.append(draw_boxes(img, [box], max_side=360)[..., ::-1].copy())
        return crops, films
    crops = []
    for path, side in zip(picks["path"], picks["side"].fillna("").astype(str)):
        img = p.read(str(path))
        ks = p.knees_from_image(img, str(path))
        k = next((k for k in ks if k.side == side), ks[0])  # this knee of a bilateral film
        crops.append(k.crop)
        boxes = [KneeBox(k.x0, k.y0, k.x1, k.y1, k.side or "U", k.roi_score, bool(k.roi_fallback),
                         implant=bool(k.implant))]
        films.append(draw_boxes(img, boxes, max_side=360)[..., ::-1].copy())
    return np.stack(crops), films


def gradcam_examples(p, preds: pd.DataFrame, data: Path, split: str, per_grade: int,
                     tta: str | None = None) -> list[dict]:
    """A few Grad-CAM overlays per true grade, computed in-process, each with the whole image and its knee box:
    ``[{"grade", "caption", "png", "film"}]`` (base64 PNGs; ``film`` may be ``None``). The predicted grade in a
    caption is the one ``predictions.csv`` holds: the checkpoint's decoding over the ``tta`` views. ``p``: the
    checkpoint's :class:`~koa_ray.infer.predictor.Predictor`."""
    from koa_ray.infer.gradcam import compute_cams, overlay

    picks = preds[preds.status == "ok"].groupby("label", group_keys=False).head(per_grade)
    if picks.empty:
        return []
    crops, films = _examples_input(p, picks, data, split)
    probs = p.predict(crops, tta=tta)
    grades = p.grades(probs)
    maps = compute_cams(p.model, p.inputs(crops), list(grades))
    out = []
    for row, crop, cam, pr, pred, film in zip(picks.itertuples(), crops, maps, probs, grades, films):
        pred = int(pred)
        out.append({"grade": int(row.label), "png": png_b64(overlay(crop, cam, None)),
                    "film": png_b64(film) if film is not None else None,
                    "caption": f"true KL{row.label}, predicted KL{pred} (p {pr[pred]:.2f}) - {Path(row.path).name}"})
    return out


def error_gallery(p, preds: pd.DataFrame, data: Path, split: str, per_grade: int) -> list[dict]:
    """The worst misgradings per true grade: farthest from the true grade first, then the most confident; each with
    the crop the model saw and the whole image with its knee box. ``[{"grade", "caption", "png", "film"}]``.
    ``p``: the checkpoint's :class:`~koa_ray.infer.predictor.Predictor` (it decodes the raw files)."""
    wrong = preds[(preds.status == "ok") & (preds.grade != preds.label)].copy()
    if wrong.empty or per_grade <= 0:
        return []
    probs = wrong[[f"p{g}" for g in range(5)]].to_numpy()
    wrong["distance"] = (wrong["grade"] - wrong["label"]).abs()
    wrong["confidence"] = probs[np.arange(len(wrong)), wrong["grade"].to_numpy().astype(int)]
    picks = (wrong.sort_values(["label", "distance", "confidence", "path"], ascending=[True, False, False, True])
             .groupby("label", group_keys=False).head(per_grade))
    crops, films = _examples_input(p, picks, data, split)
    out = []
    for row, crop, film in zip(picks.itertuples(), crops, films):
        rgb = np.repeat(upscale_gray(crop)[..., None], 3, axis=2)
        out.append({"grade": int(row.label), "png": png_b64(rgb), "film": png_b64(film) if film is not None else None,
                    "caption": f"true KL{row.label}, predicted KL{int(row.grade)} (p {row.confidence:.2f}) - "
                               f"{Path(row.path).name}"})
    return out


def evaluate(checkpoint: str, data: str | Path, out: str | Path, *, split: str = "test", tta: str | None = None,
             batch_size: int = 64, concurrency: int = 1, use_gpu: bool | None = None, address: str | None = None,
             gradcam_per_grade: int = 3, errors_per_grade: int = 4) -> dict:
    """Evaluate and write ``metrics.json``, ``per_class.csv``, ``predictions.csv``, ``calibration.json``,
    ``confusion_matrix.png``, ``reliability.png`` and ``report.html`` (metrics, calibration, Grad-CAM examples and
    the worst errors per grade, each with its knee box on the whole image) to ``out``; returns the metrics dict.
    ``tta``: the test-time views to average (:mod:`koa_ray.data.tta`); ``None`` takes the checkpoint's (``tta`` in
    its ``koa.json``)."""
    from koa_ray.checkpoint import read_meta, resolve_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data)
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    tta = meta.get("tta", "none") if tta is None else tta
    preds = predict_split(str(ckpt), data, split, tta, batch_size, concurrency, use_gpu, address)
    preds.to_csv(out / "predictions.csv", index=False)
    ok = preds[preds.status == "ok"]
    if ok.empty:
        raise RuntimeError(f"no image of split {split!r} could be scored; see {out / 'predictions.csv'}")
    metrics = classification_metrics(ok["label"].to_numpy(), ok["grade"].to_numpy(), num_classes=5)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    cal = calibration(ok[[f"p{g}" for g in range(5)]].to_numpy(), ok["label"].to_numpy(), n_bins=10)
    (out / "calibration.json").write_text(json.dumps(cal, indent=2))
    per_class = pd.DataFrame([{"grade": int(g), "name": CLASS_NAMES[int(g)], **v} for g, v in metrics["per_class"].items()])
    per_class.to_csv(out / "per_class.csv", index=False)
    plot_confusion(np.array(metrics["confusion_matrix"]), out / "confusion_matrix.png")
    plot_reliability(cal, out / "reliability.png")
    examples, errors = [], []
    if gradcam_per_grade > 0 or errors_per_grade > 0:
        from koa_ray.infer.predictor import Predictor

        p = Predictor(ckpt, device="cpu")  # one in-process model for both example sets
        examples = gradcam_examples(p, ok, data, split, gradcam_per_grade, tta) if gradcam_per_grade > 0 else []
        errors = error_gallery(p, ok, data, split, errors_per_grade) if errors_per_grade > 0 else []
    write_report(out / "report.html", metrics, per_class, examples, ckpt, meta, split, tta,
                 n_errors=int((preds.status == "error").sum()), cal=cal, gallery=errors)
    return metrics
