import numpy as np
import pytest

from koa_ray.config import AugmentConfig, BalanceConfig
from koa_ray.data.augment import EvalPreset, TrainPreset, build_train_transform
from koa_ray.data.balance import Resample, epoch_indices, sampling_weights, target_distribution

COUNTS = np.array([2286, 1046, 1516, 757, 173])


def labels_from(counts):
    return np.repeat(np.arange(5), counts)


@pytest.mark.parametrize("target", ["uniform", "sqrt", [0.1, 0.2, 0.3, 0.2, 0.2]])
def test_resampling_reaches_target_distribution(target):
    cfg = BalanceConfig(target=target, strength=1.0)
    want = target_distribution(COUNTS, cfg)
    labels = labels_from(COUNTS)
    w = sampling_weights(COUNTS, cfg)
    rng = np.random.default_rng(0)
    got = np.bincount(labels[epoch_indices(labels, w, rng)], minlength=5)
    assert abs(got.sum() - COUNTS.sum()) < 0.02 * COUNTS.sum()  # epoch size preserved
    np.testing.assert_allclose(got / got.sum(), want, atol=0.01)
    # minority grade is over-sampled (repeats), majority under-sampled
    if target == "uniform":
        assert got[4] > COUNTS[4] * 5 and got[0] < COUNTS[0]


def test_strength_interpolates_and_none_is_natural():
    nat = COUNTS / COUNTS.sum()
    np.testing.assert_allclose(target_distribution(COUNTS, BalanceConfig(target="none")), nat)
    half = target_distribution(COUNTS, BalanceConfig(target="uniform", strength=0.5))
    np.testing.assert_allclose(half, 0.5 * nat + 0.5 * 0.2)
    w = sampling_weights(COUNTS, BalanceConfig(target="none"))
    np.testing.assert_allclose(w, 1.0)


def test_absent_grade_gets_nothing():
    counts = np.array([10, 0, 5, 5, 1])
    p = target_distribution(counts, BalanceConfig(target="uniform"))
    assert p[1] == 0 and abs(p.sum() - 1) < 1e-9
    assert sampling_weights(counts, BalanceConfig(target="uniform"))[1] == 0


def test_resample_is_fresh_each_call_and_keeps_columns():
    labels = labels_from([50, 10, 10, 10, 2])
    batch = {"label": labels, "path": np.array([f"p{i}" for i in range(len(labels))])}
    fn = Resample(sampling_weights(np.bincount(labels, minlength=5), BalanceConfig(target="uniform")))
    a, b = fn(batch), fn(batch)
    assert set(a) == {"label", "path"} and len(a["label"]) == len(a["path"])
    assert not np.array_equal(a["path"], b["path"])  # re-drawn per epoch
    # every emitted path keeps its own label
    idx = np.array([int(p[1:]) for p in a["path"]])
    assert np.array_equal(labels[idx], a["label"])


def test_train_preset_is_random_class_aware_and_eval_is_deterministic():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (4, 80, 80), dtype=np.uint8)
    batch = {"image": [i.tobytes() for i in imgs], "size": np.full(4, 80), "label": np.array([0, 1, 2, 4])}
    tp = TrainPreset(AugmentConfig(grade_strength=[0.0, 1.0, 1.0, 1.0, 2.0]), image_size=64)
    a, b = tp(batch), tp(batch)
    assert a["image"].shape == (4, 1, 64, 64) and a["image"].dtype == np.float32
    assert np.isfinite(a["image"]).all()
    assert np.allclose(a["image"][0], b["image"][0])  # strength 0 for KL0: deterministic resize only
    assert not np.allclose(a["image"][3], b["image"][3])  # KL4 augmented
    ep = EvalPreset(64, in_chans=3)
    e1, e2 = ep(batch), ep(batch)
    assert e1["image"].shape == (4, 3, 64, 64) and np.array_equal(e1["image"], e2["image"])
    assert np.array_equal(e1["image"][0, 0], a["image"][0, 0])  # eval == un-augmented train


def test_transform_built_for_all_options():
    t = build_train_transform(AugmentConfig(), strength=1.5)
    out = t(image=np.full((64, 64), 128, np.uint8))["image"]
    assert out.shape == (64, 64) and out.dtype == np.uint8


