"""Ray Train V2 driver: builds the Ray Data streams and the ``TorchTrainer``, then writes the run directory."""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from koa_ray.config import ConfigError, TrainConfig, from_dict, to_dict
from koa_ray.data.augment import EvalPreset, TrainPreset
from koa_ray.data.balance import Resample
from koa_ray.progress import ProgressQueue, Reporter, verbose
from koa_ray.train.loop import DataInfo, FaultPlan, train_loop
from koa_ray.train.run import check_inputs, check_resources, data_info, owns_row, watched, write_run_artifacts


class RayTrainSession:
    """Session for a Ray Train worker: DDP, dataset shards, ``ray.train.report``."""

    def __init__(self, cfg: TrainConfig):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.eval_preset = EvalPreset(cfg.image_size, in_chans=cfg.in_chans)
        self._val: tuple[np.ndarray, np.ndarray] | None = None

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def train_batches(self, epoch):
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        # the stream is globally shuffled every epoch (build_datasets); no local buffer needed on top
        # two batches in flight; on a GPU, page-locked host memory so the copy to the device is asynchronous
        for batch in shard.iter_torch_batches(batch_size=self.cfg.batch_size, prefetch_batches=2,
                                              pin_memory=self.device.type == "cuda",
                                              dtypes={"image": torch.float32, "label": torch.int64}):
            yield batch["image"], batch["label"]

    def val_batches(self):
        """This worker's share of the val split, read and preprocessed once, then served from memory every epoch
        (a fresh Ray Data pass per epoch costs seconds even for a small split)."""
        if self._val is None:
            import ray.train

            shard = ray.train.get_dataset_shard("val")
            xs, ys = [], []
            for b in (shard.iter_batches(batch_size=self.cfg.eval_batch_size, batch_format="numpy")
                      if shard is not None else ()):
                mine = np.array([owns_row(p, k, self.rank, self.world_size) for p, k in zip(b["path"], b["knee"])],
                                bool)
                if mine.any():
                    out = self.eval_preset({"image": b["image"][mine], "size": b["size"][mine],
                                            "label": b["label"][mine]})
                    xs.append(out["image"])
                    ys.append(out["label"])
            self._val = (np.concatenate(xs) if xs else np.zeros((0,), np.float32),
                         np.concatenate(ys) if ys else np.zeros((0,), np.int64))
        x, y = self._val
        for i in range(0, len(y), self.cfg.eval_batch_size):
            yield x[i:i + self.cfg.eval_batch_size], y[i:i + self.cfg.eval_batch_size]

    @contextlib.contextmanager
    def latest_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
        else:
            with ckpt.as_directory() as d:
                yield Path(d)

    def report(self, metrics, checkpoint_dir):
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch_{metrics['epoch']:04d}")

    def all_reduce(self, t):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
            return t.cpu()
        return t


def train_worker(config: dict) -> None:
    """``train_loop_per_worker``: rebuild the typed config, then run the shared loop."""
    import ray

    cfg = from_dict(TrainConfig, config["cfg"])
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    session = RayTrainSession(cfg)
    queue = config.get("progress")
    where = (f"worker {session.rank}/{session.world_size} on node {ray.get_runtime_context().get_node_id()} "
             f"({session.device})")
    if queue is not None:
        Reporter(queue).message(where)
    else:
        print(f"[koa] {where}", flush=True)
    fault = FaultPlan(**config["fault"]) if config.get("fault") else None
    train_loop(cfg, DataInfo(**config["data"]), session, fault=fault,
               progress=Reporter(queue) if queue is not None and session.rank == 0 else None)


def build_datasets(cfg: TrainConfig, weights: np.ndarray) -> dict:
    """The Ray Data streams of a run.

    The preprocessed Parquet is read and materialized once (deterministic). Every epoch then re-executes, after it:
    re-sampling by grade (:class:`Resample`), a global ``random_shuffle`` with a fresh order (prepared data is
    written grade by grade, and re-sampled copies sit next to their original, so block-order randomisation and a
    local shuffle buffer cannot mix it), and random augmentation. Batches therefore carry the epoch's grade mix.
    """
    import ray.data

    prep = Path(cfg.data)
    n_blocks = max(8, cfg.workers * 4)
    train = (ray.data.read_parquet(str(prep / "train")).select_columns(["image", "size", "label"])
             .repartition(n_blocks).materialize())
    stream = (train.map_batches(Resample(weights), batch_format="numpy", batch_size=256)
              .random_shuffle()
              .map_batches(TrainPreset(cfg.augment, cfg.image_size, in_chans=cfg.in_chans), batch_format="numpy",
                           batch_size=64))
    datasets = {"train": stream}
    if (prep / "val").is_dir():
        datasets["val"] = ray.data.read_parquet(str(prep / "val")).select_columns(
            ["image", "size", "label", "path", "knee"]).materialize()
    return datasets


