"""Evaluation metrics of the GLUE tasks the paper reports, in numpy alone.

Why it exists: the edge evaluates on its own labelled test file (the labels never leave
the device) and cannot pull in scikit-learn or scipy. Accuracy and F1 (SST-2, MRPC,
QQP), Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B). Degenerate
inputs follow scikit-learn/scipy: F1 and MCC are 0 where their denominator is 0, a
correlation with a constant input is NaN.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, *, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of examples of true class ``i`` predicted as class ``j``."""
    labels, predictions = _pair(labels, predictions)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    labels, predictions = _pair(labels, predictions)
    return float(np.mean(labels == predictions))


def _f1_per_class(matrix: np.ndarray) -> np.ndarray:
    true_positive = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # 2·TP + FP + FN
    return np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)


def binary_f1(labels: np.ndarray, predictions: np.ndarray, *, positive: int = 1) -> float:
    """F1 of the positive class (MRPC, QQP)."""
    labels, predictions = _pair(labels, predictions)
    matrix = confusion_matrix(labels == positive, predictions == positive, num_classes=2)
    return float(_f1_per_class(matrix)[1])


def macro_f1(labels: np.ndarray, predictions: np.ndarray, *, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in labels or predictions."""
    matrix = confusion_matrix(labels, predictions, num_classes=num_classes)
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    return float(_f1_per_class(matrix)[present].mean())


def matthews_corrcoef(labels: np.ndarray, predictions: np.ndarray, *, num_classes: int) -> float:
    """Matthews correlation, multi-class (Gorodkin's R_K); the binary phi coefficient for 2 classes."""
    matrix = confusion_matrix(labels, predictions, num_classes=num_classes).astype(np.float64)
    n = matrix.sum()
    correct = np.trace(matrix)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    covariance = correct * n - predicted @ actual
    denominator = np.sqrt(n * n - predicted @ predicted) * np.sqrt(n * n - actual @ actual)
    return float(covariance / denominator) if denominator > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = (np.asarray(v, dtype=np.float64) for v in _pair(x, y))
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denominator) if denominator > 0 else float("nan")


def rank(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    x, y = _pair(x, y)
    return pearson(rank(x), rank(y))


def classification_report(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and MCC from ``B×C`` logits; F1 of class 1 too when there are two classes."""
    num_classes = logits.shape[1]
    predictions = np.argmax(logits, axis=1)
    report = {
        "accuracy": accuracy(labels, predictions),
        "macro_f1": macro_f1(labels, predictions, num_classes=num_classes),
        "mcc": matthews_corrcoef(labels, predictions, num_classes=num_classes),
    }
    if num_classes == 2:
        report["f1"] = binary_f1(labels, predictions)
    return report


def regression_report(targets: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation and mean squared error from ``B×1`` outputs."""
    predictions = logits.reshape(-1)
    return {
        "pearson": pearson(targets, predictions),
        "spearman": spearman(targets, predictions),
        "mse": float(np.mean((np.asarray(targets, dtype=np.float64) - predictions) ** 2)),
    }


def report(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """The metrics of the task the head's width implies: regression for one output."""
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise ValueError(f"logits of shape {logits.shape} do not match {len(labels)} labels")
    if logits.shape[1] == 1:
        return regression_report(labels, logits)
    return classification_report(labels, logits)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected two non-empty 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    return a, b
