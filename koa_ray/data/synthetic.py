"""Procedural knee radiographs with known Kellgren-Lawrence (KL) grade and joint location.

Nothing here is real patient data. The renderer draws a simplified *projection* (attenuation) model of the knee and
turns it into an 8-bit image the way a radiograph looks after windowing:

* **Anatomy** (upright, right-knee orientation, units of the tibiofemoral joint width ``W``): the distal femur (shaft
  flaring into two rounded condyles separated by the intercondylar notch, the shaft slanting laterally upwards like
  the anatomical femoral axis), the proximal tibia (plateau with the two tibial spines poking into the notch,
  metaphysis narrowing into the shaft), the fibular head and shaft on the lateral side, a faint patella superimposed
  on the femur, and the leg's soft-tissue envelope. Bones get a thickness-dependent density, a brighter cortical rim
  and vertically streaked trabecular texture. Left knees are the mirror image (fibula on the image-right side).
* **KL-dependent signs**: joint-space narrowing that increases with grade (mostly medial, with patient-to-patient
  spread so adjacent grades overlap); marginal osteophytes (spurs at the femoral and tibial joint margins) that are
  doubtful/tiny at KL1 and definite from KL2, growing with grade; subchondral sclerosis (bright bands in the bone next
  to the joint) from KL3 (occasionally faint at KL2); at KL4 near-obliterated medial space, irregular/flattened
  articular surfaces, lateral tibial subluxation, and subchondral cysts (also sometimes at KL3).
* **Acquisition**: random pose (rotation, translation), scale, exposure and contrast (gamma, window), a smooth
  heel-effect gradient, quantum-like noise, detector blur, and (for single-knee crops) CLAHE contrast enhancement like
  the public Chen 2018 / OAI crop set.

Three products are built on the low-level renderer :func:`draw_knee` (one knee at an arbitrary centre and scale on a
canvas of attenuation values):

* :func:`render_knee` - a 224 px single-knee crop centred on the joint (like the Chen 2018 crops).
* :func:`render_bilateral` - a full PA radiograph with both knees (femur shafts above, tibia/fibula below).
* :func:`embed_in_canvas` - a *real* knee crop placed at random scale/offset inside a larger radiograph-like canvas.

Ground-truth joint boxes use exactly the definition of :mod:`koa_ray.data.roi`: a square centred on the joint-space
centre whose side is ``joint_width * (1 + margin)`` (``joint_width`` = medio-lateral width of the tibiofemoral joint,
i.e. of the femoral condyles / tibial plateau, osteophytes excluded), built by :func:`koa_ray.data.roi.square_box`.
Boxes may extend past the image border (the ROI cropper pads).

:func:`make_dataset` writes OAI-style folders (``{split}/{grade}/{patient_id}{L|R}.png``) or bilateral radiographs
with a ``boxes.csv``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from koa_ray.data.roi import square_box

KL_PRIORS = (0.39, 0.18, 0.26, 0.13, 0.04)
"""Class priors of KL 0..4, a plausible imbalance close to the real OAI/Chen training set."""

GT_MARGIN = 0.15
"""Margin of the ground-truth boxes; equals the default ``RoiConfig.margin``."""

REAL_CROP_JOINT_FRAC = 0.86
"""Joint width / crop width of the Chen 2018 224 px crops, read off by eye on 8 validation crops (KL0-2) against
a pixel grid: condyles/plateau span 0.82-0.90 of the crop, mean 0.86. With ``GT_MARGIN`` the ground-truth box of an
embedded real crop is then ~0.99x the crop."""

REAL_CROP_JOINT_Y = 0.56
"""Joint-space centre height / crop height of the same crops (measured 0.53-0.60, mean 0.56: the crops are centred
slightly above the joint line). The horizontal centre is at 0.50."""

# --- per-grade pathology parameters (index = KL grade) -------------------------------------------------------------
_GAP_MEAN = (0.074, 0.063, 0.050, 0.033, 0.012)  # medial joint-space width / joint width
_GAP_SD = (0.008, 0.009, 0.009, 0.009, 0.006)
_OSTEO_P = (0.05, 0.45, 0.85, 0.97, 1.0)  # probability that a given joint margin carries a spur
_OSTEO_SIZE = (0.008, 0.016, 0.032, 0.052, 0.075)  # spur length / joint width
_SCLEROSIS_P = (0.0, 0.05, 0.25, 0.9, 1.0)
_SCLEROSIS_AMP = (0.0, 0.06, 0.10, 0.26, 0.40)
_IRREGULAR = (0.0, 0.0, 0.002, 0.005, 0.013)  # surface irregularity amplitude / joint width
_CYST_P = (0.0, 0.0, 0.03, 0.25, 0.5)
_BANK = 1024
_PATCH_RES = 110.0  # joint width (px) at which the anatomy is rasterised before warping onto the canvas


@dataclass(frozen=True)
class KneeParams:
    """Anatomy and pathology of one knee, in units of the joint width (canonical right-knee orientation:
    lateral = image-left = negative ``u``, medial = positive ``u``; ``v`` points down, 0 = joint-space centre)."""

    grade: int
    side: str  # 'R' or 'L'
    gap_med: float
    gap_lat: float
    osteo: tuple[float, float, float, float]  # femur-lat, femur-med, tibia-lat, tibia-med spur lengths (0 = none)
    scl_amp: float
    scl_thick: float
    irregular: float
    subluxation: float
    cysts: int
    cond_hw: float
    plat_hw: float
    femur_shaft_hw: float
    tibia_shaft_hw: float
    notch_depth: float
    notch_hw: float
    corner_r: float
    spine_h: float
    femur_slant: float
    fib_u: float
    fib_v: float
    leg_hw: float
    patella: float
    density: float
    cortex: float
    texture: float
    soft: float
    joint_fill: float


def sample_knee_params(grade: int, rng: np.random.Generator, side: str = "R") -> KneeParams:
    """Draw anatomy + KL-dependent pathology for one knee."""
    if grade not in range(5):
        raise ValueError(f"grade={grade!r}: must be an int in 0..4")
    if side not in ("L", "R"):
        raise ValueError(f"side={side!r}: must be 'L' or 'R'")
    u = rng.uniform
    gap_med = float(np.clip(rng.normal(_GAP_MEAN[grade], _GAP_SD[grade]), 0.004, 0.1))
    # OA narrows mostly one (here the medial) compartment; the lateral one stays more open
    lat_ratio = (u(0.9, 1.2), u(0.9, 1.25), u(1.0, 1.5), u(1.1, 1.8), u(1.5, 4.0))[grade]
    gap_lat = float(np.clip(gap_med * lat_ratio, 0.006, 0.075))
    osteo = []
    for k in range(4):
        medial = k % 2 == 1
        present = u() < _OSTEO_P[grade] * (1.0 if medial else 0.85)
        osteo.append(float(_OSTEO_SIZE[grade] * u(0.55, 1.35) * (1.15 if medial else 0.9)) if present else 0.0)
    for k in range(2):  # per margin one spur dominates (femoral or tibial), the opposite one stays small
        small = k if u() < 0.5 else k + 2
        osteo[small] *= u(0.0, 0.4)
    scl = float(_SCLEROSIS_AMP[grade] * u(0.6, 1.3)) if u() < _SCLEROSIS_P[grade] else 0.0
    return KneeParams(
        grade=int(grade), side=side, gap_med=gap_med, gap_lat=gap_lat, osteo=tuple(osteo),
        scl_amp=scl, scl_thick=u(0.035, 0.08), irregular=float(_IRREGULAR[grade] * u(0.6, 1.4)),
        subluxation=u(0.0, 0.035) if grade == 4 else 0.0, cysts=int(u() < _CYST_P[grade]) * int(rng.integers(1, 4)),
        cond_hw=u(0.47, 0.5), plat_hw=u(0.48, 0.52), femur_shaft_hw=u(0.2, 0.25), tibia_shaft_hw=u(0.15, 0.19),
        notch_depth=u(0.07, 0.12), notch_hw=u(0.07, 0.1), corner_r=u(0.16, 0.22), spine_h=u(0.05, 0.1),
        femur_slant=math.tan(math.radians(u(3.0, 8.0))), fib_u=u(-0.47, -0.41), fib_v=u(0.38, 0.5),
        leg_hw=u(0.55, 0.66), patella=u(0.04, 0.12), density=u(0.85, 1.15), cortex=u(0.15, 0.3),
        texture=u(0.03, 0.07), soft=u(0.45, 0.65), joint_fill=u(0.1, 0.3),
    )


# ------------------------------------------------------------------------------------------------- low level
def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _noise1d(rng: np.random.Generator, u: np.ndarray, amp: float, n: int = 24) -> np.ndarray:
    """Smooth random 1-D function over ``u`` (knots every ~0.1 W) with standard deviation ~``amp``."""
    if amp <= 0:
        return np.zeros_like(u)
    knots = rng.normal(0.0, amp, n)
    return np.interp(u, np.linspace(-1.2, 1.2, n), knots).astype(np.float32)


@lru_cache(maxsize=1)
def _noise_bank() -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seeded) 1024x1024 banks of white noise and of vertically streaked noise (trabecular texture), both
    zero-mean, unit-std. Random windows of them are much cheaper than fresh Gaussian noise and stay deterministic."""
    g = np.random.default_rng(20180601)
    white = g.standard_normal((_BANK, _BANK), dtype=np.float32)
    streak = cv2.GaussianBlur(g.standard_normal((_BANK, _BANK), dtype=np.float32), (0, 0), sigmaX=0.5, sigmaY=1.6)
    streak /= streak.std()
    return white, streak


