"""What every part of a sweep agrees on: the metric it optimises, its time attribute, its settings file, trial names.

A sweep's folder holds ``sweep.json`` (:data:`SWEEP_FILE`, the settings :func:`koa_ray.tune.sweep.run_sweep` saved
and ``resume`` reads back) and one Ray Train run per trial, named :func:`trial_name` of the Tune trial id.
"""

from __future__ import annotations

METRIC, MODE = "val_qwk", "max"
TIME_ATTR = "epochs_done"  # 1-based epoch counter added to every report (Train's ``epoch`` is 0-based)
SWEEP_FILE = "sweep.json"


def trial_name(trial_id: str) -> str:
    """The name of a trial's Tune folder and of its Ray Train run: ``trial_<trial_id>``."""
    return f"trial_{trial_id}"
