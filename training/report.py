"""Model report images drawn with OpenCV (no plotting dependency).

confusion.png (row-normalised), curves.png (loss/accuracy per epoch from history.csv),
reliability.png (accuracy against confidence: how far a score can be taken at its word),
misclassified.jpg (a grid of wrong predictions), gradcam.jpg (Grad-CAM heatmaps of the float model
over a few faces per class), metrics.json.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np

from .data import FER_LABELS

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def confusion_png(cm: np.ndarray, labels: list[str], path: Path, cell: int = 70) -> None:
    n = len(labels)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    left, top = 110, 60
    img = np.full((top + n * cell + 90, left + n * cell + 20, 3), 255, np.uint8)
    for i in range(n):
        for j in range(n):
            v = norm[i, j]
            color = tuple(int(c) for c in cv2.applyColorMap(np.uint8([[int(v * 255)]]), cv2.COLORMAP_BLUES
                                                              if hasattr(cv2, "COLORMAP_BLUES") else cv2.COLORMAP_VIRIDIS)[0, 0])
            x0, y0 = left + j * cell, top + i * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), color, -1)
            txt_color = BLACK if sum(color) > 380 else WHITE
            cv2.putText(img, f"{v:.2f}", (x0 + 12, y0 + cell // 2 + 6), FONT, 0.55, txt_color, 1, cv2.LINE_AA)
        cv2.putText(img, labels[i], (5, top + i * cell + cell // 2 + 6), FONT, 0.5, BLACK, 1, cv2.LINE_AA)
        cv2.putText(img, labels[i][:7], (left + i * cell + 4, top + n * cell + 20), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
    cv2.putText(img, "true (rows) vs predicted (columns), row-normalised", (10, 30), FONT, 0.55, BLACK, 1, cv2.LINE_AA)
    cv2.putText(img, "predicted", (left + n * cell // 2 - 40, top + n * cell + 50), FONT, 0.5, BLACK, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def curves_png(history_csv: Path | list[Path], path: Path, w: int = 900, h: int = 360) -> None:
    """Loss and accuracy per epoch; several history files are training cycles, drawn one after the other."""
    rows, starts = [], []
    for hist in [history_csv] if isinstance(history_csv, (str, Path)) else history_csv:
        cycle = list(csv.DictReader(open(hist)))
        offset = len(rows)
        starts.append(offset + 1)
        rows += [dict(r, epoch=int(r["epoch"]) + offset) for r in cycle]
    if not rows:
        return
    ep = np.array([int(r["epoch"]) for r in rows])
    img = np.full((h, w, 3), 255, np.uint8)
    panels = [("loss", ["loss", "val_loss"]), ("accuracy", ["accuracy", "val_accuracy"])]
    colors = [(200, 80, 0), (0, 120, 255)]
    pw = w // 2
    for k, (title, keys) in enumerate(panels):
        x0, y0, x1, y1 = k * pw + 50, 40, (k + 1) * pw - 20, h - 40
        vals = np.array([[float(r[key]) for r in rows] for key in keys])
        lo, hi = float(vals.min()), float(vals.max())
        hi = hi if hi > lo else lo + 1
        cv2.rectangle(img, (x0, y0), (x1, y1), BLACK, 1)
        cv2.putText(img, title, (x0, 25), FONT, 0.6, BLACK, 1, cv2.LINE_AA)
        cv2.putText(img, f"{hi:.3f}", (x0 - 48, y0 + 5), FONT, 0.35, BLACK, 1, cv2.LINE_AA)
        cv2.putText(img, f"{lo:.3f}", (x0 - 48, y1), FONT, 0.35, BLACK, 1, cv2.LINE_AA)
        cv2.putText(img, f"epoch 1..{ep.max()}", (x1 - 90, y1 + 20), FONT, 0.4, BLACK, 1, cv2.LINE_AA)
        for s in starts[1:]:  # a new training cycle (--init) starts here
            xs = int(x0 + (s - ep.min()) / max(ep.max() - ep.min(), 1) * (x1 - x0))
            cv2.line(img, (xs, y0), (xs, y1), (160, 160, 160), 1, cv2.LINE_AA)
            cv2.putText(img, f"cycle {starts.index(s) + 1}", (xs + 4, y1 - 8), FONT, 0.4, (120, 120, 120), 1,
                        cv2.LINE_AA)
        for series, key, color in zip(vals, keys, colors):
            xs = x0 + (ep - ep.min()) / max(ep.max() - ep.min(), 1) * (x1 - x0)
            ys = y1 - (series - lo) / (hi - lo) * (y1 - y0)
            pts = np.stack([xs, ys], 1).astype(np.int32)
            cv2.polylines(img, [pts], False, color, 2, cv2.LINE_AA)
            cv2.putText(img, key, (x0 + 8, y0 + 18 + 18 * keys.index(key)), FONT, 0.45, color, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def reliability_png(probs: np.ndarray, y: np.ndarray, path: Path, bins: int = 10, size: int = 420) -> None:
    """Reliability diagram: per confidence bin, the accuracy (bars) against the diagonal of perfect calibration."""
    from .calibrate import ece, reliability_bins

    conf, hit = probs.max(1), probs.argmax(1) == y
    m, top = 50, 50
    img = np.full((size + top + 50, size + 2 * m, 3), 255, np.uint8)
    x0, y0, x1, y1 = m, top, m + size, top + size
    bw = size / bins
    for row in reliability_bins(probs, y, bins):
        b = int(round(row["from"] * bins))
        xa, xb = int(x0 + b * bw) + 2, int(x0 + (b + 1) * bw) - 2
        cv2.rectangle(img, (xa, int(y1 - row["accuracy"] * size)), (xb, y1), (200, 140, 60), -1)
        cv2.putText(img, str(row["n"]), (xa, y1 + 14 + 12 * (b % 2)), FONT, 0.33, (90, 90, 90), 1, cv2.LINE_AA)
    cv2.line(img, (x0, y1), (x1, y0), (0, 0, 200), 1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y0), (x1, y1), BLACK, 1)
    for v in (0.0, 0.5, 1.0):
        cv2.putText(img, f"{v:.1f}", (x0 - 30, int(y1 - v * size) + 4), FONT, 0.35, BLACK, 1, cv2.LINE_AA)
    cv2.putText(img, f"accuracy vs confidence (ECE {ece(probs, y):.3f}, mean conf {conf.mean():.2f}, "
                     f"acc {hit.mean():.2f})", (10, 25), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
    cv2.putText(img, "top-1 score (faces per bin below); red: perfect calibration", (x0, y1 + 42), FONT, 0.4, BLACK,
                1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def grid_png(faces, captions, path: Path, cols: int = 10, scale: int = 2) -> None:
    if not len(faces):  # e.g. no misclassified face: say so rather than leave a stale or missing image
        img = np.full((60, 320, 3), 255, np.uint8)
        cv2.putText(img, "none", (10, 38), FONT, 0.8, BLACK, 2, cv2.LINE_AA)
        cv2.imwrite(str(path), img)
        return
    s = faces[0].shape[0] * scale
    rows = (len(faces) + cols - 1) // cols
    img = np.full((rows * (s + 30), cols * s, 3), 255, np.uint8)
    for k, (f, cap) in enumerate(zip(faces, captions)):
        r, c = divmod(k, cols)
        tile = cv2.resize(f, (s, s), interpolation=cv2.INTER_NEAREST)
        img[r * (s + 30): r * (s + 30) + s, c * s:(c + 1) * s] = tile if tile.ndim == 3 else tile[..., None]
        for line, txt in enumerate(cap.split("\n")[:2]):
            cv2.putText(img, txt, (c * s + 2, r * (s + 30) + s + 12 + 12 * line), FONT, 0.33, BLACK, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def gradcam(model, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] for ``classes`` over the last convolutional block."""
    from .tfenv import keras, tf

    conv = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)][-1]
    sub = keras.Model(model.inputs, [conv.output, model.output])
    xt = tf.convert_to_tensor(x[..., None].astype(np.float32) / 255.0)
    with tf.GradientTape() as tape:
        fmap, probs = sub(xt, training=False)
        score = tf.gather(probs, classes, axis=1, batch_dims=1)
    grads = tape.gradient(score, fmap)
    w = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(w * fmap, axis=-1)).numpy()
    out = np.stack([cv2.resize(c, (x.shape[2], x.shape[1]), interpolation=cv2.INTER_CUBIC) for c in cam])
    out -= out.min(axis=(1, 2), keepdims=True)
    return out / np.maximum(out.max(axis=(1, 2), keepdims=True), 1e-8)


