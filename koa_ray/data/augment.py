"""Train and eval presets (albumentations), applied to preprocessed knee crops on CPU.

Presets are small callable classes in the style of torchvision's ``references/classification/presets.py``: the
train preset is random and label-safe — by default every grade gets the same pipeline (``AugmentConfig.
grade_strength`` can scale it per grade on request; minority grades get more augmented copies through
:mod:`koa_ray.data.balance` either way); the eval preset is deterministic. Both take ``uint8 (N, S, S)`` crops and return
normalised ``float32 (N, C, size, size)`` arrays ready for ``torch.from_numpy``.
"""

from __future__ import annotations

import numpy as np

from koa_ray.config import AugmentConfig

# ImageNet statistics averaged over RGB: right for grayscale input to an ImageNet-initialised network and harmless
# for random initialisation. Stored in every checkpoint, so inference never guesses them.
GRAY_MEAN = 0.449
GRAY_STD = 0.226


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def normalize(images: np.ndarray, mean: float = GRAY_MEAN, std: float = GRAY_STD, in_chans: int = 1) -> np.ndarray:
    """``uint8 (N, H, W)`` → ``float32 (N, C, H, W)`` with ``(x/255 - mean) / std``."""
    x = (images.astype(np.float32) * (1.0 / 255.0) - mean) / std
    x = x[:, None]
    return np.repeat(x, in_chans, axis=1) if in_chans > 1 else np.ascontiguousarray(x)


def build_train_transform(cfg: AugmentConfig, strength: float = 1.0):
    """One albumentations pipeline at a given strength (1.0 = the configured magnitudes)."""
    import albumentations as A
    import cv2

    s = float(strength)
    ops = []
    if cfg.hflip_p > 0 and s > 0:  # strength 0 = this grade is not augmented at all
        ops.append(A.HorizontalFlip(p=cfg.hflip_p))
    if cfg.rotate_deg > 0 or cfg.scale > 0 or cfg.translate > 0:
        # zoom in at most half as far as out: the joint margins (osteophytes) stay inside the crop
        ops.append(A.Affine(scale=(1 - cfg.scale * s, 1 + 0.5 * cfg.scale * s),
                            translate_percent=(-cfg.translate * s, cfg.translate * s),
                            rotate=(-cfg.rotate_deg * s, cfg.rotate_deg * s),
                            border_mode=cv2.BORDER_REFLECT_101, p=min(1.0, 0.7 * s)))
    if cfg.brightness > 0 or cfg.contrast > 0:
        ops.append(A.RandomBrightnessContrast(brightness_limit=cfg.brightness * s, contrast_limit=cfg.contrast * s,
                                              p=min(1.0, 0.6 * s)))
    if cfg.clahe_p > 0:
        ops.append(A.CLAHE(clip_limit=(1.0, 1.0 + 2.0 * s), tile_grid_size=(8, 8), p=min(1.0, cfg.clahe_p * s)))
    if cfg.gamma_p > 0:
        ops.append(A.RandomGamma(gamma_limit=(100 - 20 * s, 100 + 20 * s), p=min(1.0, cfg.gamma_p * s)))
    if cfg.noise_p > 0:
        ops.append(A.GaussNoise(std_range=(0.01, 0.01 + 0.04 * s), p=min(1.0, cfg.noise_p * s)))
    if cfg.blur_p > 0:
        ops.append(A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 0.3 + 0.9 * s), p=min(1.0, cfg.blur_p * s)))
    return A.Compose(ops)


class TrainPreset:
    """Random, class-aware augmentation → normalised tensors. ``__call__`` is a Ray Data ``map_batches`` body."""

    def __init__(self, cfg: AugmentConfig, image_size: int, mean: float = GRAY_MEAN, std: float = GRAY_STD,
                 in_chans: int = 1):
        self.cfg, self.image_size, self.mean, self.std, self.in_chans = cfg, image_size, mean, std, in_chans
        self._pipelines = None  # built lazily: albumentations objects are cheap to build, and unpickled per worker
        self._seed: int | None = None

    def reseed(self, seed: int) -> "TrainPreset":
        """Make the random stream reproducible from ``seed``. Returns ``self``.

        Local mode reseeds every epoch (and every ``DataLoader`` worker) from the run's seed, so a local run is
        repeatable; in the Ray Data stream each task starts unseeded and only the re-sampling is seeded.
        """
        self._seed = int(seed)
        if self._pipelines is not None:
            self._seed_pipelines()
        return self

    def _seed_pipelines(self):
        for i, p in enumerate({id(p): p for p in self._pipelines}.values()):
            p.set_random_seed(self._seed * 7919 + i)

    def pipeline(self, grade: int):
        if self._pipelines is None:
            cache: dict[float, object] = {}
            self._pipelines = []
            for s in self.cfg.grade_strength:
                cache.setdefault(float(s), build_train_transform(self.cfg, s))
                self._pipelines.append(cache[float(s)])
            if self._seed is not None:
                self._seed_pipelines()
        return self._pipelines[int(grade)]

    def augment(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = np.empty((len(images), self.image_size, self.image_size), np.uint8)
        for i, (img, g) in enumerate(zip(images, labels)):
            out[i] = self.pipeline(g)(image=_resize(img, self.image_size))["image"]
        return out

    def __call__(self, batch: dict) -> dict:
        from koa_ray.data.decode import decode_image_column

        images = decode_image_column(batch["image"], batch["size"])
        labels = np.asarray(batch["label"], np.int64)
        x = normalize(self.augment(images, labels), self.mean, self.std, self.in_chans)
        return {"image": x, "label": labels}


class EvalPreset:
    """Deterministic resize + normalise. Keeps ``path``/``knee`` columns when present for traceability."""

    def __init__(self, image_size: int, mean: float = GRAY_MEAN, std: float = GRAY_STD, in_chans: int = 1):
        self.image_size, self.mean, self.std, self.in_chans = image_size, mean, std, in_chans

    def transform(self, images: np.ndarray) -> np.ndarray:
        resized = np.stack([_resize(img, self.image_size) for img in images]) if len(images) else \
            np.zeros((0, self.image_size, self.image_size), np.uint8)
        return normalize(resized, self.mean, self.std, self.in_chans)

    def __call__(self, batch: dict) -> dict:
        from koa_ray.data.decode import decode_image_column

        images = decode_image_column(batch["image"], batch["size"])
        return {"image": self.transform(images), "label": np.asarray(batch["label"], np.int64)}
