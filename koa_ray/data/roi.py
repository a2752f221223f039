"""Knee-joint ROI detection for knee radiographs (classical image analysis, no learning, no GPU).

**Box definition** (shared with the ground truth of :mod:`koa_ray.data.synthetic`): a *square* centred on the centre
of the tibiofemoral joint space, with side ``joint_width * (1 + margin)``. ``joint_width`` is the medio-lateral width
of the joint, i.e. of the femoral condyles / tibial plateau (osteophytes excluded). Coordinates are original-image
pixels, ``x1``/``y1`` exclusive; a box may extend past the image border (:func:`crop_knee` pads).

**Method** (per knee, on a downscaled, lightly smoothed copy of the image):

1. *Valley map*: the joint space is a dark band between two bright bones, so every pixel is scored by how much
   darker it is than *both* the pixels ``d`` rows above and below it (max over a few ``d``).
2. *Joint line*: the slope-limited left-to-right path that collects the most valley response (dynamic programming);
   it follows the arch of the intercondylar notch. Its strong part (notch gap bridged, ends grown by hysteresis) is
   the visible joint line; its median height (the two compartments) is the joint-space centre.
3. *Scale normalisation*: step 2 is repeated in a window around the first result with valley offsets proportional
   to the found extent, so the measurement does not depend on how large the knee is in the image.
4. *Obliterated compartments* (KL4 bone-on-bone): the line is extended outwards while both the band above it
   (condyles) and the band below it (plateau) stay bright.
5. *Width*: the joint line fades where the rounded condylar margins leave no bone above it, so its extent is
   ``1/_EXTENT_TO_WIDTH`` (~0.93) of the condylar width; this factor was calibrated on real OAI crops (whose joint
   width was read off by eye, see ``synthetic.REAL_CROP_JOINT_FRAC``).
6. *Confidence*: the valley depth along the line relative to the strong valley responses elsewhere in the image
   (90th percentile: trabeculae, noise), times its depth relative to the image's intensity range. Below
   ``min_score`` → centred fallback crop.

Speed: everything runs on a <= ``work_size`` px copy with a handful of OpenCV/numpy passes and a 1-D dynamic
programme over <= ``_PATH_COLS`` columns: ~5-15 ms per image on one CPU core for 224-2000 px inputs.

**One knee or two** (bilateral PA films): thin bright marks (text, markers, ruler ticks) are first removed by a grey
opening; the per-column median profile is searched for a dark gap between two leg-wide bright bands; each side of
it is analysed as one knee, and the pair is kept when the two joints are alike, fit the film and no bone bridges
the gap (:func:`_pair_ok`, :func:`_bone_bridge`), or when the gap is as dark as the background and one knee is
found beside room for another (:func:`detect_knees`). Image-left = patient's right knee ('R'), image-right = left
knee ('L'). Measured on held-out films made by generators the detector was not tuned on (``tests/films.py``):
``benchmarks/bench_roi.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import cv2
import numpy as np

SIDES = ("L", "R", "U")
BILATERAL_ASPECT = 1.4  # width / height from which touching legs (no dark gap between them) may still be two knees
_LEG_MIN_FRAC = 0.08  # a leg is at least this x the image width (narrower bright bands: rulers, strips)
_LEG_CONTRAST = 0.15  # legs vs gap: the column profile spans at least this x the image's 1st-99th percentile range
_LEG_LEVEL = 0.25  # ... and reaches this fraction of the brightest column's height above the darkest (a leg exposed
#                    at 40 % of the other's level is still a leg: 0.5 read such pairs as one knee)
_GAP_SURE = 0.45  # a gap this dark separates two legs whatever the joints found either side
_GAP_DEPTH = 0.08  # a column-profile dip this deep (or a wide film) gets the two-knee hypothesis tested
_BRIDGE_MAX = 0.6  # ... and the gap column above/below the joints darker than this x the bone level (not one knee)
_MIN_REGION = 24  # px (work scale): smaller images or halves are not analysed (centred fallback)
_PAIR_SPAN = 0.8  # two knees' joint widths add up to at most this x the image width (legs, gap, margins)
_ROOM = 0.6  # with one knee found beside a dark gap, the other side is at least this x its width
_PAIR_WIDTH_RATIO_SURE = 2.5  # (with a dark gap between the legs, a looser width ratio)
_PAIR_WIDTH_RATIO = 1.6  # two knees of one film: joint widths within this ratio ...
_PAIR_DY = 0.6  # ... joint heights within this x their mean width ...
_PAIR_CLEAR = -0.1  # ... and each joint line ending clear of the gap column (x its width; a cut knee fails)

_REF_WORK = 256.0  # pixel constants below are for a 256 px working image and scale with the working size
_SMOOTH_SIGMA = 1.0  # px, denoising before the valley map
_MARK_FRAC = 0.02  # opening disc / shorter side: bright strokes thinner than this are removed (text, ticks)
_AIR_FRAC = 0.6  # ... and marks on air (opened image below this x its Otsu level) with a disc twice that size
_VALLEY_OFFSETS = (2, 3, 5, 8, 12, 17)  # px, pass 1: distances above/below probed for the bright bones
_VALLEY_OFFSETS_REL = (0.025, 0.04, 0.06, 0.085)  # pass 2: the same, as fractions of the joint-line extent
_WIN_X, _WIN_Y = 0.25, 0.3  # pass 2 window around the pass-1 joint line (each side), fractions of its extent
_PASS2_AGREE = 0.75  # pass 2 replaces the pass-1 geometry only if its extent is at least this x the pass-1 extent
_PATH_COLS = 80  # the path is traced on the valley map max-pooled to at most this many columns
_STRONG_FRAC = 0.3  # joint line = path where the valley is >= this x its 90th percentile ...
_WEAK_FRAC = 0.18  # ... grown at the ends while >= this x the 90th percentile (hysteresis) ...
_GROW_MAX = 0.1  # ... by at most this x the extent per end
_MERGE_GAP = 0.3  # strong parts separated by less than this x their joint extent are one line (notch, spines) ...
_MERGE_MIN = 0.05  # ... if they are at least this x the extent long
_BAND = (0.04, 0.12)  # bone bands above/below the joint line, fractions of its extent
_EXTEND_LEVEL = 0.8  # extension continues while both bands are >= joint level + this x (bone - joint level) ...
_EXTEND_MAX = 0.3  # ... by at most this x the extent per side
_MIN_EXTENT_FRAC = 0.12  # joint lines shorter than this x the region's shorter side are rejected
_EXTENT_TO_WIDTH = 1.08  # joint width / visible joint-line extent (calibrated on real OAI crops)
_RATIO_ZERO, _RATIO_FULL = 1.5, 4.0  # joint-line valley / 90th percentile of all valley responses → confidence 0, 1
_CONTRAST_FULL = 0.12  # joint-line valley / intensity range (1st-99th percentile) giving full confidence
# implant flag (:func:`_implant_in`), calibrated on all 6,604 real Chen crops (none flagged, cover <= 0.31) and on
# held-out films with drawn knee replacements (tests/films.py, cover >= 0.37)
_METAL_TOL = 6.0  # grey levels (of 255) below the box's brightest level that still count as metal
_METAL_FLAT = 3.0  # metal is flat: local 5x5 standard deviation below this many grey levels
_METAL_COVER = 0.34  # flat-bright share of the femoral band above the joint (central 70 % of the box width) ...
_METAL_THICK = 0.11  # ... and its largest blob thick (2 x area / perimeter >= this x the box side): no cortical rim


@dataclass(frozen=True)
class RoiConfig:
    """Knee-joint ROI settings (stored in manifests and checkpoints via :meth:`to_dict`).

    Args:
        enabled: detect and crop the joint; ``False`` means callers use the whole image.
        margin: box side = ``joint_width * (1 + margin)`` (``joint_width`` = measured condylar width); the box is
            square and centred on the joint-space centre. With 0.15 the box matches the framing of the public
            OAI / Chen 2018 knee crops.
        mirror_left: flip left knees horizontally to the canonical right-knee orientation (fibula on image-left).
        work_size: the image is downscaled (never upscaled) so that its shorter side is ``work_size`` px before the
            analysis; boxes are mapped back to original pixels.
        min_score: detections with a confidence below this are replaced by the centred fallback crop.
    """

    enabled: bool = True
    margin: float = 0.15
    mirror_left: bool = True
    work_size: int = 256
    min_score: float = 0.3

    def __post_init__(self):
        for name in ("enabled", "mirror_left"):
            val = getattr(self, name)
            if not isinstance(val, (bool, np.bool_)):
                raise ValueError(f"RoiConfig.{name}={val!r}: must be a bool")
        if not _is_real(self.margin) or not 0.0 <= float(self.margin) <= 3.0:
            raise ValueError(f"RoiConfig.margin={self.margin!r}: must be a number in [0, 3]")
        if isinstance(self.work_size, (bool, np.bool_)) or not isinstance(self.work_size, (int, np.integer)) \
                or not 64 <= int(self.work_size) <= 4096:
            raise ValueError(f"RoiConfig.work_size={self.work_size!r}: must be an int in [64, 4096]")
        if not _is_real(self.min_score) or not 0.0 <= float(self.min_score) <= 1.0:
            raise ValueError(f"RoiConfig.min_score={self.min_score!r}: must be a number in [0, 1]")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RoiConfig":
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys raise ``ValueError``."""
        if d is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RoiConfig: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**d)


