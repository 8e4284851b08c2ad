"""FER-2013 loaders: Kaggle folder layout and the original fer2013.csv, decoded once and cached.

Both loaders return uint8 arrays of shape (N, 48, 48) and int labels in FER-2013's canonical order
(``FER_LABELS``). Bad input raises ``DataError`` naming the file or row, unless ``skip_bad`` is set, in
which case bad items are skipped and counted (never silently).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

# FER-2013's label ids, in the original CSV's order (0..6).
FER_LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
IMAGE_SIZE = 48
_SYNONYMS = {
    "angry": ["angry", "anger", "mad"],
    "disgust": ["disgust", "disgusted", "disgusting"],
    "fear": ["fear", "fearful", "afraid", "scared"],
    "happy": ["happy", "happiness", "joy"],
    "sad": ["sad", "sadness"],
    "surprise": ["surprise", "surprised"],
    "neutral": ["neutral", "calm", "none"],
}
_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".webp"}


class DataError(Exception):
    """A dataset problem the user must fix; the message names the file or row."""


@dataclass
class Split:
    x: np.ndarray  # (N, 48, 48) uint8
    y: np.ndarray  # (N,) int64 in FER_LABELS order
    names: list[str] = field(default_factory=list)
    skipped: int = 0

    def counts(self) -> dict[str, int]:
        return {lab: int((self.y == i).sum()) for i, lab in enumerate(FER_LABELS)}


def canonical_label(name: str) -> str | None:
    """Map a folder/class name tolerantly (case, plural, synonyms, '0_angry') to a FER label, or None."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if "_" in key and key.split("_", 1)[0].isdigit():
        key = key.split("_", 1)[1]
    if key.isdigit() and int(key) < len(FER_LABELS):
        return FER_LABELS[int(key)]
    for label, words in _SYNONYMS.items():
        if key in words or key.rstrip("s") in words:
            return label
    return None


def _decode(path: Path, data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DataError(f"{path}: not a readable image (corrupt or unsupported format)")
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE} (FER-2013 faces)")
    return img


