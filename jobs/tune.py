"""Entrypoint for `ray job submit --working-dir . -- python jobs/tune.py ...` (same flags as `koa tune`).

Under `ray job submit`, RAY_ADDRESS is set, so the sweep joins the cluster it was submitted to. ``--out`` must be
storage every node can see (shared mount, or the head node on a one-node cluster); re-submitting with ``--resume``
continues an interrupted sweep without re-running finished trials.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not pip-installed

from koa_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