def roi_dict(cfg: RoiConfig) -> dict:
    """``cfg`` as a plain dict for manifests/checkpoints (same as ``cfg.to_dict()``)."""
    return cfg.to_dict()


@dataclass(frozen=True)
class KneeBox:
    """A square knee-joint box in original-image pixels (``x1``/``y1`` exclusive; may extend past the border).

    ``side``: 'R' / 'L' (patient's right / left knee) or 'U' (unknown); ``score``: confidence in [0, 1];
    ``fallback``: True when no joint was found and a centred crop is used instead; ``implant``: True when metal
    caps the joint (a knee replacement, :func:`_implant_in`): KL grading does not apply to such a knee."""

    x0: int
    y0: int
    x1: int
    y1: int
    side: str
    score: float
    fallback: bool
    implant: bool = False

    @property
    def size(self) -> int:
        return self.x1 - self.x0

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0


def box_iou(a, b) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (or :class:`KneeBox`), exclusive ends."""
    a = (a.x0, a.y0, a.x1, a.y1) if isinstance(a, KneeBox) else tuple(a)[:4]
    b = (b.x0, b.y0, b.x1, b.y1) if isinstance(b, KneeBox) else tuple(b)[:4]
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def square_box(cx: float, cy: float, side: float) -> tuple[int, int, int, int]:
    """Integer square ``(x0, y0, x1, y1)`` of side ``round(side)`` (>= 1) centred on ``(cx, cy)``."""
    s = max(1, int(round(side)))
    x0 = int(round(cx - s / 2.0))
    y0 = int(round(cy - s / 2.0))
    return x0, y0, x0 + s, y0 + s


@dataclass(frozen=True)
class _Joint:
    """A joint found in a work-scale region: joint-space centre, joint width and confidence."""

    cx: float
    cy: float
    width: float
    score: float


# ------------------------------------------------------------------------------------------------ helpers
def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)) \
        and bool(np.isfinite(x))


def _as_gray(img: np.ndarray) -> np.ndarray:
    """Validate the input: 2-D, or (H, W, 1|3|4) which is converted to grayscale."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        if a.shape[2] == 1:
            a = a[..., 0]
        elif a.dtype == np.uint8:
            a = cv2.cvtColor(np.ascontiguousarray(a[..., :3]), cv2.COLOR_RGB2GRAY)
        else:
            a = a[..., :3].astype(np.float32).mean(axis=2)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected a 2-D grayscale image, got shape {a.shape}")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"expected a numeric image, got dtype {a.dtype}")
    return a