def _noise(rng: np.random.Generator, h: int, w: int, kind: str = "white") -> np.ndarray:
    """(h, w) float32 zero-mean unit-std noise: a random window (random flips) of the bank, or fresh noise if larger."""
    white, streak = _noise_bank()
    bank = white if kind == "white" else streak
    if h > _BANK or w > _BANK:
        n = rng.standard_normal((h, w), dtype=np.float32)
        return n if kind == "white" else cv2.GaussianBlur(n, (0, 0), sigmaX=0.5, sigmaY=1.6) * 3.0
    y, x = int(rng.integers(0, _BANK - h + 1)), int(rng.integers(0, _BANK - w + 1))
    out = bank[y:y + h, x:x + w]
    return out[:, ::-1] if rng.random() < 0.5 else out


def _fill(mask: np.ndarray, pts_uv: list[tuple[float, float]], cx: float, cy: float, w: float) -> None:
    pts = np.array([[cx + a * w, cy + b * w] for a, b in pts_uv], np.float64)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)


def _add_dome(arr: np.ndarray, cx: float, cy: float, rx: float, ry: float, amp: float) -> None:
    """Add ``amp * sqrt(1 - r^2)`` (projection of an ellipsoid) inside the ellipse, touching only its bounding box."""
    h, w = arr.shape
    x0, x1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, w)
    y0, y1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, h)
    if x0 >= x1 or y0 >= y1 or rx <= 0 or ry <= 0:
        return
    xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / rx) ** 2
    ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / ry) ** 2
    arr[y0:y1, x0:x1] += amp * np.sqrt(np.clip(1.0 - ys[:, None] - xs[None, :], 0.0, None))


