"""Knee-joint ROI detection: accuracy on synthetic bilateral radiographs and on real OAI crops embedded in larger
canvases, joint centring on the real crops, fallback, determinism, cropping and config handling."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from koa_ray.data.roi import KneeBox, RoiConfig, box_iou, crop_knee, detect_knees, roi_dict, square_box
from koa_ray.data.synthetic import embed_in_canvas, render_bilateral, render_knee

try:
    from films import drawn_film, held_out_scores, held_out_set, stitched_film
except ImportError:  # tests/ imported as a package
    from tests.films import drawn_film, held_out_scores, held_out_set, stitched_film

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "knee-kl224"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="real knee-kl224 crops (../shared) not available")


def _real_sample(n_per_grade: int, seed: int, splits=("val", "train")) -> list[Path]:
    """Fixed-seed sample of real crops, the same number per KL grade."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(5):
        files = sorted(p for s in splits for p in (REAL / s / str(g)).glob("*.jpg"))
        out += [files[i] for i in rng.choice(len(files), n_per_grade, replace=False)]
    return out


def _read(p: Path) -> np.ndarray:
    return cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)


# ------------------------------------------------------------------------------------------------ accuracy
def test_iou_on_synthetic_bilateral():
    ious = []
    for i in range(30):
        rng = np.random.default_rng(1000 + i)
        grades = (int(rng.integers(5)), int(rng.integers(5)))
        img, truth = render_bilateral(grades, rng, height=(256, 512, 1000)[i % 3])
        boxes = detect_knees(img)
        assert [b.side for b in boxes] == ["R", "L"]
        for b, t in zip(boxes, truth):
            ious.append(box_iou(b, (t["x0"], t["y0"], t["x1"], t["y1"])))
    assert np.mean(ious) >= 0.8, f"mean IoU {np.mean(ious):.3f}"
    assert np.mean(np.array(ious) > 0.5) >= 0.95


def test_iou_on_synthetic_single_crops():
    ious = [box_iou(detect_knees(img)[0], box) for img, box in (render_knee(i % 5, np.random.default_rng(i))
                                                                 for i in range(20))]
    assert np.mean(ious) >= 0.8, f"mean IoU {np.mean(ious):.3f}"


@needs_real
def test_iou_on_real_crops_embedded_in_canvas():
    ious = []
    for i, path in enumerate(_real_sample(8, seed=1, splits=("val",))):
        canvas, truth = embed_in_canvas(_read(path), np.random.default_rng(i))
        (box,) = detect_knees(canvas)
        assert not box.fallback
        ious.append(box_iou(box, truth))
    assert len(ious) == 40
    assert np.mean(ious) >= 0.8, f"mean IoU {np.mean(ious):.3f}"


@needs_real
def test_joint_centre_in_central_third_of_real_crops():
    """The real 224 px crops are centred on the joint: the detected joint-space centre must be in the central
    third. Measured: 49/50 (the miss is a crop whose joint line really sits at ~0.68 of its height)."""
    paths = _real_sample(10, seed=2, splits=("val",))
    inside = 0
    for path in paths:
        img = _read(path)
        (box,) = detect_knees(img, side_hint=path.stem[-1])
        assert box.side == path.stem[-1]
        cx, cy = box.center
        h, w = img.shape
        inside += (w / 3 <= cx <= 2 * w / 3) and (h / 3 <= cy <= 2 * h / 3)
    assert inside / len(paths) >= 0.98, f"{inside}/{len(paths)}"


@needs_real
def test_real_crops_are_confident():
    scores = [detect_knees(_read(p))[0].score for p in _real_sample(6, seed=3)]
    assert np.mean(np.array(scores) >= RoiConfig().min_score) >= 0.95


