"""Grad-CAM family explanations (pytorch-grad-cam), in-process and as a batch Ray Data job (``koa gradcam``,
``jobs/gradcam.py``).

Default target layer: the attention block after the last dense block (``model.gradcam_target_layer``). Hooks are
owned by :func:`cam_extractor`, a context manager that always releases them — also when the computation raises
(pytorch-grad-cam's own ``__exit__`` swallows ``IndexError``; we do not rely on it).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

METHODS = ("gradcam", "gradcam++", "eigencam", "layercam")
GRADCAM_COLUMNS = ["path", "status", "error", "knee", "side", "grade", "probability", "target", "overlay", "npy",
                   "x0", "y0", "x1", "y1", "roi_fallback", "film"]


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM, "layercam": LayerCAM}
    if method not in classes:
        raise ValueError(f"method={method!r}: supported: {', '.join(METHODS)}")
    return classes[method]


def target_layer(model: torch.nn.Module, name: str | None = None) -> torch.nn.Module:
    """``name`` is a dotted module path (e.g. ``features.denseblock3``); default: the model's Grad-CAM layer."""
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"layer={name!r} is not a module of the model: {e}") from e
    layer = model.gradcam_target_layer
    return layer() if callable(layer) and not isinstance(layer, torch.nn.Module) else layer


@contextlib.contextmanager
def cam_extractor(model: torch.nn.Module, method: str = "gradcam", layer: str | None = None):
    """Yield a pytorch-grad-cam object whose hooks are released on exit, whatever happens inside."""
    cam = _cam_class(method)(model=model, target_layers=[target_layer(model, layer)])
    try:
        yield cam
    finally:
        cam.activations_and_grads.release()


