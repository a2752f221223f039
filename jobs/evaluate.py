"""Entrypoint for `ray job submit --working-dir . -- python jobs/evaluate.py ...` (same flags as `koa evaluate`).

Under `ray job submit`, RAY_ADDRESS is set, so the job joins the cluster it was submitted to.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, when not pip-installed

from koa_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
