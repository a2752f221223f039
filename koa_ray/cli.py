"""``koa`` command line: argument parsing only; every command is one call into the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from koa_ray import TTA_MODES


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------------------------------------- commands
def cmd_synth(a) -> int:
    from koa_ray.data.synthetic import make_dataset

    summary = make_dataset(a.out, a.n, layout=a.layout, size=a.size, seed=a.seed)
    _print_json({k: v for k, v in summary.items() if not isinstance(v, list)})
    return 0


def _add_tta(s) -> None:
    s.add_argument("--tta", choices=TTA_MODES, default=None,
                   help="test-time views to average: none, flip (mirror image), shift (small shifts and zooms); "
                        "default: the checkpoint's")


def _roi_config(a):
    from koa_ray.data.roi import RoiConfig

    kw = {"enabled": not getattr(a, "no_roi", False)}
    if getattr(a, "roi_margin", None) is not None:
        kw["margin"] = a.roi_margin
    if getattr(a, "no_mirror", False):
        kw["mirror_left"] = False
    return RoiConfig(**kw)


def _ingest_config(a):
    from koa_ray.data.ingest import IngestConfig

    kw = {"seed": a.split_seed}
    if a.patient_regex:
        kw["patient_regex"] = a.patient_regex
    if a.split_fractions:
        kw["split_fractions"] = tuple(a.split_fractions)
    return IngestConfig(**kw)


def cmd_prepare(a) -> int:
    from koa_ray.data.prep import PrepConfig, prepare

    manifest = prepare(a.data, a.out, PrepConfig(image_size=a.image_size, roi=_roi_config(a)), _ingest_config(a),
                       local=a.local, force=a.force, address=a.address, num_cpus=a.num_cpus)
    print(f"prepared {manifest['n_inputs']} files -> {manifest['n_knees']} knees, {manifest['n_errors']} errors "
          f"({'reused existing output' if manifest.get('reused') else str(manifest['images_per_s']) + ' images/s'}); "
          f"counts: {json.dumps(manifest['counts'])}")
    print(f"output: {a.out} (manifest.json, errors.csv)")
    return 0


def cmd_roi(a) -> int:
    from koa_ray.data.locate import locate_knees

    boxes, errors = locate_knees(a.inputs, _roi_config(a), _ingest_config(a), draw=a.draw)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    boxes.to_csv(out, index=False)
    err_path = out.with_name(out.stem + ".errors.csv")
    errors.to_csv(err_path, index=False)
    print(f"{len(boxes)} knee boxes from {boxes['path'].nunique()} images -> {out}; "
          f"{int(boxes['roi_fallback'].sum())} fallback crops; {int(boxes['implant'].sum())} knee replacements "
          f"(implant=true: not KL-gradable); {len(errors)} unreadable -> {err_path}")
    if a.draw:
        print(f"drawn boxes: {a.draw}/<image name>.png (green: joint found, orange: fallback crop)")
    return 0


def _train_config(a):
    from koa_ray.config import load_train_config

    overrides = {"data": a.data, "out": a.out, "name": a.name, "workers": a.workers, "gpu": True if a.gpu else None,
                 "address": a.address, "storage_path": a.storage_path, "epochs": a.epochs,
                 "batch_size": a.batch_size, "image_size": a.image_size, "optim.lr": a.lr,
                 "model.attention": a.attention, "model.arch": a.arch, "loss.name": a.loss,
                 "model.pretrained": a.pretrained, "model.weights": a.weights, "seed": a.seed,
                 "compile": a.compile, "mlflow": False if a.no_mlflow else None, "mlflow_uri": a.mlflow_uri}
    return load_train_config(a.config, overrides, a.set or [])


def cmd_train(a) -> int:
    from koa_ray.progress import train_summary

    cfg = _train_config(a)  # validated before Ray starts
    if a.local:
        from koa_ray.train.local import fit_local

        result = fit_local(cfg, loader_workers=a.loader_workers)
    else:
        from koa_ray.train.driver import fit

        result = fit(cfg)
    print(train_summary(result, cfg))
    return 0


def cmd_evaluate(a) -> int:
    from koa_ray.infer.evaluate import evaluate

    m = evaluate(a.checkpoint, a.data, a.out, split=a.split, tta=a.tta, batch_size=a.batch_size,
                 concurrency=a.concurrency, address=a.address, gradcam_per_grade=a.gradcam_examples)
    print(f"{a.split}: n={m['n']} accuracy={m['accuracy']:.4f} balanced_accuracy={m['balanced_accuracy']:.4f} "
          f"macro_f1={m['macro_f1']:.4f} qwk={m['qwk']:.4f} mae={m['mae']:.4f}")
    print(f"report: {Path(a.out) / 'report.html'} (metrics.json, per_class.csv, confusion_matrix.png)")
    return 0


def _batch_exit_code(summary: dict, n_ok: int, listing: str) -> int:
    """0 if any input succeeded (failures are listed in the output); 1 if every input failed, so a scripted or
    ``ray job submit`` run reports failure instead of success with nothing in it."""
    if n_ok == 0 and summary["n_errors"] > 0:
        print(f"error: all {summary['n_inputs']} inputs failed; reasons in {listing}", file=sys.stderr)
        return 1
    return 0


def cmd_score(a) -> int:
    from koa_ray.infer.score import score

    summary = score(a.input, a.checkpoint, a.out, batch_size=a.batch_size, concurrency=a.concurrency,
                    resume=a.resume, tta=a.tta, address=a.address, threads=a.threads)
    _print_json(summary)
    if summary.get("interrupted"):
        return 0
    return _batch_exit_code(summary, summary["n_rows"] - summary["n_errors"], f"{a.out} (status=error rows)")


def cmd_gradcam(a) -> int:
    from koa_ray.infer.gradcam import run_gradcam

    summary = run_gradcam(a.input, a.checkpoint, a.out, method=a.method, target=a.target, layer=a.layer,
                          save_npy=a.npy, batch_size=a.batch_size, concurrency=a.concurrency, address=a.address,
                          tta=a.tta)
    _print_json(summary)
    return _batch_exit_code(summary, summary["n_overlays"], str(Path(a.out) / "index.csv"))


def cmd_tune(a) -> int:
    from koa_ray.tune import run_sweep

    if not a.resume and not a.data:
        raise ValueError("--data is required (unless --resume)")
    summary = run_sweep(
        data=a.data, out=a.out, num_samples=a.num_samples, max_epochs=a.max_epochs, search=a.search,
        scheduler=a.scheduler, workers_per_trial=a.workers_per_trial, gpus_per_trial=a.gpus_per_trial,
        cpus_per_worker=a.cpus_per_worker, space=a.space, image_size=a.image_size, config=a.config,
        resume=a.resume, name=a.name, sets=a.set, seed=a.seed, address=a.address,
        max_concurrent_trials=a.max_concurrent_trials, verbose=a.verbose)
    _print_json(summary)
    return 0


def cmd_export(a) -> int:
    from koa_ray.infer.export import export_model

    r = export_model(a.checkpoint, a.out, fmt=a.format, opset=a.opset)
    print(f"exported {r['format']}: {r['model']} (largest logit difference from PyTorch {r['max_abs_logit_diff']:.1e})")
    print(f"preprocessing: {r['preprocess']}")
    return 0


def cmd_demo(a) -> int:
    from koa_ray.demo import run_demo

    run_demo(a.out, n=a.n, epochs=a.epochs, workers=a.workers, image_size=a.image_size, arch=a.arch)
    return 0


# --------------------------------------------------------------------------------------------------------- parser
def _add_ingest(p) -> None:
    g = p.add_argument_group("ingest")
    g.add_argument("--patient-regex", default=None, help="regex on the file stem with (?P<patient>) and (?P<side>)")
    g.add_argument("--split-fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=None,
                   help="patient-level split when the input has none (default 0.8 0.1 0.1)")
    g.add_argument("--split-seed", type=int, default=0)


def _add_roi(p) -> None:
    g = p.add_argument_group("knee ROI")
    g.add_argument("--roi-margin", type=float, default=None, help="box margin around the joint width")
    g.add_argument("--no-mirror", action="store_true", help="do not mirror left knees to the right-knee orientation")


def _add_actor_pool(p, batch: int = 32) -> None:
    g = p.add_argument_group("Ray Data actor pool")
    g.add_argument("--batch-size", type=int, default=batch)
    g.add_argument("--concurrency", type=int, default=1, help="number of model actors")
    g.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="koa", description="Kellgren-Lawrence grading of knee radiographs on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    loud = argparse.ArgumentParser(add_help=False)
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="also show Ray's own logs (execution plans, worker output); always in /tmp/ray/session_latest/logs")

    s = sub.add_parser("synth", help="generate synthetic knee radiographs")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=600, help="number of images")
    s.add_argument("--layout", choices=["single", "bilateral"], default="single")
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("prepare", parents=[loud], help="decode, ROI-crop and resize images into Parquet with Ray Data")
    s.add_argument("data", help="dataset root, split/grade folders, or a CSV/Parquet manifest")
    s.add_argument("--out", required=True)
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--no-roi", action="store_true", help="resize whole images, no knee-joint crop")
    s.add_argument("--local", action="store_true", help="run the same transforms in this process, without Ray")
    s.add_argument("--force", action="store_true", help="recompute even if a matching output exists")
    s.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance")
    _add_roi(s)
    _add_ingest(s)
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("roi", parents=[loud], help="detect knee-joint boxes and write them to CSV")
    s.add_argument("inputs", nargs="+", help="files, folders (recursive), globs or manifests")
    s.add_argument("--out", required=True, help="boxes CSV: path,x0,y0,x1,y1,side,score,roi_fallback,implant")
    s.add_argument("--draw", metavar="DIR", help="also write each image with its boxes, sides and scores drawn")
    _add_roi(s)
    _add_ingest(s)
    s.set_defaults(fn=cmd_roi)

    s = sub.add_parser("train", parents=[loud], help="train with Ray Train (or --local in one process)")
    s.add_argument("--data", help="prepared dataset (output of koa prepare)")
    s.add_argument("--out", help="runs folder (run directory = OUT/NAME)")
    s.add_argument("--name", help="run name: re-running the same name resumes it")
    s.add_argument("--config", help="YAML config; flags override it")
    s.add_argument("--workers", type=int)
    s.add_argument("--gpu", action="store_true")
    s.add_argument("--address")
    s.add_argument("--storage-path", help="checkpoint storage: local folder, shared mount, s3:// or gs://")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--image-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--arch")
    s.add_argument("--attention", choices=["none", "se", "cbam", "se+cbam"])
    s.add_argument("--loss", choices=["focal", "ce"])
    s.add_argument("--pretrained", choices=["imagenet"])
    s.add_argument("--weights", help="local weights file for the backbone (offline alternative to --pretrained)")
    s.add_argument("--seed", type=int)
    s.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (GPU fast path)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. loss.gamma=1.5")
    s.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///<run folder>/mlflow.db)")
    s.add_argument("--no-mlflow", action="store_true", help="do not track the run in MLflow")
    s.add_argument("--local", action="store_true", help="one process, one GPU if present else CPU, no Ray")
    s.add_argument("--loader-workers", type=int, default=0, help="local mode: DataLoader worker processes")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("evaluate", parents=[loud], help="metrics, confusion matrix and HTML report on a labelled split")
    s.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (its best)")
    s.add_argument("--data", required=True, help="prepared dataset or raw labelled folder/manifest")
    s.add_argument("--split", default="test")
    s.add_argument("--out", required=True)
    _add_tta(s)
    s.add_argument("--gradcam-examples", type=int, default=3, help="Grad-CAM examples per grade in the report")
    _add_actor_pool(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("score", parents=[loud], help="batch-score image folders/globs/manifests into CSV or Parquet")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--input", required=True, nargs="+", help="folders (recursive), globs, manifests, files")
    s.add_argument("--out", required=True, help="results.csv or results.parquet")
    s.add_argument("--resume", action="store_true", help="skip paths already in the output")
    _add_tta(s)
    s.add_argument("--threads", type=int, help="torch threads per CPU actor (default: the CPUs shared between actors)")
    _add_actor_pool(s)
    s.set_defaults(fn=cmd_score)

    s = sub.add_parser("gradcam", parents=[loud], help="batch Grad-CAM overlays with an index.html contact sheet")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--input", required=True, nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++", "eigencam", "layercam"])
    s.add_argument("--target", default="predicted", help="predicted, or a grade 0-4 to explain")
    s.add_argument("--layer", default=None, help="dotted module name (default: features.attention4)")
    s.add_argument("--npy", action="store_true", help="also save the raw maps as .npy")
    _add_tta(s)
    _add_actor_pool(s, batch=16)
    s.set_defaults(fn=cmd_gradcam)

    s = sub.add_parser("tune", help="Ray Tune sweep of augmentation/loss/optimiser settings, ASHA early stopping")
    s.add_argument("--data", help="prepared dataset with a val split (output of koa prepare)")
    s.add_argument("--out", required=True, help="sweep folder: results.csv, best_config.yaml, best.json, ...")
    s.add_argument("--num-samples", type=int, default=10, help="number of trials")
    s.add_argument("--max-epochs", type=int, default=10, help="epochs per trial (ASHA max_t)")
    s.add_argument("--search", choices=["random", "optuna"], default="random")
    s.add_argument("--scheduler", choices=["asha", "none"], default="asha")
    s.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (default: config workers)")
    s.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, split over its workers (0 = CPU)")
    s.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per Train worker")
    s.add_argument("--space", help="search space YAML (mode: extend|replace, params: {dotted.key: spec})")
    s.add_argument("--image-size", type=int)
    s.add_argument("--config", help="base TrainConfig YAML")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="base config override")
    s.add_argument("--name", default="sweep", help="Tune experiment name (folder under --out)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    s.add_argument("--seed", type=int, default=0, help="seed of the search algorithm")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    s.add_argument("--max-concurrent-trials", type=int, help="default: as many as leave 1 CPU to Ray Data")
    s.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2, 3],
                   help="Tune's progress output; 3 also shows Ray's own logs")
    s.set_defaults(fn=cmd_tune)

    s = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript, with its preprocessing as JSON")
    s.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (its best)")
    s.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    s.add_argument("--out", required=True, help="folder for the model file and preprocess.json")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("demo", parents=[loud], help="synthetic data -> prepare -> 2-worker Ray Train -> evaluate, end to end")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--n", type=int, default=600)
    s.add_argument("--epochs", type=int, default=15)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--arch", default="densenet_tiny", help="densenet_tiny (CPU demo) or densenet121")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from koa_ray.config import ConfigError
    from koa_ray.progress import VERBOSE_ENV

    if getattr(args, "verbose", 0) is True or (args.command == "tune" and args.verbose >= 3):
        os.environ[VERBOSE_ENV] = "1"  # read by koa_ray.runtime.init_ray and the trainer's logging config

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"koa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