def compute_cams(model: torch.nn.Module, x: torch.Tensor, targets: list[int], method: str = "gradcam",
                 layer: str | None = None) -> np.ndarray:
    """Class-activation maps ``float32 (N, H, W)`` in [0, 1] at the input resolution."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    with cam_extractor(model, method, layer) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    maps = np.nan_to_num(np.asarray(maps, np.float32), nan=0.0)
    return maps


def overlay(crop: np.ndarray, cam: np.ndarray, caption: str | None, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 image: JET heatmap blended on the grayscale crop, upscaled to at least 256 px wide, with the
    caption (if any) in a bar on top, its font sized to the image so it stays legible. Pass ``caption=None`` when
    the page shows the caption as text (drawn once)."""
    import cv2

    h, w = crop.shape
    cam_r = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(255 * np.clip(cam_r, 0, 1)), cv2.COLORMAP_JET)[..., ::-1]
    base = np.repeat(crop[..., None], 3, axis=2).astype(np.float32)
    blend = np.uint8(np.clip((1 - alpha) * base + alpha * heat, 0, 255))
    scale = max(1, -(-256 // max(w, 1)))
    if scale > 1:
        blend = cv2.resize(blend, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    if not caption:
        return blend
    width = blend.shape[1]
    font = cv2.FONT_HERSHEY_SIMPLEX
    fs = width / 256 * 0.55
    (tw, th), _ = cv2.getTextSize(caption, font, fs, 1)
    if tw > width - 8:  # shrink a long caption to fit the bar
        fs *= (width - 8) / tw
        (tw, th), _ = cv2.getTextSize(caption, font, fs, 1)
    bar = np.zeros((th + 12, width, 3), np.uint8)
    cv2.putText(bar, caption, (4, th + 5), font, fs, (255, 255, 255), max(1, int(round(fs * 1.6))), cv2.LINE_AA)
    return np.concatenate([bar, blend], axis=0)


def _stem(path: str, knee: int, side: str) -> str:
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(path).stem)[:60]
    return f"{safe}_{digest}_k{knee}{side}"


class GradCamActor:
    """Ray Data actor: batches of paths → overlays (and optional ``.npy`` maps) written to ``out_dir``."""

    def __init__(self, checkpoint: str, out_dir: str, method: str = "gradcam", target: str = "predicted",
                 layer: str | None = None, save_npy: bool = False, use_gpu: bool = False, threads: int = 1,
                 tta: str | None = None):
        from koa_ray.infer.predictor import Predictor
        from koa_ray.runtime import set_actor_threads

        set_actor_threads(threads)
        _cam_class(method)
        self.p = Predictor(checkpoint, device="cuda" if use_gpu else "cpu")
        self.out, self.method, self.layer, self.save_npy = Path(out_dir), method, layer, save_npy
        self.target = parse_target(target)
        self.tta = tta  # the views the predicted grade averages (None: the checkpoint's); the map is of the crop
        target_layer(self.p.model, layer)  # fail fast on a bad layer name

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from koa_ray.data.decode import DecodeError
        from koa_ray.data.roi import KneeBox, draw_boxes

        rows, knees = [], []
        films: dict[str, str] = {}  # path -> picture of the whole image with its knee boxes
        for path, side in zip(batch["path"], batch.get("side", [""] * len(batch))):
            try:
                img = self.p.read(str(path))
                ks = self.p.knees_from_image(img, str(path), side=side or None)
                knees.extend((k, i) for i, k in enumerate(ks))
                film = self.out / f"{_stem(str(path), 0, '')}_film.png"
                boxes = [KneeBox(k.x0, k.y0, k.x1, k.y1, k.side or "U", k.roi_score, bool(k.roi_fallback),
                                 implant=bool(k.implant)) for k in ks]
                _write_png(film, draw_boxes(img, boxes, max_side=400)[..., ::-1])  # BGR picture -> RGB
                films[str(path)] = film.name
            except DecodeError as e:
                rows.append(_error(str(path), e.reason))
            except Exception as e:  # noqa: BLE001 - recorded per file
                rows.append(_error(str(path), f"{type(e).__name__}: {e}"))
        if knees:
            crops = np.stack([k.crop for k, _ in knees])
            probs = self.p.predict(crops, tta=self.tta)
            preds = self.p.grades(probs)  # the checkpoint's decoding over the test-time views, as in koa score
            targets = preds if self.target is None else np.full(len(preds), self.target)
            x = self.p.inputs(crops)
            maps = compute_cams(self.p.model, x, list(targets), self.method, self.layer)
            for (k, i), prob, pred, tgt, cam in zip(knees, probs, preds, targets, maps):
                stem = _stem(k.path, i, k.side)
                size = self.p.eval_preset.image_size
                crop = k.crop if k.crop.shape[0] == size else self.p.eval_preset.transform(k.crop[None])[0, 0]
                if crop.dtype != np.uint8:  # normalised input → back to a displayable crop
                    crop = np.uint8(np.clip(crop * self.p.eval_preset.std + self.p.eval_preset.mean, 0, 1) * 255)
                caption = f"KL{pred} p={prob[pred]:.2f}" + ("" if tgt == pred else f" cam:KL{tgt}")
                png = self.out / f"{stem}.png"
                _write_png(png, overlay(crop, cam, caption))
                npy = ""
                if self.save_npy:
                    np.save(self.out / f"{stem}.npy", cam)
                    npy = f"{stem}.npy"
                rows.append({"path": k.path, "status": "ok", "error": "", "knee": i, "side": k.side,
                             "grade": int(pred), "probability": float(prob[pred]), "target": int(tgt),
                             "overlay": png.name, "npy": npy, "x0": k.x0, "y0": k.y0, "x1": k.x1, "y1": k.y1,
                             "roi_fallback": bool(k.roi_fallback), "film": films.get(k.path, "")})
        return pd.DataFrame(rows, columns=GRADCAM_COLUMNS)


def parse_target(target: str | int) -> int | None:
    """``"predicted"`` → None; ``"0".."4"`` / ``"KL3"`` → that grade."""
    t = str(target).upper().removeprefix("KL")
    if t == "PREDICTED":
        return None
    if t.isdigit() and 0 <= int(t) <= 4:
        return int(t)
    raise ValueError(f"target={target!r}: supported: predicted, or a grade 0-4")


def _error(path: str, reason: str) -> dict:
    return {"path": path, "status": "error", "error": reason, "knee": -1, "side": "", "grade": -1,
            "probability": np.nan, "target": -1, "overlay": "", "npy": "", "x0": -1, "y0": -1, "x1": -1, "y1": -1,
            "roi_fallback": False, "film": ""}


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    tmp = path.with_name(f".{path.name}.tmp.png")
    cv2.imwrite(str(tmp), rgb[..., ::-1])
    os.replace(tmp, path)


def contact_sheet(rows: pd.DataFrame, out_html: Path, title: str = "Grad-CAM") -> None:
    """``index.html``: overlays grouped by predicted grade, each with the whole image and its knee box(es) below
    (to check the ROI by eye), errors listed at the end."""
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif} figure{display:inline-block;margin:4px;width:256px;"
             "vertical-align:top} img{width:256px} img.film{margin-top:2px} "
             "figcaption{font-size:13px;word-break:break-all}"
             "</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    ok = rows[rows.status == "ok"]
    for g in range(5):
        sel = ok[ok.grade == g]
        parts.append(f"<h2>Predicted KL{g} ({len(sel)})</h2>")
        for r in sel.itertuples():
            film = getattr(r, "film", "")
            film_img = (f"<img class='film' src='{html.escape(film)}' loading='lazy' "
                        f"title='knee box on the whole image'>" if isinstance(film, str) and film else "")
            fallback = " <b>ROI fallback</b>" if bool(getattr(r, "roi_fallback", False)) else ""
            parts.append(f"<figure><img src='{html.escape(r.overlay)}' loading='lazy'>{film_img}<figcaption>"
                         f"{html.escape(Path(r.path).name)} {html.escape(str(r.side))}"
                         f"{fallback}</figcaption></figure>")  # grade and p are drawn on the overlay, once
    err = rows[rows.status == "error"]
    if len(err):
        parts.append(f"<h2>Errors ({len(err)})</h2><ul>")
        parts += [f"<li>{html.escape(r.path)}: {html.escape(r.error)}</li>" for r in err.itertuples()]
        parts.append("</ul>")
    parts.append("</body></html>")
    out_html.write_text("\n".join(parts))


def run_gradcam(inputs: list[str], checkpoint: str, out: str | Path, *, method: str = "gradcam",
                target: str = "predicted", layer: str | None = None, save_npy: bool = False, batch_size: int = 16,
                concurrency: int = 1, use_gpu: bool | None = None, address: str | None = None,
                tta: str | None = None) -> dict:
    """Batch Grad-CAM over files on a Ray Data actor pool; writes overlays, ``index.csv`` and ``index.html``.
    ``tta``: the test-time views the predicted grade averages (``None``: the checkpoint's, as ``koa score``)."""
    import ray

    from koa_ray.checkpoint import resolve_checkpoint
    from koa_ray.data.ingest import expand_inputs, input_frame
    from koa_ray.runtime import actor_threads, cluster_gpus, frame_blocks, init_ray

    _cam_class(method)
    parse_target(target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = str(resolve_checkpoint(checkpoint).resolve())
    files = expand_inputs(inputs)
    init_ray(address)
    gpu = bool(cluster_gpus() > 0) if use_gpu is None else use_gpu
    ds = ray.data.from_pandas(frame_blocks(input_frame(files, inputs), batch_size)).map_batches(
        GradCamActor, fn_constructor_kwargs={"checkpoint": ckpt, "out_dir": str(out.resolve()), "method": method,
                                             "target": target, "layer": layer, "save_npy": save_npy,
                                             "use_gpu": gpu, "threads": actor_threads(concurrency), "tta": tta},
        batch_size=batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if gpu else 0,
        num_cpus=0.5 if not gpu else 1)
    rows = ds.to_pandas().sort_values(["path", "knee"], kind="stable").reset_index(drop=True)
    rows.to_csv(out / "index.csv", index=False)
    contact_sheet(rows, out / "index.html", f"Grad-CAM ({method}) — {Path(ckpt).parent.name}/{Path(ckpt).name}")
    return {"out": str(out), "n_inputs": len(files), "n_overlays": int((rows.status == "ok").sum()),
            "n_errors": int((rows.status == "error").sum())}
