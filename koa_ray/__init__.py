"""koa-ray: Kellgren-Lawrence grading of knee radiographs on Ray."""

__version__ = "0.3.0"

GRADES = (0, 1, 2, 3, 4)
CLASS_NAMES = ("KL0", "KL1", "KL2", "KL3", "KL4")
TTA_MODES = ("none", "flip", "shift")  # koa_ray.data.tta: test-time views averaged

# The names the package accepts, kept here so that configuration can be checked without importing what implements
# them (torch, torchvision); each implementing module keys its registry by these names and a test keeps them in step.
ARCHS = ("densenet121", "densenet169", "densenet_tiny")  # koa_ray.models.densenet: registered architectures
ATTENTIONS = ("none", "se", "cbam", "se+cbam")  # koa_ray.models.blocks: attention blocks by name
DECODINGS = ("argmax", "expected")  # koa_ray.metrics.decode_grades: probabilities -> grade
