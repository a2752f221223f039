"""Find labelled or unlabelled radiographs and split them by patient.

Layouts understood by :func:`discover`:

* ``ROOT/{train,val,test}/{0..4}/*`` — an existing split (the layout of the Chen 2018 / OAI KL set);
* ``ROOT/{0..4}/*`` — labelled, no split: a patient-grouped, grade-stratified split is made;
* a CSV or Parquet manifest with columns ``path,label[,split][,patient_id][,side]`` (relative paths are resolved
  against the manifest's folder);
* any other folder, file or glob — unlabelled images (``label = -1``), e.g. for scoring.

Patient id and knee side are parsed from OAI-style names (``9003175L.jpg`` → patient ``9003175``, side ``L``) with a
configurable regular expression. Image-level splits leak one patient's two knees (and follow-up visits) across
splits — a known failure in published KOA work — so every split made here is by patient.
"""

from __future__ import annotations

import glob as _glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from koa_ray import GRADES
from koa_ray.data.decode import is_candidate_file

SPLITS = ("train", "val", "test")
UNLABELED = -1
SIDECAR_SUFFIXES = (".csv", ".json", ".parquet", ".md", ".txt", ".html", ".yaml", ".yml", ".npy", ".log", ".py")
COLUMNS = ["path", "label", "split", "patient_id", "side"]


@dataclass(frozen=True)
class IngestConfig:
    """How inputs are discovered and split.

    Args:
        patient_regex: applied with ``re.search`` to the file stem; group ``patient`` gives the patient id and the
            optional group ``side`` (``L``/``R``) the knee. Files that do not match are their own patient.
        split_fractions: train/val/test fractions used when the input carries no split.
        seed: seed of the patient split.
    """

    patient_regex: str = r"^(?P<patient>\d+)(?P<side>[LR])?(?:[_-].*)?$"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0

    def __post_init__(self):
        try:
            rx = re.compile(self.patient_regex)
        except re.error as e:
            raise ValueError(f"patient_regex={self.patient_regex!r} is not a valid regular expression: {e}") from e
        if "patient" not in rx.groupindex:
            raise ValueError(f"patient_regex={self.patient_regex!r} must define a (?P<patient>...) group")
        fr = tuple(float(f) for f in self.split_fractions)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions={self.split_fractions!r} must be three non-negative numbers summing to 1")
        object.__setattr__(self, "split_fractions", fr)


def parse_patient_side(path: str, regex: str = IngestConfig.patient_regex) -> tuple[str, str]:
    """Return ``(patient_id, side)`` from a file name; unknown parts come back as ``""``."""
    m = re.search(regex, Path(path).stem)
    if not m:
        return "", ""
    side = (m.groupdict().get("side") or "").upper()
    return m.group("patient"), side if side in ("L", "R") else ""


def printable_path(path: str) -> str:
    """``path`` itself, or, when its name is not valid UTF-8 (the OS hands such names over with lone surrogates,
    which no CSV or Parquet file can hold), its escaped form (``bad\\xffname.png``). The escaped form names the
    file in error lists; reading it fails with a reason that says why (:func:`koa_ray.data.decode.read_bytes`)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _files_under(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(printable_path(os.path.join(root, f)) for f in sorted(files) if not f.startswith("."))
    return out


def _grade_dirs(folder: Path) -> dict[int, Path]:
    return {g: folder / str(g) for g in GRADES if (folder / str(g)).is_dir()}


def _labelled_rows(folder: Path, split: str) -> list[dict]:
    rows = []
    for grade, gdir in _grade_dirs(folder).items():
        for f in _files_under(gdir):
            if Path(f).suffix.lower() in SIDECAR_SUFFIXES:
                continue
            rows.append({"path": f, "label": grade, "split": split})
    return rows


def _read_manifest(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    missing = {"path"} - set(df.columns)
    if missing:
        raise ValueError(f"manifest {path}: missing required column(s) {sorted(missing)}; has {list(df.columns)}")
    unknown = set(df.columns) - set(COLUMNS)
    if unknown:
        raise ValueError(f"manifest {path}: unknown column(s) {sorted(unknown)}; supported: {COLUMNS}")
    base = path.parent
    df = df.copy()
    df["path"] = [str(p) if os.path.isabs(str(p)) else str(base / str(p)) for p in df["path"]]
    if "label" not in df:
        df["label"] = UNLABELED
    bad = ~df["label"].isin(list(GRADES) + [UNLABELED])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"manifest {path}: row {i + 2} has label {df['label'].iloc[i]}; expected one of {GRADES}")
    if "split" in df:
        bad = ~df["split"].isin(SPLITS)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"manifest {path}: row {i + 2} has split '{df['split'].iloc[i]}'; expected {SPLITS}")
    return df


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Expand folders (recursively), globs and files into a sorted, de-duplicated list of candidate image files.

    Paths are made absolute here, in the driver: the Ray workers that read them may run in another working
    directory (always so under ``ray job submit``). A path that does not exist is kept (absolute), so the job reports
    it as unreadable, naming where it looked, instead of dropping it. Relative paths inside a manifest are resolved
    against the manifest's folder.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    out: list[str] = []
    for item in inputs:
        item = os.path.abspath(item)
        p = Path(item)
        if p.is_dir():
            out.extend(f for f in _files_under(p) if Path(f).suffix.lower() not in SIDECAR_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            out.extend(sorted(printable_path(f) for f in _glob.glob(item, recursive=True) if os.path.isfile(f)))
        elif p.suffix.lower() in (".csv", ".parquet") and p.is_file():
            out.extend(_read_manifest(p)["path"].tolist())
        else:
            out.append(printable_path(item))
    seen, unique = set(), []
    for f in out:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique


def manifest_sides(inputs: list[str] | str) -> dict[str, str]:
    """Side ('L'/'R') per path from the ``side`` column of any CSV/Parquet manifest among ``inputs`` (paths as
    :func:`expand_inputs` gives them). Inference passes these to the predictor so that a knee whose side came from a
    manifest at training time is mirrored the same way when scored; files without one fall back to the file name."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    sides: dict[str, str] = {}
    for item in inputs:
        p = Path(os.path.abspath(item))
        if p.suffix.lower() in (".csv", ".parquet") and p.is_file():
            df = _read_manifest(p)
            if "side" in df:
                for path, side in zip(df["path"], df["side"].fillna("").astype(str).str.upper()):
                    if side in ("L", "R"):
                        sides[path] = side
    return sides


