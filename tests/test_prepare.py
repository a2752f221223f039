"""`koa prepare` end to end: Ray Data and --local, corrupt inputs accounted for, reuse, manifest."""

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from koa_ray.data.decode import decode_image_column
from koa_ray.data.prep import PrepConfig, prepare


@pytest.fixture(scope="module")
def dirty(synth_dir, tmp_path_factory):
    """The synthetic set plus every kind of bad input, placed between good files in the same folders."""
    root = tmp_path_factory.mktemp("dirty") / "data"
    shutil.copytree(synth_dir, root)
    g = root / "train" / "2"
    (g / "0000001L.png").write_bytes(b"")  # zero-byte
    good = next(g.glob("*.png")).read_bytes()
    (g / "0000002L.png").write_bytes(good[: len(good) // 3])  # truncated
    (g / "0000003L.jpg").write_text("this is not an image")  # non-image
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(g / "0000004L.png")  # too small
    (g / "0000005L.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2\0")  # broken DICOM
    bad = {"0000001L.png": "empty", "0000002L.png": "truncated", "0000003L.jpg": "not an image",
           "0000004L.png": "too small", "0000005L.dcm": "DICOM"}
    return root, bad


def _read_split(d):
    return pq.read_table(str(d)).to_pandas()


def test_prepare_ray_accounts_for_every_input(ray_session, dirty, tmp_path):
    root, bad = dirty
    n_in = sum(1 for p in root.rglob("*") if p.is_file())
    out = tmp_path / "prep"
    m = prepare(root, out, PrepConfig(image_size=48), progress=False)
    assert m["n_inputs"] == n_in
    assert m["n_ok_files"] + m["n_errors"] == n_in  # count in = ok + errors
    errors = pd.read_csv(out / "errors.csv")
    assert len(errors) == len(bad) == m["n_errors"]
    for name, reason in bad.items():
        row = errors[errors["path"].str.endswith(name)]
        assert len(row) == 1 and reason in row["reason"].iloc[0], (name, row)
    # good files next to the bad ones are all there
    rows = pd.concat([_read_split(out / s) for s in m["splits"]])
    assert rows["path"].nunique() == n_in - len(bad)
    same_folder = {p.name for p in (root / "train" / "2").iterdir()} - set(bad)
    assert same_folder <= {p.split("/")[-1] for p in rows["path"]}
    imgs = decode_image_column(rows["image"].tolist(), rows["size"].to_numpy())
    assert imgs.shape[1:] == (48, 48) and imgs.dtype == np.uint8 and imgs.std() > 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prep"]["image_size"] == 48 and "roi" in manifest["prep"]
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == len(rows)
    assert manifest["duration_s"] > 0 and manifest["package_version"]


def test_local_matches_ray_and_reuse(ray_session, synth_dir, tmp_path):
    a = prepare(synth_dir, tmp_path / "ray", PrepConfig(image_size=40), progress=False)
    b = prepare(synth_dir, tmp_path / "local", PrepConfig(image_size=40), local=True, progress=False)
    assert a["counts"] == b["counts"] and a["fingerprint"] == b["fingerprint"]
    ra = _read_split(tmp_path / "ray" / "train").sort_values("path").reset_index(drop=True)
    rb = _read_split(tmp_path / "local" / "train").sort_values("path").reset_index(drop=True)
    assert ra["path"].tolist() == rb["path"].tolist()
    assert (ra["image"] == rb["image"]).all()  # deterministic preprocessing, same bytes
    # Ray workers write the parts themselves: no temporary file left, and a second run writes the same files with
    # the same rows in the same order (part names come from their rows' keys), so the prepared order is reproducible
    assert not [p for p in (tmp_path / "ray").rglob("*") if p.name.endswith(".tmp")]
    c = prepare(synth_dir, tmp_path / "ray2", PrepConfig(image_size=40), progress=False)
    assert c["counts"] == a["counts"]
    for split in a["splits"]:
        names = sorted(p.name for p in (tmp_path / "ray" / split).glob("*.parquet"))
        assert names == sorted(p.name for p in (tmp_path / "ray2" / split).glob("*.parquet")) and names
        assert _read_split(tmp_path / "ray" / split)["path"].tolist() == \
            _read_split(tmp_path / "ray2" / split)["path"].tolist()
    # re-running reuses; --force recomputes; other settings recompute
    again = prepare(synth_dir, tmp_path / "local", PrepConfig(image_size=40), local=True, progress=False)
    assert again["reused"] is True
    forced = prepare(synth_dir, tmp_path / "local", PrepConfig(image_size=40), local=True, force=True, progress=False)
    assert forced["reused"] is False
    other = prepare(synth_dir, tmp_path / "local", PrepConfig(image_size=32), local=True, progress=False)
    assert other["reused"] is False and other["image_size"] == 32


def test_bilateral_radiographs_give_two_knees(tmp_path):
    from koa_ray.data.synthetic import make_dataset

    make_dataset(tmp_path / "bi", 6, layout="bilateral", seed=2)
    rows = pd.DataFrame({"path": sorted(str(p) for p in (tmp_path / "bi" / "images").glob("*.png"))})
    rows.to_csv(tmp_path / "m.csv", index=False)
    m = prepare(tmp_path / "m.csv", tmp_path / "prep", PrepConfig(image_size=64), local=True, progress=False)
    assert m["n_inputs"] == 6 and m["n_knees"] == 12
    knees = _read_split(tmp_path / "prep" / "unlabeled")
    assert sorted(knees.groupby("path")["side"].apply(lambda s: "".join(sorted(s)))) == ["LR"] * 6


def test_no_roi_resizes_whole_image_and_mirrors_left_knees():
    """--no-roi (inputs already knee crops): the whole image is resized, and a left knee (side from the file name)
    is still mirrored to the right-knee orientation, unless mirroring is off."""
    import numpy as np

    from koa_ray.data.prep import PrepConfig, knee_crops
    from koa_ray.data.roi import RoiConfig

    img = np.tile(np.arange(100, dtype=np.uint8), (100, 1))  # brighter to the right
    cfg = PrepConfig(image_size=50, roi=RoiConfig(enabled=False))
    (right, box_r), = knee_crops(img, cfg, side_hint="R")
    (left, box_l), = knee_crops(img, cfg, side_hint="L")
    assert right.shape == (50, 50) and (box_r.x0, box_r.y0, box_r.x1, box_r.y1) == (0, 0, 100, 100)
    assert right[0, -1] > right[0, 0] and left[0, 0] > left[0, -1]
    np.testing.assert_array_equal(left, right[:, ::-1])
    (kept, _), = knee_crops(img, PrepConfig(image_size=50, roi=RoiConfig(enabled=False, mirror_left=False)), "L")
    np.testing.assert_array_equal(kept, right)
