"""Test-time augmentation (TTA): deterministic views of each normalised crop, whose probabilities are averaged.

A view must be one the model met in training, or averaging adds a view it cannot read:

- ``none``: the crop alone.
- ``flip``: the crop and its horizontal mirror image. Only for a model trained with flips (``augment.hflip_p > 0``)
  on data prepared with ``--no-mirror``; with left knees mirrored to one orientation, the mirror image is a knee
  the model never saw.
- ``shift``: the crop, shifted by 2.5 % of its side (rounded to whole pixels, so the shifted views are not
  blurred by interpolation) left, right, up and down, and zoomed to 0.95 and 1.03 (7 views).
  It keeps the canonical orientation and stays inside the train preset's affine range (``augment.translate``,
  ``augment.scale``), so it suits the mirrored recipe. Multi-crop averaging of this kind is the classic form of
  TTA (Krizhevsky et al., NeurIPS 2012; Simonyan & Zisserman, ICLR 2015).

Validation during training and ``evaluate`` / ``score`` / ``gradcam`` use the same function, :func:`tta_probs`, so
a checkpoint's logged val figures are the ones inference reproduces (on the CPU, where both run in fp32; CUDA
validation runs under the training autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from koa_ray import TTA_MODES

SHIFT = 0.025  # fraction of the crop's side
ZOOMS = (0.95, 1.03)


def _affine(x: torch.Tensor, dx: float, dy: float, zoom: float) -> torch.Tensor:
    """``x`` (N, C, S, S) with its content moved right by ``dx`` and down by ``dy`` (fractions of the side) and
    scaled by ``zoom`` about the centre; borders are reflected (edge pixel included). Computed in float32 even
    under autocast: a bf16 sampling grid would move whole-pixel shifts off the pixel centres."""
    with torch.autocast(x.device.type, enabled=False):
        xf = x.float()
        theta = torch.tensor([[1.0 / zoom, 0.0, -2.0 * dx], [0.0, 1.0 / zoom, -2.0 * dy]], device=x.device)
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(xf, grid, mode="bilinear", padding_mode="reflection", align_corners=False).to(x.dtype)


def tta_views(x: torch.Tensor, mode: str = "none") -> list[torch.Tensor]:
    """The views of ``x`` (N, C, S, S) that ``mode`` averages over; the first is always ``x`` itself.

    Raises:
        ValueError: ``mode`` is not one of ``TTA_MODES``.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta={mode!r}: supported: {', '.join(TTA_MODES)}")
    if mode == "none" or len(x) == 0:
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    d = max(1, round(SHIFT * x.shape[-1])) / x.shape[-1]  # whole pixels: the sampling grid hits pixel centres
    shifts = [(d, 0.0), (-d, 0.0), (0.0, d), (0.0, -d)]
    return [x] + [_affine(x, dx, dy, 1.0) for dx, dy in shifts] + [_affine(x, 0.0, 0.0, z) for z in ZOOMS]


def tta_probs(model: torch.nn.Module, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Softmax probabilities (float32, N x classes) of ``model`` averaged over the ``mode`` views of ``x``."""
    views = tta_views(x, mode)
    return sum(torch.softmax(model(v).float(), 1) for v in views) / len(views)
