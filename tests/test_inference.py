"""Evaluate, batch scoring and batch Grad-CAM on a real (tiny) checkpoint."""

import json
import shutil
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from koa_ray.infer.score import SCORE_COLUMNS, score

try:
    from films import stitched_film
    from helpers import chromium, render_in_browser
except ImportError:  # tests/ imported as a package
    from tests.films import stitched_film
    from tests.helpers import chromium, render_in_browser

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "knee-kl224"


@pytest.fixture(scope="module")
def score_inputs(synth_dir, tmp_path_factory):
    """Single-knee crops, two bilateral radiographs, and corrupt files, in nested folders."""
    from koa_ray.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("score_in")
    files = sorted((synth_dir / "val").rglob("*.png"))[:10]
    for i, f in enumerate(files):
        dest = root / ("a" if i % 2 else "b/c") / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    make_dataset(root / "bi", 2, layout="bilateral", seed=5)
    (root / "bi" / "boxes.csv").unlink()  # a sidecar, not an input
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "a" / "empty.png").write_bytes(b"")
    return root, len(files)


def test_score_one_row_per_input_and_knee(ray_session, tiny_run, score_inputs, tmp_path):
    run, _ = tiny_run
    root, n_single = score_inputs
    out = tmp_path / "results.csv"
    summary = score([str(root)], str(run), out, batch_size=4)
    df = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert list(df.columns) == SCORE_COLUMNS
    n_inputs = n_single + 2 + 2
    assert summary["n_inputs"] == n_inputs and df["path"].nunique() == n_inputs
    err = df[df.status == "error"]
    assert sorted(err["path"].str.split("/").str[-1]) == ["broken.jpg", "empty.png"]
    assert (err["error"].str.len() > 0).all()
    ok = df[df.status == "ok"]
    single = ok[~ok["path"].str.contains("/bi/")]
    assert single.groupby("path").size().eq(1).all() and len(single) == n_single
    bilateral = ok[ok["path"].str.contains("/bi/")]
    assert bilateral.groupby("path")["side"].apply(lambda s: "".join(sorted(s))).tolist() == ["LR", "LR"]
    p = ok[[f"p{k}" for k in range(5)]].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    assert (ok["grade"].to_numpy() == p.argmax(1)).all()
    np.testing.assert_allclose(ok["expected_grade"], p @ np.arange(5), atol=1e-6)
    assert (ok["x1"] > ok["x0"]).all() and (ok["model"] == "tiny/" + json.load(open(run / "best.json"))["checkpoint"]).all()
    assert not (tmp_path / ".results.csv.parts").exists()


def test_score_resume_after_interruption(ray_session, tiny_run, score_inputs, tmp_path):
    run, _ = tiny_run
    root, _ = score_inputs
    full = tmp_path / "full.parquet"
    score([str(root)], str(run), full, batch_size=4)
    part = tmp_path / "part.parquet"
    interrupted = score([str(root)], str(run), part, batch_size=4, max_files=5, flush_rows=1)
    assert interrupted["interrupted"] and not part.exists()  # nothing that looks complete
    resumed = score([str(root)], str(run), part, batch_size=4, resume=True)
    assert resumed["n_new_files"] == resumed["n_inputs"] - 5  # finished files were not re-scored
    a = pd.read_parquet(full).drop(columns=["model"])
    b = pd.read_parquet(part).drop(columns=["model"])
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5)
    again = score([str(root)], str(run), part, batch_size=4, resume=True)
    assert again["n_new_files"] == 0 and again["n_rows"] == len(b)
    # killed after writing the output and before removing its parts: both are there; resume keeps each path once
    from koa_ray.infer.score import parts_dir

    parts_dir(part).mkdir()
    pd.read_parquet(part).iloc[::-1].to_parquet(parts_dir(part) / "part-00000.parquet")
    healed = score([str(root)], str(run), part, batch_size=4, resume=True)
    c = pd.read_parquet(part)
    assert healed["n_new_files"] == 0 and len(c) == len(b) == healed["n_rows"]
    assert c.groupby("path").size().to_dict() == pd.read_parquet(full).groupby("path").size().to_dict()
    # rows of another checkpoint are never mixed in
    c.assign(model="other-run/checkpoint_epoch_0007").to_parquet(part)
    with pytest.raises(ValueError, match=r"other-run/checkpoint_epoch_0007.*another --out"):
        score([str(root)], str(run), part, batch_size=4, resume=True)


