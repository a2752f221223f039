"""A checkpoint applied to images: prediction, batch scoring, evaluation, explanation and export.

- :mod:`koa_ray.infer.predictor`: ``Predictor``, a loaded checkpoint with the preprocessing recorded in it.
- :mod:`koa_ray.infer.score`: ``koa score``, image folders to a predictions table on a Ray Data actor pool.
- :mod:`koa_ray.infer.evaluate`: ``koa evaluate``, metrics, plots and report examples for a labelled split.
- :mod:`koa_ray.infer.report`: the one-page HTML evaluation report (presentation only).
- :mod:`koa_ray.infer.gradcam`: ``koa gradcam``, Grad-CAM family maps, in-process and as a Ray Data job.
- :mod:`koa_ray.infer.export`: ``koa export``, a checkpoint as ONNX or TorchScript with its ``preprocess.json``.

Nothing is imported here: Ray actors import the one module they need.
"""
