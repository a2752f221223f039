"""Channel / spatial attention blocks inserted after DenseNet dense blocks.

* :class:`SEBlock` -- Squeeze-and-Excitation, Hu et al., "Squeeze-and-Excitation
  Networks", CVPR 2018 (https://arxiv.org/abs/1709.01507).
* :class:`ChannelAttention`, :class:`SpatialAttention`, :class:`CBAM` -- Woo et al.,
  "CBAM: Convolutional Block Attention Module", ECCV 2018
  (https://arxiv.org/abs/1807.06521).
* :class:`SECBAM` -- SE followed by CBAM.

Every block maps ``(N, C, H, W) -> (N, C, H, W)`` (the input re-weighted by a
sigmoid gate), so any of them can follow any feature map.  Pick one by name with
:func:`create_attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from koa_ray import ATTENTIONS

__all__ = [
    "ATTENTIONS",
    "CBAM",
    "ChannelAttention",
    "SEBlock",
    "SECBAM",
    "SpatialAttention",
    "create_attention",
    "reduced_channels",
]


#: Smallest bottleneck width of the SE / channel-attention MLP (as timm's ``rd_divisor``).
MIN_REDUCED_CHANNELS = 8


def reduced_channels(channels: int, reduction: int) -> int:
    """Width of the bottleneck MLP: ``channels // reduction``, at least 8, at most ``channels``.

    The floor keeps very narrow feature maps (e.g. the tiny test DenseNet) from
    collapsing to a 1-unit bottleneck.

    Raises:
        ValueError: if ``channels`` or ``reduction`` is not a positive integer.
    """
    _check_positive_int("channels", channels)
    _check_positive_int("reduction", reduction)
    return min(channels, max(channels // reduction, MIN_REDUCED_CHANNELS))


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class SEBlock(nn.Module):
    """Squeeze-and-Excitation block (Hu et al. 2018).

    ``x * sigmoid(W2 relu(W1 avgpool(x)))`` with ``W1: C -> C/r`` and ``W2: C/r -> C``.

    Args:
        channels: number of input (and output) channels ``C``.
        reduction: bottleneck ratio ``r``; the hidden width is :func:`reduced_channels`.

    Raises:
        ValueError: if ``channels`` or ``reduction`` is not a positive integer.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.pool(x)
        s = self.fc1(s)
        s = self.act(s)
        s = self.fc2(s)
        return x * self.gate(s)


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al. 2018, Sec. 3.1).

    ``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with an MLP shared by both
    pooled descriptors.

    Args:
        channels: number of input (and output) channels.
        reduction: bottleneck ratio of the shared MLP; hidden width is :func:`reduced_channels`.

    Raises:
        ValueError: if ``channels`` or ``reduction`` is not a positive integer.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)
        self.gate = nn.Sigmoid()

    def mlp(self, s: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(s)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * self.gate(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al. 2018, Sec. 3.2).

    ``x * sigmoid(conv_kxk([mean_c(x); max_c(x)]))``.

    Args:
        kernel_size: odd size of the square convolution (the paper uses 7).

    Raises:
        ValueError: if ``kernel_size`` is not a positive odd integer.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the spatial size, got {kernel_size}.")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=1, keepdim=True)
        mx = x.amax(dim=1, keepdim=True)
        s = self.conv(torch.cat([avg, mx], dim=1))
        return x * self.gate(s)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel then spatial attention.

    Args:
        channels: number of input (and output) channels.
        reduction: bottleneck ratio of the channel-attention MLP.
        kernel_size: spatial-attention kernel size (odd).

    Raises:
        ValueError: on a non-positive ``channels``/``reduction`` or an even ``kernel_size``.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel(x)
        x = self.spatial(x)
        return x


class SECBAM(nn.Module):
    """Squeeze-and-Excitation followed by CBAM.

    Args:
        channels: number of input (and output) channels.
        reduction: bottleneck ratio shared by the SE and channel-attention MLPs.

    Raises:
        ValueError: if ``channels`` or ``reduction`` is not a positive integer.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.se = SEBlock(channels, reduction)
        self.cbam = CBAM(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(x)
        x = self.cbam(x)
        return x


def create_attention(name: str, channels: int, reduction: int = 16) -> nn.Module:
    """Build an attention block by name.

    Args:
        name: one of :data:`ATTENTIONS` (``none``, ``se``, ``cbam``, ``se+cbam``),
            case-insensitive. ``none`` gives :class:`torch.nn.Identity`.
        channels: channels of the feature map the block will re-weight.
        reduction: bottleneck ratio of the SE / channel-attention MLP.

    Raises:
        ValueError: on an unknown ``name`` (the message lists the choices), or a
            non-positive ``channels``/``reduction``.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "none":
        _check_positive_int("channels", channels)
        _check_positive_int("reduction", reduction)
        return nn.Identity()
    if key == "se":
        return SEBlock(channels, reduction)
    if key == "cbam":
        return CBAM(channels, reduction)
    if key == "se+cbam":
        return SECBAM(channels, reduction)
    raise ValueError(f"Unknown attention {name!r}; choose one of {', '.join(ATTENTIONS)}.")
