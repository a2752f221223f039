import numpy as np
import pandas as pd
import pytest

from koa_ray.data.ingest import IngestConfig, discover, expand_inputs, parse_patient_side, patient_split


def touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_parse_oai_names():
    assert parse_patient_side("/a/b/9003175L.jpg") == ("9003175", "L")
    assert parse_patient_side("9003175R.png") == ("9003175", "R")
    assert parse_patient_side("9003175.dcm") == ("9003175", "")
    assert parse_patient_side("knee_scan.png") == ("", "")
    rx = r"^P(?P<patient>\d+)_(?P<side>[LR])"
    assert parse_patient_side("P12_L_v2.png", rx) == ("12", "L")


def test_bad_regex_and_fractions_rejected():
    with pytest.raises(ValueError, match="patient"):
        IngestConfig(patient_regex=r"(\d+)")
    with pytest.raises(ValueError, match="split_fractions"):
        IngestConfig(split_fractions=(0.5, 0.2, 0.2))


def test_split_layout(tmp_path):
    for s, g, name in [("train", 0, "1L.jpg"), ("train", 4, "1R.jpg"), ("val", 2, "2L.jpg"), ("test", 1, "3R.png")]:
        touch(tmp_path / s / str(g) / name)
    df = discover(tmp_path)
    assert sorted(df["split"]) == ["test", "train", "train", "val"]
    row = df[df["path"].str.endswith("1R.jpg")].iloc[0]
    assert (row.label, row.patient_id, row.side) == (4, "1", "R")


def _make_unsplit(root, n_patients=300, seed=0):
    rng = np.random.default_rng(seed)
    for pid in range(1000000, 1000000 + n_patients):
        base = rng.choice(5, p=[0.4, 0.18, 0.25, 0.13, 0.04])
        for side in "LR"[: rng.integers(1, 3)]:
            g = int(np.clip(base + rng.integers(-1, 2), 0, 4))
            touch(root / str(g) / f"{pid}{side}.png")


def test_unsplit_folder_gets_patient_disjoint_stratified_split(tmp_path):
    _make_unsplit(tmp_path)
    df = discover(tmp_path, IngestConfig(split_fractions=(0.7, 0.15, 0.15), seed=3))
    assert set(df["split"]) == {"train", "val", "test"}
    # no patient crosses splits: both knees of a patient always land together
    per_patient = df.groupby("patient_id")["split"].nunique()
    assert per_patient.max() == 1
    assert df.groupby("patient_id").size().max() == 2
    # roughly the requested shares, and every grade present in train
    share = df["split"].value_counts(normalize=True)
    assert abs(share["train"] - 0.7) < 0.06 and abs(share["val"] - 0.15) < 0.05
    assert set(df.loc[df.split == "train", "label"]) == {0, 1, 2, 3, 4}
    # deterministic for a seed, different for another
    again = discover(tmp_path, IngestConfig(split_fractions=(0.7, 0.15, 0.15), seed=3))
    assert (again["split"] == df["split"]).all()
    other = discover(tmp_path, IngestConfig(split_fractions=(0.7, 0.15, 0.15), seed=4))
    assert (other["split"] != df["split"]).any()


def test_images_without_patient_id_are_their_own_patient(tmp_path):
    for i in range(20):
        touch(tmp_path / str(i % 5) / f"scan_{i}.png")
    df = discover(tmp_path)
    assert len(df) == 20 and (df["patient_id"] == "").all()
    assert set(df["split"]) <= {"train", "val", "test"}


def test_manifest_relative_paths_and_validation(tmp_path):
    touch(tmp_path / "imgs" / "5L.png")
    touch(tmp_path / "imgs" / "6R.png")
    m = tmp_path / "m.csv"
    pd.DataFrame({"path": ["imgs/5L.png", "imgs/6R.png"], "label": [1, 3], "split": ["train", "val"]}).to_csv(m, index=False)
    df = discover(m)
    assert df["path"].tolist() == [str(tmp_path / "imgs/5L.png"), str(tmp_path / "imgs/6R.png")]
    assert df["patient_id"].tolist() == ["5", "6"] and df["side"].tolist() == ["L", "R"]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"path": ["imgs/5L.png"], "label": [7]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="label 7"):
        discover(bad)
    unk = tmp_path / "unk.csv"
    pd.DataFrame({"path": ["imgs/5L.png"], "grade": [1]}).to_csv(unk, index=False)
    with pytest.raises(ValueError, match="grade"):
        discover(unk)


def test_unlabelled_inputs_folders_globs_missing(tmp_path):
    touch(tmp_path / "a" / "x.png")
    touch(tmp_path / "a" / "sub" / "y.dcm")
    touch(tmp_path / "a" / "IM0001")
    touch(tmp_path / "a" / "boxes.csv")
    touch(tmp_path / "b" / "z.jpg")
    files = expand_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "*.jpg"), str(tmp_path / "nope.png")])
    names = [f.split("/")[-1] for f in files]
    assert names == ["IM0001", "x.png", "y.dcm", "z.jpg", "nope.png"]
    df = discover([str(tmp_path / "a")])
    assert (df["label"] == -1).all() and (df["split"] == "unlabeled").all()
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "does-not-exist")
