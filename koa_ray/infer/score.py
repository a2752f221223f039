"""Batch scoring of image folders with a Ray Data actor pool (``koa score``, ``jobs/score.py``).

Each actor loads the checkpoint once and applies its recorded preprocessing. Every input file gives either one row
per detected knee (``status=ok``) or one ``status=error`` row with the reason, so the output accounts for every
input. Results are flushed to part files as they stream in and consolidated atomically (temporary file, then
rename) at the end; ``resume=True`` skips paths already present in the output or in parts left by an interrupted
run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

SCORE_COLUMNS = ["path", "status", "error", "grade", "p0", "p1", "p2", "p3", "p4", "expected_grade", "confidence",
                 "x0", "y0", "x1", "y1", "side", "roi_fallback", "implant", "model"]


def _error_row(path: str, reason: str, model: str) -> dict:
    return {"path": path, "status": "error", "error": reason, "grade": -1,
            **{f"p{k}": np.nan for k in range(5)}, "expected_grade": np.nan, "confidence": np.nan,
            "x0": -1, "y0": -1, "x1": -1, "y1": -1, "side": "", "roi_fallback": False, "implant": False,
            "model": model}


def score_rows(predictor, paths, tta: str | None = None, sides=None) -> pd.DataFrame:
    """Score a list of files with a loaded :class:`~koa_ray.infer.predictor.Predictor` (no Ray). ``sides``: optional
    'L'/'R'/'' per path (from a manifest); empty means the side is parsed from the file name. ``tta``: the
    test-time views to average (:mod:`koa_ray.data.tta`); ``None`` takes the checkpoint's."""
    from koa_ray.data.decode import DecodeError

    rows, knees = [], []
    sides = [""] * len(paths) if sides is None else list(sides)
    for path, side in zip(paths, sides):
        try:
            knees.extend(predictor.knees_from_file(str(path), side=side or None))
        except DecodeError as e:
            rows.append(_error_row(str(path), e.reason, predictor.model_id))
        except Exception as e:  # noqa: BLE001 - recorded per file; the job goes on
            rows.append(_error_row(str(path), f"{type(e).__name__}: {e}", predictor.model_id))
    if knees:
        probs = predictor.predict(np.stack([k.crop for k in knees]), tta=tta)
        for k, p, grade in zip(knees, probs, predictor.grades(probs)):
            rows.append({"path": k.path, "status": "ok", "error": "", "grade": int(grade),
                         **{f"p{g}": float(p[g]) for g in range(5)},
                         "expected_grade": float((p * np.arange(5)).sum()), "confidence": float(p.max()),
                         "x0": k.x0, "y0": k.y0, "x1": k.x1, "y1": k.y1, "side": k.side,
                         "roi_fallback": k.roi_fallback, "implant": k.implant, "model": predictor.model_id})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


class ScoreActor:
    """Ray Data actor: one model per actor, batches of paths in, score rows out."""

    def __init__(self, checkpoint: str, use_gpu: bool = False, tta: str | None = None, threads: int = 1):
        from koa_ray.infer.predictor import Predictor
        from koa_ray.runtime import set_actor_threads

        set_actor_threads(threads)
        self.predictor = Predictor(checkpoint, device="cuda" if use_gpu else "cpu")
        self.tta = tta

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return score_rows(self.predictor, batch["path"].tolist(), self.tta, batch.get("side"))


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _write_table(df: pd.DataFrame, path: Path) -> None:
    """Atomic write: a temporary file in the same folder, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def parts_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.parts")


def existing_rows(out: Path) -> pd.DataFrame:
    """Rows already written: the consolidated output, then the parts of an interrupted run, each path taken from the
    first of them that holds it (a run killed after writing the output and before removing its parts leaves both;
    a path, i.e. all of its knees' rows, is never counted twice)."""
    frames = [_read_table(out)] if out.is_file() else []
    pdir = parts_dir(out)
    if pdir.is_dir():
        frames += [pd.read_parquet(p) for p in sorted(pdir.glob("part-*.parquet"))]
    kept, seen = [], set()
    for frame in frames:
        if "implant" not in frame:  # written before the implant flag existed
            frame = frame.assign(implant=False)
        frame = frame[~frame["path"].isin(seen)]
        seen |= set(frame["path"])
        kept.append(frame)
    return pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=SCORE_COLUMNS)


