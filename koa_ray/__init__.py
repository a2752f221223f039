"""koa-ray: Kellgren-Lawrence grading of knee radiographs on Ray."""

__version__ = "0.3.0"

GRADES = (0, 1, 2, 3, 4)
CLASS_NAMES = ("KL0", "KL1", "KL2", "KL3", "KL4")
TTA_MODES = ("none", "flip", "shift")  # koa_ray.data.tta: test-time views averaged
