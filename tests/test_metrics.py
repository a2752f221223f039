"""Tests for koa_ray.metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

import koa_ray.metrics as koa_metrics
from koa_ray.metrics import (
    METRIC_KEYS,
    classification_metrics,
    confusion_matrix,
    expected_grade,
    quadratic_weighted_kappa,
)

K = 5
LABELS = list(range(K))


def _sklearn_reference(y_true, y_pred):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average=None, zero_division=0)
        mp, mr, mf, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=LABELS, average="macro", zero_division=0
        )
        return {
            "accuracy": skm.accuracy_score(y_true, y_pred),
            "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
            "macro_precision": mp,
            "macro_recall": mr,
            "macro_f1": mf,
            "qwk": skm.cohen_kappa_score(y_true, y_pred, labels=LABELS, weights="quadratic"),
            "mae": skm.mean_absolute_error(y_true, y_pred),
            "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=LABELS),
            "per_class": (p, r, f, s),
        }


def _assert_matches_sklearn(y_true, y_pred):
    got = classification_metrics(y_true, y_pred, num_classes=K)
    ref = _sklearn_reference(y_true, y_pred)
    assert got["n"] == len(y_true)
    for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "qwk", "mae"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    np.testing.assert_array_equal(got["confusion_matrix"], ref["confusion_matrix"])
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred, K), ref["confusion_matrix"])
    p, r, f, s = ref["per_class"]
    for k in range(K):
        row = got["per_class"][str(k)]
        assert row["precision"] == pytest.approx(p[k], abs=1e-12)
        assert row["recall"] == pytest.approx(r[k], abs=1e-12)
        assert row["f1"] == pytest.approx(f[k], abs=1e-12)
        assert row["support"] == s[k]
    assert quadratic_weighted_kappa(y_true, y_pred, K) == pytest.approx(ref["qwk"], abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_random_predictions_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y_true = rng.integers(0, K, n)
    # Mix of noisy-correct and random predictions, so kappa is neither ~0 nor 1.
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, K, n))
    y_pred = np.clip(y_pred + rng.integers(-1, 2, n) * (rng.random(n) < 0.3), 0, K - 1)
    _assert_matches_sklearn(y_true, y_pred)


@pytest.mark.parametrize("seed", range(4))
def test_missing_classes_match_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    y_true = rng.choice([0, 1, 2], 60)  # grades 3 and 4 never occur in the truth
    y_pred = rng.choice([0, 2, 4], 60)  # grades 1 and 3 are never predicted
    _assert_matches_sklearn(y_true, y_pred)
    got = classification_metrics(y_true, y_pred)
    assert got["per_class"]["3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert got["per_class"]["1"]["precision"] == 0.0
    recalls = [got["per_class"][str(k)]["recall"] for k in (0, 1, 2)]
    assert got["balanced_accuracy"] == pytest.approx(np.mean(recalls))


def test_perfect_predictions():
    y = np.array([0, 1, 2, 3, 4, 4, 2])
    got = classification_metrics(y, y)
    assert got["qwk"] == 1.0
    assert got["accuracy"] == got["balanced_accuracy"] == got["macro_f1"] == 1.0
    assert got["mae"] == 0.0


def test_qwk_hand_computed():
    # y_true = [0, 1, 2], y_pred = [0, 2, 2], K = 3, W_ij = (i - j)^2 / (K - 1)^2 = (i - j)^2 / 4
    # O = [[1,0,0],[0,0,1],[0,0,1]]  -> sum(W*O) = W_12 = 1/4
    # rows r = [1,1,1], cols c = [1,0,2], n = 3 -> every row of E = r c^T / n is [1/3, 0, 2/3]
    # sum(W*E) = (0 + 1*2/3) + (1/4*1/3 + 1/4*2/3) + (1*1/3 + 0) = 2/3 + 1/4 + 1/3 = 5/4
    # kappa = 1 - (1/4) / (5/4) = 0.8   (unused grades 3, 4 change nothing for K = 5)
    assert quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], num_classes=3) == pytest.approx(0.8)
    assert quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], num_classes=5) == pytest.approx(0.8)
    # Fully reversed order on 5 grades: kappa = -1.
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [4, 3, 2, 1, 0]) == pytest.approx(-1.0)


def test_qwk_degenerate_single_grade_is_one():
    # Expected disagreement is 0 (one grade everywhere, always right): defined as 1.0.
    assert quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]) == 1.0
    assert classification_metrics([2, 2, 2], [2, 2, 2])["qwk"] == 1.0
    # Constant prediction over several true grades is chance-level: 0.
    assert quadratic_weighted_kappa([0, 1, 2, 3], [2, 2, 2, 2]) == pytest.approx(0.0)


def test_output_is_json_serialisable_with_exact_keys():
    rng = np.random.default_rng(0)
    got = classification_metrics(rng.integers(0, K, 50), rng.integers(0, K, 50))
    assert tuple(got) == METRIC_KEYS
    assert list(got["per_class"]) == ["0", "1", "2", "3", "4"]
    assert set(got["per_class"]["0"]) == {"precision", "recall", "f1", "support"}
    assert isinstance(got["n"], int) and isinstance(got["per_class"]["4"]["support"], int)
    assert all(isinstance(v, int) for row in got["confusion_matrix"] for v in row)
    assert json.loads(json.dumps(got)) == got


def test_mae_in_grades():
    got = classification_metrics([0, 4, 2, 1], [1, 2, 2, 1])
    assert got["mae"] == pytest.approx((1 + 2 + 0 + 0) / 4)


def test_probs_and_expected_grade():
    probs = np.array([[0.7, 0.2, 0.1, 0.0, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_allclose(expected_grade(probs), [0.4, 3.0])
    assert expected_grade(probs[1]) == pytest.approx(3.0)
    from_probs = classification_metrics([0, 3], probs=probs)
    assert from_probs == classification_metrics([0, 3], [0, 4])
    with pytest.raises(ValueError, match="probs"):
        classification_metrics([0, 3], probs=probs[:, :3])
    with pytest.raises(ValueError, match="y_pred or probs"):
        classification_metrics([0, 3])
    with pytest.raises(ValueError):
        expected_grade(np.zeros((2, 2, 5)))


@pytest.mark.parametrize(
    "y_true, y_pred, match",
    [
        ([0, 1], [0], "same length"),
        ([0, 5], [0, 1], "outside"),
        ([0, -1], [0, 1], "outside"),
        ([0, 1.5], [0, 1], "integer"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([], [], "empty"),
    ],
)
def test_validation(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, y_pred)


def test_integral_float_labels_accepted():
    got = classification_metrics(np.array([0.0, 1.0, 4.0]), [0, 1, 3])
    assert got["accuracy"] == pytest.approx(2 / 3)


def test_module_imports_neither_torch_nor_sklearn():
    # Load the file on its own so imports added to koa_ray/__init__.py do not matter.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('koa_metrics', {koa_metrics.__file__!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(any(m in sys.modules for m in ('torch', 'sklearn')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_decode_grades_argmax_and_expected():
    from koa_ray.metrics import decode_grades

    p = np.array([[0.5, 0.0, 0.0, 0.0, 0.5],  # argmax 0 (first max), expected 2
                  [0.1, 0.6, 0.3, 0.0, 0.0],  # argmax 1, expected 1.2 -> 1
                  [0.0, 0.0, 0.0, 0.4, 0.6]])  # argmax 4, expected 3.6 -> 4
    assert decode_grades(p, "argmax").tolist() == [0, 1, 4]
    assert decode_grades(p, "expected").tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match="supported: argmax, expected"):
        decode_grades(p, "mode")