def test_gradcam_maps_and_hooks_released(tiny_run):
    from koa_ray.checkpoint import load_checkpoint
    from koa_ray.infer.gradcam import cam_extractor, compute_cams, target_layer

    run, _ = tiny_run
    model, _ = load_checkpoint(run)
    layer = target_layer(model)
    x = torch.randn(3, 1, 64, 64)
    for method in ("gradcam", "gradcam++", "eigencam", "layercam"):
        maps = compute_cams(model, x, [0, 2, 4], method)
        assert maps.shape == (3, 64, 64) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert not layer._forward_hooks and not layer._backward_hooks
    with pytest.raises(RuntimeError):
        with cam_extractor(model) as cam:
            assert layer._forward_hooks
            raise RuntimeError("boom")
    assert not layer._forward_hooks  # released on error too
    # memory must not grow across many batches
    tracemalloc.start()
    for i in range(40):
        compute_cams(model, x, [1, 1, 1])
        if i == 9:
            base = tracemalloc.get_traced_memory()[0]
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 2_000_000, grown
    assert not layer._forward_hooks


def test_gradcam_job_writes_overlays_and_index(ray_session, tiny_run, score_inputs, tmp_path):
    from koa_ray.infer.gradcam import run_gradcam

    run, _ = tiny_run
    root, n_single = score_inputs
    summary = run_gradcam([str(root)], str(run), tmp_path / "cam", method="gradcam++", target="2", save_npy=True,
                          batch_size=4)
    assert summary["n_overlays"] == n_single + 4 and summary["n_errors"] == 2
    idx = pd.read_csv(tmp_path / "cam" / "index.csv", keep_default_na=False)
    ok = idx[idx.status == "ok"]
    assert (ok["target"] == 2).all()
    for r in ok.itertuples():
        assert (tmp_path / "cam" / r.overlay).is_file()
        cam = np.load(tmp_path / "cam" / r.npy)
        assert cam.shape == (64, 64) and np.isfinite(cam).all()
    html = (tmp_path / "cam" / "index.html").read_text()
    assert "Predicted KL" in html and "broken.jpg" in html
    # every overlay comes with the whole image and its knee box(es), shown in the contact sheet
    assert (ok.groupby("path")["film"].nunique() == 1).all()
    bi = ok[ok.path.str.contains("/bi/")]
    assert bi.groupby("path")["side"].apply(lambda s: "".join(sorted(s))).tolist() == ["LR", "LR"]
    for r in ok.drop_duplicates("film").itertuples():
        assert f"src='{r.film}'" in html
        assert cv2.imread(str(tmp_path / "cam" / r.film)) is not None
    # each caption is drawn once: grade and probability on the overlay, only the file name and side as text
    for r in ok.itertuples():
        assert f"p={float(r.probability):.2f}</figcaption>" not in html
    if chromium():  # the contact sheet's relative image links all load in a real browser
        seen = render_in_browser(tmp_path / "cam" / "index.html")
        assert seen["broken"] == 0 and seen["images"] == 2 * len(ok)


