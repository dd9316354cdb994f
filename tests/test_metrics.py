"""The edge's numpy metrics equal values computed by hand, and keep their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime import metrics

# labels / predictions:  TP = 3, FN = 1, FP = 1, TN = 1
BINARY_LABELS = np.array([1, 1, 1, 1, 0, 0])
BINARY_PREDICTIONS = np.array([1, 1, 1, 0, 0, 1])

# confusion rows (true) [1 1 0] [0 2 0] [1 0 1]
MULTI_LABELS = np.array([0, 0, 1, 1, 2, 2])
MULTI_PREDICTIONS = np.array([0, 1, 1, 1, 2, 0])


def test_binary_metrics_by_hand():
    assert metrics.accuracy(BINARY_LABELS, BINARY_PREDICTIONS) == pytest.approx(4 / 6)
    assert metrics.binary_f1(BINARY_LABELS, BINARY_PREDICTIONS) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # class 0: TP 1, FP 1, FN 1 → 2/4; class 1: 6/8
    assert metrics.macro_f1(BINARY_LABELS, BINARY_PREDICTIONS, num_classes=2) == pytest.approx((1 / 2 + 3 / 4) / 2)
    # phi = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 − 1) / sqrt(4·4·2·2)
    assert metrics.matthews_corrcoef(BINARY_LABELS, BINARY_PREDICTIONS, num_classes=2) == pytest.approx(0.25)


def test_multiclass_metrics_by_hand():
    assert metrics.confusion_matrix(MULTI_LABELS, MULTI_PREDICTIONS, num_classes=3).tolist() == [
        [1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics.accuracy(MULTI_LABELS, MULTI_PREDICTIONS) == pytest.approx(4 / 6)
    # per-class F1 = 2·TP / (column sum + row sum): 2/4, 4/5, 2/3
    assert metrics.macro_f1(MULTI_LABELS, MULTI_PREDICTIONS, num_classes=3) == pytest.approx(59 / 90)
    # (c·s − p·t) / sqrt((s² − p·p)(s² − t·t)) with c 4, s 6, p (2, 3, 1), t (2, 2, 2)
    expected = (4 * 6 - 12) / math.sqrt((36 - 14) * (36 - 12))
    assert metrics.matthews_corrcoef(MULTI_LABELS, MULTI_PREDICTIONS, num_classes=3) == pytest.approx(expected)


def test_macro_f1_ignores_classes_absent_from_labels_and_predictions():
    labels, predictions = np.array([0, 0, 1]), np.array([0, 1, 1])
    assert metrics.macro_f1(labels, predictions, num_classes=5) == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_degenerate_cases_follow_scikit_learn():
    zeros = np.zeros(4, dtype=int)
    assert metrics.binary_f1(zeros, zeros) == 0.0
    assert metrics.matthews_corrcoef(zeros, zeros, num_classes=2) == 0.0
    assert metrics.matthews_corrcoef(np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0]), num_classes=2) == pytest.approx(-1.0)
    assert math.isnan(metrics.pearson(np.ones(3), np.arange(3.0)))


def test_correlations_by_hand():
    x, y = np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 5, 9])
    assert metrics.pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    assert metrics.rank(np.array([3.0, 1, 4, 1, 5])).tolist() == [3, 1.5, 4, 1.5, 5]
    # ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4)
    assert metrics.spearman(np.array([1.0, 2, 2, 3]), np.array([10.0, 20, 30, 40])) == pytest.approx(math.sqrt(0.9))


def test_report_picks_the_task_from_the_head_width():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]], dtype=np.float32)
    report = metrics.report(np.array([0, 1, 1, 0]), logits)
    assert report == pytest.approx({"accuracy": 0.75, "f1": 2 / 3, "macro_f1": (2 / 3 + 0.8) / 2,
                                    "mcc": 1 / math.sqrt(3)})
    regression = metrics.report(np.array([1.0, 2, 3]), np.array([[1.5], [2.0], [2.0]], dtype=np.float32))
    assert regression["mse"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert regression["pearson"] == pytest.approx(math.sqrt(0.75))
    assert regression["spearman"] == pytest.approx(math.sqrt(0.75))
    with pytest.raises(ValueError, match="do not match"):
        metrics.report(np.array([0, 1]), logits)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=40))
def test_binary_mcc_is_the_phi_coefficient(pairs):
    labels = np.array([a for a, _ in pairs], dtype=int)
    predictions = np.array([b for _, b in pairs], dtype=int)
    tp = int(np.sum((labels == 1) & (predictions == 1)))
    tn = int(np.sum((labels == 0) & (predictions == 0)))
    fp = int(np.sum((labels == 0) & (predictions == 1)))
    fn = int(np.sum((labels == 1) & (predictions == 0)))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    expected = (tp * tn - fp * fn) / denominator if denominator else 0.0
    assert metrics.matthews_corrcoef(labels, predictions, num_classes=2) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=3, max_size=30, unique=True))
def test_spearman_is_invariant_under_monotone_maps(values):
    x = np.array(values, dtype=np.float64)
    assert metrics.spearman(x, np.exp(x / 500)) == pytest.approx(1.0)
    assert metrics.spearman(x, -(x ** 3)) == pytest.approx(-1.0)
    assert metrics.pearson(x, 3 * x - 7) == pytest.approx(1.0)
