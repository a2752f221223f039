"""The one-page HTML report of ``koa evaluate``: presentation only.

:func:`write_report` renders the metrics, per-grade table, plots and example tiles that
:mod:`koa_ray.infer.evaluate` computed into a self-contained ``report.html`` (images inlined as base64 PNGs). Nothing
here runs the model.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd


def png_b64(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def upscale_gray(gray: np.ndarray, width: int = 256) -> np.ndarray:
    import cv2

    h, w = gray.shape[:2]
    if w >= width:
        return gray
    return cv2.resize(gray, (width, int(round(h * width / w))), interpolation=cv2.INTER_NEAREST)


def _tiles(items: list[dict], empty: str) -> str:
    """Figures grouped by true grade: the image, the whole film with its knee box below, one caption."""
    out = ""
    for g in range(5):
        figs = []
        for it in items:
            if it["grade"] != g:
                continue
            film = (f"<img class='film' src='data:image/png;base64,{it['film']}' alt='knee box on the whole image'>"
                    if it.get("film") else "")
            figs.append(f"<figure><img src='data:image/png;base64,{it['png']}' alt='{html.escape(it['caption'])}'>"
                        f"{film}<figcaption>{html.escape(it['caption'])}</figcaption></figure>")
        if figs:
            out += f"<h3>True grade KL{g}</h3><div class='tiles'>" + "".join(figs) + "</div>"
    return out or f"<p>{empty}</p>"


def write_report(path: Path, metrics: dict, per_class: pd.DataFrame, examples, ckpt: Path, meta: dict, split: str,
                 tta: str, n_errors: int, cal: dict | None = None, gallery: list[dict] | None = None) -> None:
    cm_b64 = base64.b64encode((path.parent / "confusion_matrix.png").read_bytes()).decode()
    rel = path.parent / "reliability.png"
    rel_html = (f"<p>Expected calibration error <b>{cal['ece']:.3f}</b> (maximum {cal['mce']:.3f}, 10 bins, top "
                "label; Guo et al. 2017). Where a bin's red outline (mean confidence) stands above its blue bar (accuracy), the "
                "model is more confident than it is right; below, less."
                f"</p><img class='plot' src='data:image/png;base64,{base64.b64encode(rel.read_bytes()).decode()}'>"
                if cal is not None and rel.is_file() else "<p>not computed</p>")
    rows = [(k, metrics[k]) for k in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1",
                                      "qwk", "mae")]
    if cal is not None:
        rows.append(("ece", cal["ece"]))
    summary = "".join(f"<tr><th>{k}</th><td>{v:.4f}</td></tr>" for k, v in rows)
    model = meta["model"]
    doc = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>koa-ray evaluation</title><style>
body{{font-family:system-ui,sans-serif;max-width:1150px;margin:auto;padding:0 12px;color:#222}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
.tiles{{display:flex;flex-wrap:wrap;gap:10px}} figure{{margin:0;width:220px}}
figure img{{width:220px;display:block;image-rendering:auto}} figure img.film{{margin-top:3px}}
figcaption{{font-size:13px;line-height:1.3;margin-top:3px;word-break:break-word}} img.plot{{max-width:100%}}
</style></head><body>
<h1>Evaluation: {html.escape(ckpt.parent.name)}/{html.escape(ckpt.name)}</h1>
<p>split <b>{html.escape(split)}</b>, n = {metrics['n']}{f' (TTA: {html.escape(tta)})' if tta != 'none' else ''}; unreadable inputs: {n_errors};
model {html.escape(model['arch'])} + {html.escape(model['attention'])}, input {meta['preprocess']['input_size']} px,
epoch {meta.get('epoch')}</p>
<table>{summary}</table>
<h2>Confusion matrix</h2><img class="plot" src="data:image/png;base64,{cm_b64}">
<h2>Per grade</h2>{per_class.to_html(index=False, float_format=lambda v: f'{v:.3f}')}
<h2>Calibration</h2>{rel_html}
<h2>Grad-CAM examples (by true grade)</h2>
<p>Heat: where the evidence for the predicted grade lies. Below each: the whole image with the knee box the model
was given.</p>{_tiles(examples, 'none')}
<h2>Worst errors (by true grade)</h2>
<p>Farthest from the true grade first, then most confident; the crop the model saw, and its knee box.</p>
{_tiles(gallery or [], 'no misgraded knee')}
</body></html>"""
    path.write_text(doc)
