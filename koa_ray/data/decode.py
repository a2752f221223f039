"""Decode radiographs of any common format to 8-bit grayscale.

Supported: PNG, JPEG, TIFF, BMP (8- or 16-bit; L, LA, RGB, RGBA, I;16, I, F) and DICOM (``.dcm`` or any file that
carries the ``DICM`` magic at byte 128). For DICOM, the Modality LUT (rescale slope/intercept) and the VOI LUT or
window centre/width are applied when present, and MONOCHROME1 images (bright = air) are inverted so bone is always
bright. Every decoder returns a 2-D ``uint8`` array; any failure raises :class:`DecodeError` with a reason that names
the file, never a bare exception, so batch jobs can record it and go on.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
MIN_SIDE = 32
# Larger files are refused before they are read (a 16-bit 3000 x 3000 DICOM is ~18 MB; a multi-frame one may be
# a few hundred MB): a stray multi-GB file would otherwise be read whole into a worker's memory.
MAX_FILE_BYTES = 1 << 30


class DecodeError(ValueError):
    """An input could not be turned into an image; ``reason`` is short and machine-groupable."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_dicom_bytes(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_candidate_file(path: str | os.PathLike) -> bool:
    """True for files a folder scan should pick up: known image extensions, or no extension (possible DICOM)."""
    p = Path(path)
    if p.name.startswith("."):
        return False
    suffix = p.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix == "" or not suffix[1:].isalpha()


ROBUST_PERCENTILES = (0.05, 99.95)  # window of un-windowed 16-bit/float images: a few outlier pixels are clipped


def to_uint8(arr: np.ndarray, robust: bool = False) -> np.ndarray:
    """Scale any numeric 2-D array to uint8 (uint8 input is returned unchanged): min-max, or with ``robust`` between
    the ``ROBUST_PERCENTILES`` of its values, so that a single hot or dead pixel in a 16-bit image cannot crush the
    contrast of the rest (min-max when that window is empty)."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if robust and a.size:
        step = max(1, int(np.sqrt(a.size / 1_000_000)))  # ~1 M samples are plenty for the percentiles
        plo, phi = (float(v) for v in np.percentile(a[::step, ::step], ROBUST_PERCENTILES))
        if phi > plo:
            lo, hi = plo, phi
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _to_gray(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] in (1, 2, 3, 4):
        if arr.shape[2] in (1, 2):  # L or LA
            return arr[..., 0]
        rgb = arr[..., :3].astype(np.float32)
        gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        return gray.astype(arr.dtype) if arr.dtype != np.uint8 else np.clip(gray + 0.5, 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported array shape {arr.shape}")


def decode_raster(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP bytes with Pillow, keeping 16-bit depth until the final scaling."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            if mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if "A" in mode else "RGB")
            arr = np.asarray(im)
    except UnidentifiedImageError as e:
        raise DecodeError(path, "not an image (unrecognised format)") from e
    except Image.DecompressionBombError as e:  # a header claiming a huge raster: refused before decoding it
        raise DecodeError(path, f"image too large (decompression bomb guard): {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt stream
        raise DecodeError(path, f"corrupt or truncated image: {e}") from e
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype.kind in "iuf" and arr.dtype != np.uint8:
        arr = _to_gray(arr) if arr.ndim == 3 else arr
        return to_uint8(arr, robust=True)
    return _to_gray(arr)


def decode_dicom(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """Decode a DICOM file: modality LUT, VOI LUT/window, MONOCHROME1 inversion, first frame of multi-frame."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError) as e:
        raise DecodeError(path, f"unreadable DICOM: {e}") from e
    if "PixelData" not in ds:
        raise DecodeError(path, "unsupported DICOM: no PixelData element")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for unsupported transfer syntaxes
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DecodeError(path, f"unsupported DICOM pixel data (transfer syntax {ts}): {e}") from e
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1 or (arr.ndim == 3 and photometric.startswith("MONOCHROME")):
        arr = arr[0]
    if photometric.startswith("MONOCHROME"):
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        arr = apply_modality_lut(arr, ds)
        windowed = "VOILUTSequence" in ds or "WindowCenter" in ds
        if windowed:
            arr = apply_voi_lut(arr, ds, index=0)
        out = to_uint8(np.asarray(arr, np.float32), robust=not windowed)  # the window, else a robust range
        if photometric == "MONOCHROME1":
            out = 255 - out
        return out
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        if photometric != "RGB":
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        return to_uint8(_to_gray(np.asarray(arr)))
    raise DecodeError(path, f"unsupported DICOM photometric interpretation {photometric}")


def decode_bytes(data: bytes, path: str = "<bytes>", min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode raw file bytes into a 2-D uint8 grayscale image.

    Raises:
        DecodeError: empty file, non-image, corrupt/truncated data, unsupported DICOM, or an image smaller than
            ``min_side`` pixels on either side.
    """
    if not data:
        raise DecodeError(path, "empty file (0 bytes)")
    if is_dicom_bytes(data) or str(path).lower().endswith((".dcm", ".dicom")):
        img = decode_dicom(data, path)
    else:
        img = decode_raster(data, path)
    if img.ndim != 2:
        raise DecodeError(path, f"unsupported image shape {img.shape}")
    if min(img.shape) < min_side:
        raise DecodeError(path, f"image too small ({img.shape[1]}x{img.shape[0]} px, minimum {min_side} px)")
    return np.ascontiguousarray(img)


def read_bytes(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path``; raises :class:`DecodeError` when it cannot be read or is larger than ``max_bytes``."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DecodeError(str(path), f"file too large ({size} bytes, limit {max_bytes})")
            return f.read()
    except OSError as e:
        if isinstance(e, FileNotFoundError) and "\\x" in str(path) and not os.path.lexists(path):
            raise DecodeError(str(path), "file name is not valid UTF-8 (shown escaped); rename the file") from e
        raise DecodeError(str(path), f"unreadable path: {e.strerror or e}") from e


def read_image(path: str | os.PathLike, min_side: int = MIN_SIDE) -> np.ndarray:
    """Read and decode one file; see :func:`decode_bytes`."""
    return decode_bytes(read_bytes(path), str(path), min_side=min_side)


def decode_image_column(images, size: int | np.ndarray) -> np.ndarray:
    """Parquet ``image`` bytes → ``(N, S, S)`` uint8 array."""
    sizes = np.broadcast_to(np.asarray(size), (len(images),))
    return np.stack([np.frombuffer(b, np.uint8).reshape(int(s), int(s)) for b, s in zip(images, sizes)])
