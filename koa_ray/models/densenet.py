"""DenseNet-BC with an attention block after every dense block, for KL grading.

Backbone: Huang et al., "Densely Connected Convolutional Networks", CVPR 2017
(https://arxiv.org/abs/1608.06993), built from :class:`torchvision.models.DenseNet`
so that torchvision / ImageNet state dicts load without key surgery.

Layout of :class:`KneeDenseNet` (``features`` keeps torchvision's module names)::

    features: conv0 norm0 relu0 pool0
              denseblock1 attention1 transition1
              denseblock2 attention2 transition2
              denseblock3 attention3 transition3
              denseblock4 attention4 norm5 relu5
    head:     global_pool -> flatten -> head_drop -> fc

``attentionI`` is :func:`~koa_ray.models.blocks.create_attention` (``nn.Identity`` for
``"none"``), so ``features.attention4`` always exists and is the Grad-CAM target.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn

from koa_ray import ARCHS, ATTENTIONS
from koa_ray.models.blocks import create_attention

__all__ = [
    "ARCHS",
    "ArchSpec",
    "KneeDenseNet",
    "adapt_input_conv",
    "build_model",
    "load_state_dict_into",
    "load_weights_file",
    "model_config",
    "remap_legacy_keys",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """DenseNet-BC hyper-parameters of one registered architecture.

    ``imagenet_weights`` names the torchvision weights enum (e.g. ``"DenseNet121_Weights"``)
    or is ``None`` when no pretrained weights exist for the architecture.
    """

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int = 4
    imagenet_weights: str | None = None


#: The registry behind :data:`koa_ray.ARCHS` (the names :func:`build_model` accepts), keyed by those names.
_ARCH_SPECS: dict[str, ArchSpec] = {
    "densenet121": ArchSpec(32, (6, 12, 24, 16), 64, 4, "DenseNet121_Weights"),
    "densenet169": ArchSpec(32, (6, 12, 32, 32), 64, 4, "DenseNet169_Weights"),
    # Same code, a few thousand parameters: trains on CPU at 64 px in the tests.
    "densenet_tiny": ArchSpec(12, (2, 2, 2, 2), 16, 2, None),
}

# Pre-0.4 torchvision checkpoints (including the ImageNet files still served today) name
# dense-layer modules "norm.1", "conv.2", ... ; modern modules are "norm1", "conv2".
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
# Wrappers that prefix every key: DistributedDataParallel / DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class KneeDenseNet(nn.Module):
    """DenseNet-BC with an attention block after each dense block.

    Args:
        growth_rate: ``k``, channels added by each dense layer.
        block_config: number of dense layers in each dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width multiplier (``bn_size * k`` channels in the 1x1 conv).
        attention: one of :data:`~koa_ray.models.blocks.ATTENTIONS`.
        reduction: bottleneck ratio of the SE / channel-attention MLPs.
        in_chans: input channels, 1 (grayscale radiograph) or 3.
        num_classes: number of output logits (5 KL grades).
        drop_rate: dropout probability before the classifier.
        memory_efficient: gradient-checkpoint the dense layers (torchvision option).

    Attributes:
        feature_channels: channels after each dense block (= attention block widths).
        num_features: channels of :meth:`forward_features` output (= ``feature_channels[-1]``).
        build_config: the :func:`build_model` kwargs (set by :func:`build_model`; ``None``
            when the class is instantiated directly).

    Raises:
        ValueError: on a bad attention name or an out-of-range argument.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        attention: str = "cbam",
        reduction: int = 16,
        in_chans: int = 1,
        num_classes: int = 5,
        drop_rate: float = 0.2,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}.")
        if len(block_config) < 1:
            raise ValueError(f"block_config must have at least one block, got {block_config!r}.")

        backbone = tvm.DenseNet(
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            num_init_features=num_init_features,
            bn_size=bn_size,
            memory_efficient=memory_efficient,
        )
        tv_features = dict(backbone.features.named_children())
        if in_chans != 3:
            conv0 = nn.Conv2d(in_chans, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(conv0.weight)
            tv_features["conv0"] = conv0

        self.features = nn.Sequential()
        for name in ("conv0", "norm0", "relu0", "pool0"):
            self.features.add_module(name, tv_features[name])
        channels = num_init_features
        feature_channels = []
        for i, num_layers in enumerate(block_config, start=1):
            channels += num_layers * growth_rate
            feature_channels.append(channels)
            self.features.add_module(f"denseblock{i}", tv_features[f"denseblock{i}"])
            self.features.add_module(f"attention{i}", create_attention(attention, channels, reduction))
            if i < len(block_config):
                self.features.add_module(f"transition{i}", tv_features[f"transition{i}"])
                channels //= 2
        self.features.add_module("norm5", tv_features["norm5"])
        # Not in-place: hooks on norm5 (or attention4 via Identity) see unmodified tensors.
        self.features.add_module("relu5", nn.ReLU())

        self.feature_channels: tuple[int, ...] = tuple(feature_channels)
        self.num_features: int = channels
        self.num_classes = num_classes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.fc.bias)
        self.build_config: dict[str, Any] | None = None

    @property
    def gradcam_target_layer(self) -> nn.Module:
        """Attention block after the last dense block; its output is (N, C, h, w)."""
        return self.features.get_submodule(f"attention{len(self.feature_channels)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(N, in_chans, H, W)`` -> final feature map ``(N, num_features, H/32, W/32)``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits ``(N, num_classes)`` (pooled features if ``pre_logits``)."""
        x = self.global_pool(x)
        x = torch.flatten(x, 1)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# --------------------------------------------------------------------------- weights


def remap_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old torchvision DenseNet keys (``...denselayer1.norm.1.weight`` ->
    ``...denselayer1.norm1.weight``) and strip DDP / ``torch.compile`` key prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        match = _LEGACY_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a stem conv weight ``(O, I, k, k)`` to ``in_chans`` input channels.

    3 -> 1: mean over the RGB kernels.  1 -> 3: the kernel repeated and divided by 3,
    so a grey image replicated to RGB gives the same response.

    Raises:
        ValueError: for any other channel change.
    """
    src = weight.shape[1]
    if src == in_chans:
        return weight
    if in_chans == 1:
        return weight.mean(dim=1, keepdim=True)
    if src == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    raise ValueError(f"Cannot adapt a {src}-channel stem convolution to in_chans={in_chans}.")


def load_state_dict_into(model: KneeDenseNet, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a torchvision DenseNet or a full :class:`KneeDenseNet` state dict into ``model``.

    A dict with ``fc.*`` keys is a full model and must match exactly.  Otherwise it is a
    backbone (torchvision DenseNet): its ``classifier.*`` head is dropped and only the
    attention blocks and ``fc`` may stay at their initialisation.  ``features.conv0``
    is adapted to ``model``'s ``in_chans`` (:func:`adapt_input_conv`).

    Raises:
        RuntimeError: naming ``source`` and listing missing / unexpected / mis-shaped keys.
    """
    sd = remap_legacy_keys(state_dict)
    if "features.conv0.weight" in sd:
        in_chans = model.features.conv0.in_channels
        sd["features.conv0.weight"] = adapt_input_conv(sd["features.conv0.weight"], in_chans)
    is_full_model = any(k.startswith("fc.") for k in sd)
    if not is_full_model:
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}

    own = model.state_dict()
    optional = ("num_batches_tracked",)  # absent from pre-2018 checkpoints; BatchNorm fills it
    missing = [k for k in own if k not in sd and not k.endswith(optional)]
    if not is_full_model:
        missing = [k for k in missing if not (k.startswith("fc.") or _is_attention_key(k))]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        kind = "full KneeDenseNet" if is_full_model else "DenseNet backbone"
        raise RuntimeError(
            f"Weights from {source} (read as a {kind} state dict) do not fit the model "
            f"(build_config={model.build_config}).\n"
            f"  missing keys ({len(missing)}): {_preview(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}\n"
            f"  shape mismatches ({len(mismatched)}): {_preview(mismatched)}\n"
            "Check that arch / attention / num_classes match the weights."
        )
    model.load_state_dict(sd, strict=False)
    if not is_full_model:
        logger.info("Loaded DenseNet backbone weights from %s; attention blocks and fc keep their random init.", source)
    else:
        logger.info("Loaded KneeDenseNet weights from %s.", source)


