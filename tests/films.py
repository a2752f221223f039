"""Held-out film generators for the knee localiser (issue 10): radiograph-like films made *differently* from
:mod:`koa_ray.data.synthetic`, so that the detector is measured on data it was not tuned on.

* :func:`stitched_film` builds full films from **real** Chen 2018 crops: each crop becomes a leg whose femur and
  tibia are continued by re-sampling the crop's own edge bands row by row towards a shaft (np.interp, not a
  remap), with column streaks, a soft-tissue silhouette and a feathered seam; one or two legs (image-left = the
  patient's right knee), a gap between the legs from "touching" to wide, knees at slightly different heights.
* :func:`drawn_film` draws knees from geometric primitives (polygons and ellipses with a cortical rim: femur shaft,
  two condyles and the notch, tibial plateau with spines and sloping margins, fibula, patella) over soft tissue
  whose thickness follows an elliptical limb cross-section, optionally as a long-leg standing film from hip to
  ankle (hip and ankle joints included, which also look like joint lines). The condyles are rounded and the
  plateau margins slope, so the visible joint line stops short of the condylar width as on real films (on the
  Chen crops it spans ~0.93 of it, ``REAL_CROP_JOINT_FRAC``); an earlier version with square margins drew a line
  over the full width, which no real knee shows.

:func:`draw_implant` draws a knee replacement into either kind. Unlike the films themselves, it is *not* held out:
the detector's implant threshold (``roi._METAL_COVER``) was set between these drawn implants and the real crops.

Both add what real films carry (:func:`film_clutter`): a ruler at an edge, a calibration sphere, burned-in text and
lead L/R markers; heights from 400 to 3000 px, and 8- or 16-bit output. The ground truth follows the box
definition of :mod:`koa_ray.data.roi`: a square centred on the joint-space centre with side
``joint_width * (1 + margin)``; for real crops the joint width and centre are the measured fractions of the crop
(``REAL_CROP_JOINT_FRAC``, ``REAL_CROP_JOINT_Y``, facts about the data, not about a generator).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from koa_ray.data.roi import square_box
from koa_ray.data.synthetic import GT_MARGIN, REAL_CROP_JOINT_FRAC, REAL_CROP_JOINT_Y


def _lowpass_noise(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """1-D smooth noise of unit std, correlation length ``scale`` samples."""
    v = cv2.GaussianBlur(rng.standard_normal((1, n + 8)).astype(np.float32), (0, 0), max(scale, 0.5)).ravel()[4:-4]
    return v / (v.std() + 1e-6)


# ------------------------------------------------------------------------------------------------ stitched (real)
def _extend(profile: np.ndarray, rows: int, narrow_to: float, rng: np.random.Generator, floor: float) -> np.ndarray:
    """``rows`` rows continuing an edge band whose column profile is ``profile``: each row is the profile squeezed
    horizontally about its bone centre by a factor going from 1 to ``narrow_to`` (a shaft), the squeezed-out
    columns filled with the soft-tissue level ``floor``, plus column streaks."""
    w = profile.size
    x = np.arange(w, dtype=np.float32)
    c = float(np.average(x, weights=np.clip(profile - profile.min(), 1e-3, None)))
    out = np.empty((rows, w), np.float32)
    t = np.linspace(0.0, 1.0, rows, dtype=np.float32)
    k = 1.0 - (1.0 - narrow_to) * np.clip(t / rng.uniform(0.35, 0.7), 0.0, 1.0) ** rng.uniform(0.7, 1.5)
    for i in range(rows):
        out[i] = np.interp(c + (x - c) / k[i], x, profile, left=floor, right=floor)
    streak = _lowpass_noise(rng, w, rng.uniform(1.0, 3.0))[None, :] * rng.uniform(3, 9)
    return out + streak * np.clip(t[:, None] * 4, 0, 1)


def _leg_from_crop(crop: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """One leg (float32) around a real crop resized to ``size``; returns (leg, (cx, cy, joint_width))."""
    src = cv2.resize(crop.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    band = max(4, int(0.1 * size))
    floor = float(np.percentile(src, 8))
    up = int(size * rng.uniform(0.9, 2.2))
    down = int(size * rng.uniform(0.9, 2.2))
    side_pad = int(size * rng.uniform(0.08, 0.3))
    top = _extend(src[:band].mean(0), up, rng.uniform(0.45, 0.62), rng, floor)[::-1]
    bot = _extend(src[-band:].mean(0), down, rng.uniform(0.5, 0.7), rng, floor)
    body = np.vstack([top, src, bot])
    # soft tissue beside the knee: the outer columns' level, smoothed along the leg (no bone edges, no joint space
    # continued sideways), falling off outwards
    h = body.shape[0]
    fall = np.linspace(1.0, rng.uniform(0.6, 0.9), side_pad, dtype=np.float32)[None, :]
    pads = []
    for edge in (body[:, :band].mean(1, keepdims=True), body[:, -band:].mean(1, keepdims=True)):
        level = cv2.GaussianBlur(np.minimum(edge, np.percentile(edge, 60)), (1, 0), sigmaX=0.5, sigmaY=0.3 * size)
        pads.append(level * fall)
    body = np.hstack([pads[0][:, ::-1], body, pads[1]])
    h, w = body.shape
    # feathered seam: the crop keeps its pixels in its interior and blends into the extension at its borders
    alpha = np.zeros((h, w), np.float32)
    alpha[up:up + size, side_pad:side_pad + size] = 1.0
    alpha = cv2.GaussianBlur(alpha, (0, 0), 0.03 * size + 1) * alpha
    smooth = cv2.GaussianBlur(body, (0, 0), 0.04 * size + 1)
    body = alpha * body + (1 - alpha) * (0.5 * body + 0.5 * smooth)
    # soft-tissue silhouette: the leg narrows towards the ankle, widens towards the thigh, fades to air
    ys = np.arange(h, dtype=np.float32)
    half = 0.5 * w * (1.0 + 0.25 * np.clip((up - ys) / max(up, 1), 0, 1) - 0.2 * np.clip((ys - up - size) / max(down, 1), 0, 1))
    dx = np.abs(np.arange(w, dtype=np.float32)[None, :] - w / 2)
    env = 1.0 / (1.0 + np.exp((dx - half[:, None] * rng.uniform(0.85, 1.0)) / (0.02 * size + 1)))
    leg = body * np.maximum(env, alpha)
    return leg, (side_pad + size / 2.0, up + REAL_CROP_JOINT_Y * size, REAL_CROP_JOINT_FRAC * size)


def stitched_film(crops: list[np.ndarray], rng: np.random.Generator, *, height: int | None = None,
                  margin: float = GT_MARGIN, clutter: bool = True, bits: int = 8, implants: tuple[bool, ...] = ()):
    """A film from one or two real crops (two: ``crops[0]`` = patient's right knee, drawn on the image-left).

    Returns ``(img, boxes)``: uint8/uint16 image and ``[{x0, y0, x1, y1, side}]`` from image-left to image-right
    (sides 'R', 'L' for two knees, 'U' for one)."""
    size = int(rng.integers(200, 420))
    legs = [_leg_from_crop(c, int(size * rng.uniform(0.95, 1.05)), rng) for c in crops]
    gap = int(size * rng.uniform(-0.12, 0.6)) if len(legs) == 2 else 0
    outer = [int(size * rng.uniform(0.05, 0.5)) for _ in range(2)]
    dy = [int(size * rng.normal(0, 0.05)) for _ in legs]
    top_pad = int(size * rng.uniform(0.05, 0.4))
    fh = max(leg.shape[0] + abs(d) for (leg, _), d in zip(legs, dy)) + 2 * top_pad
    fw = outer[0] + outer[1] + sum(leg.shape[1] for leg, _ in legs) + gap
    bg = rng.uniform(0, 30)
    film = np.full((fh, fw), bg, np.float32)
    x, boxes = outer[0], []
    for (leg, (cx, cy, jw)), d in zip(legs, dy):
        lh, lw = leg.shape
        y = top_pad + max(0, d) + (fh - 2 * top_pad - lh - abs(d)) // 2
        region = film[y:y + lh, x:x + lw]
        np.maximum(region, bg + np.clip(leg - bg, 0, None), out=region)  # touching legs overlap as tissue does
        boxes.append((x + cx, y + cy, jw))
        x += lw + gap
    sides = ["R", "L"] if len(legs) == 2 else ["U"]
    return _finish(film, boxes, sides, rng, height=height, margin=margin, clutter=clutter, bits=bits, implants=implants)


# ------------------------------------------------------------------------------------------------ drawn
def _draw_knee(atten: np.ndarray, cx: float, cy: float, jw: float, rng: np.random.Generator, grade: int,
               long_leg: bool) -> None:
    """Femur, condyles, tibia, fibula and patella of one knee, joint-space centre (cx, cy), joint width ``jw``."""
    h = atten.shape[0]
    bone = np.zeros_like(atten)
    gap = jw * (0.075 - 0.014 * grade) * rng.uniform(0.8, 1.2)
    gap = max(gap, 0.004 * jw)
    tilt = rng.uniform(-0.03, 0.03)
    # condyles (two ellipses, rounded at the outer margins as in the coronal plane) and femoral metaphysis/shaft
    cond_y = cy - gap / 2
    for sgn in (-1, 1):
        ex, ey = cx + sgn * jw * 0.25, cond_y - jw * 0.2
        cv2.ellipse(bone, (int(ex), int(ey)), (int(jw * 0.25), int(jw * 0.2 + tilt * sgn * jw)), 0, 0, 360, 1.0, -1)
    cv2.rectangle(bone, (int(cx - jw * 0.42), int(cond_y - jw * 0.55)), (int(cx + jw * 0.42), int(cond_y - jw * 0.2)),
                  1.0, -1)
    shaft_top = 0 if not long_leg else int(cy - 4.2 * jw)
    pts = np.array([[cx - jw * 0.45, cond_y - jw * 0.5], [cx - jw * 0.2, cond_y - jw * 1.3], [cx - jw * 0.19, shaft_top],
                    [cx + jw * 0.19, shaft_top], [cx + jw * 0.2, cond_y - jw * 1.3], [cx + jw * 0.45, cond_y - jw * 0.5]],
                   np.int32)
    cv2.fillPoly(bone, [pts], 1.0)
    cv2.ellipse(bone, (int(cx), int(cond_y - jw * 0.05)), (int(jw * 0.07), int(jw * 0.12)), 0, 0, 360, 0.25, -1)  # notch
    # tibia: plateau, spines, shaft; fibula
    pl_y = cy + gap / 2
    plateau = np.array([[cx - jw * 0.4, pl_y], [cx + jw * 0.4, pl_y], [cx + jw * 0.5, pl_y + jw * 0.07],
                        [cx + jw * 0.42, pl_y + jw * 0.3], [cx + jw * 0.2, pl_y + jw * 0.7],
                        [cx + jw * 0.18, h if not long_leg else cy + 3.6 * jw],
                        [cx - jw * 0.18, h if not long_leg else cy + 3.6 * jw], [cx - jw * 0.2, pl_y + jw * 0.7],
                        [cx - jw * 0.42, pl_y + jw * 0.3], [cx - jw * 0.5, pl_y + jw * 0.07]], np.int32)
    cv2.fillPoly(bone, [plateau], 1.0)
    for sx in (-0.05, 0.05):
        tri = np.array([[cx + (sx - 0.04) * jw, pl_y + jw * 0.03], [cx + sx * jw, pl_y - gap * 0.6],
                        [cx + (sx + 0.04) * jw, pl_y + jw * 0.03]], np.int32)
        cv2.fillPoly(bone, [tri], 1.0)
    fib_side = 1 if rng.random() < 0.5 else -1
    fx = cx + fib_side * jw * 0.42
    cv2.rectangle(bone, (int(fx - jw * 0.06), int(pl_y + jw * 0.2)),
                  (int(fx + jw * 0.06), int(h if not long_leg else cy + 3.5 * jw)), 0.8, -1)
    cv2.ellipse(bone, (int(fx), int(pl_y + jw * 0.22)), (int(jw * 0.09), int(jw * 0.07)), 0, 0, 360, 0.9, -1)
    if long_leg:  # femoral head at the hip, talus at the ankle: joint spaces of their own
        cv2.circle(bone, (int(cx - jw * 0.1), int(cy - 4.3 * jw)), int(jw * 0.25), 1.0, -1)
        cv2.circle(bone, (int(cx - jw * 0.1), int(cy - 4.3 * jw)), int(jw * 0.27), 0.0, max(1, int(jw * 0.03)))
        cv2.ellipse(bone, (int(cx), int(cy + 3.75 * jw)), (int(jw * 0.25), int(jw * 0.12)), 0, 0, 360, 1.0, -1)
    # cortex brighter than the medulla, trabecular texture
    k = max(3, int(jw * 0.05)) | 1
    rim = bone - cv2.erode(bone, np.ones((k, k), np.uint8))
    tex = cv2.GaussianBlur(rng.standard_normal(bone.shape).astype(np.float32), (0, 0), max(1.0, jw * 0.01))
    atten += bone * (0.55 + 0.05 * tex / (tex.std() + 1e-6)) + 0.35 * np.clip(rim, 0, None)
    pat = np.zeros_like(atten)
    cv2.ellipse(pat, (int(cx + rng.normal(0, 0.03) * jw), int(cond_y - jw * 0.35)), (int(jw * 0.2), int(jw * 0.25)),
                0, 0, 360, 0.15, -1)
    atten += cv2.GaussianBlur(pat, (0, 0), jw * 0.03 + 1)


def drawn_film(rng: np.random.Generator, *, bilateral: bool, long_leg: bool = False, height: int | None = None,
               margin: float = GT_MARGIN, clutter: bool = True, bits: int = 8, implants: tuple[bool, ...] = ()):
    """A drawn PA film: one or two knees (image-left 'R'), or a long-leg standing film (hip to ankle)."""
    jw = float(rng.uniform(120, 260))
    n = 2 if bilateral else 1
    spacing = jw * rng.uniform(1.25, 2.0)
    fw = int(jw * rng.uniform(1.5, 2.2) + (n - 1) * spacing)
    fh = int(jw * (9.5 if long_leg else rng.uniform(1.6, 3.0)))
    ys = np.arange(fh, dtype=np.float32)
    xs = np.arange(fw, dtype=np.float32)
    tissue = np.zeros((fh, fw), np.float32)
    bones = np.zeros((fh, fw), np.float32)
    boxes = []
    for i in range(n):
        cx = fw / 2 + (i - (n - 1) / 2) * spacing + rng.normal(0, 0.03) * jw
        cy = fh * (0.5 if long_leg else rng.uniform(0.4, 0.6)) + rng.normal(0, 0.04) * jw
        w_i = jw * rng.uniform(0.95, 1.05)
        # soft tissue: path length through an elliptical limb cross-section (thick in the middle, thin at the
        # skin line); legs side by side in a PA view are never crossed by the same ray, so they combine by max
        half = w_i * rng.uniform(0.7, 0.95) * (1 + 0.15 * np.clip((cy - ys) / fh, 0, None))[:, None]
        path = np.sqrt(np.clip(1.0 - ((xs[None, :] - cx) / half) ** 2, 0.0, None))
        np.maximum(tissue, path * rng.uniform(0.2, 0.35), out=tissue)
        _draw_knee(bones, cx, cy, w_i, rng, int(rng.integers(5)), long_leg)
        boxes.append((cx, cy, w_i))
    atten = tissue + bones
    film = 255.0 * (1.0 - np.exp(-2.2 * atten)) * rng.uniform(0.85, 1.0) + rng.uniform(0, 20)
    sides = ["R", "L"] if bilateral else ["U"]
    return _finish(film, boxes, sides, rng, height=height, margin=margin, clutter=clutter, bits=bits, implants=implants)


# ------------------------------------------------------------------------------------------------ common
def film_clutter(img: np.ndarray, rng: np.random.Generator, keep_out: list[tuple[int, int, int, int]]) -> None:
    """In place: a ruler at an edge, a calibration sphere, burned-in text and an L/R lead marker, away from the
    ``keep_out`` boxes (the knees)."""
    h, w = img.shape
    hi = float(np.percentile(img, 99.5))
    if rng.random() < 0.7:  # ruler: bright strip with ticks along the left or right edge
        rw = max(6, int(0.025 * w))
        x0 = 2 if rng.random() < 0.5 else w - rw - 2
        img[:, x0:x0 + rw] = np.maximum(img[:, x0:x0 + rw], 0.55 * hi)
        step = max(4, int(h / rng.uniform(40, 90)))
        for i, y in enumerate(range(0, h, step)):
            tl = rw if i % 5 == 0 else rw // 2
            cv2.line(img, (x0, y), (x0 + tl, y), 0.15 * hi, max(1, h // 900))
    if rng.random() < 0.7:  # calibration sphere (25 mm steel ball): a bright disc with a soft rim
        r = int(h * rng.uniform(0.015, 0.035))
        for _ in range(20):
            cx, cy = int(rng.uniform(r, w - r)), int(rng.uniform(r, h - r))
            if all(not (x0 - r < cx < x1 + r and y0 - r < cy < y1 + r) for x0, y0, x1, y1 in keep_out):
                disc = np.zeros_like(img)
                cv2.circle(disc, (cx, cy), r, 1.0, -1)
                disc = cv2.GaussianBlur(disc, (0, 0), r * 0.15 + 0.5)
                np.maximum(img, disc * hi, out=img)
                break
    fs = h / 900 * rng.uniform(0.6, 1.2)
    text = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
    for i in range(int(rng.integers(1, 4))):  # burned-in text in a corner
        txt = rng.choice(["PA FIXED FLEXION", "STANDING AP", "ID 9012345  2004-03-12", "KV 70 MAS 12", "BILAT KNEES"])
        y = int((0.04 + 0.035 * i) * h) + 10
        x = int(0.06 * w) if rng.random() < 0.5 else int(0.55 * w)
        cv2.putText(text, str(txt), (x, y), cv2.FONT_HERSHEY_SIMPLEX, fs, 230, max(1, int(2 * fs)), cv2.LINE_AA)
    letter, pos = ("R", int(0.03 * w)) if rng.random() < 0.5 else ("L", int(0.9 * w))
    cv2.putText(text, letter, (pos, int(0.95 * h)), cv2.FONT_HERSHEY_DUPLEX, 2 * fs, 255, max(1, int(4 * fs)))
    np.maximum(img, text.astype(np.float32) * (hi / 255.0), out=img)


def draw_implant(film: np.ndarray, cx: float, cy: float, jw: float, rng: np.random.Generator) -> None:
    """In place: a total knee replacement as a PA film shows it, around the joint-space centre ``(cx, cy)`` of a knee
    of joint width ``jw``: a metal femoral component capping both condyles (the notch open between them), a
    radiolucent polyethylene insert (the new "joint space"), and a metal tibial tray with its keel. Metal stops
    nearly all of the beam, so it is drawn above the film's brightest level (it saturates) with sharp edges."""
    metal = np.zeros_like(film)
    ins = jw * rng.uniform(0.035, 0.06)  # half the insert's thickness
    fem_bottom, tray_top = cy - ins, cy + ins
    for sgn in (-1, 1):  # condylar runners
        cv2.ellipse(metal, (int(cx + sgn * jw * 0.24), int(fem_bottom - jw * 0.17)),
                    (int(jw * rng.uniform(0.22, 0.26)), int(jw * 0.17)), 0, 0, 360, 1.0, -1)
    cv2.rectangle(metal, (int(cx - jw * 0.44), int(fem_bottom - jw * rng.uniform(0.3, 0.42))),
                  (int(cx + jw * 0.44), int(fem_bottom - jw * 0.17)), 1.0, -1)
    cv2.ellipse(metal, (int(cx), int(fem_bottom)), (int(jw * 0.07), int(jw * 0.16)), 0, 0, 360, 0.0, -1)  # notch box
    metal[int(fem_bottom) + 1:] = 0.0
    tray = np.array([[cx - jw * 0.45, tray_top], [cx + jw * 0.45, tray_top], [cx + jw * 0.45, tray_top + jw * 0.05],
                     [cx + jw * 0.08, tray_top + jw * 0.05], [cx + jw * 0.05, tray_top + jw * rng.uniform(0.3, 0.45)],
                     [cx - jw * 0.05, tray_top + jw * 0.4], [cx - jw * 0.08, tray_top + jw * 0.05],
                     [cx - jw * 0.45, tray_top + jw * 0.05]], np.int32)
    cv2.fillPoly(metal, [tray], 1.0)
    metal = cv2.GaussianBlur(metal, (0, 0), max(0.5, jw * 0.004))
    level = float(film.max()) * 1.05 + 5.0
    np.maximum(film, metal * level, out=film)


def _finish(film: np.ndarray, boxes: list[tuple[float, float, float]], sides: list[str], rng: np.random.Generator, *,
            height: int | None, margin: float, clutter: bool, bits: int, implants: tuple[bool, ...] = ()):
    if any(implants):  # drawn with a stream of their own, so films without implants stay as they were
        metal_rng = np.random.default_rng(int(film.shape[0] * 7919 + film.shape[1]))
        for (cx, cy, jw), on in zip(boxes, implants):
            if on:
                draw_implant(film, cx, cy, jw, metal_rng)
    h0 = film.shape[0]
    height = int(height or rng.integers(400, 3001))
    s = height / h0
    out = cv2.resize(film, (max(8, int(round(film.shape[1] * s))), height),
                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    truth = []
    for (cx, cy, jw), side in zip(boxes, sides):
        x0, y0, x1, y1 = square_box(cx * s, cy * s, jw * s * (1 + margin))
        truth.append({"x0": x0, "y0": y0, "x1": x1, "y1": y1, "side": side})
    if clutter:
        film_clutter(out, rng, [(t["x0"], t["y0"], t["x1"], t["y1"]) for t in truth])
    out += rng.standard_normal(out.shape).astype(np.float32) * rng.uniform(1.0, 4.0)
    out = cv2.GaussianBlur(out, (0, 0), 0.4 + height / 2000)
    out = np.clip(out, 0, 255)
    if bits == 16:  # a 12-bit detector range in a 16-bit container, with an offset
        out = (out * rng.uniform(12, 16) + rng.uniform(0, 2000)).astype(np.uint16)
    else:
        out = out.astype(np.uint8)
    return out, truth


# ------------------------------------------------------------------------------------------------ held-out sets
def held_out_set(gen: str, n: int, seed: int, real: Path | None = None, heights: tuple[int, int] = (400, 3000),
                 height: int | None = None, implants: bool = False):
    """``n`` single-knee and ``n`` bilateral films from generator ``gen`` ('stitched': real crops from
    ``real/val/*/*{R,L}.jpg``; 'drawn': every 4th bilateral one a long-leg film), fixed seeds, heights drawn from
    ``heights`` (or all ``height``), a quarter of them 16-bit. ``implants``: the image-left knee of every film has a
    knee replacement (:func:`draw_implant`), its truth ``implant=True``. Yields ``(img, truth)``."""
    if gen == "stitched":
        right, left = sorted(real.glob("val/*/*R.jpg")), sorted(real.glob("val/*/*L.jpg"))

        def read(p):
            return cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
    for i in range(2 * n):
        rng = np.random.default_rng(seed + i)
        two = i % 2 == 1
        kw = {"height": height or int(rng.integers(heights[0], heights[1] + 1)), "bits": 16 if i % 4 == 3 else 8,
              "implants": (implants, False)}
        if gen == "stitched":
            crops = [read(right[(7 * i) % len(right)])] + ([read(left[(11 * i) % len(left)])] if two else [])
            img, truth = stitched_film(crops, rng, **kw)
        else:
            img, truth = drawn_film(rng, bilateral=two, long_leg=two and i % 8 == 7, **kw)
        for t, on in zip(truth, kw["implants"]):
            t["implant"] = on
        yield img, truth


def held_out_scores(films, detect) -> dict:
    """Localisation figures of ``detect`` (image -> boxes) over ``(img, truth)`` films: mean best-match IoU for
    single and bilateral films, the share of bilateral films found as two knees, and as R then L, and the share of
    single films kept as one knee; the share of knees with a drawn implant whose box is flagged ``implant``, and of
    knees without one whose box is."""
    from koa_ray.data.roi import box_iou

    single, bilateral, two, one, sides, flagged, false_flags = [], [], [], [], [], [], []
    for img, truth in films:
        boxes = detect(img)
        for t in truth:  # the implant flag of the box that matches each knee best (a knee no box covers: unflagged)
            best = max(boxes, key=lambda b: box_iou(b, (t["x0"], t["y0"], t["x1"], t["y1"])))
            found = box_iou(best, (t["x0"], t["y0"], t["x1"], t["y1"])) > 0.3
            (flagged if t.get("implant") else false_flags).append(found and bool(best.implant))
        if len(truth) == 2:
            two.append(len(boxes) == 2)
            sides.append([b.side for b in boxes] == ["R", "L"])
        else:
            one.append(len(boxes) == 1)
        for t in truth:
            iou = max(box_iou(b, (t["x0"], t["y0"], t["x1"], t["y1"])) for b in boxes)
            (bilateral if len(truth) == 2 else single).append(iou)
    return {"single_iou": float(np.mean(single)), "bilateral_iou": float(np.mean(bilateral)),
            "two_knee_rate": float(np.mean(two)), "sides_rl": float(np.mean(sides)),
            "single_kept_whole": float(np.mean(one)), "n_films": len(one) + len(two),
            "implants_flagged": float(np.mean(flagged)) if flagged else None,
            "false_implant_flags": float(np.mean(false_flags)) if false_flags else None}