def test_evaluate_prepared_and_raw(ray_session, tiny_run, prepared, synth_dir, tmp_path):
    from koa_ray.infer.evaluate import evaluate

    run, _ = tiny_run
    m = evaluate(str(run), prepared, tmp_path / "ev", split="test", gradcam_per_grade=1)
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(saved) == ["n", "accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "qwk",
                           "mae", "per_class", "confusion_matrix"]
    assert set(saved["per_class"]["0"]) == {"precision", "recall", "f1", "support"}
    # the saved metrics are those of the saved predictions (recomputed independently), one row per test knee
    from koa_ray.metrics import classification_metrics

    preds = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    ok = preds[preds.status == "ok"]
    again = classification_metrics(ok["label"].to_numpy(), ok["grade"].to_numpy(), num_classes=5)
    assert again["confusion_matrix"] == saved["confusion_matrix"] and len(ok) == saved["n"]
    for k in ("accuracy", "qwk", "mae", "macro_f1", "balanced_accuracy"):
        assert saved[k] == pytest.approx(again[k], abs=1e-12), k
    per_class = pd.read_csv(tmp_path / "ev" / "per_class.csv")
    assert per_class["support"].tolist() == [saved["per_class"][str(g)]["support"] for g in range(5)]
    assert cv2.imread(str(tmp_path / "ev" / "confusion_matrix.png")) is not None
    report = (tmp_path / "ev" / "report.html").read_text()
    assert "data:image/png;base64" in report and f"<th>qwk</th><td>{saved['qwk']:.4f}</td>" in report
    # calibration: recomputed from the saved probabilities, stated in the report with its diagram
    from koa_ray.metrics import calibration

    cal = json.loads((tmp_path / "ev" / "calibration.json").read_text())
    assert cal["ece"] == pytest.approx(
        calibration(ok[[f"p{g}" for g in range(5)]].to_numpy(), ok["label"].to_numpy())["ece"], abs=1e-12)
    assert f"Expected calibration error <b>{cal['ece']:.3f}</b>" in report
    assert cv2.imread(str(tmp_path / "ev" / "reliability.png")) is not None
    # the error gallery: up to 4 misgraded knees per true grade, each with its crop and its knee box on the film
    wrong = ok[ok.grade != ok.label]
    gallery = report.split("<h2>Worst errors", 1)[1]
    n_tiles = gallery.count("<figure>")
    assert n_tiles == int(wrong.groupby("label").size().clip(upper=4).sum())
    assert gallery.count("class='film'") == n_tiles  # the original files are there: every tile shows its box
    import re

    by_name = wrong.assign(name=wrong["path"].map(lambda p: Path(p).name)).set_index("name")
    for cap in gallery.split("<figcaption>")[1:]:  # each caption names a misgraded knee with its true/predicted grade
        t, g, name = re.match(r"true KL(\d), predicted KL(\d) \(p [0-9.]+\) - ([^<]+)<", cap).groups()
        row = by_name.loc[name]
        assert (int(row["label"]), int(row["grade"])) == (int(t), int(g)) and t != g
    # Grad-CAM examples carry their caption once, as text, not burned into the picture too
    cams = report.split("<h2>Grad-CAM examples", 1)[1].split("<h2>Worst errors", 1)[0]
    assert cams.count("<figcaption>") == cams.count("<figure>") == int(ok.groupby("label").size().clip(upper=1).sum())
    # the page renders in a real browser: every image loads (base64 PNGs), and a screenshot is taken
    if chromium():
        seen = render_in_browser(tmp_path / "ev" / "report.html", screenshot=tmp_path / "ev" / "report.png")
        assert seen["title"] == "koa-ray evaluation" and seen["broken"] == 0
        assert seen["images"] == report.count("<img ")
        shot = cv2.imread(str(tmp_path / "ev" / "report.png"))
        assert shot is not None and shot.shape[1] == 1200 and shot.std() > 5
    # raw labelled folder with the checkpoint's own preprocessing gives the same predictions
    raw = evaluate(str(run), synth_dir, tmp_path / "ev_raw", split="test", gradcam_per_grade=0)
    assert raw["n"] == m["n"]
    assert raw["confusion_matrix"] == m["confusion_matrix"]
    tta = evaluate(str(run), prepared, tmp_path / "ev_tta", split="test", tta="shift", gradcam_per_grade=0)
    assert tta["n"] == m["n"]
    assert "(TTA: shift)" in (tmp_path / "ev_tta" / "report.html").read_text()
    shifted = pd.read_csv(tmp_path / "ev_tta" / "predictions.csv").set_index("path")
    single = preds.set_index("path").loc[shifted.index]
    probs = [f"p{g}" for g in range(5)]
    # the views were averaged (the tiny model is near-uniform: differences of ~1e-5, far above float noise)
    assert np.abs(shifted[probs].to_numpy() - single[probs].to_numpy()).max() > 5e-6
    # a checkpoint that records its views (tta in koa.json) is evaluated with them when --tta is not given
    from koa_ray.checkpoint import META

    rec = tmp_path / "ckpt_shift"
    shutil.copytree(run / json.loads((run / "best.json").read_text())["checkpoint"], rec)
    meta = json.loads((rec / META).read_text())
    (rec / META).write_text(json.dumps({**meta, "tta": "shift"}))
    evaluate(str(rec), prepared, tmp_path / "ev_rec", split="test", gradcam_per_grade=0)
    recorded = pd.read_csv(tmp_path / "ev_rec" / "predictions.csv").set_index("path").loc[shifted.index]
    np.testing.assert_allclose(recorded[probs].to_numpy(), shifted[probs].to_numpy(), atol=1e-6)


