"""Hostile inputs through the commands that read images: every input is accounted for (a row or an error that
names it and says why), the job finishes, and no good file is lost."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

try:
    from test_decode import _png_header_only
except ImportError:  # tests/ imported as a package
    from tests.test_decode import _png_header_only

BAD = {  # file name -> what the error must say
    "random.png": "not an image",
    "trunc.png": "truncated",
    "trunc.jpg": "truncated",
    "bomb.png": "decompression bomb",
    "huge.png": "file too large",
    "one.png": "too small",
    "loop.png": "Too many levels of symbolic links",
    "bad\\xffname.png": "not valid UTF-8",
}


def make_hostile(folder) -> list[str]:
    """The hostile files beside good ones in ``folder``; returns the names of the good ones."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    good = np.clip(60 + 120 * (np.abs(yy - 48) > 4) + rng.normal(0, 10, (96, 96)), 0, 255).astype(np.uint8)
    cv2.imwrite(str(folder / "good_a.png"), good)
    cv2.imwrite(str(folder / "good_b.jpg"), good)
    (folder / "random.png").write_bytes(rng.bytes(5000))
    data = (folder / "good_a.png").read_bytes()
    (folder / "trunc.png").write_bytes(data[: len(data) // 2])
    data = (folder / "good_b.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (folder / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    with open(folder / "huge.png", "wb") as f:
        f.truncate(2 * 1024**3)  # sparse: takes no disk, and is never read
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(folder / "one.png")
    a = rng.normal(20000, 2000, (96, 96)).clip(14000, 26000).astype(np.uint16)
    a[5, 5] = 65535
    Image.fromarray(a).save(folder / "outlier16.tif")
    os.symlink("loop.png", folder / "loop.png")
    with open(os.fsencode(str(folder)) + b"/bad\xffname.png", "wb") as f:
        f.write((folder / "good_a.png").read_bytes())
    long_name = "L" * 250 + ".png"
    (folder / long_name).write_bytes((folder / "good_a.png").read_bytes())
    return ["good_a.png", "good_b.jpg", "outlier16.tif", long_name]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "2").mkdir()
    return root, make_hostile(root / "2")


def _check(ok_names, errors: pd.DataFrame, good: list[str]):
    names = {os.path.basename(p) for p in errors["path"]}
    assert names == set(BAD), names
    for name, why in BAD.items():
        reason = errors.loc[errors["path"].map(os.path.basename) == name].iloc[0]
        assert why in " ".join(str(v) for v in reason.values), (name, reason.to_dict())
    assert sorted(set(ok_names)) == sorted(good)


def test_roi_accounts_for_every_hostile_input(hostile, tmp_path):
    from koa_ray.data.locate import locate_knees

    root, good = hostile
    boxes, errors = locate_knees([str(root / "2")])
    _check(boxes["path"].map(os.path.basename), errors, good)


def test_prepare_accounts_for_every_hostile_input(hostile, tmp_path):
    from koa_ray.data.prep import PrepConfig, prepare

    root, good = hostile
    m = prepare(root, tmp_path / "prep", PrepConfig(image_size=64), local=True, progress=False)
    assert m["n_inputs"] == len(good) + len(BAD) == m["n_ok_files"] + m["n_errors"]
    errors = pd.read_csv(tmp_path / "prep" / "errors.csv")
    import pyarrow.parquet as pq

    ok = pd.concat([pq.read_table(str(d), columns=["path"]).to_pandas() for d in (tmp_path / "prep").iterdir()
                    if d.is_dir()])
    _check(ok["path"].map(os.path.basename), errors, good)


def test_score_accounts_for_every_hostile_input(ray_session, tiny_run, hostile, tmp_path):
    from koa_ray.infer.score import score

    root, good = hostile
    out = tmp_path / "s.csv"
    summary = score([str(root / "2")], str(tiny_run[0]), out, batch_size=4)
    rows = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert summary["n_inputs"] == len(good) + len(BAD) == rows["path"].nunique()
    bad = rows[rows.status == "error"].rename(columns={"error": "reason"})
    _check(rows.loc[rows.status == "ok", "path"].map(os.path.basename), bad[["path", "reason"]], good)
    p = rows.loc[rows.status == "ok", [f"p{k}" for k in range(5)]].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)


def test_gradcam_accounts_for_every_hostile_input(ray_session, tiny_run, hostile, tmp_path):
    from koa_ray.infer.gradcam import run_gradcam

    root, good = hostile
    summary = run_gradcam([str(root / "2")], str(tiny_run[0]), tmp_path / "cam", batch_size=4)
    rows = pd.read_csv(tmp_path / "cam" / "index.csv", keep_default_na=False, na_values=[""])
    assert summary["n_inputs"] == len(good) + len(BAD) == rows["path"].nunique()
    ok = rows[rows.status == "ok"]
    assert all((tmp_path / "cam" / o).is_file() for o in ok["overlay"])  # each overlay row points at its picture
    _check(ok["path"].map(os.path.basename), rows[rows.status == "error"].rename(columns={"error": "reason"})
           [["path", "reason"]], good)


def test_evaluate_on_a_hostile_labelled_folder(ray_session, tiny_run, hostile, tmp_path):
    """An external labelled folder (``DIR/2/*``) with hostile files: the good knees are evaluated, every bad file is
    listed in predictions.csv with its reason, and the metrics count only the good ones."""
    from koa_ray.infer.evaluate import evaluate

    root, good = hostile
    m = evaluate(str(tiny_run[0]), root, tmp_path / "ev", gradcam_per_grade=0)
    preds = pd.read_csv(tmp_path / "ev" / "predictions.csv", keep_default_na=False, na_values=[""])
    assert preds["path"].nunique() == len(good) + len(BAD)
    ok = preds[preds.status == "ok"]
    _check(ok["path"].map(os.path.basename), preds[preds.status == "error"].rename(columns={"error": "reason"})
           [["path", "reason"]], good)
    assert m["n"] == len(ok) and (ok["label"] == 2).all()