def load_weights_file(model: KneeDenseNet, path: str | os.PathLike) -> None:
    """Load a local weights file into ``model`` with ``torch.load(weights_only=True)``.

    The file may hold a plain state dict (torchvision DenseNet or KneeDenseNet) or a
    checkpoint dict with the state dict under ``"model"`` or ``"state_dict"``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        RuntimeError: if the file cannot be read or its keys do not fit (see
            :func:`load_state_dict_into`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path!r}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise RuntimeError(f"Could not read weights file {path!r} with torch.load(weights_only=True): {exc}") from exc
    load_state_dict_into(model, _unwrap_checkpoint(obj, path), source=repr(path))


def _unwrap_checkpoint(obj: Any, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise RuntimeError(
        f"Weights file {path!r} is neither a state dict nor a checkpoint dict with a 'model' or "
        f"'state_dict' entry (top-level keys: {_preview(list(obj)) if isinstance(obj, Mapping) else type(obj)})."
    )


def _is_attention_key(key: str) -> bool:
    return key.startswith("features.attention")


def _preview(items: list[str], limit: int = 8) -> str:
    if not items:
        return "-"
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _download_imagenet_state_dict(arch: str, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision's weights API (cached under ``$TORCH_HOME``)."""
    weights = getattr(tvm, spec.imagenet_weights).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, DNS, refused
        filename = os.path.basename(urlparse(weights.url).path)
        target_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"Could not download the ImageNet weights for {arch!r} from {weights.url} ({exc}). "
            "This machine appears to be offline (or cannot reach the download host). Either "
            f"download {filename!r} elsewhere and copy it to {os.path.join(target_dir, filename)!r} "
            "(i.e. $TORCH_HOME/hub/checkpoints/, where torchvision looks before downloading), "
            f"or pass weights='/path/to/{filename}' instead of pretrained='imagenet'."
        ) from exc


