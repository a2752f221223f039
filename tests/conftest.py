"""Shared fixtures: one Ray instance per test session, tiny synthetic data prepared once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_KL = REPO.parent / "shared" / "data" / "knee-kl224"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Keep idle Ray worker processes for a minute instead of one second, so the many short Ray Data and Train runs of
# the suite reuse warm workers instead of re-importing torch in fresh ones (about 10 s less per Train run on 2 cores).
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")


def pytest_collection_modifyitems(config, items):
    """Tests that use Ray (the session instance, or a cluster of their own) are marked ``ray``: ``make test-fast``
    leaves them out."""
    for item in items:
        if {"ray_session", "cluster"} & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance sized for a 2-core machine, started once for the whole test session."""
    import ray

    from koa_ray.runtime import init_ray

    init_ray(num_cpus=2, object_store_mb=400)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_kl():
    if not SHARED_KL.is_dir():
        pytest.skip(f"real data not present at {SHARED_KL}")
    return SHARED_KL


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """~160 single-knee synthetic crops in the split/grade folder layout (train/val/test)."""
    from koa_ray.data.synthetic import make_dataset

    out = tmp_path_factory.mktemp("synth")
    make_dataset(out, 160, layout="single", size=96, seed=1)
    return out


@pytest.fixture(scope="session")
def prepared(synth_dir, tmp_path_factory):
    """``synth_dir`` prepared at 64 px with the in-process path (fast; the Ray path has its own tests)."""
    from koa_ray.data.prep import PrepConfig, prepare

    out = tmp_path_factory.mktemp("prep") / "prep64"
    prepare(synth_dir, out, PrepConfig(image_size=64), local=True, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(prepared, tmp_path_factory):
    """A densenet_tiny run trained 2 epochs in local mode on ``prepared``: a real checkpoint for inference tests."""
    from koa_ray.config import TrainConfig
    from koa_ray.train.local import fit_local

    try:
        from helpers import TINY
    except ImportError:  # tests/ imported as a package
        from tests.helpers import TINY

    out = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(data=str(prepared), out=str(out), name="tiny", epochs=2, **TINY)
    result = fit_local(cfg)
    return out / "tiny", result