def test_cli_exit_code_when_every_input_fails(ray_session, tiny_run, tmp_path, monkeypatch, capsys):
    """Every input unreadable: the row is still written with the reason, a relative path made absolute against the
    driver's working dir (Ray workers may run elsewhere), and the command exits 1 so `ray job submit` reports a
    failed job; one good input makes it 0."""
    from koa_ray.cli import _batch_exit_code, main

    run, _ = tiny_run
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--checkpoint", str(run), "--input", "no/such/dir", "--out", "bad.csv"]) == 1
    assert "all 1 inputs failed" in capsys.readouterr().err
    row = pd.read_csv(tmp_path / "bad.csv").iloc[0]
    assert row["status"] == "error" and "No such file" in row["error"] and row["path"] == str(tmp_path / "no/such/dir")
    assert main(["gradcam", "--checkpoint", str(run), "--input", "no/such/dir", "--out", "cams"]) == 1
    assert "all 1 inputs failed" in capsys.readouterr().err
    # one good input among failures: exit 0, the failures are in the output's error rows
    assert _batch_exit_code({"n_inputs": 3, "n_errors": 2}, 1, "x") == 0
    assert _batch_exit_code({"n_inputs": 0, "n_errors": 0}, 0, "x") == 0


def test_evaluate_unsplit_labelled_folder_evaluates_every_image(ray_session, tiny_run, synth_dir, tmp_path, capsys):
    """An external test set laid out as DIR/{0..4}/* is evaluated whole (never re-split by patient), and says so;
    the predictions recompute to the written metrics."""
    from koa_ray.infer.evaluate import evaluate
    from koa_ray.metrics import classification_metrics

    run, _ = tiny_run
    ext = tmp_path / "external"
    files = sorted((synth_dir / "val").rglob("*.png")) + sorted((synth_dir / "test").rglob("*.png"))
    for f in files:
        (ext / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, ext / f.parent.name / f.name)
    m = evaluate(str(run), ext, tmp_path / "ev_ext", split="test", gradcam_per_grade=0)
    assert m["n"] == len(files)
    assert "evaluating all" in capsys.readouterr().out
    preds = pd.read_csv(tmp_path / "ev_ext" / "predictions.csv")
    assert sorted(preds["path"].str.split("/").str[-1]) == sorted(f.name for f in files)
    again = classification_metrics(preds["label"].to_numpy(), preds["grade"].to_numpy())
    assert again["confusion_matrix"] == m["confusion_matrix"]
    assert preds["label"].tolist() == [int(p.split("/")[-2]) for p in preds["path"]]


