"""`koa export`: ONNX (run by ONNX Runtime) and TorchScript models that give the PyTorch logits on real crops, with
the preprocessing a user needs written beside them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from koa_ray.checkpoint import load_checkpoint, resolve_checkpoint
from koa_ray.cli import main
from koa_ray.data.augment import EvalPreset
from koa_ray.data.decode import decode_image_column
from koa_ray.infer.export import export_model, run_onnx
from koa_ray.train.local import read_split


def _crops(prepared, meta, n=24):
    val = read_split(prepared, "val").head(n)
    pre = meta["preprocess"]
    return EvalPreset(pre["input_size"], pre["mean"], pre["std"], pre["in_chans"]).transform(
        decode_image_column(val["image"].tolist(), val["size"].to_numpy()))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_real_crops(tiny_run, prepared, tmp_path, fmt):
    run, _ = tiny_run
    model, meta = load_checkpoint(run)
    x = _crops(prepared, meta)
    r = export_model(run, tmp_path / fmt, fmt=fmt, check_inputs=x)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    # reload the file as a user elsewhere would, with a batch size the export never saw
    if fmt == "onnx":
        got = run_onnx(r["model"], x[:7])
    else:
        got = torch.jit.load(r["model"]).eval()(torch.from_numpy(x[:7])).detach().numpy()
    assert np.abs(got - want[:7]).max() < 1e-4
    assert r["max_abs_logit_diff"] < 1e-4
    spec = json.loads((tmp_path / fmt / "preprocess.json").read_text())
    pre = meta["preprocess"]
    assert spec["input"]["shape"] == ["N", pre["in_chans"], pre["input_size"], pre["input_size"]]
    assert spec["preprocess"]["mean"] == pre["mean"] and spec["preprocess"]["std"] == pre["std"]
    assert spec["preprocess"]["prep"] == pre["prep"]  # ROI, side source and mirroring travel with the model
    assert spec["source_checkpoint"] == str(resolve_checkpoint(run))
    assert spec["class_names"] == ["KL0", "KL1", "KL2", "KL3", "KL4"]
    assert any("mirror left knees" in s for s in spec["steps"])


def test_export_cli_and_bad_format(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 0
    assert "largest logit difference from PyTorch" in capsys.readouterr().out
    assert (tmp_path / "x" / "model.onnx").stat().st_size > 10_000
    with pytest.raises(ValueError, match="supported: onnx, torchscript"):
        export_model(run, tmp_path / "y", fmt="tflite")


def test_export_spec_names_the_test_time_views(tiny_run):
    """A checkpoint with test-time views (``tta``) exports a single-view model; ``preprocess.json`` tells the other
    runtime which views to average, as ``koa score`` does."""
    from koa_ray.infer.export import preprocess_spec

    run, _ = tiny_run
    _, meta = load_checkpoint(run)
    plain = preprocess_spec(meta, "onnx", str(run))
    assert plain["tta"] == "none" and "test-time views" not in plain["output"]["to_grade"]
    shifted = preprocess_spec({**meta, "tta": "shift"}, "onnx", str(run))
    assert shifted["tta"] == "shift" and "average p over the test-time views 'shift'" in shifted["output"]["to_grade"]