# ------------------------------------------------------------------------------------------------ fallback
@pytest.mark.parametrize("name", ["zeros", "gray", "white", "uniform", "gauss", "uniform_wide", "uniform_big"])
def test_fallback_on_blank_and_noise(name):
    rng = np.random.default_rng(0)
    img = {
        "zeros": np.zeros((300, 300), np.uint8),
        "gray": np.full((224, 224), 128, np.uint8),
        "white": np.full((100, 180), 255, np.uint8),
        "uniform": rng.integers(0, 256, (224, 224)).astype(np.uint8),
        "gauss": np.clip(rng.normal(128, 30, (512, 512)), 0, 255).astype(np.uint8),
        "uniform_wide": rng.integers(0, 256, (400, 800)).astype(np.uint8),
        "uniform_big": rng.integers(0, 256, (1000, 900)).astype(np.uint8),
    }[name]
    boxes = detect_knees(img)
    h, w = img.shape
    assert len(boxes) == 1, "no legs in the image: one knee or two is decided from content, not from the shape"
    for b in boxes:
        assert b.fallback and b.score < RoiConfig().min_score
        assert 0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h, "fallback box inside the image"
        assert b.x1 - b.x0 == b.y1 - b.y0


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (300, 5), (8, 8), (16, 40), (3000, 64)])
def test_degenerate_shapes_never_raise(shape):
    img = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    boxes = detect_knees(img)
    assert boxes and all(0 <= b.x0 < b.x1 <= shape[1] and 0 <= b.y0 < b.y1 <= shape[0] for b in boxes)
    assert crop_knee(img, boxes[0], 32).shape == (32, 32)


def test_min_score_threshold():
    img, _ = render_knee(1, np.random.default_rng(0))
    noise = np.random.default_rng(0).normal(0, 25, img.shape)
    faint = np.clip(128 + (img.astype(np.float32) - 128) * 0.25 + noise, 0, 255).astype(np.uint8)  # low contrast
    (b,) = detect_knees(faint, RoiConfig(min_score=0.0))
    assert not b.fallback and 0.0 < b.score < 1.0
    assert not detect_knees(faint, RoiConfig(min_score=b.score))[0].fallback
    fb = detect_knees(faint, RoiConfig(min_score=min(1.0, b.score + 0.01)))[0]
    assert fb.fallback and fb.score == 0.0 and (fb.x0, fb.y0, fb.x1, fb.y1) == (0, 0, 224, 224)


def test_invalid_images_raise_value_error():
    for bad in (np.zeros(5), np.zeros((0, 5)), np.zeros((2, 3, 5)), np.array([["a", "b"]])):
        with pytest.raises(ValueError):
            detect_knees(bad)


# ------------------------------------------------------------------------------------------------ behaviour
def test_deterministic():
    img, _ = render_bilateral((2, 3), np.random.default_rng(5))
    assert detect_knees(img) == detect_knees(img.copy()) == detect_knees(img)


def test_side_hint_and_bilateral_sides():
    img, _ = render_knee(2, np.random.default_rng(1))
    assert detect_knees(img, side_hint="L")[0].side == "L"
    assert detect_knees(img, side_hint="r")[0].side == "R"
    assert detect_knees(img, side_hint=None)[0].side == "U"
    assert detect_knees(img, side_hint="")[0].side == "U"
    wide, truth = render_bilateral((0, 1), np.random.default_rng(2))
    boxes = detect_knees(wide, side_hint="L")  # ignored: sides come from the positions
    assert [b.side for b in boxes] == ["R", "L"]
    assert boxes[0].center[0] < wide.shape[1] / 2 < boxes[1].center[0]


def test_boxes_are_square_with_margin():
    img, _ = render_knee(0, np.random.default_rng(3))
    b0 = detect_knees(img, RoiConfig(margin=0.0))[0]
    b1 = detect_knees(img, RoiConfig(margin=0.3))[0]
    assert b0.size == b0.y1 - b0.y0 and b1.size == b1.y1 - b1.y0
    assert abs(b1.size / b0.size - 1.3) < 0.02
    assert np.allclose(b0.center, b1.center, atol=1.0)


def test_other_dtypes_and_channels():
    img, _ = render_knee(3, np.random.default_rng(4))
    ref = detect_knees(img)[0]
    for variant in (img.astype(np.uint16) * 257, img.astype(np.float64) / 255.0,
                    cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), img[..., None]):
        b = detect_knees(variant)[0]
        assert box_iou(b, ref) > 0.9 and not b.fallback


def test_disabled_returns_whole_image_square():
    img = np.zeros((200, 300), np.uint8)
    (b,) = detect_knees(img, RoiConfig(enabled=False), side_hint="R")
    assert (b.x0, b.y0, b.x1, b.y1, b.side, b.fallback) == (50, 0, 250, 200, "R", False)