def check_shared_storage(storage_path: str) -> None:
    """Fail early when a multi-node cluster would checkpoint to a folder that other nodes cannot see.

    URIs (``s3://``, ``gs://``, ...) are trusted. A local path must be visible from every alive node: a marker file
    written here must be readable by a task pinned to each node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if "://" in storage_path:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    Path(storage_path).mkdir(parents=True, exist_ok=True)
    marker = Path(storage_path) / f".koa-shared-check-{uuid.uuid4().hex}"
    marker.write_text("ok")

    @ray.remote(num_cpus=0)
    def _visible(p: str) -> bool:
        return os.path.isfile(p)

    try:
        seen = ray.get([_visible.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(str(marker)) for n in nodes])
    finally:
        marker.unlink(missing_ok=True)
    if not all(seen):
        missing = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
        raise RuntimeError(
            f"--storage-path {storage_path} is a local folder that nodes {missing} cannot see; a multi-node run needs "
            "shared storage for checkpoints: pass an s3:// or gs:// URI, or a folder on a shared mount (NFS, "
            "/mnt/cluster_storage on KubeRay)")


def build_trainer(cfg: TrainConfig, *, storage_path: str | None = None, callbacks: list | None = None,
                  scaling_resources: dict | None = None, fault: FaultPlan | None = None, progress=None):
    """The ``TorchTrainer`` for ``cfg`` (Ray must be initialised). Used by :func:`fit` and by Tune trials.

    The run is named ``cfg.name`` under ``storage_path`` (default ``cfg.storage_path`` or ``cfg.out``); re-using a
    name resumes that run from its latest checkpoint. ``progress``: a ``ray.util.queue.Queue`` for the console
    events of the workers (:class:`koa_ray.progress.ProgressQueue`).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = cfg.validate()
    info, weights = data_info(cfg)
    storage = storage_path or cfg.storage_path or str(Path(cfg.out).resolve())
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {}), **(scaling_resources or {})}
    score_attr = "val_qwk" if _has_val(cfg) else "best_val_qwk"
    return TorchTrainer(
        train_loop_per_worker=train_worker,
        train_loop_config={"cfg": to_dict(cfg), "data": asdict(info),
                           "torch_threads": cfg.torch_threads or max(1, int(cfg.cpus_per_worker)),
                           "fault": asdict(fault) if fault is not None else None, "progress": progress},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage, callbacks=list(callbacks or []),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_best, checkpoint_score_attribute=score_attr,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
        datasets=build_datasets(cfg, weights),
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def result_checkpoints(result) -> list[str]:
    """Paths of the kept checkpoints of a finished ``Result`` (best N plus the latest)."""
    ckpts = [c.path for c, _ in (result.best_checkpoints or [])]
    if result.checkpoint is not None and result.checkpoint.path not in ckpts:
        ckpts.append(result.checkpoint.path)
    return ckpts


def fit(cfg: TrainConfig, scaling_resources: dict | None = None, fault: FaultPlan | None = None) -> dict:
    """Train with Ray Train on a local or existing cluster; returns the run's ``best.json`` plus ``run_dir``.

    A worker crash is retried ``cfg.max_failures`` times (default 1), from the latest reported checkpoint.
    ``fault`` injects a crash (fault-tolerance tests)."""
    from koa_ray.runtime import init_ray, local_resources

    import time

    t0 = time.perf_counter()
    cfg = cfg.validate()
    check_inputs(cfg)  # data and output, before Ray starts
    import ray
    import ray.data

    remote = bool(cfg.address or os.environ.get("RAY_ADDRESS"))
    if not remote:  # the local instance koa starts gets this machine's CPUs and GPUs, and can never grow
        check_resources(cfg, ray.cluster_resources() if ray.is_initialized() else local_resources())
    init_ray(cfg.address)
    if remote:  # an existing cluster may still scale up: say so, but let Ray wait for the resources
        try:
            check_resources(cfg, ray.cluster_resources())
        except ConfigError as e:
            print(f"[koa] warning: {e} (waiting in case the cluster scales up)", flush=True)
    storage = cfg.storage_path or str(Path(cfg.out).resolve())
    check_shared_storage(storage)
    local_dir = Path(storage) / cfg.name if "://" not in storage else Path(cfg.out).resolve() / cfg.name
    if not verbose():  # the epoch lines are the progress; no Ray Data bars for the one-off reads of the set-up
        ray.data.DataContext.get_current().enable_progress_bars = False
    with watched(cfg, local_dir) as (handle, trackers), ProgressQueue(handle) as pq:
        result = build_trainer(cfg, storage_path=storage, scaling_resources=scaling_resources, fault=fault,
                               progress=pq.queue).fit()
        if result.error:
            raise RuntimeError(f"training run {cfg.name} failed: {result.error}") from result.error
        ckpts = result_checkpoints(result)
        if "://" in storage:
            out = {"run_dir": f"{storage.rstrip('/')}/{cfg.name}", "checkpoints": ckpts}
        else:
            out = {"run_dir": str(local_dir)}
            out.update(write_run_artifacts(cfg, local_dir, ckpts, wall_s=time.perf_counter() - t0))
    out.update(trackers.finish(out if "checkpoint" in out else None))  # a store error is reported, not raised
    out["wall_s"] = time.perf_counter() - t0
    return out


def _has_val(cfg: TrainConfig) -> bool:
    return (Path(cfg.data) / "val").is_dir()
