"""Connecting to Ray: a local cluster sized for this machine, or an existing one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None,
             quiet: bool = True) -> None:
    """Start or join Ray once per process.

    ``address=None`` joins ``RAY_ADDRESS`` when set (as under ``ray job submit``), else starts a local instance bound
    to 127.0.0.1. ``"auto"`` or ``"ray://..."``/``"HOST:PORT"`` joins an existing cluster.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"log_to_driver": True}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    if object_store_mb:
        kwargs["object_store_memory"] = int(object_store_mb) * 1024 * 1024
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def frame_blocks(df, max_rows: int = 64, max_blocks: int = 200) -> list:
    """Cut a DataFrame into contiguous chunks for ``ray.data.from_pandas`` (one block each, so work spreads)."""
    n = len(df)
    k = max(1, min(max_blocks, -(-n // max_rows)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [df.iloc[a:b].reset_index(drop=True) for a, b in zip(bounds, bounds[1:]) if b > a]
