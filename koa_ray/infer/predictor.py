"""Inference from a checkpoint with exactly the preprocessing recorded in it.

:class:`Predictor` loads a checkpoint once and turns raw files (decode → ROI → crop, as in ``koa prepare``) or
already-prepared crops into class probabilities. The Ray Data actors of the sibling modules
(:mod:`koa_ray.infer.score`, :mod:`koa_ray.infer.evaluate`, :mod:`koa_ray.infer.gradcam`) each hold one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from koa_ray.checkpoint import load_checkpoint, model_id, resolve_checkpoint
from koa_ray.data.augment import EvalPreset
from koa_ray.data.decode import DecodeError, read_image
from koa_ray.data.ingest import IngestConfig, parse_patient_side
from koa_ray.data.prep import PrepConfig, knee_crops
from koa_ray.data.tta import tta_probs
from koa_ray.metrics import decode_grades


@dataclass
class Knee:
    """One knee crop of one input file, ready for the model."""

    path: str
    crop: np.ndarray  # uint8 (S, S) at the prepared size
    x0: int = -1
    y0: int = -1
    x1: int = -1
    y1: int = -1
    side: str = ""
    roi_fallback: bool = False
    roi_score: float = 0.0
    label: int = -1
    implant: bool = False  # metal caps the joint (a knee replacement): the grade does not apply


def pick_device(use_gpu: bool | None = None) -> torch.device:
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class Predictor:
    """Model + preprocessing of one checkpoint. ``model_id`` names it in outputs (run/checkpoint folder)."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device | None = None):
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.device = torch.device(device) if device is not None else pick_device()
        self.model, self.meta = load_checkpoint(self.checkpoint, self.device)
        pre = self.meta["preprocess"]
        self.prep = PrepConfig.from_dict(pre["prep"])
        self.eval_preset = EvalPreset(pre["input_size"], pre["mean"], pre["std"], pre["in_chans"])
        self.model_id = model_id(self.checkpoint)
        # the side (which decides mirroring) is found as it was when the training data was prepared
        self.side_source = dict(pre["prep"].get("side") or {"from": "filename",
                                                            "patient_regex": IngestConfig.patient_regex})
        self.decode = self.meta.get("decode", "argmax")
        self.tta = self.meta.get("tta", "none")  # the test-time views the checkpoint was validated with

    def knees_from_file(self, path: str, side: str | None = None) -> list[Knee]:
        """Decode and crop one file with the checkpoint's preprocessing; raises :class:`DecodeError` for unreadable
        input. ``side`` ('L'/'R', e.g. from a manifest) overrides the side parsed from the file name with the
        recorded ``patient_regex``."""
        return self.knees_from_image(self.read(path), path, side)

    def read(self, path: str) -> np.ndarray:
        """Decode ``path`` as the checkpoint's preprocessing does; raises :class:`DecodeError`."""
        return read_image(path, min_side=self.prep.min_side)

    def knees_from_image(self, img: np.ndarray, path: str, side: str | None = None) -> list[Knee]:
        """:meth:`knees_from_file` for an already decoded image (``path`` names it and gives the side)."""
        side_hint = side if side in ("L", "R") else parse_patient_side(path, self.side_source["patient_regex"])[1]
        return [Knee(path, crop, b.x0, b.y0, b.x1, b.y1, b.side if b.side in ("L", "R") else side_hint,
                     bool(b.fallback), float(b.score), implant=bool(b.implant))
                for crop, b in knee_crops(img, self.prep, side_hint)]

    def inputs(self, crops: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.eval_preset.transform(crops)).to(self.device)

    def grades(self, probs: np.ndarray) -> np.ndarray:
        """Grades from probabilities with the checkpoint's decoding (``argmax`` or ``expected``)."""
        return decode_grades(probs, self.decode) if len(probs) else np.zeros(0, np.int64)

    @torch.no_grad()
    def predict(self, crops: np.ndarray, tta: str | None = None) -> np.ndarray:
        """``uint8 (N, S, S)`` crops → ``float (N, 5)`` probabilities, averaged over the test-time views of ``tta``
        (``none`` | ``flip`` | ``shift``, :mod:`koa_ray.data.tta`; ``None``: the checkpoint's, :attr:`tta`)."""
        if len(crops) == 0:
            return np.zeros((0, 5), np.float32)
        return tta_probs(self.model, self.inputs(crops), self.tta if tta is None else tta).cpu().numpy()


__all__ = ["DecodeError", "Knee", "Predictor", "pick_device"]
