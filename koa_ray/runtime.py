"""Connecting to Ray: a local cluster sized for this machine, or an existing one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None) -> None:
    """Start or join Ray once per process.

    ``address=None`` joins ``RAY_ADDRESS`` when set (as under ``ray job submit``), else starts a local instance bound
    to 127.0.0.1. ``"auto"`` or ``"ray://..."``/``"HOST:PORT"`` joins an existing cluster.

    Unless ``--verbose`` (:func:`koa_ray.progress.verbose`), Ray logs warnings only and the output of workers and
    actors is not streamed to this console (koa's own progress comes through :mod:`koa_ray.progress`; a failure's
    traceback comes with its exception; everything is in Ray's log folder).
    """
    import ray

    from koa_ray.progress import quiet_ray_logs, verbose

    if ray.is_initialized():
        return
    loud = verbose()
    kwargs: dict = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.WARNING}
    quiet_ray_logs()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        quiet_ray_logs()
        return
    if object_store_mb:
        kwargs["object_store_memory"] = int(object_store_mb) * 1024 * 1024
    # The dashboard (bound to 127.0.0.1, never public) serves the State API that Ray Train's placement-group cleaner
    # polls. That client finds its cluster through RAY_API_SERVER_ADDRESS, else by scanning the machine for Ray
    # instances, and with two instances on one machine it can ask the wrong one, conclude the Train controller is
    # dead and remove a live run's placement group. Pinning the address in the environment the raylet (and so
    # every worker and actor of this instance) inherits keeps each instance talking to its own dashboard.
    port = dashboard_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, _node_ip_address="127.0.0.1", **kwargs)
    quiet_ray_logs()


def dashboard_port(preferred: int = 8265) -> int:
    """``preferred`` (Ray's usual dashboard port) when it is free on 127.0.0.1, else any free port."""
    import socket

    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1 for the Ray dashboard")


def local_resources() -> dict:
    """What a local Ray instance started by :func:`init_ray` will offer: this machine's CPUs and CUDA GPUs."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def actor_threads(concurrency: int, threads: int | None = None) -> int:
    """Torch intra-op threads for each of ``concurrency`` CPU inference actors (score, evaluate, gradcam): ``threads``
    when given, else the cluster's CPUs shared between the actors (at least 1). The actors still reserve only half a
    CPU each in Ray's accounting, so the read and decode tasks of the same job always find a CPU; Ray's own
    ``OMP_NUM_THREADS`` (the reservation, rounded: 1) would leave the node's other cores idle during the forward
    pass."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}: must be >= 1")
        return int(threads)
    return max(1, int(cluster_cpus() // max(1, concurrency)))


def set_actor_threads(threads: int) -> None:
    """In an inference actor's constructor: ``threads`` torch threads, never more than this node has. The setting is
    process-wide (torch applies it lazily to every thread that computes), so it also holds for the thread Ray Data
    runs the actor's batches on (checked: a Ray Data actor reports the constructor's count in ``__call__``)."""
    import torch

    torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))


def frame_blocks(df, max_rows: int = 64, max_blocks: int = 200) -> list:
    """Cut a DataFrame into contiguous chunks for ``ray.data.from_pandas`` (one block each, so work spreads)."""
    n = len(df)
    k = max(1, min(max_blocks, -(-n // max_rows)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [df.iloc[a:b].reset_index(drop=True) for a, b in zip(bounds, bounds[1:]) if b > a]
