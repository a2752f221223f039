"""``MODEL_CARD.md`` for a finished run: what the model is, what it was trained and validated on, how well it did
per grade, what it is for and where it stops (Mitchell et al. 2019, "Model Cards for Model Reporting")."""

from __future__ import annotations

import json
from pathlib import Path

GRADES = ("KL0 none", "KL1 doubtful", "KL2 minimal", "KL3 moderate", "KL4 severe")


def _counts_table(counts: dict) -> list[str]:
    splits = [s for s in ("train", "val", "test") if s in counts] + sorted(set(counts) - {"train", "val", "test"})
    lines = ["| split | " + " | ".join(f"KL{g}" for g in range(5)) + " | total |",
             "|---|" + "---:|" * 6]
    for s in splits:
        c = [int(counts[s].get(str(g), 0)) for g in range(5)]
        lines.append(f"| {s} | " + " | ".join(str(v) for v in c) + f" | {sum(c)} |")
    return lines


def model_card(cfg: dict, best_meta: dict, manifest: dict | None, run_dir: str, wall_s: float | None = None) -> str:
    """The card's Markdown. ``cfg``: the resolved train config (dict); ``best_meta``: the best checkpoint's
    ``koa.json``; ``manifest``: the prepared data's ``manifest.json`` (``None`` when unreadable)."""
    m = best_meta.get("metrics", {})
    val = m.get("val") or {}
    model, pre = best_meta.get("model", {}), best_meta.get("preprocess", {})
    prep = pre.get("prep", {})
    roi = prep.get("roi", {})
    tta = best_meta.get("tta", "none")
    views = f", averaged over the test-time views {tta!r} (koa_ray.data.tta)" if tta != "none" else ""
    o, loss, bal, aug = cfg["optim"], cfg["loss"], cfg["balance"], cfg["augment"]
    lines = [f"# Model card: {cfg['name']}", "",
             "Kellgren-Lawrence (KL 0-4) grading of a knee joint on a plain radiograph, trained with koa-ray.", "",
             "## Model", "",
             f"- Architecture: {model.get('arch')} with {model.get('attention')} attention, {model.get('in_chans')}-channel "
             f"input, {model.get('num_classes', 5)} grades; weights from "
             f"{cfg['model'].get('pretrained') or cfg['model'].get('weights') or 'random initialisation'}.",
             f"- Input: one knee, {'the joint box found by koa ROI (margin ' + str(roi.get('margin')) + ')' if roi.get('enabled') else 'the whole image (no ROI crop)'}, "
             f"resized to {pre.get('input_size')} px, normalised with mean {pre.get('mean')} / std {pre.get('std')}; "
             f"left knees mirrored to the right-knee orientation: {roi.get('mirror_left')} (side from "
             f"{prep.get('side', {}).get('from', 'filename')}).",
             f"- Output: probabilities of KL0-KL4{views}; grade by {best_meta.get('decode', 'argmax')}.",
             f"- Checkpoint: epoch {int(best_meta.get('epoch', 0)) + 1} of {cfg['epochs']} (best val QWK of the run; "
             f"folder `checkpoint_epoch_{int(best_meta.get('epoch', 0)):04d}` in `{run_dir}`); its `koa.json` "
             "holds this preprocessing, which `koa score`, `koa evaluate` and `koa gradcam` apply.", "",
             "## Data", ""]
    if manifest:
        lines += [f"- Source: `{manifest.get('source')}`, prepared to `{cfg['data']}` ({manifest.get('n_knees')} "
                  f"knees from {manifest.get('n_inputs')} files, {manifest.get('n_errors')} unreadable).",
                  "- Splits as prepared (patient-disjoint: given by the folder layout, or made by patient ID): ", ""]
        lines += _counts_table(manifest.get("counts", {}))
    else:
        lines.append(f"- Prepared data: `{cfg['data']}` (manifest not readable from here).")
    lines += ["", "Model selection used the val split only; no test split was looked at during training.", "",
              "## Training recipe", "",
              f"- {cfg['epochs']} epochs, batch {cfg['batch_size']}, {cfg['workers']} Ray Train worker(s)"
              f"{' on GPU' if cfg.get('gpu') else ''}, precision {cfg['amp']}, seed {cfg['seed']}"
              + (f"; wall time {wall_s / 60:.1f} min" if wall_s else "") + ".",
              f"- Optimiser {o['optimizer']} lr {o['lr']} weight decay {o['weight_decay']}, warm-up "
              f"{o['warmup_epochs']} epochs then cosine to {o['min_lr_ratio']} x lr"
              + (f", weight EMA {o['ema_decay']}" if o.get("ema_decay") else "") + ".",
              f"- Loss {loss['name']}" + (f" (gamma {loss['gamma']})" if loss["name"] == "focal" else "")
              + f", label smoothing {loss['label_smoothing']}, class weights {loss['alpha']}; re-sampling to "
              f"{bal['target']} (strength {bal['strength']}).",
              f"- Augmentation (same for every grade unless grade-aware strength was asked): rotate "
              f"{aug.get('rotate_deg')} deg, scale {aug.get('scale')}, translate {aug.get('translate')}, brightness "
              f"{aug.get('brightness')}, contrast {aug.get('contrast')}, horizontal flip p {aug.get('hflip_p')}.", "",
              "## Validation (best epoch)", ""]
    if val:
        lines += [f"QWK **{val['qwk']:.3f}**, accuracy {val['accuracy']:.3f}, balanced accuracy "
                  f"{val['balanced_accuracy']:.3f}, macro-F1 {val['macro_f1']:.3f}, MAE {val['mae']:.3f} "
                  f"(n = {val['n']}).", "",
                  "| grade | precision | recall | F1 | n |", "|---|---:|---:|---:|---:|"]
        for g in range(5):
            pc = val["per_class"][str(g)]
            lines.append(f"| {GRADES[g]} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | "
                         f"{pc['support']} |")
        lines += ["", "Confusion matrix (rows: true grade, columns: predicted):", "", "```"]
        lines += ["      " + " ".join(f"{f'KL{g}':>5}" for g in range(5))]
        lines += [f"KL{t}   " + " ".join(f"{v:>5}" for v in row) for t, row in enumerate(val["confusion_matrix"])]
        lines += ["```"]
    else:
        lines.append("No val split: the run has no validation figures.")
    lines += ["", "## Intended use", "",
              "Research on automated KL grading and decision support for trained readers: batch grading of PA or "
              "fixed-flexion knee radiographs (`koa score`), with Grad-CAM maps (`koa gradcam`) to check what the "
              "model looked at. Not a medical device, not validated for clinical use, not for a diagnosis without a "
              "radiologist.", "",
              "## Limits", "",
              "- Validated only on the val split above (same source and preprocessing as training). Expect lower "
              "figures on other scanners, exposures, positioning or populations; evaluate on your own labelled data "
              "first (`koa evaluate --data FOLDER`).",
              "- KL1 (doubtful) is the hardest grade: readers themselves disagree most there; see its recall above.",
              "- Knee replacements are not KL-gradable: `koa roi` / `koa score` flag them (`implant`), the grade of "
              "such a knee means nothing.",
              "- Probabilities are not calibrated by training; `koa evaluate` reports the calibration error.",
              "- One grade per knee crop; lateral views, children and post-traumatic knees were not in the data.", ""]
    return "\n".join(lines)


def write_model_card(run_dir: Path, cfg: dict, best_meta: dict, wall_s: float | None = None) -> Path:
    manifest = None
    try:
        manifest = json.loads((Path(cfg["data"]) / "manifest.json").read_text())
    except (OSError, ValueError):
        pass
    path = Path(run_dir) / "MODEL_CARD.md"
    path.write_text(model_card(cfg, best_meta, manifest, str(run_dir), wall_s))
    return path
