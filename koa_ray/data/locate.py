"""``koa roi``: knee-joint boxes for a list of image files (one row per detected knee)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from koa_ray.data.decode import DecodeError, read_image
from koa_ray.data.ingest import IngestConfig, expand_inputs, parse_patient_side
from koa_ray.data.roi import RoiConfig, detect_knees, draw_boxes

BOX_COLUMNS = ["path", "x0", "y0", "x1", "y1", "side", "score", "roi_fallback", "implant"]


def locate_knees(inputs: list[str], cfg: RoiConfig = RoiConfig(), ingest: IngestConfig = IngestConfig(),
                 draw: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(boxes, errors)``: boxes in original-image pixels (x1/y1 exclusive); errors as ``path,reason``.

    ``draw``: folder that receives, per readable image, ``STEM.png`` with its boxes, sides and scores drawn
    (:func:`~koa_ray.data.roi.draw_boxes`; a repeated stem gets ``-2``, ``-3``...), to check a folder by eye."""
    import cv2

    rows, errors = [], []
    draw_dir, used = (Path(draw), set()) if draw is not None else (None, None)
    if draw_dir is not None:
        draw_dir.mkdir(parents=True, exist_ok=True)
    for path in expand_inputs(inputs):
        try:
            img = read_image(path)
        except DecodeError as e:
            errors.append({"path": path, "reason": e.reason})
            continue
        _, side = parse_patient_side(path, ingest.patient_regex)
        boxes = detect_knees(img, cfg, side_hint=side or None)
        for b in boxes:
            rows.append({"path": path, "x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1, "side": b.side,
                         "score": round(float(b.score), 4), "roi_fallback": bool(b.fallback),
                         "implant": bool(b.implant)})
        if draw_dir is not None:
            stem, n = Path(path).stem, 1
            while (name := stem if n == 1 else f"{stem}-{n}") in used:
                n += 1
            used.add(name)
            if not cv2.imwrite(str(draw_dir / f"{name}.png"), draw_boxes(img, boxes)):
                errors.append({"path": path, "reason": f"could not write {draw_dir / (name + '.png')}"})
    return pd.DataFrame(rows, columns=BOX_COLUMNS), pd.DataFrame(errors, columns=["path", "reason"])
