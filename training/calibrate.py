"""Temperature scaling: make the shipped model's scores mean what they say, without changing its decisions.

Distillation from tempered teachers and label smoothing leave a network under-confident (a clearly happy
face at 0.55). One scalar T, fitted by minimising the negative log-likelihood of validation labels, rescales
the logits (softmax(z / T)); the argmax, hence accuracy, is unchanged. T is folded into the weights of the
final ``probs`` Dense layer before int8 conversion, so the daemon needs no code for it.
"""
from __future__ import annotations

import numpy as np


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits."""
    return np.exp(_log_softmax(z))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels ``y`` under softmax(logits / temperature)."""
    lp = _log_softmax(np.asarray(logits, np.float64) / temperature)
    return float(-lp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The temperature in [lo, hi] that minimises :func:`nll`.

    The NLL is convex in the inverse temperature, so a golden-section search on it finds the optimum.
    """
    f = lambda beta: nll(logits, y, 1.0 / beta)  # noqa: E731
    a, b = 1.0 / hi, 1.0 / lo
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(2.0 / (a + b))


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: the gap between confidence and accuracy, averaged over confidence bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    hit = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            gap += m.sum() * abs(hit[m].mean() - conf[m].mean())
    return float(gap / max(len(y), 1))


def calibration_metrics(probs: np.ndarray, y: np.ndarray) -> dict:
    """ECE, NLL and mean top-1 confidence of probabilities ``probs`` for labels ``y``."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1.0)
    return {"ece": round(ece(p, y), 4),
            "nll": round(float(-np.log(p[np.arange(len(y)), y]).mean()), 4),
            "mean_confidence": round(float(p.max(1).mean()), 4)}


def reliability_bins(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict]:
    """Per top-1-score bin of width 1/bins: face count, mean score and accuracy (the reliability diagram's data)."""
    conf, hit = probs.max(1), probs.argmax(1) == y
    idx = np.clip((conf * bins).astype(int), 0, bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append({"from": round(b / bins, 3), "to": round((b + 1) / bins, 3), "n": int(sel.sum()),
                        "mean_score": round(float(conf[sel].mean()), 4), "accuracy": round(float(hit[sel].mean()), 4)})
    return out


def crossfit_ece(logits: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """ECE with T fitted on one half of the data and measured on the other (both ways, averaged).

    T is fitted on the same split that reports the figures; this is the figure without that advantage.
    """
    idx = np.random.default_rng(seed).permutation(len(y))
    halves = (idx[: len(y) // 2], idx[len(y) // 2:])
    out = []
    for fit, test in (halves, halves[::-1]):
        t = fit_temperature(logits[fit], y[fit])
        out.append(ece(softmax(logits[test] / t), y[test]))
    return round(float(np.mean(out)), 4)


def head_logits(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Pre-softmax logits of a Keras model whose last layer is the ``probs`` Dense(softmax) layer."""
    from training.tfenv import keras

    head = model.get_layer("probs")
    feats = keras.Model(model.inputs, head.input).predict(x, batch_size=batch, verbose=0)
    kernel, bias = head.get_weights()
    return feats.astype(np.float64) @ kernel + bias


def fold_temperature(model, temperature: float) -> None:
    """Divide the ``probs`` layer's kernel and bias by T in place: its softmax becomes softmax(z / T)."""
    head = model.get_layer("probs")
    kernel, bias = head.get_weights()
    head.set_weights([kernel / temperature, bias / temperature])
