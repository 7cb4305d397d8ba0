"""Evaluation metrics against scikit-learn and against a plain re-derivation of Vertex's auPrc."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, log_loss, roc_auc_score

from fmnist_gcp.evaluation import (VERTEX_THRESHOLDS, classification_metrics, confusion, expected_calibration_error,
                                 per_class_report, vertex_au_prc)


@pytest.fixture
def example():
    "A constructed 10-class problem: 500 images, a model that is right about 80 % of the time."
    rng = np.random.default_rng(7)
    y = rng.integers(0, 10, 500)
    logits = rng.normal(size=(500, 10)) * 1.5
    logits[np.arange(500), y] += 2.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_metrics_agree_with_scikit_learn(example):
    y, p = example
    oh = np.eye(10)[y]
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert m["log_loss"] == pytest.approx(log_loss(y, p, labels=list(range(10))))
    assert m["micro_ap"] == pytest.approx(average_precision_score(oh, p, average="micro"))
    assert m["macro_ap"] == pytest.approx(average_precision_score(oh, p, average="macro"))
    assert m["macro_roc_auc"] == pytest.approx(roc_auc_score(oh, p, average="macro"))
    rep = per_class_report(y, p)
    assert rep["ap"].to_numpy() == pytest.approx([average_precision_score(y == c, p[:, c]) for c in range(10)])
    assert rep["support"].sum() == 500 and confusion(y, p.argmax(1)).trace() == (p.argmax(1) == y).sum()


def test_au_prc_matches_a_plain_loop(example):
    y, p = example
    pts = []
    for t in VERTEX_THRESHOLDS:
        tp = fp = 0
        for i in range(len(y)):
            for c in range(10):
                if p[i, c] >= t:
                    tp += c == y[i]
                    fp += c != y[i]
        pts.append((tp / len(y), tp / (tp + fp) if tp + fp else 1.0))
    pts.reverse()  # trace the curve from the highest threshold (lowest recall) down
    pts = [(0.0, pts[0][1])] + pts
    area = sum((r2 - r1) * (p1 + p2) / 2 for (r1, p1), (r2, p2) in zip(pts, pts[1:]))
    assert vertex_au_prc(y, p) == pytest.approx(area, abs=1e-12)
    # sampling at 24 thresholds is coarser than exact AP, but close for a reasonable model
    assert abs(vertex_au_prc(y, p) - classification_metrics(y, p)["micro_ap"]) < 0.03


def test_ece_is_zero_for_a_perfectly_calibrated_toy_and_positive_for_overconfidence():
    y = np.array([0, 0, 1, 1])
    calibrated = np.array([[0.5, 0.5]] * 4)  # confidence 0.5, accuracy 0.5
    assert expected_calibration_error(y, calibrated) == pytest.approx(0.0)
    over = np.array([[0.99, 0.01]] * 4)  # confidence 0.99, accuracy 0.5
    assert expected_calibration_error(y, over) == pytest.approx(0.49)
