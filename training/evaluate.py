"""Evaluate a model bundle through the daemon's own code path (edge.preprocess + edge.classify).

    python -m training.evaluate --model edge/models/fer_emotion.tflite --data ../shared/data/fer2013 [--report DIR]

FER-2013 faces are already framed; each goes through ``edge.preprocess.crop_face`` with the box that
the manifest's margin maps back onto the whole image, then ``Classifier.predict`` in batches, so the
figures here are exactly what the device computes for a face framed like FER-2013.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge.classify import ModelError, load_classifier
from edge.preprocess import crop_face, inner_box

from .calibrate import calibration_metrics, reliability_bins
from .data import FER_LABELS, DataError, load_dataset


def predict_split(clf, x: np.ndarray, batch: int = 64, flip_average: bool = False) -> np.ndarray:
    """Probabilities for uint8 faces (N, 48, 48) via the daemon's preprocess and classifier."""
    size, margin = clf.input_size, clf.margin
    box = inner_box(x.shape[1], margin)
    out = []
    for i in range(0, len(x), batch):
        faces = np.stack([crop_face(img, box, size, margin) for img in x[i : i + batch]])
        out.append(clf.predict(faces, flip_average=flip_average))
    return np.concatenate(out)


def metrics(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1, macro F1 and the row-normalised confusion matrix."""
    n = len(labels)
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (y, pred), 1)
    per = {}
    for i, lab in enumerate(labels):
        tp = cm[i, i]
        p = tp / max(cm[:, i].sum(), 1)
        r = tp / max(cm[i].sum(), 1)
        per[lab] = {"precision": round(float(p), 4), "recall": round(float(r), 4),
                    "f1": round(float(2 * p * r / max(p + r, 1e-12)), 4), "support": int(cm[i].sum())}
    return {"accuracy": round(float((y == pred).mean()), 4), "n": int(len(y)),
            "macro_f1": round(float(np.mean([v["f1"] for v in per.values()])), 4),
            "per_class": per, "confusion": cm.tolist()}


def evaluate_bundle(model: str | Path, x: np.ndarray, y: np.ndarray, threads: int = 1,
                    flip_average: bool = False) -> tuple[dict, np.ndarray]:
    """Metrics (with calibration: ECE, NLL) of a bundle on FER-ordered labels ``y``; labels are mapped by name."""
    clf = load_classifier(model, threads)
    probs = predict_split(clf, x, flip_average=flip_average)
    order = [clf.labels.index(lab) for lab in FER_LABELS]  # model output order -> FER order
    probs = probs[:, order]
    m = metrics(y, probs.argmax(1), FER_LABELS)
    m["calibration"] = calibration_metrics(probs, y)
    return m, probs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model .tflite (default: the bundled one)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", help="val (PublicTest) or test (PrivateTest, CSV only)")
    p.add_argument("--report", default="", help="write report files (metrics.json, PNGs) to this folder")
    p.add_argument("--float-model", default="", help="Keras .h5 of the float model, for Grad-CAM in the report")
    p.add_argument("--history", nargs="+", default=[],
                   help="training history.csv, for the curves in the report (several: cycles, in order)")
    p.add_argument("--flip-average", action="store_true",
                   help="as the daemon with model.flip_average = true: average each face with its mirror image")
    p.add_argument("--cache-dir", default=".cache/fer-data", help="decoded-dataset cache (as training.train)")
    a = p.parse_args(argv)
    try:
        if a.float_model and not Path(a.float_model).is_file():
            raise DataError(f"--float-model {a.float_model}: file not found")
        splits = load_dataset(a.data, cache_dir=a.cache_dir)
        if a.split not in splits:
            raise DataError(f"--split {a.split}: this dataset has {', '.join(splits)} (PrivateTest, 'test', is only "
                            f"in fer2013.csv)")
        s = splits[a.split]
        m, probs = evaluate_bundle(a.model, s.x, s.y, flip_average=a.flip_average)
    except (DataError, ModelError) as e:
        print(f"training.evaluate: {e}", file=sys.stderr)
        return 2
    m["flip_average"] = a.flip_average
    m["reliability"] = reliability_bins(probs, s.y)  # the reliability diagram's data: score vs accuracy per bin
    # the figure with model.flip_average = true beside the plain one, for the model card
    m["flip_average_accuracy"] = m["accuracy"] if a.flip_average else \
        evaluate_bundle(a.model, s.x, s.y, flip_average=True)[0]["accuracy"]
    print(json.dumps({k: v for k, v in m.items() if k != "confusion"}, indent=1))
    if a.report:
        from .report import write_report

        write_report(Path(a.report), s, probs, m, float_model=a.float_model or None, history_csv=a.history)
        print(f"report written to {a.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