def input_frame(files: list[str], inputs: list[str] | str) -> pd.DataFrame:
    """``path, side`` rows for ``files`` (from :func:`expand_inputs`), the side from a manifest among ``inputs``
    (:func:`manifest_sides`) or '' (parsed from the file name downstream): what score and gradcam jobs map over."""
    sides = manifest_sides(inputs)
    return pd.DataFrame({"path": files, "side": [sides.get(f, "") for f in files]})


def patient_split(df: pd.DataFrame, cfg: IngestConfig = IngestConfig()) -> pd.Series:
    """Assign ``train/val/test`` per patient, stratified by each patient's highest grade.

    All images of a patient land in one split. Within each stratum, patients are shuffled with ``cfg.seed`` and
    cut by cumulative fraction, so each split gets close to the requested share of every grade.
    """
    patients = df["patient_id"].where(df["patient_id"] != "", "__img__" + df["path"])
    stratum = df.groupby(patients)["label"].max()
    rng = np.random.default_rng(cfg.seed)
    assign: dict[str, str] = {}
    cuts = np.cumsum(cfg.split_fractions)
    for _, group in stratum.groupby(stratum):
        ids = np.array(sorted(group.index))
        rng.shuffle(ids)
        n = len(ids)
        # position of each patient's centre in [0, 1) → split whose cumulative fraction covers it
        pos = (np.arange(n) + 0.5) / n
        for pid, p in zip(ids, pos):
            assign[pid] = SPLITS[int(np.searchsorted(cuts, p, side="right").clip(0, 2))]
    return patients.map(assign).rename("split")


WHOLE = "all"  # the split of every row when ``discover(..., make_split=False)`` finds no split in the input


def discover(source: str | os.PathLike | list[str], cfg: IngestConfig = IngestConfig(), *,
             make_split: bool = True) -> pd.DataFrame:
    """Return one row per input file with columns ``path, label, split, patient_id, side``.

    Labelled input without a split gets a patient-level split (``make_split=True``, for ``koa prepare``) or the
    split ``"all"`` on every row (``make_split=False``: an external test set to be evaluated whole).

    Raises:
        FileNotFoundError: a single source path that does not exist.
        ValueError: a malformed manifest.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if len(sources) == 1 and not any(ch in str(sources[0]) for ch in "*?["):
        root = Path(os.path.abspath(sources[0]))  # absolute: read by Ray workers, maybe in another cwd
        if not root.exists():
            raise FileNotFoundError(f"input {root} does not exist")
        split_dirs = [s for s in SPLITS if (root / s).is_dir() and _grade_dirs(root / s)]
        if root.is_file() and root.suffix.lower() in (".csv", ".parquet"):
            df = _read_manifest(root)
        elif split_dirs:
            df = pd.DataFrame([r for s in split_dirs for r in _labelled_rows(root / s, s)], columns=["path", "label", "split"])
        elif _grade_dirs(root):
            df = pd.DataFrame(_labelled_rows(root, ""), columns=["path", "label", "split"]).drop(columns="split")
        else:
            df = pd.DataFrame({"path": expand_inputs(sources), "label": UNLABELED})
    else:
        df = pd.DataFrame({"path": expand_inputs(sources), "label": UNLABELED})

    df = df.reset_index(drop=True)
    parsed = [parse_patient_side(p, cfg.patient_regex) for p in df["path"]]
    if "patient_id" not in df:
        df["patient_id"] = [pid for pid, _ in parsed]
    side_from_manifest = "side" in df
    if not side_from_manifest:
        df["side"] = [side for _, side in parsed]
    df["patient_id"] = df["patient_id"].fillna("").astype(str)
    df["side"] = df["side"].fillna("").astype(str).str.upper()
    df["label"] = df["label"].astype(int)
    if "split" not in df:
        if (df["label"] == UNLABELED).all():
            df["split"] = "unlabeled"
        elif not make_split:
            df["split"] = WHOLE
        else:
            df["split"] = patient_split(df, cfg).to_numpy()
    out = df[COLUMNS].copy()
    out.attrs["side_from_manifest"] = side_from_manifest
    return out
