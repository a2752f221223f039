"""Training: the worker loop (:mod:`~koa_ray.train.loop`) run by Ray Train workers (:mod:`~koa_ray.train.driver`) or
in one process (:mod:`~koa_ray.train.local`), the run-directory artefacts both write (:mod:`~koa_ray.train.run`,
:mod:`~koa_ray.train.card`) and weight averaging (:mod:`~koa_ray.train.ema`). Checkpoints are written in the format
of :mod:`koa_ray.checkpoint`, which inference reads.
"""
