"""``koa export``: a checkpoint as an ONNX or TorchScript model that runs without koa-ray, with its preprocessing
written beside it (``preprocess.json``), and a parity check against the PyTorch model on real crops.

The exported graph takes ``image``: float32 ``(N, C, S, S)``, normalised crops, and returns ``logits`` ``(N, 5)``.
Everything before it (decode, knee ROI, mirroring of left knees, resize, normalisation) is data, not code, and is
spelled out in ``preprocess.json`` so another runtime can reproduce it; ``koa score`` does the same steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FORMATS = ("onnx", "torchscript")
EXPORT_FORMAT = "koa-ray-export/1"
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


def preprocess_spec(meta: dict, fmt: str, checkpoint: str) -> dict:
    """The ``preprocess.json`` of an export: input contract, preprocessing steps, output and class names."""
    from koa_ray import CLASS_NAMES

    pre = meta["preprocess"]
    prep = pre.get("prep", {})
    roi = prep.get("roi", {})
    size, chans = int(pre["input_size"]), int(pre.get("in_chans", 1))
    tta = meta.get("tta", "none")
    to_grade = ["softmax over the 5 logits"]
    if tta != "none":
        to_grade.append(f"average p over the test-time views '{tta}' (koa_ray.data.tta; the checkpoint was "
                        "validated so)")
    to_grade.append("grade = " + ("round(sum_k k * p_k)" if meta.get("decode") == "expected" else "argmax"))
    steps = ["decode the file to grayscale uint8 (DICOM: apply its VOI LUT / window; 16-bit: percentile window)"]
    if roi.get("enabled"):
        steps.append(f"crop each knee joint box (koa ROI, margin {roi.get('margin')}); `koa roi` writes the boxes")
    if roi.get("mirror_left", True):
        steps.append(f"mirror left knees horizontally to the right-knee orientation (side from "
                     f"{prep.get('side', {}).get('from', 'filename')})")
    steps += [f"resize to {prep.get('image_size', size)} px square (OpenCV INTER_AREA when shrinking, INTER_LINEAR when "
              f"enlarging), then to {size} px if different",
              f"x = (pixel / 255 - {pre['mean']}) / {pre['std']}, float32, shape (N, {chans}, {size}, {size})"]
    return {
        "format": EXPORT_FORMAT,
        "model_format": fmt,
        "model_file": FILES[fmt],
        "source_checkpoint": checkpoint,
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW", "shape": ["N", chans, size, size]},
        "output": {"name": "logits", "shape": ["N", len(CLASS_NAMES)],
                   "to_grade": "; ".join(to_grade)},
        "tta": tta,
        "class_names": list(CLASS_NAMES),
        "preprocess": pre,
        "steps": steps,
        "model": meta["model"],
        "val_metrics": {k: meta.get("metrics", {}).get(k) for k in ("val_qwk", "val_accuracy", "val_macro_f1")},
    }


def export_model(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", opset: int = 17,
                 check_inputs: np.ndarray | None = None, atol: float = 1e-4) -> dict:
    """Export ``checkpoint`` (a checkpoint or run folder) to ``out/``: the model file and ``preprocess.json``.

    The exported model is run on ``check_inputs`` (default: 4 random normalised crops) and compared with the
    PyTorch model; the largest absolute logit difference is returned and must stay under
    ``atol * max(1, max |logit|)``.

    Raises:
        ValueError: unknown ``fmt`` (lists the supported ones).
        RuntimeError: the exported model disagrees with PyTorch by more than ``atol``, or ONNX Runtime is missing
            for the check (``pip install onnxruntime``).
    """
    from koa_ray.checkpoint import load_checkpoint, resolve_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: supported: {', '.join(FORMATS)}")
    ckpt = resolve_checkpoint(checkpoint)
    model, meta = load_checkpoint(ckpt)
    model = model.float().eval()
    size, chans = int(meta["preprocess"]["input_size"]), int(meta["preprocess"].get("in_chans", 1))
    if check_inputs is None:
        check_inputs = np.random.default_rng(0).normal(0, 1, (4, chans, size, size)).astype(np.float32)
    x = torch.as_tensor(np.ascontiguousarray(check_inputs, np.float32))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILES[fmt]
    example = x[:2]
    with torch.no_grad():
        want = model(x).numpy()
        if fmt == "torchscript":
            scripted = torch.jit.trace(model, example, check_trace=False)
            scripted.save(str(path))
            got = torch.jit.load(str(path)).eval()(x).numpy()
        else:
            torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=opset,
                              dynamo=False)
            got = run_onnx(path, x.numpy())
    diff = float(np.abs(got - want).max())
    bound = atol * max(1.0, float(np.abs(want).max()))  # atol on logits of order 1, relative beyond
    spec = preprocess_spec(meta, fmt, str(ckpt))
    spec["parity"] = {"max_abs_logit_diff": diff, "bound": bound, "n": int(len(x))}
    (out / "preprocess.json").write_text(json.dumps(spec, indent=2, default=float))
    if not diff <= bound:
        raise RuntimeError(f"{path}: exported model differs from PyTorch by {diff:.2e} (> {bound:.1e}) in logits")
    return {"model": str(path), "preprocess": str(out / "preprocess.json"), "format": fmt,
            "max_abs_logit_diff": diff}


def run_onnx(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Logits of an exported ONNX model under ONNX Runtime (CPU)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeError("checking an ONNX export needs ONNX Runtime: pip install onnxruntime") from e
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"image": np.ascontiguousarray(x, np.float32)})[0]