def write_report(out: Path, split, probs: np.ndarray, m: dict, float_model: str | None = None,
                 history_csv: Path | list[Path] | None = None, per_class: int = 3) -> None:
    """Write metrics.json and the report PNGs for one evaluated split."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    confusion_png(np.array(m["confusion"]), FER_LABELS, out / "confusion.png")
    reliability_png(probs, split.y, out / "reliability.png")
    hists = [history_csv] if isinstance(history_csv, (str, Path)) else list(history_csv or [])
    hists = [Path(p) for p in hists if Path(p).exists()]
    if hists:
        curves_png(hists, out / "curves.png")
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != split.y)
    pick = np.random.default_rng(0).permutation(wrong)[:40]
    grid_png([split.x[i] for i in pick],
             [f"true {FER_LABELS[split.y[i]][:7]}\npred {FER_LABELS[pred[i]][:7]} {probs[i, pred[i]]:.2f}" for i in pick],
             out / "misclassified.jpg")
    if float_model:
        from .tfenv import keras

        model = keras.models.load_model(float_model, compile=False)
        idx = []
        for c in range(len(FER_LABELS)):
            # correctly classified faces first; a weak model may have none of a class, then any of its faces
            hits = np.flatnonzero((split.y == c) & (pred == c))
            rest = np.flatnonzero((split.y == c) & (pred != c))
            idx.extend(np.concatenate([hits, rest])[:per_class])
        idx = np.array(idx, dtype=np.int64)
        cams = gradcam(model, split.x[idx], split.y[idx])
        tiles, caps = [], []
        for i, cam in zip(idx, cams):
            face = cv2.cvtColor(split.x[i], cv2.COLOR_GRAY2BGR)
            heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
            tiles += [face, cv2.addWeighted(face, 0.55, heat, 0.45, 0)]
            caps += [FER_LABELS[split.y[i]], "grad-cam"]
        grid_png(tiles, caps, out / "gradcam.jpg", cols=2 * per_class, scale=2)
