"""``koa prepare``: image files → decoded, ROI-cropped, resized knees in Parquet, with Ray Data.

The deterministic part of the input pipeline runs once here and is materialized; random augmentation happens later,
in the training stream. Every input file is accounted for: each produces one row per detected knee in
``OUT/{split}/*.parquet`` or one row in ``OUT/errors.csv``; ``manifest.json`` holds the counts and settings and is
written last, so its presence marks a complete output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from koa_ray import __version__
from koa_ray.data.decode import DecodeError, read_image
from koa_ray.data.ingest import IngestConfig, discover
from koa_ray.data.roi import RoiConfig, crop_knee, detect_knees

RECORD_COLUMNS = ["path", "knee", "label", "split", "patient_id", "side", "image", "size", "x0", "y0", "x1", "y1",
                  "roi_score", "roi_fallback", "roi_implant", "status", "error"]
MANIFEST = "manifest.json"
ERRORS = "errors.csv"


@dataclass(frozen=True)
class PrepConfig:
    """Deterministic preprocessing, stored in the manifest and in every checkpoint.

    Args:
        image_size: side of the square knee crop written to Parquet.
        roi: knee-joint ROI settings; ``roi.enabled=False`` resizes the whole image (for inputs that are already
            knee crops) and still mirrors left knees when ``roi.mirror_left``.
        min_side: inputs smaller than this (px) are rejected as errors.
    """

    image_size: int = 224
    roi: RoiConfig = field(default_factory=RoiConfig)
    min_side: int = 32

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size}: must be >= 32")
        if self.min_side < 1:
            raise ValueError(f"min_side={self.min_side}: must be >= 1")

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "min_side": self.min_side, "roi": asdict(self.roi)}

    @classmethod
    def from_dict(cls, d: dict) -> "PrepConfig":
        return cls(image_size=int(d["image_size"]), min_side=int(d.get("min_side", 32)), roi=RoiConfig(**d["roi"]))


def knee_crops(img: np.ndarray, cfg: PrepConfig, side_hint: str = "") -> list[tuple[np.ndarray, object]]:
    """ROI-detect and crop every knee in a decoded image → ``[(crop uint8 SxS, KneeBox), ...]``."""
    from koa_ray.data.roi import KneeBox

    if cfg.roi.enabled:
        boxes = detect_knees(img, cfg.roi, side_hint=side_hint or None)
        return [(crop_knee(img, b, cfg.image_size, mirror_left=cfg.roi.mirror_left), b) for b in boxes]
    # no ROI (inputs that are already knee crops, e.g. the Chen 2018 / OAI set): the whole image, resized, with
    # left knees still mirrored to the canonical orientation so that training and inference agree
    h, w = img.shape
    box = KneeBox(0, 0, w, h, side_hint or "U", 1.0, False)
    return [(crop_knee(img, box, cfg.image_size, mirror_left=cfg.roi.mirror_left), box)]


def process_file(row: dict, cfg: PrepConfig) -> list[dict]:
    """One input row → one output record per knee, or a single ``status=error`` record with the reason."""
    base = {"path": str(row["path"]), "label": int(row["label"]), "split": str(row["split"]),
            "patient_id": str(row["patient_id"]), "side": str(row["side"])}
    try:
        img = read_image(base["path"], min_side=cfg.min_side)
        crops = knee_crops(img, cfg, side_hint=base["side"])
    except DecodeError as e:
        return [{**base, "knee": 0, "image": b"", "size": 0, "x0": -1, "y0": -1, "x1": -1, "y1": -1,
                 "roi_score": 0.0, "roi_fallback": False, "roi_implant": False, "status": "error", "error": e.reason}]
    except Exception as e:  # noqa: BLE001 - any per-file failure is recorded, never allowed to drop its neighbours
        return [{**base, "knee": 0, "image": b"", "size": 0, "x0": -1, "y0": -1, "x1": -1, "y1": -1,
                 "roi_score": 0.0, "roi_fallback": False, "roi_implant": False, "status": "error", "error": f"{type(e).__name__}: {e}"}]
    out = []
    for k, (crop, box) in enumerate(crops):
        out.append({**base, "knee": k, "side": box.side if box.side in ("L", "R") else base["side"],
                    "image": np.ascontiguousarray(crop, np.uint8).tobytes(), "size": int(crop.shape[0]),
                    "x0": int(box.x0), "y0": int(box.y0), "x1": int(box.x1), "y1": int(box.y1),
                    "roi_score": float(box.score), "roi_fallback": bool(box.fallback),
                    "roi_implant": bool(box.implant), "status": "ok", "error": ""})
    return out


def process_batch(batch: pd.DataFrame, cfg: PrepConfig) -> pd.DataFrame:
    """Ray Data ``map_batches`` body: per-file isolation inside the batch, so one bad file never fails a block."""
    records = [r for row in batch.to_dict("records") for r in process_file(row, cfg)]
    return pd.DataFrame.from_records(records, columns=RECORD_COLUMNS)


# ------------------------------------------------------------------------------------------------------ driver
def side_source(inputs: pd.DataFrame, ingest: IngestConfig) -> dict:
    """How each knee's side (which decides mirroring) was found; recorded in the manifest and every checkpoint, so
    inference finds it the same way. ``from``: ``filename`` (``patient_regex`` on the stem) or ``manifest``."""
    src = "manifest" if inputs.attrs.get("side_from_manifest") else "filename"
    return {"from": src, "patient_regex": ingest.patient_regex}


def fingerprint(df: pd.DataFrame, cfg: PrepConfig, extra: dict | None = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": cfg.to_dict(), "version": __version__, "extra": extra or {}},
                        sort_keys=True).encode())
    for path, label, split in zip(df["path"], df["label"], df["split"]):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{path}|{label}|{split}|{stamp}\n".encode())
    return h.hexdigest()[:16]


def _summarise(meta: pd.DataFrame, inputs: pd.DataFrame, out: Path, source: str, cfg: PrepConfig, fp: str,
               seconds: float, mode: str, side: dict) -> dict:
    ok = meta[meta["status"] == "ok"]
    errors = meta[meta["status"] == "error"]
    counts = {s: {str(g): int(((ok["split"] == s) & (ok["label"] == g)).sum()) for g in sorted(ok["label"].unique())}
              for s in sorted(ok["split"].unique())}
    n_files_ok = ok["path"].nunique()
    if n_files_ok + len(errors) != len(inputs):
        raise RuntimeError(f"accounting error: {len(inputs)} inputs != {n_files_ok} ok + {len(errors)} errors")
    return {
        "source": str(source), "out": str(out), "package_version": __version__, "fingerprint": fp, "mode": mode,
        "n_inputs": int(len(inputs)), "n_ok_files": int(n_files_ok), "n_knees": int(len(ok)),
        "n_errors": int(len(errors)), "n_roi_fallback": int(ok["roi_fallback"].sum()),
        "n_roi_implant": int(ok["roi_implant"].sum()),
        "counts": counts, "splits": sorted(counts), "image_size": cfg.image_size,
        "prep": {**cfg.to_dict(), "side": side},
        "duration_s": round(seconds, 2), "images_per_s": round(len(inputs) / max(seconds, 1e-9), 2),
    }


def load_manifest(prep_dir: str | Path) -> dict:
    p = Path(prep_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{prep_dir} is not a prepared dataset (no {MANIFEST}); run `koa prepare` first")
    return json.loads(p.read_text())


def prepare(source: str | list[str], out: str | Path, cfg: PrepConfig = PrepConfig(),
            ingest: IngestConfig = IngestConfig(), *, local: bool = False, force: bool = False,
            address: str | None = None, num_cpus: int | None = None, batch_size: int = 32,
            progress: bool = True) -> dict:
    """Preprocess ``source`` into ``out`` and return the manifest dict.

    Reuses an existing complete output with the same inputs and settings unless ``force``.
    """
    out = Path(out)
    inputs = discover(source, ingest)
    if inputs.empty:
        raise ValueError(f"no input files found under {source}")
    side = side_source(inputs, ingest)
    fp = fingerprint(inputs, cfg, side)
    if not force and (out / MANIFEST).is_file():
        manifest = load_manifest(out)
        if manifest.get("fingerprint") == fp:
            manifest["reused"] = True
            return manifest
    t0 = time.perf_counter()
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if local:
        meta = _prepare_local(inputs, staging, cfg, progress)
    else:
        meta = _prepare_ray(inputs, staging, cfg, address, num_cpus, batch_size, progress)
    meta[meta["status"] == "error"][["path", "label", "split", "error"]].rename(columns={"error": "reason"}).to_csv(
        staging / ERRORS, index=False)
    manifest = _summarise(meta, inputs, out, str(source), cfg, fp, time.perf_counter() - t0,
                          "local" if local else "ray", side)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    manifest["reused"] = False
    return manifest


def _prepare_local(inputs: pd.DataFrame, staging: Path, cfg: PrepConfig, progress: bool) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for i, row in enumerate(inputs.to_dict("records")):
        records.extend(process_file(row, cfg))
        if progress and (i + 1) % 500 == 0:
            print(f"prepare --local: {i + 1}/{len(inputs)} files", flush=True)
    table = pd.DataFrame.from_records(records, columns=RECORD_COLUMNS)
    for split, part in table[table["status"] == "ok"].groupby("split"):
        (staging / split).mkdir()
        pq.write_table(pa.Table.from_pandas(part.drop(columns=["status", "error"]), preserve_index=False),
                       staging / split / "part-00000.parquet")
    return table.drop(columns=["image"])


def write_parts(records: pd.DataFrame, staging: str | Path) -> None:
    """Write the ``ok`` rows of ``records`` as one Parquet file per split under ``staging/<split>/``, named by a hash
    of its rows' (path, knee) keys (stable across runs, so the prepared row order is reproducible), via a temporary name
    and an atomic rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok = records[records["status"] == "ok"]
    for split, part in ok.groupby("split", sort=True):
        d = Path(staging) / str(split)
        d.mkdir(parents=True, exist_ok=True)
        keys = "\n".join(f"{p}#{k}" for p, k in zip(part["path"], part["knee"]))
        name = "part-" + hashlib.sha1(keys.encode()).hexdigest()[:16]
        tmp = d / f".{name}.tmp"
        pq.write_table(pa.Table.from_pandas(part.drop(columns=["status", "error"]), preserve_index=False), tmp)
        os.replace(tmp, d / f"{name}.parquet")


