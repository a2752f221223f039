"""``koa roi``: knee-joint boxes for a list of image files (one row per detected knee)."""

from __future__ import annotations

import pandas as pd

from koa_ray.data.decode import DecodeError, read_image
from koa_ray.data.ingest import IngestConfig, expand_inputs, parse_patient_side
from koa_ray.data.roi import RoiConfig, detect_knees

BOX_COLUMNS = ["path", "x0", "y0", "x1", "y1", "side", "score", "roi_fallback"]


def locate_knees(inputs: list[str], cfg: RoiConfig = RoiConfig(),
                 ingest: IngestConfig = IngestConfig()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(boxes, errors)``: boxes in original-image pixels (x1/y1 exclusive); errors as ``path,reason``."""
    rows, errors = [], []
    for path in expand_inputs(inputs):
        try:
            img = read_image(path)
        except DecodeError as e:
            errors.append({"path": path, "reason": e.reason})
            continue
        _, side = parse_patient_side(path, ingest.patient_regex)
        for b in detect_knees(img, cfg, side_hint=side or None):
            rows.append({"path": path, "x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1, "side": b.side,
                         "score": round(float(b.score), 4), "roi_fallback": bool(b.fallback)})
    return pd.DataFrame(rows, columns=BOX_COLUMNS), pd.DataFrame(errors, columns=["path", "reason"])