# ------------------------------------------------------------------------------------------------ crop_knee
def test_crop_knee_shape_padding_and_mirroring():
    img = np.tile(np.arange(100, dtype=np.uint8), (80, 1))  # intensity grows to the right
    inside = KneeBox(10, 10, 60, 60, "R", 1.0, False)
    c = crop_knee(img, inside, 32)
    assert c.shape == (32, 32) and c.dtype == np.uint8
    assert c[:, 0].mean() < c[:, -1].mean()
    left = KneeBox(10, 10, 60, 60, "L", 1.0, False)
    assert np.array_equal(crop_knee(img, left, 32), c[:, ::-1])
    assert np.array_equal(crop_knee(img, left, 32, mirror_left=False), c)
    outside = KneeBox(-30, -30, 50, 50, "U", 0.5, False)  # partly outside: replicated border
    co = crop_knee(img, outside, 40)
    assert co.shape == (40, 40) and co[:, 0].max() == img[0, 0]
    far = KneeBox(500, 500, 600, 600, "U", 0.0, True)  # entirely outside
    assert crop_knee(img, far, 16).shape == (16, 16)
    with pytest.raises(ValueError):
        crop_knee(img, KneeBox(5, 5, 5, 9, "U", 0.0, False), 16)


def test_crop_knee_on_detection_puts_the_joint_in_the_middle():
    img, _ = render_bilateral((1, 2), np.random.default_rng(7))
    crops = [crop_knee(img, b, 224) for b in detect_knees(img)]
    for c in crops:
        rows = c[:, 60:164].astype(np.float32).mean(axis=1)
        assert 80 <= int(np.argmin(rows[40:184])) + 40 <= 144, "the dark joint band is near the middle row"


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, field", [
    ({"margin": -0.1}, "margin"), ({"margin": 5.0}, "margin"), ({"margin": "0.1"}, "margin"),
    ({"work_size": 10}, "work_size"), ({"work_size": 256.0}, "work_size"), ({"work_size": True}, "work_size"),
    ({"min_score": 1.5}, "min_score"), ({"min_score": float("nan")}, "min_score"),
    ({"enabled": "yes"}, "enabled"), ({"mirror_left": 1}, "mirror_left"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field) as e:
        RoiConfig(**kwargs)
    assert repr(next(iter(kwargs.values())))[:4] in str(e.value)


def test_config_roundtrip():
    cfg = RoiConfig(enabled=True, margin=0.2, mirror_left=False, work_size=320, min_score=0.4)
    d = cfg.to_dict()
    assert d == roi_dict(cfg) == asdict(cfg)
    assert RoiConfig.from_dict(d) == cfg == RoiConfig(**d)
    assert RoiConfig.from_dict(None) == RoiConfig() == RoiConfig.from_dict({})
    with pytest.raises(ValueError, match="unknown"):
        RoiConfig.from_dict({**d, "bogus": 1})


def test_square_box_and_iou():
    assert square_box(50, 50, 20) == (40, 40, 60, 60)
    assert square_box(0, 0, 0.2) == (0, 0, 1, 1)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert abs(box_iou((0, 0, 10, 10), (5, 0, 15, 10)) - 1 / 3) < 1e-9


# ------------------------------------------------------------------------------------------------ held-out films
@pytest.mark.parametrize("gen", ["stitched", "drawn"])
def test_held_out_films_one_or_two_knees(gen):
    """Films made differently from koa synth (real crops stitched into legs; drawn anatomy incl. long-leg films):
    mean IoU >= 0.85 for single and bilateral films, >= 95 % of bilateral films found as two knees tagged R then
    L, single films never split."""
    if gen == "stitched" and not REAL.is_dir():
        pytest.skip("real knee-kl224 crops (../shared) not available")
    r = held_out_scores(held_out_set(gen, 16, seed=7000, real=REAL, heights=(400, 2000)), detect_knees)
    assert r["sides_rl"] >= 0.95, f"two-knee rate (R then L) {r['sides_rl']:.2f}"
    assert r["single_kept_whole"] >= 0.95, f"single films kept whole {r['single_kept_whole']:.2f}"
    assert r["single_iou"] >= 0.85, f"single mean IoU {r['single_iou']:.3f}"
    assert r["bilateral_iou"] >= 0.85, f"bilateral mean IoU {r['bilateral_iou']:.3f}"