def process_and_write(batch: pd.DataFrame, cfg: PrepConfig, staging: str) -> pd.DataFrame:
    """Ray Data body of ``koa prepare``: process a block of files, write its crops to Parquet from the worker, and
    return only the per-knee metadata (no pixels), so images never travel through the object store or the driver."""
    records = process_batch(batch, cfg)
    write_parts(records, staging)
    return records.drop(columns=["image"])


def rows_per_block(n: int, cpus: float, lo: int = 16, hi: int = 256) -> int:
    """Input rows per Ray Data block: about sixteen blocks per CPU (load balance: the last wave of tasks is short)
    within ``[lo, hi]`` (per-task overhead below, memory and file size above)."""
    return int(min(max(hi, lo), max(lo, -(-n // max(1, int(round(cpus * 16)))))))


def _prepare_ray(inputs: pd.DataFrame, staging: Path, cfg: PrepConfig, address, num_cpus, batch_size,
                 progress: bool) -> pd.DataFrame:
    """One pass: each task decodes, crops and resizes a block of files and writes its Parquet parts; the driver
    collects only the metadata. ``batch_size`` is the smallest block (input rows per task)."""
    import sys

    import ray

    from koa_ray.runtime import cluster_cpus, frame_blocks, init_ray

    init_ray(address, num_cpus=num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = progress and sys.stdout.isatty()
    rows = rows_per_block(len(inputs), cluster_cpus(), lo=batch_size)
    ds = ray.data.from_pandas(frame_blocks(inputs, max_rows=rows, max_blocks=10_000))
    ds = ds.map_batches(process_and_write, fn_kwargs={"cfg": cfg, "staging": str(staging)}, batch_format="pandas",
                        batch_size=None)
    return ds.to_pandas()