def check_same_model(rows: pd.DataFrame, model: str, out: Path) -> None:
    """Refuse to resume into ``out`` when its rows come from another checkpoint than ``model``.

    Raises:
        ValueError: names the models found and the way out.
    """
    others = sorted(set(rows["model"].dropna().astype(str)) - {model}) if len(rows) else []
    if others:
        raise ValueError(f"--resume: {out} holds rows scored by {others}, not by {model}; resuming would mix two "
                         "models' grades: score into another --out, or drop --resume to start over")


def score(inputs: list[str], checkpoint: str, out: str | Path, *, batch_size: int = 32, concurrency: int = 1,
          resume: bool = False, use_gpu: bool | None = None, tta: str | None = None, address: str | None = None,
          flush_rows: int = 2000, max_files: int | None = None, threads: int | None = None) -> dict:
    """Score every file under ``inputs`` and write ``out`` (``.csv`` or ``.parquet``).

    Args:
        tta: test-time views to average, ``none`` | ``flip`` | ``shift``; ``None`` (default): the checkpoint's.
        threads: torch threads per CPU actor (default: the cluster's CPUs shared between the ``concurrency``
            actors, :func:`koa_ray.runtime.actor_threads`).
        max_files: stop after this many new files (used to simulate an interrupted job in tests).
    Returns:
        Summary: counts of inputs, rows, ok and errors, and the output path.
    """
    import ray

    from koa_ray.checkpoint import model_id, resolve_checkpoint
    from koa_ray.data.ingest import expand_inputs, input_frame
    from koa_ray.runtime import actor_threads, cluster_gpus, frame_blocks, init_ray

    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--out {out}: must end in .csv or .parquet")
    ckpt = str(resolve_checkpoint(checkpoint).resolve())
    files = expand_inputs(inputs)
    pdir = parts_dir(out)
    if resume:
        previous = existing_rows(out)
        check_same_model(previous, model_id(ckpt), out)
        done = set(previous["path"])
    else:
        done = set()
        shutil.rmtree(pdir, ignore_errors=True)
    todo = [f for f in files if f not in done]
    if max_files is not None:
        todo = todo[:max_files]
    out.parent.mkdir(parents=True, exist_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)
    if todo:
        init_ray(address)
        gpu = bool(cluster_gpus() > 0) if use_gpu is None else use_gpu
        ds = ray.data.from_pandas(frame_blocks(input_frame(todo, inputs), batch_size)).map_batches(
            ScoreActor, fn_constructor_kwargs={"checkpoint": ckpt, "use_gpu": gpu, "tta": tta,
                                               "threads": actor_threads(concurrency, threads)},
            batch_size=batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=1 if gpu else 0,
            num_cpus=0.5 if not gpu else 1)
        start = len(list(pdir.glob("part-*.parquet")))
        buf: list[pd.DataFrame] = []

        def flush(i):
            if buf:
                frame = pd.concat(buf, ignore_index=True)
                tmp = pdir / f".part-{i:05d}.tmp"
                frame.to_parquet(tmp, index=False)
                os.replace(tmp, pdir / f"part-{i:05d}.parquet")
                buf.clear()
                return i + 1
            return i

        i = start
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            buf.append(batch)
            if sum(len(b) for b in buf) >= flush_rows:
                i = flush(i)
        flush(i)
    if max_files is not None and len(todo) < len([f for f in files if f not in done]):
        # simulated interruption: leave the parts, write no consolidated output
        return {"interrupted": True, "parts": str(pdir)}
    rows = existing_rows(out) if resume else pd.concat(
        [pd.read_parquet(p) for p in sorted(pdir.glob("part-*.parquet"))] or [pd.DataFrame(columns=SCORE_COLUMNS)],
        ignore_index=True)
    rows = rows[SCORE_COLUMNS].sort_values(["path", "x0"], kind="stable").reset_index(drop=True)
    _write_table(rows, out)
    shutil.rmtree(pdir, ignore_errors=True)
    missing = set(files) - set(rows["path"])
    if missing:
        raise RuntimeError(f"{len(missing)} inputs have no output row, e.g. {sorted(missing)[:3]}")
    return {"out": str(out), "n_inputs": len(files), "n_rows": len(rows),
            "n_ok_files": int(rows.loc[rows.status == "ok", "path"].nunique()),
            "n_errors": int((rows.status == "error").sum()), "n_new_files": len(todo)}
