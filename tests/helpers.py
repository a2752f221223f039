"""Helpers shared by test modules (not tests themselves)."""

from __future__ import annotations

import torch

from koa_ray.config import ModelConfig, OptimConfig

# the small model of the same code, at 64 px: seconds per epoch on 2 CPU cores
TINY = dict(image_size=64, batch_size=32, eval_batch_size=64, patience=0, model=ModelConfig(arch="densenet_tiny"),
            optim=OptimConfig(lr=3e-3))


def val_predictions(ckpt, prepared):
    """Reload a checkpoint (weights_only) and predict the prepared val split in-process, without Ray."""
    from koa_ray.data.augment import EvalPreset
    from koa_ray.data.decode import decode_image_column
    from koa_ray.train.checkpoint import load_checkpoint
    from koa_ray.train.local import read_split

    model, meta = load_checkpoint(ckpt)
    val = read_split(prepared, "val")
    pre = meta["preprocess"]
    x = EvalPreset(pre["input_size"], pre["mean"], pre["std"], pre["in_chans"]).transform(
        decode_image_column(val["image"].tolist(), val["size"].to_numpy()))
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return val["label"].to_numpy(), pred, meta