def _normalise_side(side_hint: str | None) -> str:
    """'L'/'R' (any case, also 'left'/'right') → that side; None, '' or anything else → 'U'."""
    if not isinstance(side_hint, str):
        return "U"
    return {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}.get(side_hint.strip().upper(), "U")


def _to_uint8(gray: np.ndarray) -> np.ndarray:
    """uint8 passes through; other dtypes (uint16 DICOM, float) are window-levelled to 0-255 between their 0.5th
    and 99.5th percentiles (NaN/inf → 0)."""
    if gray.dtype == np.uint8:
        return gray
    a = np.nan_to_num(gray.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    step = max(1, int(np.sqrt(a.size / 65536)))
    lo, hi = np.percentile(a[::step, ::step], (0.5, 99.5))
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def _to_work(gray: np.ndarray, work_size: int) -> tuple[np.ndarray, float]:
    """Downscale so the shorter side is ``work_size`` (never upscale) and smooth; returns (float32 image, scale)."""
    h, w = gray.shape
    scale = min(1.0, work_size / float(min(h, w)))
    src = _to_uint8(gray)
    if scale < 1.0:
        size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
        while min(src.shape) >= 2 * work_size:  # Gaussian pyramid for the bulk: much cheaper than INTER_AREA
            src = cv2.pyrDown(src)
        src = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
    src = _suppress_marks(src)
    sigma = _SMOOTH_SIGMA * min(work_size, min(src.shape)) / _REF_WORK
    return cv2.GaussianBlur(src.astype(np.float32), (0, 0), max(sigma, 0.5)), scale


def _suppress_marks(src: np.ndarray) -> np.ndarray:
    """Remove thin bright marks (burned-in text, lead markers, ruler ticks) whose rows of letters would otherwise
    read as dark bands between bright bands, i.e. as joint lines: a grey-level opening with a disc ~2 % of the
    shorter side everywhere, and with one twice that size where the mark sits on air (below the Otsu level of the
    opened image; bold text in a film's corner). Bones are wider than the discs and the joint space is dark, so
    neither is changed by it."""
    def opened(frac: float) -> np.ndarray:
        k = max(3, int(round(frac * min(src.shape)))) | 1
        return cv2.morphologyEx(src, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))

    small, big = opened(_MARK_FRAC), opened(2 * _MARK_FRAC)
    level, _ = cv2.threshold(big, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return np.where(big < _AIR_FRAC * level, big, small)


def _leg_gap(work: np.ndarray) -> tuple[int, float]:
    """The most likely column between two legs and how clearly it separates them.

    Column profile = per-column median over rows (bone and soft tissue bright, air dark; robust to the pelvis,
    text and markers which cover few rows), smoothed. The gap is the column of the central 25-75 % whose profile is
    deepest below the lower of the brightest columns on its left and on its right; its depth is that drop relative
    to the profile's range (0: no dip, 1: the gap is as dark as the background); 0 when the profile is flat or
    either side holds no leg-wide band at least half as bright as the brightest."""
    w = work.shape[1]
    prof = cv2.GaussianBlur(np.median(work[::2], axis=0).reshape(1, -1).astype(np.float32), (0, 0),
                            max(w / 80.0, 1.0))
    # 1-D opening: bright bands narrower than a leg (a ruler along the edge, a marker strip) are no leg
    k = max(3, int(_LEG_MIN_FRAC * w)) | 1
    prof = cv2.morphologyEx(prof, cv2.MORPH_OPEN, np.ones((1, k), np.uint8)).ravel()
    left_max = np.maximum.accumulate(prof)
    right_max = np.maximum.accumulate(prof[::-1])[::-1]
    lo, hi = int(0.25 * w), max(int(0.75 * w), int(0.25 * w) + 1)
    shoulders = np.minimum(left_max, right_max)
    drop = shoulders - prof
    cut = lo + int(np.argmax(drop[lo:hi]))
    floor, top = float(prof.min()), float(prof.max())
    lo_i, hi_i = np.percentile(work[::4, ::4], (1, 99))
    if top - floor < _LEG_CONTRAST * max(float(hi_i - lo_i), 1.0):  # flat profile: noise, blank, one wide leg
        return cut, 0.0
    if shoulders[cut] < floor + _LEG_LEVEL * (top - floor):  # one side holds no leg (background, a strip)
        return cut, 0.0
    return cut, float(drop[cut] / max(top - floor, 1e-6))


def _bone_bridge(work: np.ndarray, left: "_Joint", right: "_Joint", cut: int) -> float:
    """How bone-like the gap column is above and below the joints, relative to the bone over the two joint centres
    at the same heights (1: as bright as that bone, 0: as dark as the background); the brighter of the two bands.
    One knee cut in two has its tibial metaphysis (below) and femur (above the notch) running across the cut
    (~1); two legs have soft tissue or air between their shafts."""
    h, w = work.shape
    wm = (left.width + right.width) / 2
    cy = (left.cy + right.cy) / 2
    half = max(1, int(0.03 * wm))
    floor = float(np.percentile(work[::4, ::4], 2))
    best = 0.0
    for r0, r1 in ((cy - 0.9 * wm, cy - 0.5 * wm), (cy + 0.3 * wm, cy + 0.9 * wm)):
        rows = np.arange(max(0, int(r0)), min(h, int(r1)))
        if rows.size < 2:
            continue

        def level(x: float) -> float:
            a, b = max(0, int(x) - half), min(w, int(x) + half + 1)
            return float(np.median(work[rows, a:b])) if b > a else 0.0

        bone = min(level(left.cx), level(cut + right.cx))
        best = max(best, (level(cut) - floor) / max(bone - floor, 1e-6))
    return best


def _pair_ok(work: np.ndarray, left: "_Joint | None", right: "_Joint | None", cut: int, depth: float,
             min_score: float) -> bool:
    """Whether joints found left and right of ``cut`` are two knees, not one knee cut in two: both confident,
    similar in width and height, neither joint line crossing the cut, and no bone bridging the cut above and
    below the joints (:func:`_bone_bridge`). A gap nearly as dark as the background decides alone: a knee not found
    there is reported as a fallback box, not merged into its neighbour."""
    ww = work.shape[1]
    found = [j is not None and j.score >= min_score for j in (left, right)]
    if not all(found):  # a gap as dark as the background between two legs, one knee found: two knees, if the
        if not any(found) or depth < _GAP_SURE:  # other side has room for a knee as wide as the one found
            return False
        j, room = (left, ww - cut) if found[0] else (right, cut)
        return j.width <= _PAIR_SPAN * ww / 2 and room >= _ROOM * j.width
    if left.width + right.width > _PAIR_SPAN * ww:  # two knees and the space between them fill the film
        return False
    if _bone_bridge(work, left, right, cut) >= _BRIDGE_MAX:  # bone across the cut: one knee, whatever the gap
        return False
    wl, wr = left.width, right.width
    ratio = max(wl, wr) / max(min(wl, wr), 1e-6)
    if depth >= _GAP_SURE:  # a dark gap: two knees unless the "joints" are far apart in size (a crop's edge)
        return ratio <= _PAIR_WIDTH_RATIO_SURE
    if ratio > _PAIR_WIDTH_RATIO:
        return False
    if abs(left.cy - right.cy) > _PAIR_DY * (wl + wr) / 2:
        return False
    clear_l = cut - (left.cx + wl / 2)  # right joint is in cut-relative coordinates
    clear_r = right.cx - wr / 2
    return min(clear_l / wl, clear_r / wr) >= _PAIR_CLEAR


def _valley_map(g: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """How much darker each pixel is than *both* pixels ``d`` rows above and below (max over ``d``), >= 0."""
    dmax = max(offsets)
    h = g.shape[0]
    gp = cv2.copyMakeBorder(g, dmax, dmax, 0, 0, cv2.BORDER_REPLICATE)
    out = np.zeros_like(g)
    for d in offsets:
        v = np.minimum(gp[dmax - d:dmax - d + h], gp[dmax + d:dmax + d + h])
        v -= g
        np.maximum(out, v, out=out)
    return out


def _max_path(cost: np.ndarray) -> np.ndarray:
    """Row per column of the left-to-right path maximising the summed ``cost`` (>= 0), moving at most one row per
    column. Forward and backward accumulations: the optimal path passes, in every column, through the row that
    maximises forward + backward - cost (so no back-pointers are needed)."""
    c = np.ascontiguousarray(cost.T)  # one contiguous row per image column
    w = c.shape[0]
    fwd = np.empty_like(c)
    bwd = np.empty_like(c)
    fwd[0] = c[0]
    bwd[-1] = c[-1]
    for acc, order, step in ((fwd, range(1, w), -1), (bwd, range(w - 2, -1, -1), 1)):
        for x in order:
            prev, cur = acc[x + step], acc[x]
            np.maximum(prev[1:], prev[:-1], out=cur[1:])  # best of same row / one row up
            cur[0] = prev[0]
            np.maximum(cur[:-1], prev[1:], out=cur[:-1])  # ... / one row down
            cur += c[x]
    return np.argmax(fwd + bwd - c, axis=1)


def _trace(valley: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Joint-line path over a valley map, traced on a copy max-pooled (both axes) to at most ``_PATH_COLS`` columns
    → (row per pooled column in ``valley`` pixels, valley along the path, pooling factor)."""
    h, w = valley.shape
    pool = max(1, int(np.ceil(w / _PATH_COLS)))
    hp, wp = h // pool, w // pool
    pooled = valley[:hp * pool, :wp * pool].reshape(hp, pool, wp, pool).max(axis=(1, 3))
    path = _max_path(pooled)
    return path * pool + (pool - 1) / 2.0, pooled[path, np.arange(wp)], pool


def _runs(mask: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Runs of True in a 1-D mask after bridging gaps of up to ``max_gap``: [(start, end exclusive), ...]."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)
    starts = np.r_[idx[0], idx[breaks + 1]]
    ends = np.r_[idx[breaks], idx[-1]] + 1
    return list(zip(starts.tolist(), ends.tolist()))


def _line_extent(strength: np.ndarray) -> tuple[int, int]:
    """(start, end) of the joint line along the path: the strong run with the largest total valley, merged with
    nearby strong runs (the notch and tibial spines interrupt the line), grown at the ends by hysteresis."""
    n = strength.size
    peak = float(np.percentile(strength, 90))
    runs = _runs(strength > _STRONG_FRAC * peak, max(1, round(0.02 * n))) if peak > 0 else []
    if not runs:
        return 0, 0
    csum = np.r_[0.0, np.cumsum(strength)]
    a, b = max(runs, key=lambda r: csum[r[1]] - csum[r[0]])
    merged = True
    while merged:
        merged = False
        for s, e in runs:
            gap = a - e if e <= a else s - b if s >= b else -1
            if 0 <= gap <= _MERGE_GAP * (max(b, e) - min(a, s)) and e - s >= _MERGE_MIN * (b - a):
                a, b, merged = min(a, s), max(b, e), True
    weak = strength > _WEAK_FRAC * peak
    grow = max(1, int(_GROW_MAX * (b - a)))
    a_min, b_max = max(0, a - grow), min(n, b + grow)
    while a > a_min and weak[a - 1]:
        a -= 1
    while b < b_max and weak[b]:
        b += 1
    return a, b


def _measure(g: np.ndarray, offsets: tuple[int, ...]) -> tuple[float, float, float, float] | None:
    """Trace the joint line in ``g`` → (x0, x1, centre row, median valley along the line) in ``g`` pixels."""
    path, strength, pool = _trace(_valley_map(g, offsets))
    a, b = _line_extent(strength)
    if b <= a:
        return None
    return a * pool, b * pool, float(np.median(path[a:b])), float(np.median(strength[a:b]))


def _offsets(values, factor: float) -> tuple[int, ...]:
    return tuple(sorted({max(1, int(round(v * factor))) for v in values}))


def _confidence(depth: float, g: np.ndarray, texture: float) -> float:
    """Valley depth of the joint line relative to the image's strong valley responses elsewhere (``texture`` = 90th
    percentile: trabeculae, noise) and to its intensity range → [0, 1]. Calibrated so that real knee crops score
    >= ~0.6 (1st percentile) while white noise scores 0 and knees rotated by 90 degrees score <= ~0.4."""
    ratio = depth / (texture + 1.0)
    lo, hi = np.percentile(g[::3, ::3], (1, 99))
    rng = float(hi - lo)
    s_ratio = (ratio - _RATIO_ZERO) / (_RATIO_FULL - _RATIO_ZERO)
    s_contrast = depth / max(rng, 1.0) / _CONTRAST_FULL
    return float(np.clip(s_ratio, 0.0, 1.0) * np.clip(s_contrast, 0.0, 1.0))


def _find_joint(g: np.ndarray, ref: float) -> _Joint | None:
    """Locate the joint in a single-knee region ``g`` (work scale, smoothed float32; ``ref`` = working size):
    pass 1 with offsets fixed to the working size, pass 2 in a window with offsets scaled to the found extent,
    extension over obliterated compartments, calibration to the condylar width, confidence (module docstring)."""
    h, w = g.shape
    first = _measure(g, _offsets(_VALLEY_OFFSETS, ref / _REF_WORK))
    if first is None or first[1] - first[0] < _MIN_EXTENT_FRAC * min(h, w):
        return None
    x0, x1, cy, depth = first
    extent = x1 - x0
    texture = float(np.percentile(_valley_map(g[::2, ::2], _offsets(_VALLEY_OFFSETS, ref / _REF_WORK / 2))[::2], 90))
    # pass 2: offsets proportional to the joint-line extent, in a window around it
    wx0, wx1 = max(0, int(x0 - _WIN_X * extent)), min(w, int(x1 + _WIN_X * extent) + 1)
    wy0, wy1 = max(0, int(cy - _WIN_Y * extent)), min(h, int(cy + _WIN_Y * extent) + 1)
    if min(wx1 - wx0, wy1 - wy0) >= 8:
        second = _measure(g[wy0:wy1, wx0:wx1], _offsets(_VALLEY_OFFSETS_REL, extent))
        if second is not None and second[1] - second[0] >= _PASS2_AGREE * extent:
            x0, x1, cy = second[0] + wx0, second[1] + wx0, second[2] + wy0
    x0, x1 = _extend_over_bone(g, x0, x1, cy)
    return _Joint(cx=(x0 + x1) / 2.0, cy=cy, width=(x1 - x0) * _EXTENT_TO_WIDTH,
                  score=_confidence(depth, g, texture))


def _extend_over_bone(g: np.ndarray, x0: float, x1: float, cy: float) -> tuple[float, float]:
    """Extend the joint line over an obliterated compartment: continue outwards while *both* bones stay bright, i.e.
    the darker of the bands just above (condyles) and just below (plateau) the line remains closer to the bone
    level than to the joint-space level. Normal knees stop at once: beyond the visible line the rounded condylar
    margin leaves soft tissue in the band above."""
    h, w = g.shape
    e = x1 - x0
    t0, t1 = max(1, int(round(_BAND[0] * e))), max(2, int(round(_BAND[1] * e)))
    r = int(round(cy))
    if r - t1 < 0 or r + t1 >= h or e < 8:
        return x0, x1
    above = g[r - t1:r - t0].mean(axis=0)
    below = g[r + t0:r + t1].mean(axis=0)
    both = cv2.GaussianBlur(np.minimum(above, below).reshape(1, -1), (0, 0), max(1.0, 0.01 * e)).ravel()
    a, b = int(x0), min(int(x1), w)
    bone = float(np.median(both[a:b]))
    gap = float(np.median(g[max(0, r - 1):r + 2, a:b]))
    if bone - gap <= 0:
        return x0, x1
    keep = both >= gap + _EXTEND_LEVEL * (bone - gap)
    lim = int(_EXTEND_MAX * e)
    lo, hi = max(0, a - lim), min(w, b + lim)
    while a > lo and keep[a - 1]:
        a -= 1
    while b < hi and keep[b]:
        b += 1
    return float(min(a, x0)), float(max(b, x1))


def _implant_in(work: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> bool:
    """Whether the work-scale box ``[x0, x1) x [y0, y1)`` (centred on the joint) holds a knee replacement.

    Metal stops nearly the whole beam: on the film it is the brightest level and flat (no trabecular texture), with
    the femoral component capping both condyles just above the joint line. So: pixels within ``_METAL_TOL`` of the
    box's brightest level whose 5x5 neighbourhood is flat must cover at least ``_METAL_COVER`` of the band above
    the joint centre, and their largest blob must be thick. Over-exposed or CLAHE-saturated bone (the Chen crops)
    is bright too, but patchy, and a bright cortical rim is thin."""
    h, w = work.shape
    side = min(x1 - x0, y1 - y0)
    px0, py0 = max(0, x0), max(0, y0)
    patch = work[py0:min(h, y1), px0:min(w, x1)]
    if min(patch.shape) < 16:
        return False
    mean = cv2.blur(patch, (5, 5))
    std = np.sqrt(np.clip(cv2.blur(patch * patch, (5, 5)) - mean * mean, 0.0, None))
    metal = ((patch >= float(patch.max()) - _METAL_TOL) & (std < _METAL_FLAT)).astype(np.uint8)
    # the femoral band: from 15 % to 50 % of the box height, central 70 % of its width (of the box as found, which
    # may reach past the image border), within the image
    band = metal[max(0, y0 + int(0.15 * side) - py0):max(0, y0 + side // 2 - py0),
                 max(0, x0 + int(0.15 * side) - px0):max(0, x0 + int(0.85 * side) - px0)]
    if band.size == 0 or band.mean() < _METAL_COVER:
        return False
    n, labels, stats, _ = cv2.connectedComponentsWithStats(metal, connectivity=8)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    contours, _ = cv2.findContours((labels == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    return 2.0 * stats[k, cv2.CC_STAT_AREA] / max(perimeter, 1.0) >= _METAL_THICK * min(patch.shape)


def _fallback(x_lo: float, x_hi: float, h: int, side: str) -> KneeBox:
    """Centred square in the column range [x_lo, x_hi) of the original image, fully inside the image."""
    side_px = max(1, int(min(x_hi - x_lo, h)))
    x0 = int(round((x_lo + x_hi - side_px) / 2.0))
    y0 = int((h - side_px) // 2)
    return KneeBox(x0, y0, x0 + side_px, y0 + side_px, side, 0.0, True)


# ---------------------------------------------------------------------------------------------------- API
def detect_knees(img: np.ndarray, cfg: RoiConfig = RoiConfig(), side_hint: str | None = None) -> list[KneeBox]:
    """Find the knee joint(s) in a grayscale radiograph.

    One knee or two is decided from the image, not from its shape: the column profile is searched for a dark gap
    between two leg-wide bright bands (:func:`_leg_gap`), and the film is read as bilateral when the gap is as
    dark as the background, or when joints found on both sides of it are alike in width and height, end clear of
    the gap and have no bone bridging it (:func:`_pair_ok`; touching legs on a wide film). A bilateral film yields two boxes, image-left
    tagged 'R' (patient's right knee, radiological convention) then image-right 'L'; ``side_hint`` is ignored.
    Otherwise one box, tagged with ``side_hint`` ('L'/'R', e.g. parsed from an OAI file name) or 'U'. Thin
    bright marks (burned-in text, lead markers, ruler ticks) are removed before the search (:func:`_suppress_marks`).

    Each box is square, centred on the joint-space centre, side ``joint_width * (1 + cfg.margin)``. Where no joint
    is found (or its score < ``cfg.min_score``) a centred square crop inside the image (or inside that leg's half)
    with ``fallback=True`` is returned instead. Every box says whether metal caps its joint (``implant``, a knee
    replacement: :func:`_implant_in`). With ``cfg.enabled=False`` the centred square of the whole image is
    returned (score 1, no fallback, implant not assessed: False). Deterministic; never raises and never returns an empty list for a valid 2-D
    image.
    """
    gray = _as_gray(img)
    h, w = gray.shape
    hint = _normalise_side(side_hint)
    if not cfg.enabled:
        s = min(h, w)
        x0, y0 = (w - s) // 2, (h - s) // 2
        return [KneeBox(x0, y0, x0 + s, y0 + s, hint, 1.0, False)]
    work, scale = _to_work(gray, cfg.work_size)
    hh, ww = work.shape

    def joint_in(a: int, b: int) -> _Joint | None:
        return _find_joint(work[:, a:b], float(min(cfg.work_size, hh, b - a)))

    regions = None  # [(x from, x to, side, joint found there or None)] in work pixels
    if min(hh, ww // 2) >= _MIN_REGION:  # one knee or two: decided from the image (joints either side of a leg gap)
        cut, depth = _leg_gap(work)
        if depth >= _GAP_DEPTH or w >= BILATERAL_ASPECT * h:
            left, right = joint_in(0, cut), joint_in(cut, ww)
            if _pair_ok(work, left, right, cut, depth, cfg.min_score):
                regions = [(0, cut, "R", left), (cut, ww, "L", right)]
    if regions is None:
        regions = [(0, ww, hint, joint_in(0, ww) if min(ww, hh) >= _MIN_REGION else None)]
    boxes = []
    for xa, xb, side, joint in regions:
        score = round(joint.score, 4) if joint is not None else 0.0
        if joint is None or score < cfg.min_score:
            box = _fallback(xa / scale if xa else 0.0, w if xb == ww else xb / scale, h, side)
        else:
            x0, y0, x1, y1 = square_box((xa + joint.cx) / scale, joint.cy / scale,
                                        joint.width * (1.0 + cfg.margin) / scale)
            box = KneeBox(x0, y0, x1, y1, side, score, False)
        implant = _implant_in(work, *(int(round(v * scale)) for v in (box.x0, box.y0, box.x1, box.y1)))
        boxes.append(replace(box, implant=implant))
    return boxes


def crop_knee(img: np.ndarray, box: KneeBox, size: int, mirror_left: bool = True) -> np.ndarray:
    """Cut ``box`` out of ``img`` and resize to a ``size`` x ``size`` uint8 image.

    Parts of the box outside the image are filled by replicating the border pixels (zeros if the box misses the
    image entirely). Left knees (``box.side == 'L'``) are mirrored to the right-knee orientation when
    ``mirror_left``. Non-uint8 images are window-levelled to 0-255 first (0.5-99.5th percentiles)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size={size!r}: must be a positive int")
    gray = _to_uint8(_as_gray(img))
    h, w = gray.shape
    x0, y0, x1, y1 = int(box.x0), int(box.y0), int(box.x1), int(box.y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {box}")
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 <= cx0 or cy1 <= cy0:
        patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
    else:
        patch = cv2.copyMakeBorder(gray[cy0:cy1, cx0:cx1], cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1,
                                   cv2.BORDER_REPLICATE)
    interp = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_LINEAR
    out = cv2.resize(patch, (int(size), int(size)), interpolation=interp)
    if mirror_left and box.side == "L":
        out = np.ascontiguousarray(out[:, ::-1])
    return out


def draw_boxes(img: np.ndarray, boxes: list[KneeBox], max_side: int = 1024) -> np.ndarray:
    """An 8-bit BGR picture of ``img`` (downscaled so its longer side is at most ``max_side``) with each box drawn
    and labelled with its side and score (and 'implant' for a knee replacement): green for a detected joint, orange
    for a fallback crop (no joint found, check by eye)."""
    gray = _to_uint8(_as_gray(img))
    h, w = gray.shape
    s = min(1.0, max_side / float(max(h, w)))
    if s < 1.0:
        gray = cv2.resize(gray, (max(1, int(round(w * s))), max(1, int(round(h * s)))), interpolation=cv2.INTER_AREA)
    out = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    th = max(1, int(round(max(out.shape) / 300)))
    for b in boxes:
        colour = (0, 140, 255) if b.fallback else (60, 200, 60)
        p0, p1 = (int(b.x0 * s), int(b.y0 * s)), (int(b.x1 * s) - 1, int(b.y1 * s) - 1)
        cv2.rectangle(out, p0, p1, colour, th)
        label = f"{b.side} {b.score:.2f}" + (" fallback" if b.fallback else "") + (" implant" if b.implant else "")
        fs = max(0.4, max(out.shape) / 1400)
        (tw, tht), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, th)
        x, y = max(0, p0[0]), max(tht + base, p0[1] - 2 * th)
        cv2.rectangle(out, (x, y - tht - base), (x + tw, y + base // 2), colour, -1)
        cv2.putText(out, label, (x, y - base // 2), cv2.FONT_HERSHEY_SIMPLEX, fs, (0, 0, 0), th, cv2.LINE_AA)
    return out
