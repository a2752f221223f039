"""Exponential moving average of model weights (Polyak averaging), the evaluated and exported model when on.

Polyak & Juditsky 1992, "Acceleration of stochastic approximation by averaging"; as used by timm's ``ModelEmaV2``
and TensorFlow's ``ExponentialMovingAverage``: after every optimizer step ``ema = d * ema + (1 - d) * weights``, for
parameters and floating-point buffers alike (BatchNorm running statistics); integer buffers
(``num_batches_tracked``) are copied. The decay warms up as ``d_n = min(decay, (1 + n) / (10 + n))`` (TensorFlow's
``num_updates``), so the average is not dominated by the random initial weights in a short run.
"""

from __future__ import annotations

import copy

import torch


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used for update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class ModelEma:
    """A frozen copy of ``model`` whose weights track an exponential moving average of ``model``'s.

    Args:
        model: the bare model (not DDP-wrapped); copied, so later changes to it do not touch the average.
        decay: the target decay in ``(0, 1)``, e.g. 0.999.

    Raises:
        ValueError: ``decay`` outside ``(0, 1)``.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay}: must be in (0, 1)")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = ema_decay_at(self.decay, self.updates)
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            new = current[name].detach()
            if avg.dtype.is_floating_point:
                avg.lerp_(new.to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(new)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