def load_folder_split(root: Path, skip_bad: bool = False) -> Split:
    """Load ``root/<class>/*.jpg`` (one Kaggle split). Every FER class folder must exist."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    found: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        lab = canonical_label(d.name)
        if lab is None:
            raise DataError(f"{d}: unknown class folder '{d.name}' (expected one of {', '.join(FER_LABELS)})")
        if lab in found:
            raise DataError(f"{d}: class '{lab}' appears twice ({found[lab].name} and {d.name})")
        found[lab] = d
    missing = [lab for lab in FER_LABELS if lab not in found]
    if missing:
        raise DataError(f"{root}: missing class folder(s): {', '.join(missing)}")
    xs, ys, names, bad = [], [], [], []
    for idx, lab in enumerate(FER_LABELS):
        for f in sorted(found[lab].iterdir()):
            if f.suffix.lower() not in _IMAGE_EXT:
                continue
            try:
                xs.append(_decode(f, f.read_bytes()))
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
                continue
            ys.append(idx)
            names.append(f"{lab}/{f.name}")
    if bad:
        log.warning("skipped %d bad image(s) in %s, e.g. %s", len(bad), root, bad[0])
    if not xs:
        raise DataError(f"{root}: no images found")
    return Split(np.stack(xs), np.asarray(ys, np.int64), names, len(bad))


def load_csv(path: Path, skip_bad: bool = False) -> dict[str, Split]:
    """Load the original ``fer2013.csv`` (emotion,pixels,Usage) into {'train', 'val', 'test'} splits."""
    path = Path(path)
    usage_map = {"training": "train", "publictest": "val", "privatetest": "test"}
    parts: dict[str, tuple[list, list, list]] = {}
    bad = 0
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"emotion", "pixels"}
        if not reader.fieldnames or not need <= {c.strip().lower() for c in reader.fieldnames}:
            raise DataError(f"{path}: header must contain 'emotion,pixels[,Usage]' (got {reader.fieldnames})")
        cols = {c.strip().lower(): c for c in reader.fieldnames}
        for rowno, row in enumerate(reader, start=2):
            try:
                emo = int(row[cols["emotion"]])
                if not 0 <= emo < len(FER_LABELS):
                    raise ValueError(f"emotion {emo} out of range 0..6")
                px = np.array(row[cols["pixels"]].split(), dtype=np.int32)
                if px.size != IMAGE_SIZE * IMAGE_SIZE:
                    raise ValueError(f"{px.size} pixels, expected {IMAGE_SIZE * IMAGE_SIZE}")
                if px.min() < 0 or px.max() > 255:
                    raise ValueError("pixel values outside 0..255")
                usage = usage_map.get(str(row.get(cols.get("usage", ""), "Training")).strip().lower(), None)
                if usage is None:
                    raise ValueError(f"unknown Usage '{row.get(cols.get('usage', ''))}'")
            except (ValueError, TypeError, AttributeError) as e:
                if not skip_bad:
                    raise DataError(f"{path}: row {rowno}: {e}") from None
                bad += 1
                continue
            xs, ys, ns = parts.setdefault(usage, ([], [], []))
            xs.append(px.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))
            ys.append(emo)
            ns.append(f"row{rowno}")
    if bad:
        log.warning("skipped %d malformed row(s) in %s", bad, path)
    if "train" not in parts:
        raise DataError(f"{path}: no Training rows")
    return {k: Split(np.stack(v[0]), np.asarray(v[1], np.int64), v[2], bad) for k, v in parts.items()}


def stratified_split(s: Split, frac: float, seed: int) -> tuple[Split, Split]:
    """Split off ``frac`` of each class as validation (used when no PublicTest exists)."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in range(len(FER_LABELS)):
        idx = np.flatnonzero(s.y == c)
        rng.shuffle(idx)
        val_idx.extend(idx[: max(1, int(round(len(idx) * frac)))] if len(idx) > 1 else [])
    mask = np.zeros(len(s.y), bool)
    mask[val_idx] = True
    pick = lambda m: Split(s.x[m], s.y[m], [n for n, k in zip(s.names, m) if k])  # noqa: E731
    return pick(~mask), pick(mask)


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    if path.is_file():
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                h.update(f"{root}/{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_dataset(source: str | Path, cache_dir: str | Path | None = ".cache/fer-data", val_frac: float = 0.1,
                 seed: int = 1, skip_bad: bool = False) -> dict[str, Split]:
    """Load a dataset (folder with train/[test] or a fer2013.csv) as {'train', 'val'[, 'test']} splits.

    Validation is PublicTest when present (folder ``test/`` or CSV Usage=PublicTest), else a stratified split.
    The decoded arrays are cached under ``cache_dir`` keyed by the files' names, sizes and mtimes.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: dataset not found (give the folder holding train/ and test/, or fer2013.csv)")
    cache = None
    if cache_dir:
        cache = Path(cache_dir) / f"{source.name}-{_fingerprint(source)}.npz"
        if cache.exists():
            z = np.load(cache, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            out = {k: Split(z[f"{k}_x"], z[f"{k}_y"], list(z[f"{k}_n"]), meta.get(k, 0)) for k in meta}
            log.info("loaded cached dataset %s", cache)
            return out
    if source.is_file():
        splits = load_csv(source, skip_bad)
    else:
        tr = source / "train" if (source / "train").is_dir() else source
        splits = {"train": load_folder_split(tr, skip_bad)}
        for name in ("test", "val", "validation", "publictest"):
            if (source / name).is_dir():
                splits["val"] = load_folder_split(source / name, skip_bad)
                break
    if "val" not in splits:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_frac, seed)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for k, s in splits.items():
            arrays.update({f"{k}_x": s.x, f"{k}_y": s.y, f"{k}_n": np.asarray(s.names)})
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, meta=json.dumps({k: s.skipped for k, s in splits.items()}), **arrays)
        os.replace(tmp, cache)
    return splits


def sharpness(x: np.ndarray) -> float:
    """Median variance of the Laplacian over faces (N, H, W): a blur measure, lower = blurrier."""
    if len(x) == 0:
        return 0.0
    idx = np.linspace(0, len(x) - 1, min(len(x), 3000)).astype(int)  # a sample is enough, and fast
    return float(np.median([cv2.Laplacian(x[i], cv2.CV_32F).var() for i in idx]))


# Faithful FER-2013 train and PublicTest both have a median near 2,100 (training.train prints them); a 3x3
# Gaussian blur of the training faces drops it to ~320, 5x5 to ~140. Train below this fraction of the
# validation faces is a blurred copy (a widely mirrored one is): models trained on it fail on real faces.
BLUR_RATIO = 0.4


def check_sharpness(splits: dict[str, Split]) -> dict[str, float]:
    """Refuse a training set much blurrier than its validation set (DataError); returns the medians."""
    med = {k: round(sharpness(s.x), 1) for k, s in splits.items()}
    tr, va = med.get("train", 0.0), med.get("val", 0.0)
    if va > 0 and tr < BLUR_RATIO * va:
        raise DataError(
            f"training faces are much blurrier than the validation faces (median Laplacian variance {tr:.0f} vs "
            f"{va:.0f}): this looks like a blurred copy of FER-2013, and a model trained on it scores near chance "
            "on real camera faces. Use the original fer2013.csv or a faithful folder copy "
            "(--allow-blurry trains anyway)")
    return med
