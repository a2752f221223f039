"""Tests for koa_ray.losses: focal loss vs cross-entropy, validation and class weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from koa_ray.losses import LOSSES, FocalLoss, build_loss, class_weights, focal_loss

K = 5
ALPHA = [0.5, 1.0, 2.0, 1.5, 3.0]


def _batch(seed: int, n: int = 64, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, K, generator=g) * scale
    target = torch.randint(0, K, (n,), generator=g)
    return logits, target


# --------------------------------------------------------------------------- gamma = 0 is cross-entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [None, ALPHA])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gamma_zero_equals_cross_entropy(reduction, alpha, label_smoothing):
    logits, target = _batch(0)
    weight = None if alpha is None else torch.tensor(alpha)
    expected = F.cross_entropy(logits, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    got = FocalLoss(gamma=0.0, alpha=alpha, reduction=reduction, label_smoothing=label_smoothing)(logits, target)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    got_fn = focal_loss(logits, target, 0.0, weight, reduction, label_smoothing)
    torch.testing.assert_close(got_fn, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [None, ALPHA])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_build_loss_ce_matches_focal_gamma_zero(alpha, label_smoothing):
    logits, target = _batch(1)
    ce = build_loss("ce", alpha=alpha, label_smoothing=label_smoothing)
    focal0 = build_loss("focal", gamma=0.0, alpha=alpha, label_smoothing=label_smoothing)
    assert isinstance(ce, nn.CrossEntropyLoss) and isinstance(focal0, FocalLoss)
    torch.testing.assert_close(focal0(logits, target), ce(logits, target), rtol=1e-6, atol=1e-6)


def test_alpha_weighted_mean_definition():
    logits, target = _batch(2)
    alpha = torch.tensor(ALPHA)
    per_sample = focal_loss(logits, target, 2.0, alpha, "none")
    mean = focal_loss(logits, target, 2.0, alpha, "mean")
    torch.testing.assert_close(mean, per_sample.sum() / alpha[target].sum())


def test_focal_matches_reference_formula():
    # Lin et al. 2017 without smoothing: -(1 - p_t)^gamma * log p_t.
    logits, target = _batch(3)
    p_t = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
    expected = -((1 - p_t) ** 2.0) * p_t.log()
    torch.testing.assert_close(focal_loss(logits, target, 2.0, reduction="none"), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- focal <= CE


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_focal_not_above_cross_entropy(gamma, label_smoothing):
    logits, target = _batch(4, n=256)
    weight = torch.tensor(ALPHA)
    focal = focal_loss(logits, target, gamma, weight, "none", label_smoothing)
    ce = F.cross_entropy(logits, target, weight=weight, reduction="none", label_smoothing=label_smoothing)
    assert torch.all(focal <= ce + 1e-6)
    assert torch.all(focal >= 0)
    assert focal.sum() < ce.sum()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gradients_finite_even_for_saturated_logits(gamma, label_smoothing):
    logits, target = _batch(5, n=32)
    logits[:8] = 0.0
    logits[:8, 0] = 200.0  # p == 1 in float32 for these rows
    target[:4] = 0  # confidently right
    target[4:8] = 3  # confidently wrong
    logits.requires_grad_(True)
    loss = FocalLoss(gamma=gamma, alpha=ALPHA, label_smoothing=label_smoothing)(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_bf16_logits_computed_in_float32():
    logits, target = _batch(6)
    out = focal_loss(logits.bfloat16(), target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, focal_loss(logits.bfloat16().float(), target))


def test_alpha_is_a_buffer():
    loss = FocalLoss(alpha=ALPHA)
    assert "alpha" in dict(loss.named_buffers())
    assert FocalLoss().alpha is None
    assert "gamma=2.0" in repr(loss)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": -1.0}, "-1.0"),
        ({"gamma": float("nan")}, "gamma"),
        ({"alpha": [1.0, 1.0, 1.0]}, "num_classes=5"),
        ({"alpha": [1.0, -0.5, 1.0, 1.0, 1.0]}, "-0.5"),
        ({"alpha": [0.0] * 5}, "not all zero"),
        ({"alpha": [1.0, float("inf"), 1.0, 1.0, 1.0]}, "inf"),
        ({"reduction": "avg"}, "'avg'"),
        ({"label_smoothing": 1.0}, "1.0"),
        ({"label_smoothing": -0.1}, "-0.1"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_focal_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss(**kwargs)


def test_focal_loss_shape_validation():
    with pytest.raises(ValueError, match="logits"):
        focal_loss(torch.randn(4, 5, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), alpha=torch.ones(3))


def test_build_loss_unknown_lists_choices():
    with pytest.raises(ValueError, match="hinge") as info:
        build_loss("hinge")
    for name in LOSSES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="num_classes=5"):
        build_loss("ce", alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss("ce", label_smoothing=1.2)


# --------------------------------------------------------------------------- class weights


def test_class_weights_inverse_known_values():
    # 1/n = [1/100, 1/50, 1/25, 1/10]; normalised to mean 1 -> multiply by 4 / sum(1/n).
    got = class_weights([100, 50, 25, 10], "inverse")
    inv = np.array([0.01, 0.02, 0.04, 0.1])
    np.testing.assert_allclose(got, inv * 4 / inv.sum())
    np.testing.assert_allclose(got, [0.23529412, 0.47058824, 0.94117647, 2.35294118], rtol=1e-7)
    assert math.isclose(np.mean(got), 1.0)
    assert all(isinstance(w, float) for w in got)


def test_class_weights_effective_known_values():
    # Cui et al. 2019: E_n = (1 - beta^n) / (1 - beta); w ∝ 1 / E_n.
    # beta = 0.5, n = [1, 2, 3]: E = [1, 1.5, 1.75] -> 1/E = [1, 2/3, 4/7]
    # sum = 47/21 -> w = 3 * [1, 2/3, 4/7] * 21/47 = [63/47, 42/47, 36/47]
    got = class_weights([1, 2, 3], "effective", beta=0.5)
    np.testing.assert_allclose(got, [63 / 47, 42 / 47, 36 / 47])
    # beta -> 0: uniform; default beta=0.999 lies between uniform and inverse.
    np.testing.assert_allclose(class_weights([10, 1000], "effective", beta=0.0), [1.0, 1.0])
    eff = class_weights([10, 1000], "effective")
    inv = class_weights([10, 1000], "inverse")
    assert 1.0 < eff[0] < inv[0]


def test_class_weights_zero_count_is_one_sample():
    got = class_weights([100, 0, 50], "inverse")
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, class_weights([100, 1, 50], "inverse"))
    assert np.all(np.isfinite(class_weights([100, 0, 50], "effective")))


def test_class_weights_none_and_explicit():
    assert class_weights([10, 20, 30], "none") is None
    assert class_weights([10, 20, 30], [1, 2.5, 0]) == [1.0, 2.5, 0.0]
    with pytest.raises(ValueError, match="3 entries"):
        class_weights([10, 20, 30], [1, 2])
    with pytest.raises(ValueError, match="-1"):
        class_weights([10, 20, 30], [1, -1, 2])


@pytest.mark.parametrize(
    "counts, scheme, kwargs, match",
    [
        ([10, 20], "median", {}, "effective"),  # unknown: lists the choices
        ([], "inverse", {}, "non-empty"),
        ([0, 0, 0], "inverse", {}, "not all zero"),
        ([10, -1], "inverse", {}, "-1"),
        ([10, 20], "effective", {"beta": 1.0}, "beta"),
    ],
)
def test_class_weights_validation(counts, scheme, kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_weights(counts, scheme, **kwargs)


def test_class_weights_feed_losses():
    alpha = class_weights([500, 300, 200, 100, 20], "effective")
    logits, target = _batch(7)
    for name in LOSSES:
        loss = build_loss(name, alpha=alpha, label_smoothing=0.05)(logits, target)
        assert torch.isfinite(loss)
