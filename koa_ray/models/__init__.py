"""Models: DenseNet-BC + SE / CBAM attention for Kellgren-Lawrence grading."""

from koa_ray.models.blocks import (
    ATTENTIONS,
    CBAM,
    SECBAM,
    ChannelAttention,
    SEBlock,
    SpatialAttention,
    create_attention,
)
from koa_ray.models.densenet import ARCHS, KneeDenseNet, build_model, load_weights_file, model_config

__all__ = [
    "ARCHS",
    "ATTENTIONS",
    "CBAM",
    "ChannelAttention",
    "KneeDenseNet",
    "SEBlock",
    "SECBAM",
    "SpatialAttention",
    "build_model",
    "create_attention",
    "load_weights_file",
    "model_config",
]
