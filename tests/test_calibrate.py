"""Temperature scaling and calibration metrics (numpy only: runs without the train extra)."""
from __future__ import annotations

import numpy as np

from training.calibrate import (calibration_metrics, crossfit_ece, ece, fit_temperature, nll, reliability_bins,
                               softmax)


def sampled(n: int = 6000, seed: int = 0):
    """Logits whose softmax is the true label distribution (a perfectly calibrated model), and labels drawn from it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, 7))
    p = softmax(z)
    y = np.array([rng.choice(7, p=row) for row in p])
    return z, y


def test_fit_temperature_recovers_the_scale_of_over_and_under_confident_logits():
    z, y = sampled()
    assert abs(fit_temperature(z, y) - 1.0) < 0.1
    assert abs(fit_temperature(3.0 * z, y) - 3.0) < 0.3  # over-confident: T > 1 softens
    assert abs(fit_temperature(0.5 * z, y) - 0.5) < 0.05  # under-confident (as after distillation): T < 1 sharpens
    t = fit_temperature(0.5 * z, y)
    assert nll(0.5 * z, y, t) < nll(0.5 * z, y, 1.0)
    assert nll(0.5 * z, y, t) <= min(nll(0.5 * z, y, t * 1.05), nll(0.5 * z, y, t / 1.05))


def test_ece_is_the_confidence_accuracy_gap():
    y = np.zeros(10, int)
    probs = np.full((10, 7), 0.1 / 6)
    probs[:, 0] = 0.9
    assert abs(ece(probs, y) - 0.1) < 1e-9  # all right at confidence 0.9: under-confident by 0.1
    y[0] = 3  # now 9 of 10 right at confidence 0.9: calibrated
    assert ece(probs, y) < 1e-9
    y[:5] = 3  # 5 of 10 right at 0.9: gap 0.4
    assert abs(ece(probs, y) - 0.4) < 1e-9


def test_scaling_an_under_confident_model_lowers_ece_without_changing_decisions():
    z, y = sampled(seed=1)
    soft = 0.5 * z
    t = fit_temperature(soft, y)
    before, after = calibration_metrics(softmax(soft), y), calibration_metrics(softmax(soft / t), y)
    assert before["ece"] > 0.05 and after["ece"] < 0.03 and after["nll"] < before["nll"]
    assert after["mean_confidence"] > before["mean_confidence"]
    assert (softmax(soft / t).argmax(1) == softmax(soft).argmax(1)).all()
    assert crossfit_ece(soft, y) < 0.04


def test_reliability_bins_count_every_face_once_and_measure_accuracy_per_bin():
    probs = np.array([[0.95, 0.05], [0.92, 0.08], [0.55, 0.45], [0.3, 0.7], [0.5, 0.5]])
    y = np.array([0, 1, 0, 1, 1])
    rows = reliability_bins(probs, y, bins=10)
    assert sum(r["n"] for r in rows) == len(y)
    by_bin = {r["from"]: r for r in rows}
    assert by_bin[0.9]["n"] == 2 and by_bin[0.9]["accuracy"] == 0.5 and abs(by_bin[0.9]["mean_score"] - 0.935) < 1e-9
    assert by_bin[0.5]["n"] == 2 and by_bin[0.5]["accuracy"] == 0.5  # 0.55 right, the 0.5 tie goes to class 0: wrong
    assert by_bin[0.7]["n"] == 1 and by_bin[0.7]["accuracy"] == 1.0