def test_default_imbalance_correction_is_applied_once():
    """Defaults: re-sampling to sqrt shares and no loss weight, so each grade's share of the loss is its sqrt share
    (KL0 ~30%, KL4 ~8% on the real counts). The old defaults (alpha 'effective' from the natural counts on top of
    the re-sampling) gave KL4, 3% of the data, more of the loss than KL0, 40% of it."""
    from koa_ray.config import LossConfig
    from koa_ray.data.balance import sampled_counts
    from koa_ray.losses import class_weights, loss_shares

    seen = sampled_counts(COUNTS, BalanceConfig())
    assert LossConfig().alpha == "none"
    shares = loss_shares(seen, None)
    np.testing.assert_allclose(shares, np.sqrt(COUNTS) / np.sqrt(COUNTS).sum(), atol=1e-9)
    assert shares[0] > shares[2] > shares[1] > shares[3] > shares[4] > 0.05
    double = loss_shares(seen, class_weights(COUNTS, "effective"))  # what the old defaults did
    assert double[4] > double[0]
    # asked for on purpose, alpha is computed from what the model sees: 'inverse' on top of re-sampling evens out
    np.testing.assert_allclose(loss_shares(seen, class_weights(seen, "inverse")), 0.2, atol=1e-9)
    with pytest.raises(ValueError, match="alpha has 4 entries"):
        loss_shares(seen, [1, 1, 1, 1])


def test_default_augmentation_is_label_safe():
    """One pipeline for every grade, no horizontal flip (prepared knees share one orientation), zoom-in bounded."""
    import albumentations as A

    tp = TrainPreset(AugmentConfig(), image_size=64)
    pipes = {id(tp.pipeline(g)) for g in range(5)}
    assert len(pipes) == 1
    names = [type(t).__name__ for t in tp.pipeline(0).transforms]
    assert "HorizontalFlip" not in names and "Affine" in names
    # a grade-aware strength is still there on request
    assert len({id(TrainPreset(AugmentConfig(grade_strength=[1, 1, 1, 1, 2]), 64).pipeline(g)) for g in (0, 4)}) == 2
    assert any(isinstance(t, A.HorizontalFlip) for t in build_train_transform(AugmentConfig(hflip_p=0.5)).transforms)
    # augmented crops of the same image do not depend on the grade they are labelled with
    img = np.random.default_rng(0).integers(0, 255, (1, 64, 64), dtype=np.uint8)
    a = TrainPreset(AugmentConfig(), 64).reseed(3).augment(img, np.array([0]))
    b = TrainPreset(AugmentConfig(), 64).reseed(3).augment(img, np.array([4]))
    np.testing.assert_array_equal(a, b)


def test_tta_views_are_exact_pixel_shifts_zooms_and_flips():
    """``shift`` moves the content by whole pixels (no interpolation blur) in four directions and zooms about the
    centre; ``flip`` is the mirror image; the first view is the input itself; an unknown mode lists the choices."""
    import torch

    from koa_ray.data.tta import SHIFT, tta_views

    x = torch.zeros(1, 1, 64, 64)
    x[0, 0, 20, 30] = 1.0
    k = round(SHIFT * 64)
    views = tta_views(x, "shift")
    assert len(views) == 7 and views[0] is x
    moved = [tuple(torch.nonzero(v[0, 0] > 0.999).tolist()[0]) for v in views[1:5]]
    assert moved == [(20, 30 + k), (20, 30 - k), (20 + k, 30), (20 - k, 30)]
    assert all(torch.allclose(v.sum(), x.sum()) for v in views[1:5])  # exact shifts: the pixel is not smeared
    ramp = torch.linspace(-1, 1, 64).repeat(64, 1)[None, None]  # centre value 0, grows to the right
    zoom_out, zoom_in = tta_views(ramp, "shift")[5:]
    # magnifying (1.03) brings values from nearer the centre out to a pixel; shrinking (0.95), from farther out
    assert zoom_in[0, 0, 32, 48] < ramp[0, 0, 32, 48] < zoom_out[0, 0, 32, 48]
    assert torch.equal(tta_views(x, "flip")[1], x.flip(-1)) and tta_views(x, "none") == [x]
    with pytest.raises(ValueError, match="tta='rotate': supported: none, flip, shift"):
        tta_views(x, "rotate")


def test_tta_probs_average_the_softmax_of_every_view():
    import torch

    from koa_ray.data.tta import tta_probs, tta_views

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 5)).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tta_probs(model, x, "none"), torch.softmax(model(x), 1))
        want = torch.stack([torch.softmax(model(v), 1) for v in tta_views(x, "shift")]).mean(0)
        got = tta_probs(model, x, "shift")
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got.sum(1), torch.ones(3))
    assert not torch.allclose(got, tta_probs(model, x, "none"), atol=1e-4)