def _render_patch(p: KneeParams, w: float, extent: tuple[float, float, float, float],
                  rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Attenuation of one upright right knee covering ``extent`` = (left, right, up, down) in units of ``w`` around
    the joint centre. Returns a (h, w, 2) float32 patch (attenuation, bone mask) and the joint centre (x, y) in patch
    pixels."""
    left, right, up, down = extent
    pw = max(int(math.ceil((left + right) * w)), 8)
    ph = max(int(math.ceil((up + down) * w)), 8)
    cx, cy = left * w, up * w
    u = ((np.arange(pw, dtype=np.float32) + 0.5) - cx) / w  # (pw,)
    v = ((np.arange(ph, dtype=np.float32) + 0.5) - cy) / w  # (ph,)
    V = v[:, None]

    gap = p.gap_lat + (p.gap_med - p.gap_lat) / (1.0 + np.exp(-u / 0.05))
    # --- femur: shaft flaring into the condyles; distal contour = notch + rounded corners + convex condyles
    shift = np.where(v < -0.4, p.femur_slant * (v + 0.4), 0.0).astype(np.float32)  # lateral slant going up
    hw_f = p.femur_shaft_hw + (p.cond_hw - p.femur_shaft_hw) * _smoothstep((v + 1.4) / 1.1)
    a = np.abs(u) - (p.cond_hw - p.corner_r)
    corner = np.where(a > 0, p.corner_r - np.sqrt(np.clip(p.corner_r ** 2 - a ** 2, 0, None)), 0.0)
    flat = 0.4 if p.grade == 4 else 1.0
    y_f = (-gap / 2 - p.notch_depth * np.exp(-(u / p.notch_hw) ** 4) - corner
           - flat * 0.35 * (np.abs(u) - 0.27) ** 2 + _noise1d(rng, u, p.irregular)).astype(np.float32)
    rf = (u[None, :] - shift[:, None]) / hw_f[:, None]  # normalised distance from the femoral axis
    femur = ((V < y_f[None, :]) & (np.abs(rf) < 1.0)).astype(np.uint8)
    # --- tibia: plateau with spines, margins sloping down, metaphysis narrowing into the shaft
    ut = u - p.subluxation
    spines = p.spine_h * (np.exp(-((ut - 0.045) / 0.03) ** 2) + 0.85 * np.exp(-((ut + 0.05) / 0.03) ** 2))
    y_t = (gap / 2 + 0.05 * _smoothstep((np.abs(ut) - 0.36) / 0.14) - spines
           + _noise1d(rng, u, p.irregular)).astype(np.float32)
    hw_t = p.tibia_shaft_hw + (p.plat_hw - p.tibia_shaft_hw) * (1 - _smoothstep((v - 0.1) / 1.4))
    rt = ut[None, :] / hw_t[:, None]
    tibia = ((V > y_t[None, :]) & (np.abs(rt) < 1.0)).astype(np.uint8)
    # --- osteophytes: spurs at the four joint margins, pointing outwards and towards the joint
    for k, s in enumerate(p.osteo):
        if s <= 0:
            continue
        sgn = 1.0 if k % 2 else -1.0
        g = p.gap_med if sgn > 0 else p.gap_lat
        if k < 2:  # femoral spur: from the outer wall above the rounded corner, pointing out and down
            e = p.cond_hw
            pts = [(sgn * (e - 0.01), -g / 2 - p.corner_r - 1.2 * s), (sgn * (e + 0.6 * s), -g / 2 - 0.4 * p.corner_r),
                   (sgn * (e - 0.01), -g / 2 - 0.8 * p.corner_r)]
            _fill(femur, pts, cx, cy, w)
        else:  # tibial spur: from the wall below the plateau margin, pointing out and up
            e = p.plat_hw + p.subluxation * sgn
            pts = [(sgn * (e - 0.01), g / 2 + 0.06 + 1.2 * s), (sgn * (e + 0.6 * s), g / 2 + 0.035 - 0.2 * s),
                   (sgn * (e - 0.01), g / 2 + 0.05)]
            _fill(tibia, pts, cx, cy, w)
    bones = (femur | tibia).astype(np.float32)
    # density ~ thickness of a cylinder-ish bone + a cortical rim (box blur of the mask) + streaked trabeculae
    thick = np.sqrt(np.clip(1.0 - np.minimum(rf * rf, rt * rt), 0.0, 1.0))
    r = max(int(0.035 * w), 2)
    rim = bones * np.clip(2.0 * (1.0 - cv2.blur(bones, (r, r))), 0.0, 1.0)
    out = bones * (p.density * (0.62 + 0.38 * thick)) + p.cortex * rim
    # joint space is not empty on a PA film: menisci and the posterior condylar rims project into it
    inside = (np.abs(u) < p.cond_hw)[None, :] & (V > y_f[None, :] - 0.01) & (V < y_t[None, :] + 0.01)
    out += (p.joint_fill * p.density) * inside
    # subchondral sclerosis: bright bands next to the articular surfaces, medial-dominant
    if p.scl_amp > 0:
        wmed = (0.45 + 0.55 / (1.0 + np.exp(-u / 0.05)))[None, :]
        dist = np.minimum(np.abs(y_f[None, :] - V), np.abs(V - y_t[None, :]))
        out += (p.scl_amp * wmed) * bones * np.exp(-dist / p.scl_thick)
    # subchondral cysts: small dark holes under the medial surfaces
    for _ in range(p.cysts):
        cu = rng.uniform(0.08, 0.4)
        col = int(np.clip(cx + cu * w, 0, pw - 1))
        on_tibia = rng.random() < 0.5
        cv_ = y_t[col] + rng.uniform(0.03, 0.07) if on_tibia else y_f[col] - rng.uniform(0.03, 0.07)
        rc = rng.uniform(0.012, 0.028) * w
        _add_dome(out, cx + cu * w, cy + cv_ * w, rc, 0.8 * rc, -0.45 * p.density)
    # fibular head (ellipsoid) + shaft, patella, all superimposed
    fx, fy = cx + p.fib_u * w, cy + p.fib_v * w
    _add_dome(out, fx, fy, 0.085 * w, 0.075 * w, 0.35 * p.density)
    y0 = int(max(fy, 0))
    if y0 < ph:
        axis = fx - 0.01 * w + 0.03 * (np.arange(y0, ph, dtype=np.float32) - fy)
        d = (np.arange(pw, dtype=np.float32)[None, :] + 0.5 - axis[:, None]) / (0.045 * w)
        out[y0:] += 0.4 * p.density * np.sqrt(np.clip(1.0 - d * d, 0.0, None))
    _add_dome(out, cx + 0.02 * w, cy - 0.33 * w, 0.2 * w, 0.23 * w, p.patella)
    _add_dome(out, cx, cy - 0.1 * w, 0.1 * w, 0.12 * w, 0.15 * p.density)  # posterior condyles overlapping the notch
    # soft-tissue envelope (thigh wider than the knee, calf a little wider)
    hs = p.leg_hw + 0.3 * _smoothstep(-(v + 0.4) / 1.5) + 0.08 * _smoothstep((v - 0.3) / 0.8)
    ds = (u[None, :] - 0.5 * shift[:, None]) / hs[:, None]
    out += p.soft * np.sqrt(np.clip(1.0 - ds * ds, 0.0, 1.0))
    out = cv2.merge([out, bones])
    if p.side == "L":
        out = np.ascontiguousarray(out[:, ::-1])
        cx = pw - cx
    return out, cx, cy


def draw_knee(atten: np.ndarray, centre: tuple[float, float], joint_width: float, params: KneeParams,
              rng: np.random.Generator, *, angle_deg: float = 0.0,
              margin: float = GT_MARGIN) -> tuple[int, int, int, int]:
    """Add one knee (bones + soft tissue attenuation) to the float32 canvas ``atten`` in place.

    Args:
        atten: (H, W) float32 attenuation canvas (0 = air); the leg is drawn across the whole canvas height.
        centre: joint-space centre (x, y) in canvas pixels.
        joint_width: medio-lateral joint width in pixels (the anatomical scale).
        params: anatomy/pathology from :func:`sample_knee_params` (``params.side`` sets the orientation).
        angle_deg: in-plane rotation about the joint centre.
        margin: margin of the returned ground-truth box.
    Returns:
        The ground-truth joint box ``(x0, y0, x1, y1)`` (square, exclusive ends, may exceed the canvas).
    """
    h, wc = atten.shape
    x, y = float(centre[0]), float(centre[1])
    wj = float(joint_width)
    slack = abs(math.sin(math.radians(angle_deg))) * max(h, wc) / wj + 0.05
    up = min(y / wj + slack, 6.0) + 0.05
    down = min((h - y) / wj + slack, 6.0) + 0.05
    left = min(x / wj + slack, 1.35)
    right = min((wc - x) / wj + slack, 1.35)
    if params.side == "L":
        left, right = right, left
    f = min(1.0, _PATCH_RES / wj)  # rasterisation scale
    patch, pcx, pcy = _render_patch(params, wj * f, (left, right, up, down), rng)
    m = cv2.getRotationMatrix2D((pcx, pcy), angle_deg, 1.0 / f)
    m[:, 2] += (x - pcx, y - pcy)
    warped = cv2.warpAffine(patch, m, (wc, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    atten += warped[..., 0]
    atten += warped[..., 1] * _noise(rng, h, wc, "streak") * params.texture
    return square_box(x, y, wj * (1.0 + margin))


def _expose(atten: np.ndarray, rng: np.random.Generator, *, background: float, clahe: bool,
            noise: float, blur: float) -> np.ndarray:
    """Attenuation → 8-bit display image: exposure/contrast, heel-effect gradient, noise, blur, optional CLAHE."""
    h, w = atten.shape
    gamma = rng.uniform(0.75, 1.3)
    ref = max(float(np.percentile(atten[::3, ::3], 99.5)), 1e-3)
    img = np.power(np.clip(atten * (1.0 / ref), 0, None), gamma)
    ang = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.0, 0.25)
    gx = (np.arange(w, dtype=np.float32) / w - 0.5) * (amp * math.cos(ang))
    gy = (np.arange(h, dtype=np.float32) / h - 0.5) * (amp * math.sin(ang))
    img = background + (1.0 - background) * img * (1.0 + gx[None, :] + gy[:, None])
    img = img * rng.uniform(190, 245) + rng.uniform(-10, 10)
    # signal-dependent (quantum-like) noise
    img += _noise(rng, h, w) * noise * (0.6 + 0.4 * img / 255.0)
    if blur > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    out = np.clip(img, 0, 255).astype(np.uint8)
    if clahe:
        tiles = int(rng.integers(4, 9))
        out = cv2.createCLAHE(clipLimit=rng.uniform(1.5, 3.0), tileGridSize=(tiles, tiles)).apply(out)
    return out


# --------------------------------------------------------------------------------------------- products
def render_knee(grade: int, rng: np.random.Generator, size: int = 224,
                side: str = "R") -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A single-knee crop like the Chen 2018 / OAI crops: joint centred, condyles above, plateau below.

    Args:
        grade: KL grade 0..4.
        rng: random generator (the only source of randomness: same state → same image).
        size: output side in pixels.
        side: 'R' (fibula on the image-left) or 'L' (mirrored).
    Returns:
        ``(img, box)``: (size, size) uint8 image and the ground-truth joint box ``(x0, y0, x1, y1)`` (square, exclusive
        ends; side = joint width * (1 + GT_MARGIN), so ~the whole crop; may slightly exceed the image).
    """
    if size < 16:
        raise ValueError(f"size={size}: must be >= 16")
    params = sample_knee_params(grade, rng, side)
    wj = size / (1.0 + GT_MARGIN) * rng.uniform(0.88, 1.08)
    cx = size / 2 + rng.normal(0, 0.025) * size
    cy = size / 2 + rng.normal(0, 0.03) * size
    atten = np.zeros((size, size), np.float32)
    box = draw_knee(atten, (cx, cy), wj, params, rng, angle_deg=rng.uniform(-5, 5))
    img = _expose(atten, rng, background=rng.uniform(0.0, 0.15), clahe=True, noise=rng.uniform(2, 9),
                  blur=rng.uniform(0.0, 1.2) * size / 224)
    return img, box


def render_bilateral(grades: tuple[int, int], rng: np.random.Generator,
                     height: int = 512) -> tuple[np.ndarray, list[dict]]:
    """A full bilateral PA knee radiograph: both legs with long femur shafts above and tibia/fibula below, on a dark
    background, with a lead side marker; width 1.6-2.2x height.

    Args:
        grades: KL grades of (image-left knee = patient's RIGHT, image-right knee = patient's LEFT).
        rng: random generator.
        height: image height in pixels.
    Returns:
        ``(img, boxes)``: uint8 (height, width) image and ``[{x0, y0, x1, y1, side, grade}, ...]`` for the
        image-left ('R') then the image-right ('L') knee, with the :mod:`koa_ray.data.roi` box definition.
    """
    if height < 64:
        raise ValueError(f"height={height}: must be >= 64")
    if len(grades) != 2:
        raise ValueError(f"grades={grades!r}: need two grades (patient right, patient left)")
    h = int(height)
    w = int(round(h * rng.uniform(1.6, 2.2)))
    scale = rng.uniform(0.85, 1.15)
    atten = np.zeros((h, w), np.float32)
    sep = rng.uniform(0.42, 0.52) * w * 0.5
    mid = w / 2 + rng.normal(0, 0.02) * w
    cy = h * rng.uniform(0.4, 0.6)
    boxes = []
    for k, (side, grade) in enumerate((("R", grades[0]), ("L", grades[1]))):
        params = sample_knee_params(int(grade), rng, side)
        wj = h * 0.3 * scale * rng.uniform(0.93, 1.07)
        wj = min(wj, 0.8 * sep)
        cx = mid + (-sep if k == 0 else sep) + rng.normal(0, 0.01) * w
        y = cy + rng.normal(0, 0.015) * h
        box = draw_knee(atten, (cx, y), wj, params, rng, angle_deg=rng.uniform(-4, 4))
        boxes.append({"x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "side": side, "grade": int(grade)})
    img = _expose(atten, rng, background=rng.uniform(0.0, 0.08), clahe=False, noise=rng.uniform(2, 7),
                  blur=rng.uniform(0.3, 1.2) * h / 512)
    if rng.random() < 0.8:  # lead marker: patient's right is on the image-left
        letter = "R" if rng.random() < 0.5 else "L"
        fs = h / 300 * rng.uniform(0.8, 1.2)
        (tw, th), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, fs, max(1, int(fs * 2)))
        x = int(rng.uniform(0.02, 0.06) * w) if letter == "R" else int(w - tw - rng.uniform(0.02, 0.06) * w)
        y = int(rng.uniform(0.05, 0.15) * h) + th
        cv2.putText(img, letter, (x, y), cv2.FONT_HERSHEY_SIMPLEX, fs, int(rng.integers(200, 256)),
                    max(1, int(fs * 2)), cv2.LINE_AA)
    return img, boxes


def embed_in_canvas(crop: np.ndarray, rng: np.random.Generator, *, scale_range: tuple[float, float] = (1.0, 3.0),
                    canvas_range: tuple[int, int] = (400, 1000),
                    margin: float = GT_MARGIN) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Place a real joint-centred knee crop inside a larger radiograph-like canvas.

    The crop is scaled by ``s ~ U(scale_range)`` and put at a random offset in a canvas whose sides are drawn from
    ``canvas_range`` (enlarged if needed to hold the crop, aspect 0.8-1.25, i.e. a single-knee image). The femur is
    continued above the crop and the tibia below it by stretching the crop's own top/bottom bands outward while
    narrowing the bone columns towards a shaft (with streaked texture); the crop's side columns continue as soft
    tissue that fades into a dark background; seams are blended, then noise and a little blur are added to all.

    Ground truth: the Chen crops are centred on the joint and their joint width is ``REAL_CROP_JOINT_FRAC`` of the
    crop side, so the box is the square centred on the embedded crop's centre with side
    ``REAL_CROP_JOINT_FRAC * crop_width_px * (1 + margin)`` (~0.99x the crop at the default margin) centred at
    ``(0.5, REAL_CROP_JOINT_Y)`` of the embedded crop (the measured joint-space centre of these crops).

    Returns:
        ``(canvas, box)``: uint8 canvas and ``(x0, y0, x1, y1)`` in canvas pixels.
    """
    crop = np.asarray(crop)
    if crop.ndim != 2 or min(crop.shape) < 16:
        raise ValueError(f"crop shape {crop.shape}: need a 2-D image of at least 16x16")
    s = rng.uniform(*scale_range)
    ch, cw = int(round(crop.shape[0] * s)), int(round(crop.shape[1] * s))
    lo, hi = canvas_range
    need_h, need_w = int(ch * 1.1) + 2, int(cw * 1.1) + 2
    hc = int(max(rng.integers(lo, hi + 1), need_h))
    wc = int(max(min(hc * rng.uniform(0.8, 1.25), hi), need_w, lo))
    ox = int(rng.integers(0, wc - cw + 1))
    oy = int(rng.integers(0, hc - ch + 1))
    src = cv2.resize(crop.astype(np.float32), (cw, ch), interpolation=cv2.INTER_LINEAR if s > 1 else cv2.INTER_AREA)

    # smooth the outermost bands so that replicated rows/columns carry no single-row noise
    band = max(3, int(0.05 * ch))
    top, bot = src[:band].mean(0), src[-band:].mean(0)
    ramp = np.linspace(1.0, 0.0, band, dtype=np.float32)[:, None]
    src[:band] = ramp * top + (1 - ramp) * src[:band]
    src[-band:] = ramp[::-1] * bot + (1 - ramp[::-1]) * src[-band:]
    # side columns: smooth along y as well, so replicated columns carry no horizontal stripes (labels, rulers)
    bx = max(3, int(0.05 * cw))
    rampx = np.linspace(1.0, 0.0, bx, dtype=np.float32)[None, :]
    sy = 0.25 * ch
    left = cv2.GaussianBlur(src[:, :bx].mean(1, keepdims=True), (1, 0), sigmaX=0.5, sigmaY=sy)
    right = cv2.GaussianBlur(src[:, -bx:].mean(1, keepdims=True), (1, 0), sigmaX=0.5, sigmaY=sy)
    src[:, :bx] = rampx * left + (1 - rampx) * src[:, :bx]
    src[:, -bx:] = rampx[:, ::-1] * right + (1 - rampx[:, ::-1]) * src[:, -bx:]

    # map every canvas pixel to a source pixel: inside = identity; above/below = edge band with the bone columns
    # narrowing towards a shaft; left/right = replicated edge columns (soft tissue)
    xs = np.arange(wc, dtype=np.float32) - ox
    ys = np.arange(hc, dtype=np.float32) - oy
    xc = cw / 2 + rng.normal(0, 0.03) * cw
    dist_up = np.clip(-ys, 0, None) / ch
    dist_dn = np.clip(ys - (ch - 1), 0, None) / ch
    k = 1.0 - 0.42 * _smoothstep(dist_up / 0.9) - 0.5 * _smoothstep(dist_dn / 0.9)
    map_x = xc + (xs[None, :] - xc) / k[:, None]
    map_y = np.broadcast_to(np.clip(ys, 0, ch - 1)[:, None], (hc, wc))
    canvas = cv2.remap(src, map_x.astype(np.float32), np.ascontiguousarray(map_y, np.float32), cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    # streaked texture outside the crop so the extension does not look painted
    outside = np.ones((hc, wc), np.float32)
    outside[oy:oy + ch, ox:ox + cw] = 0.0
    outside = cv2.GaussianBlur(outside, (0, 0), 0.03 * ch + 1)
    tex = cv2.GaussianBlur(rng.standard_normal((hc, wc), dtype=np.float32), (0, 0), sigmaX=0.8 * s, sigmaY=3.0 * s)
    canvas += outside * tex * (rng.uniform(4, 10) / (tex.std() + 1e-6))
    # leg envelope: soft tissue fades to a dark background away from the knee (wider above, thigh)
    bg = rng.uniform(5, 35)
    leg_hw = cw * rng.uniform(0.56, 0.7) * (1.0 + 0.35 * _smoothstep(dist_up / 1.5))[:, None]
    dx = np.abs(xs[None, :] - xc)
    env = 1.0 - _smoothstep((dx - leg_hw) / (0.08 * cw) + 0.5)
    env = np.maximum(env, 1.0 - outside)  # never touch the crop itself
    canvas = bg + (canvas - bg) * env
    # global acquisition effects
    canvas += rng.standard_normal((hc, wc), dtype=np.float32) * rng.uniform(1.5, 4.0)
    canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.3, 0.8))
    out = np.clip(canvas, 0, 255).astype(np.uint8)
    side = REAL_CROP_JOINT_FRAC * cw * (1.0 + margin)
    return out, square_box(ox + cw / 2, oy + REAL_CROP_JOINT_Y * ch, side)


# --------------------------------------------------------------------------------------------- dataset writer
def _patient_ids(n: int, rng: np.random.Generator) -> list[str]:
    ids: set[int] = set()
    out = []
    while len(out) < n:
        pid = int(rng.integers(9_000_000, 10_000_000))
        if pid not in ids:
            ids.add(pid)
            out.append(pid)
    return [f"{p:07d}" for p in out]


def _patients(n: int, rng: np.random.Generator, priors: np.ndarray, both_p: float = 0.85) -> list[tuple[str, dict]]:
    """Patients with 1-2 knees until ``n`` knees: ``[(pid, {'R': grade, 'L': grade}), ...]``. The second knee
    copies the first grade half of the time and is otherwise independent, which keeps the marginal = ``priors``."""
    plan: list[dict] = []
    total = 0
    while total < n:
        g1 = int(rng.choice(5, p=priors))
        knees = {"R": g1} if rng.random() < 0.5 else {"L": g1}
        if total + 1 < n and rng.random() < both_p:
            other = "L" if "R" in knees else "R"
            knees[other] = g1 if rng.random() < 0.5 else int(rng.choice(5, p=priors))
        plan.append(knees)
        total += len(knees)
    ids = _patient_ids(len(plan), rng)
    return list(zip(ids, plan))


def make_dataset(out: str | Path, n: int, *, layout: str = "single", splits: tuple[str, ...] = ("train", "val", "test"),
                 split_fractions: tuple[float, ...] = (0.7, 0.15, 0.15), size: int = 224, seed: int = 0,
                 priors: tuple[float, ...] = KL_PRIORS, fmt: str = "png") -> dict:
    """Write a synthetic KL data set; deterministic for a given ``seed``.

    * ``layout="single"``: ``n`` knee crops as ``out/{split}/{grade}/{patient_id}{L|R}.{fmt}`` (7-digit OAI-style
      patient ids; most patients contribute both knees, possibly with different grades; both knees of a patient
      always land in the same split, i.e. the split is patient-disjoint; grades follow ``priors``).
    * ``layout="bilateral"``: ``n`` bilateral radiographs ``out/images/{patient_id}.{fmt}`` of height ``2*size``
      and ``out/boxes.csv`` with columns ``path,x0,y0,x1,y1,side,grade`` (``path`` relative to ``out``).

    Returns:
        ``{"root", "layout", "seed", "n_images", "counts": {split: {grade: n}}, "paths": [...]}`` (for bilateral the
        only split is ``"all"`` and counts are per knee; ``"boxes_csv"`` is added).
    """
    if layout not in ("single", "bilateral"):
        raise ValueError(f"layout={layout!r}: must be 'single' or 'bilateral'")
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    if fmt not in ("png", "jpg", "jpeg", "bmp", "tif", "tiff"):
        raise ValueError(f"fmt={fmt!r}: unsupported image format")
    pri = np.asarray(priors, np.float64)
    if pri.shape != (5,) or (pri < 0).any() or pri.sum() <= 0:
        raise ValueError(f"priors={priors!r}: need 5 non-negative weights")
    pri = pri / pri.sum()
    root = Path(out)
    rng = np.random.default_rng(seed)
    paths: list[str] = []

    if layout == "bilateral":
        (root / "images").mkdir(parents=True, exist_ok=True)
        counts = {"all": {g: 0 for g in range(5)}}
        rows = []
        for i, pid in enumerate(_patient_ids(n, rng)):
            grades = (int(rng.choice(5, p=pri)), int(rng.choice(5, p=pri)))
            img, boxes = render_bilateral(grades, np.random.default_rng([seed, i, 2]), height=2 * size)
            rel = f"images/{pid}.{fmt}"
            cv2.imwrite(str(root / rel), img)
            paths.append(str(root / rel))
            for b in boxes:
                rows.append([rel, b["x0"], b["y0"], b["x1"], b["y1"], b["side"], b["grade"]])
                counts["all"][b["grade"]] += 1
        with open(root / "boxes.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["path", "x0", "y0", "x1", "y1", "side", "grade"])
            wr.writerows(rows)
        return {"root": str(root), "layout": layout, "seed": seed, "n_images": n, "counts": counts,
                "paths": paths, "boxes_csv": str(root / "boxes.csv")}

    if len(splits) != len(split_fractions) or not splits:
        raise ValueError(f"splits={splits!r} and split_fractions={split_fractions!r} must have the same length")
    fr = np.asarray(split_fractions, np.float64)
    if (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split_fractions={split_fractions!r}: need non-negative fractions with a positive sum")
    patients = _patients(n, rng, pri)
    # patient-disjoint split: shuffle patients, cut the knee count at the cumulative fractions
    order = rng.permutation(len(patients))
    cuts = np.cumsum(fr / fr.sum()) * n
    counts = {s: {g: 0 for g in range(5)} for s in splits}
    done = 0
    for j in order:
        pid, knees = patients[j]
        split = splits[int(min(np.searchsorted(cuts, done, side="right"), len(splits) - 1))]
        for side, grade in sorted(knees.items()):
            img, _ = render_knee(grade, np.random.default_rng([seed, int(pid), 0 if side == "R" else 1]), size,
                                 side=side)
            d = root / split / str(grade)
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{pid}{side}.{fmt}"
            cv2.imwrite(str(p), img)
            paths.append(str(p))
            counts[split][grade] += 1
            done += 1
    return {"root": str(root), "layout": layout, "seed": seed, "n_images": done, "counts": counts,
            "paths": sorted(paths)}