def test_raw_file_and_prepared_crop_give_the_same_probabilities(tiny_run, prepared):
    """The preprocessing recorded in the checkpoint (ROI, side from the file name, left-knee mirroring, size) is
    what scoring a raw file applies: identical probabilities to 1e-5 for the same knee, left and right knees."""
    import pyarrow.parquet as pq

    from koa_ray.data.decode import decode_image_column
    from koa_ray.infer.predictor import Predictor
    from koa_ray.infer.score import score_rows

    run, _ = tiny_run
    p = Predictor(run, device="cpu")
    assert p.side_source["from"] == "filename" and "(?P<side>" in p.side_source["patient_regex"]
    table = pq.read_table(str(prepared / "val")).to_pandas()
    table = pd.concat([table[table.side == "L"].head(4), table[table.side == "R"].head(4)])
    assert len(table) == 8
    from_parquet = p.predict(decode_image_column(table["image"].tolist(), table["size"].to_numpy()))
    scored = score_rows(p, table["path"].tolist()).set_index("path").loc[table["path"]]
    np.testing.assert_allclose(scored[[f"p{g}" for g in range(5)]].to_numpy(), from_parquet, atol=1e-5)
    assert scored["side"].tolist() == table["side"].tolist()
    # the mirroring matters: an un-mirrored left knee is a different input
    left = decode_image_column(table["image"].tolist()[:1], table["size"].to_numpy()[:1])
    assert not np.allclose(p.predict(left[:, :, ::-1].copy()), from_parquet[:1], atol=1e-5)


def test_score_takes_the_side_from_a_manifest(ray_session, tiny_run, synth_dir, tmp_path):
    """A knee whose side is given by a manifest's ``side`` column (its file name carries none) is mirrored as the
    same knee under its OAI-style name: same side, same probabilities; without the manifest it is not mirrored."""
    from koa_ray.infer.score import score

    run, _ = tiny_run
    left = sorted(p for p in (synth_dir / "val").rglob("*.png") if p.stem.endswith("L"))[:2]
    assert len(left) == 2
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, f in enumerate(left):
        shutil.copy(f, plain / f"knee_{i}.png")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [f"plain/knee_{i}.png" for i in range(2)], "side": ["L", "l"]}).to_csv(manifest,
                                                                                                  index=False)
    cols = [f"p{g}" for g in range(5)]
    named = pd.read_csv(score([str(f) for f in left], str(run), tmp_path / "named.csv")["out"])
    via_manifest = pd.read_csv(score([str(manifest)], str(run), tmp_path / "manifest.csv")["out"])
    bare = pd.read_csv(score([str(plain)], str(run), tmp_path / "bare.csv")["out"], keep_default_na=False)
    named, via_manifest, bare = (d.sort_values("path").reset_index(drop=True) for d in (named, via_manifest, bare))
    assert named["side"].tolist() == via_manifest["side"].tolist() == ["L", "L"]
    np.testing.assert_allclose(via_manifest[cols].to_numpy(), named[cols].to_numpy(), atol=1e-6)
    assert bare["side"].tolist() == ["", ""]  # side unknown: not mirrored
    assert not np.allclose(bare[cols].to_numpy(), named[cols].to_numpy(), atol=1e-5)


