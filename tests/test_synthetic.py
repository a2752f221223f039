"""Procedural knee radiographs: shapes, determinism, KL-dependent signs, layouts written by make_dataset."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from koa_ray.data import synthetic as syn
from koa_ray.data.synthetic import (GT_MARGIN, KL_PRIORS, REAL_CROP_JOINT_FRAC, REAL_CROP_JOINT_Y, draw_knee,
                                    embed_in_canvas, make_dataset, render_bilateral, render_knee, sample_knee_params)

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "knee-kl224"


def _rng(*seed):
    return np.random.default_rng(list(seed))


# ------------------------------------------------------------------------------------------------ render_knee
@pytest.mark.parametrize("grade", range(5))
def test_render_knee_shape_and_box(grade):
    img, box = render_knee(grade, _rng(grade), size=224)
    assert img.shape == (224, 224) and img.dtype == np.uint8
    x0, y0, x1, y1 = box
    assert x1 - x0 == y1 - y0, "box must be square"
    assert 0.85 * 224 <= x1 - x0 <= 1.15 * 224, "joint box ~ the crop, like the Chen crops"
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    assert abs(cx - 112) < 30 and abs(cy - 112) < 30, "joint centred"
    assert img.std() > 20, "not a flat image"


def test_render_knee_deterministic_and_varied():
    a, ba = render_knee(2, _rng(7))
    b, bb = render_knee(2, _rng(7))
    c, _ = render_knee(2, _rng(8))
    assert np.array_equal(a, b) and ba == bb
    assert not np.array_equal(a, c)


def test_render_knee_other_sizes():
    for size in (64, 128, 300):
        img, box = render_knee(1, _rng(size), size=size)
        assert img.shape == (size, size)
        assert 0.8 * size <= box[2] - box[0] <= 1.2 * size


def test_left_knee_is_the_mirror_image():
    p = sample_knee_params(2, _rng(3), "R")  # extents are given in the canonical (right-knee) frame
    patch_r, cx_r, cy_r = syn._render_patch(p, 100.0, (0.8, 0.9, 0.7, 0.7), _rng(4))
    patch_l, cx_l, cy_l = syn._render_patch(replace(p, side="L"), 100.0, (0.8, 0.9, 0.7, 0.7), _rng(4))
    assert np.allclose(patch_l, patch_r[:, ::-1])
    assert cy_l == cy_r and abs(cx_l - (patch_r.shape[1] - cx_r)) < 1e-6


def test_fibula_is_lateral_for_right_knee():
    """Right knee in PA view: fibula (lateral) on the image-left, like the real R crops."""
    p = sample_knee_params(0, _rng(5), "R")
    atten = np.zeros((224, 224), np.float32)
    draw_knee(atten, (112, 112), 190, p, _rng(6))
    # below the plateau, the lateral (left) edge carries the fibular head: more attenuation than the medial edge
    band = atten[150:215]
    assert band[:, 5:45].mean() > band[:, 180:220].mean()


def test_kl_signs_follow_grade():
    n = 300
    params = {g: [sample_knee_params(g, _rng(g, i)) for i in range(n)] for g in range(5)}
    gap = [np.mean([p.gap_med for p in params[g]]) for g in range(5)]
    assert all(gap[g] > gap[g + 1] for g in range(4)), f"joint space must narrow with grade: {gap}"
    osteo = [np.mean([max(p.osteo) for p in params[g]]) for g in range(5)]
    assert all(osteo[g] < osteo[g + 1] for g in range(4)), osteo
    has_osteo = [np.mean([max(p.osteo) > 0.025 for p in params[g]]) for g in range(5)]
    assert has_osteo[0] == 0 and has_osteo[1] < 0.1 and has_osteo[2] > 0.5
    scl = [np.mean([p.scl_amp > 0 for p in params[g]]) for g in range(5)]
    assert scl[0] == 0 and scl[1] < 0.1 and scl[3] > 0.8 and scl[4] == 1.0
    assert np.mean([p.gap_med for p in params[4]]) < 0.02, "near-obliterated space at KL4"
    assert np.mean([p.irregular for p in params[4]]) > 3 * np.mean([p.irregular for p in params[2]])
    # adjacent grades overlap (like real data): some KL1 knees have a narrower space than some KL2 knees
    assert min(p.gap_med for p in params[1]) < max(p.gap_med for p in params[2])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="grade"):
        render_knee(5, _rng(0))
    with pytest.raises(ValueError, match="side"):
        render_knee(1, _rng(0), side="X")
    with pytest.raises(ValueError, match="size"):
        render_knee(1, _rng(0), size=8)
    with pytest.raises(ValueError, match="grades"):
        render_bilateral((1,), _rng(0))


# ------------------------------------------------------------------------------------------------ bilateral
@pytest.mark.parametrize("height", [256, 512])
def test_render_bilateral(height):
    img, boxes = render_bilateral((0, 4), _rng(height), height=height)
    h, w = img.shape
    assert h == height and img.dtype == np.uint8
    assert 1.6 <= w / h <= 2.2
    assert [b["side"] for b in boxes] == ["R", "L"] and [b["grade"] for b in boxes] == [0, 4]
    for b in boxes:
        assert b["x1"] - b["x0"] == b["y1"] - b["y0"] > 0.15 * h
        assert -0.05 * h < b["y0"] and b["y1"] < 1.05 * h
    right, left = boxes
    assert (right["x0"] + right["x1"]) / 2 < w / 2 < (left["x0"] + left["x1"]) / 2, "patient right on image-left"
    # dark background around the legs, bright bone in the boxes
    assert img[:, : w // 40].mean() < img[right["y0"]:right["y1"], right["x0"]:right["x1"]].mean()


def test_render_bilateral_deterministic():
    a, ba = render_bilateral((1, 2), _rng(1))
    b, bb = render_bilateral((1, 2), _rng(1))
    assert np.array_equal(a, b) and ba == bb


# ------------------------------------------------------------------------------------------------ embedding
def _fake_crop(seed=0):
    img, _ = render_knee(2, _rng(seed))
    return img


def test_embed_in_canvas_geometry():
    crop = _fake_crop()
    for seed in range(6):
        canvas, box = embed_in_canvas(crop, _rng(seed))
        h, w = canvas.shape
        assert canvas.dtype == np.uint8 and 400 <= min(h, w) and max(h, w) <= 1000
        assert 0.8 <= w / h <= 1.25
        side = box[2] - box[0]
        assert side == box[3] - box[1]
        scale = side / (224 * REAL_CROP_JOINT_FRAC * (1 + GT_MARGIN))
        assert 0.99 <= scale <= 3.01
        # the crop really is where the box says: correlate the resized crop with the canvas there
        cw = int(round(224 * scale))
        ox = int(round((box[0] + box[2]) / 2 - cw / 2))
        oy = int(round((box[1] + box[3]) / 2 - REAL_CROP_JOINT_Y * cw))
        region = canvas[max(oy, 0):oy + cw, max(ox, 0):ox + cw].astype(np.float32)
        ref = cv2.resize(crop, (cw, cw)).astype(np.float32)[max(-oy, 0):, max(-ox, 0):]
        ref = ref[:region.shape[0], :region.shape[1]]
        r = np.corrcoef(region[10:-10, 10:-10].ravel(), ref[10:-10, 10:-10].ravel())[0, 1]
        assert r > 0.9, r


def test_embed_continues_the_bones():
    """Not a bare rectangle on black: above and below the crop the leg (femur / tibia) continues."""
    crop = _fake_crop(1)
    canvas, box = embed_in_canvas(crop, _rng(11), scale_range=(1.0, 1.0), canvas_range=(900, 900))
    cw = 224
    cx = (box[0] + box[2]) // 2
    oy = int(round((box[1] + box[3]) / 2 - REAL_CROP_JOINT_Y * cw))
    background = np.median(np.r_[canvas[:, :20].ravel(), canvas[:, -20:].ravel()])
    if oy > 40:
        above = canvas[oy - 30:oy - 5, cx - 20:cx + 20].mean()
        assert above > background + 40
    if oy + cw < 900 - 40:
        below = canvas[oy + cw + 5:oy + cw + 30, cx - 20:cx + 20].mean()
        assert below > background + 40


def test_embed_deterministic_and_rejects_bad_input():
    crop = _fake_crop()
    a, ba = embed_in_canvas(crop, _rng(3))
    b, bb = embed_in_canvas(crop, _rng(3))
    assert np.array_equal(a, b) and ba == bb
    with pytest.raises(ValueError):
        embed_in_canvas(np.zeros((4, 4), np.uint8), _rng(0))


@pytest.mark.skipif(not REAL.is_dir(), reason="real knee-kl224 crops not available")
def test_embed_real_crop():
    path = sorted((REAL / "val" / "2").glob("*.jpg"))[0]
    crop = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    canvas, box = embed_in_canvas(crop, _rng(0))
    assert canvas.shape[0] >= 400 and box[2] - box[0] > 200


# ------------------------------------------------------------------------------------------------ make_dataset
def test_make_dataset_single(tmp_path):
    out = tmp_path / "kl"
    summary = make_dataset(out, 160, seed=3, size=96)
    files = sorted(out.rglob("*.png"))
    assert len(files) == summary["n_images"] == 160 == len(summary["paths"])
    assert sum(sum(c.values()) for c in summary["counts"].values()) == 160
    patients = {}
    for f in files:
        split, grade = f.parts[-3], int(f.parts[-2])
        assert split in ("train", "val", "test") and 0 <= grade <= 4
        assert re.fullmatch(r"\d{7}[LR]\.png", f.name), f.name
        patients.setdefault(f.name[:7], set()).add((split, f.name[7]))
        assert summary["counts"][split][grade] >= 1
    # patient-disjoint split, most patients with both knees
    assert all(len({s for s, _ in v}) == 1 for v in patients.values())
    both = np.mean([len(v) == 2 for v in patients.values()])
    assert both > 0.6
    n_split = {s: sum(c.values()) for s, c in summary["counts"].items()}
    assert n_split["train"] > n_split["val"] > 0 and n_split["test"] > 0
    img = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (96, 96) and img.dtype == np.uint8


def test_make_dataset_deterministic(tmp_path):
    s1 = make_dataset(tmp_path / "a", 20, seed=5, size=64, splits=("train", "val"), split_fractions=(0.8, 0.2))
    s2 = make_dataset(tmp_path / "b", 20, seed=5, size=64, splits=("train", "val"), split_fractions=(0.8, 0.2))
    rel1 = [str(Path(p).relative_to(tmp_path / "a")) for p in s1["paths"]]
    rel2 = [str(Path(p).relative_to(tmp_path / "b")) for p in s2["paths"]]
    assert rel1 == rel2 and s1["counts"] == s2["counts"]
    assert (tmp_path / "a" / rel1[0]).read_bytes() == (tmp_path / "b" / rel1[0]).read_bytes()
    s3 = make_dataset(tmp_path / "c", 20, seed=6, size=64, splits=("train", "val"), split_fractions=(0.8, 0.2))
    assert [str(Path(p).relative_to(tmp_path / "c")) for p in s3["paths"]] != rel1


def test_make_dataset_follows_priors(tmp_path):
    summary = make_dataset(tmp_path, 400, seed=1, size=32, fmt="jpg")
    counts = np.zeros(5)
    for c in summary["counts"].values():
        for g, k in c.items():
            counts[g] += k
    frac = counts / counts.sum()
    assert np.all(np.abs(frac - np.array(KL_PRIORS)) < 0.07), frac
    assert frac[0] > frac[2] > frac[1] > frac[4] and frac[3] > frac[4]
    assert all(p.endswith(".jpg") for p in summary["paths"])


def test_make_dataset_bilateral(tmp_path):
    summary = make_dataset(tmp_path, 3, layout="bilateral", size=128, seed=2)
    with open(tmp_path / "boxes.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "x0", "y0", "x1", "y1", "side", "grade"]
    assert len(rows) == 6 and [r["side"] for r in rows[:2]] == ["R", "L"]
    for r in rows:
        img = cv2.imread(str(tmp_path / r["path"]), cv2.IMREAD_UNCHANGED)
        assert img.shape[0] == 256 and 1.6 <= img.shape[1] / img.shape[0] <= 2.2
        assert int(r["x1"]) - int(r["x0"]) == int(r["y1"]) - int(r["y0"]) > 0
        assert re.fullmatch(r"images/\d{7}\.png", r["path"])
    assert sum(summary["counts"]["all"].values()) == 6


def test_make_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        make_dataset(tmp_path, 2, layout="mosaic")
    with pytest.raises(ValueError, match="split"):
        make_dataset(tmp_path, 2, splits=("train",), split_fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="priors"):
        make_dataset(tmp_path, 2, priors=(1, 0))
    with pytest.raises(ValueError, match="n="):
        make_dataset(tmp_path, 0)