# --------------------------------------------------------------------------- builder


def build_model(
    arch: str = "densenet121",
    attention: str = "cbam",
    reduction: int = 16,
    in_chans: int = 1,
    num_classes: int = 5,
    drop_rate: float = 0.2,
    pretrained: str | None = None,
    weights: str | os.PathLike | None = None,
    memory_efficient: bool = False,
) -> KneeDenseNet:
    """Build a :class:`KneeDenseNet` by architecture name.

    Args:
        arch: one of :data:`ARCHS`.
        attention: one of ``none | se | cbam | se+cbam``.
        reduction: bottleneck ratio of the attention MLPs.
        in_chans: 1 (grayscale) or 3.
        num_classes: number of logits.
        drop_rate: dropout before the classifier.
        pretrained: ``None`` (random init) or ``"imagenet"``: torchvision's ImageNet
            backbone weights (downloaded once to ``$TORCH_HOME/hub/checkpoints``); the
            attention blocks and the head stay randomly initialised and ``conv0`` is
            averaged over RGB when ``in_chans=1``.
        weights: path of a local state dict / checkpoint (see :func:`load_weights_file`).
        memory_efficient: gradient-checkpoint the dense layers.

    Returns:
        The model, with ``model.build_config`` holding every argument above except
        ``pretrained`` / ``weights``, so ``build_model(**model.build_config)`` rebuilds it.

    Raises:
        ValueError: on an unknown ``arch`` / ``attention`` / ``pretrained`` value, on both
            ``pretrained`` and ``weights`` given, or ImageNet weights asked for an
            architecture that has none.
        RuntimeError: if the ImageNet download fails (offline) or loaded keys do not fit.
        FileNotFoundError: if ``weights`` does not exist.
    """
    arch_key = arch.strip().lower() if isinstance(arch, str) else arch
    if arch_key not in _ARCH_SPECS:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(ARCHS)}.")
    attention_key = attention.strip().lower() if isinstance(attention, str) else attention
    if attention_key not in ATTENTIONS:
        raise ValueError(f"Unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}.")
    if pretrained is not None and pretrained != "imagenet":
        raise ValueError(f"pretrained must be None or 'imagenet', got {pretrained!r}.")
    if pretrained is not None and weights is not None:
        raise ValueError(f"Pass either pretrained={pretrained!r} or weights={weights!r}, not both.")
    spec = _ARCH_SPECS[arch_key]
    if pretrained == "imagenet" and spec.imagenet_weights is None:
        with_weights = [name for name, s in _ARCH_SPECS.items() if s.imagenet_weights]
        raise ValueError(
            f"No ImageNet weights exist for arch {arch_key!r}; use one of {', '.join(with_weights)} or pretrained=None."
        )

    model = KneeDenseNet(
        growth_rate=spec.growth_rate,
        block_config=spec.block_config,
        num_init_features=spec.num_init_features,
        bn_size=spec.bn_size,
        attention=attention_key,
        reduction=reduction,
        in_chans=in_chans,
        num_classes=num_classes,
        drop_rate=drop_rate,
        memory_efficient=memory_efficient,
    )
    model.build_config = {
        "arch": arch_key,
        "attention": attention_key,
        "reduction": reduction,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "drop_rate": drop_rate,
        "memory_efficient": memory_efficient,
    }
    if pretrained == "imagenet":
        state_dict = _download_imagenet_state_dict(arch_key, spec)
        load_state_dict_into(model, state_dict, source=f"torchvision {spec.imagenet_weights}.IMAGENET1K_V1")
    elif weights is not None:
        load_weights_file(model, weights)
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """A copy of ``model.build_config`` (unwrapping DDP ``.module`` / ``torch.compile``).

    Raises:
        ValueError: if the model was not created by :func:`build_model`.
    """
    while not isinstance(model, KneeDenseNet):
        wrapped = [getattr(model, attr, None) for attr in ("module", "_orig_mod")]
        inner = next((m for m in wrapped if isinstance(m, nn.Module)), None)
        if inner is None:
            break
        model = inner
    config = getattr(model, "build_config", None)
    if not isinstance(config, dict):
        raise ValueError(f"{type(model).__name__} has no build_config; build it with build_model().")
    return dict(config)