@pytest.mark.skipif(not REAL.is_dir(), reason="real knee-kl224 crops (../shared) not available")
def test_bilateral_film_of_real_knees_gives_two_knees_everywhere(ray_session, tiny_run, tmp_path):
    """A bilateral film built from two real knees: ``koa roi``, ``koa score`` and ``koa gradcam`` each see two knees,
    the patient's right on the image-left, with the same boxes."""
    from koa_ray.cli import main
    from koa_ray.data.roi import box_iou
    from koa_ray.infer.gradcam import run_gradcam

    run, _ = tiny_run
    right, left = sorted(REAL.glob("val/2/*R.jpg"))[0], sorted(REAL.glob("val/3/*L.jpg"))[0]
    img, truth = stitched_film([cv2.imread(str(right), 0), cv2.imread(str(left), 0)], np.random.default_rng(11),
                               height=1200)
    film = tmp_path / "in" / "bilateral_film.png"
    film.parent.mkdir()
    cv2.imwrite(str(film), img)
    assert main(["roi", str(film), "--out", str(tmp_path / "boxes.csv")]) == 0
    boxes = pd.read_csv(tmp_path / "boxes.csv")
    assert boxes["side"].tolist() == ["R", "L"] and not boxes["roi_fallback"].any()
    for b, t in zip(boxes.itertuples(), truth):  # each box on its knee (box accuracy itself: tests/test_roi.py)
        assert t["x0"] < (b.x0 + b.x1) / 2 < t["x1"] and t["y0"] < (b.y0 + b.y1) / 2 < t["y1"]
        assert box_iou((b.x0, b.y0, b.x1, b.y1), (t["x0"], t["y0"], t["x1"], t["y1"])) >= 0.4
    cols = ["side", "x0", "y0", "x1", "y1"]
    scored = pd.read_csv(score([str(film)], str(run), tmp_path / "s.csv")["out"])
    assert scored[cols].values.tolist() == boxes[cols].values.tolist()
    run_gradcam([str(film)], str(run), tmp_path / "cam", batch_size=2)
    cams = pd.read_csv(tmp_path / "cam" / "index.csv", keep_default_na=False)
    assert cams.sort_values("knee")[cols].values.tolist() == boxes[cols].values.tolist()


class _RunsCode:
    """Pickles into a call of ``os.system`` (what a malicious checkpoint would carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_checkpoint_loaders_refuse_code_and_name_truncated_files(tiny_run, tmp_path):
    """A model.pt that would run code when unpickled is refused (and nothing runs); a truncated one gives an error
    that names the file. Both through every loader: load_checkpoint (score/evaluate/gradcam) and resume."""
    import torch

    from koa_ray.checkpoint import TRAIN_STATE, WEIGHTS, load_checkpoint, load_tensors, resolve_checkpoint
    from koa_ray.infer.predictor import Predictor

    good = resolve_checkpoint(tiny_run[0])
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    marker = tmp_path / "pwned"
    torch.save({"w": _RunsCode(marker)}, evil / WEIGHTS)
    for load in (load_checkpoint, Predictor, lambda d: load_tensors(d / WEIGHTS)):
        with pytest.raises(ValueError, match=r"model.pt: refused: .*Python objects"):
            load(evil)
    torch.save({"optimizer": _RunsCode(marker)}, evil / TRAIN_STATE)
    with pytest.raises(ValueError, match=r"train_state.pt: refused"):
        load_tensors(evil / TRAIN_STATE)
    assert not marker.exists()  # the payload never ran
    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    data = (good / WEIGHTS).read_bytes()
    (cut / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut/model.pt: not a readable PyTorch file"):
        load_checkpoint(cut)


def test_inference_actors_compute_with_their_share_of_the_cores(tiny_run, monkeypatch):
    """Ray sets OMP_NUM_THREADS from an actor's CPU reservation (0.5 -> 1 thread): an inference actor must take
    its share of the node's cores instead, or a 2-core machine scores at half the bare forward speed."""
    import os

    import koa_ray.runtime as rt
    from koa_ray.infer.evaluate import EvalActor
    from koa_ray.infer.score import ScoreActor

    monkeypatch.setattr(rt, "cluster_cpus", lambda: 8.0)
    assert [rt.actor_threads(c) for c in (1, 3, 16)] == [8, 2, 1]
    assert rt.actor_threads(2, threads=3) == 3
    with pytest.raises(ValueError, match="threads=0"):
        rt.actor_threads(1, threads=0)
    run, _ = tiny_run
    before = torch.get_num_threads()
    try:
        ScoreActor(str(run), threads=2)
        assert torch.get_num_threads() == min(2, os.cpu_count())
        EvalActor(str(run), threads=1)
        assert torch.get_num_threads() == 1
        ScoreActor(str(run), threads=10_000)  # never more than the node has
        assert torch.get_num_threads() == os.cpu_count()
    finally:
        torch.set_num_threads(before)