@needs_real
def test_bilateral_film_with_one_leg_exposed_darker_still_gives_two_knees():
    """One leg 40 % as bright as the other (thicker soft tissue, the edge of the beam) with air between them, on
    films taller than wide (long femur and tibia: no width cue): the dim leg is still a leg, so the dark gap is
    tested as two knees. Before, a leg under half the brightest column's level meant "no leg" and every one of
    these films came back as one knee."""
    right, left = sorted(REAL.glob("val/2/*R.jpg"))[:12], sorted(REAL.glob("val/2/*L.jpg"))[:12]
    found, ious = 0, []
    for i, (r, l) in enumerate(zip(right, left)):
        dim = (cv2.imread(str(r), cv2.IMREAD_GRAYSCALE).astype(np.float32) * 0.4).astype(np.uint8)
        img, truth = stitched_film([dim, cv2.imread(str(l), cv2.IMREAD_GRAYSCALE)], np.random.default_rng(300 + i),
                                   height=1200, clutter=False)
        boxes = detect_knees(img)
        if [b.side for b in boxes] == ["R", "L"]:
            found += 1
            ious += [box_iou(b, (t["x0"], t["y0"], t["x1"], t["y1"])) for b, t in zip(boxes, truth)]
    assert found >= 10, f"{found}/12 films found as two knees"
    assert np.mean(ious) >= 0.75, f"mean IoU {np.mean(ious):.3f}"


@pytest.mark.parametrize("gen", ["stitched", "drawn"])
def test_knee_replacements_are_flagged_on_held_out_films(gen):
    """A knee replacement (metal femoral component and tibial tray, drawn into held-out films) is flagged
    ``implant`` on its own box, and the other knee of a bilateral film is not; films without metal get no flag."""
    if gen == "stitched" and not REAL.is_dir():
        pytest.skip("real knee-kl224 crops (../shared) not available")
    with_metal = held_out_scores(held_out_set(gen, 6, seed=7100, real=REAL, heights=(400, 2000), implants=True),
                                 detect_knees)
    assert with_metal["implants_flagged"] >= 0.9, with_metal
    assert with_metal["false_implant_flags"] == 0.0, with_metal  # the other knee of each bilateral film
    assert with_metal["two_knee_rate"] >= 0.8, with_metal  # and the metal does not hide the pair
    plain = held_out_scores(held_out_set(gen, 6, seed=7100, real=REAL, heights=(400, 2000)), detect_knees)
    assert plain["false_implant_flags"] == 0.0, plain


def test_roi_cli_draws_boxes(tmp_path, capsys):
    """``koa roi --draw DIR`` writes every image with its boxes drawn (green = found), next to the CSV rows."""
    from koa_ray.cli import main

    img, truth = drawn_film(np.random.default_rng(3), bilateral=True, height=700, clutter=False)
    cv2.imwrite(str(tmp_path / "film.png"), img)
    crop, _ = render_knee(2, np.random.default_rng(4))
    cv2.imwrite(str(tmp_path / "crop.png"), crop)
    assert main(["roi", str(tmp_path), "--out", str(tmp_path / "b.csv"), "--draw", str(tmp_path / "drawn")]) == 0
    assert "drawn boxes" in capsys.readouterr().out
    boxes = pd.read_csv(tmp_path / "b.csv")
    film_rows = boxes[boxes.path.str.endswith("film.png")]
    assert film_rows["side"].tolist() == ["R", "L"]
    assert not boxes["implant"].any()  # no metal in these
    pic = cv2.imread(str(tmp_path / "drawn" / "film.png"))
    assert pic.shape[:2] == img.shape  # <= 1024 px: drawn at full size
    for r in film_rows.itertuples():  # the box outline is drawn in green where the CSV says the box is
        edge = pic[max(r.y0, 0) + 1, max(r.x0, 0) + 5:min(r.x1, img.shape[1]) - 5]
        assert (edge[:, 1] > 150).mean() > 0.9 and (edge[:, 0] < 100).mean() > 0.9
    assert cv2.imread(str(tmp_path / "drawn" / "crop.png")) is not None


@needs_real
def test_real_single_knee_crops_are_never_split():
    """One knee or two is decided from the image: 300 real single-knee crops (some inverted, some with staples)
    each stay one knee. Measured on all 6,604 knee-kl224 files: 1 split (an inverted crop)."""
    paths = _real_sample(60, seed=11, splits=("train",))
    found = [detect_knees(_read(p), side_hint=p.stem[-1]) for p in paths]
    assert [len(b) for b in found] == [1] * len(paths), [str(p) for p, b in zip(paths, found) if len(b) != 1]
    # and no real knee (none of the set has a replacement; some are over-exposed) is flagged as an implant
    assert not [str(p) for p, b in zip(paths, found) if b[0].implant]
