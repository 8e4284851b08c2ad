"""Installed emotion models on the device: state-dir layout, atomic install, active pointer, rollback,
and the validation + self-test every candidate model must pass before it may serve.

Layout under ``<device.state_dir>/models/``::

    active.json                      the pointer: active model, previous models, probation (survives reboots)
    <version>-<sha12>-<rand>/        one installed model: model.tflite + model.json (its manifest) + bundle
                                     (the signed bundle it came from, re-verified at every start)
    .tmp-<rand>/                     an install in progress (staging); removed at start-up if left behind
    inbox/                           default drop-in directory for bundles (see edge.updates)

Crash safety: a model directory is complete (files written and fsynced) before it is renamed into place,
and the pointer is replaced with one atomic rename, so a kill at any moment leaves either the old or the
new pointer, each naming complete models. Leftover staging/tmp entries and unreferenced model
directories are removed by :meth:`ModelStore.cleanup` at start-up.

"No pointer" or ``active: null`` means the base model: ``model.path`` from the config, else the bundled one.

Retention (the only ways a model's files are deleted): the pointer names the active model, up to
``keep_previous`` older ones (rollback targets) and up to ``keep_previous`` models rolled back from
("retired", newest first, at least one, kept for inspection or a re-push). An install or rollback that pushes a model
past either limit deletes that model's directory; start-up cleanup deletes directories the pointer does
not name (left by a crash). A rollback never deletes the model it leaves beyond that rule.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.classify import Classifier, ModelError
from edge.fsutil import atomic_write as _atomic_write, fsync_dir, write_durable  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

POINTER = "active.json"
POINTER_FORMAT = "fer-edge-active/1"
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "model.json"
BUNDLE_FILE = "bundle"
REQUEST_FILE = "request.json"
TMP_PREFIX = ".tmp-"
SELFTEST_PATH = Path(__file__).resolve().parent / "data" / "selftest.npz"
# Installed model directories: <safe version>-<12 hex of sha256>-<6 random chars>.
_MODEL_DIR = re.compile(r"^[A-Za-z0-9._-]+-[0-9a-f]{12}-[0-9a-z]{6}$")
# Input sizes a face crop can sensibly be resized to.
MIN_INPUT, MAX_INPUT = 16, 256
# The self-test's floor: share of the labelled reference faces (10 per class, 7 classes) a model must get
# right. Chance is 1/7 (14%); the shipped model gets 52 of 70 (74%; `fer-edge model sign MODEL --key K`
# prints it). A model below the floor reads faces wrongly (label order, normalisation or input size in its
# manifest) or is untrained. Binomial odds with 25 of 70 needed: a 69%-accurate model fails 2e-9, a
# chance-level one passes 7e-6, even a 25%-accurate one passes 3%.
SELFTEST_MIN_AGREEMENT = 0.35


class StoreError(Exception):
    """The model store cannot be read or written; the message says what to check."""


class ValidationError(ModelError):
    """A candidate model loads but is not fit for the pipeline (labels, shapes, self-test)."""


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds and 'Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- versions ------------------------------------------------------------------------------------

def version_key(version: str) -> tuple:
    """Sort key for model versions: numeric dotted release, a pre-release suffix sorting before it.

    "1.2" == "1.2.0" < "1.10" ; "1.0.0-rc1" < "1.0.0" ; "v2" == "2" ; build metadata ("+x") is ignored;
    a version without leading digits sorts below every numeric one.
    """
    s = str(version).strip()
    if s[:1] in ("v", "V"):
        s = s[1:]
    m = re.match(r"(\d+(?:\.\d+)*)(.*)$", s)
    if not m:
        return ((), 0, s)
    nums = [int(x) for x in m.group(1).split(".")]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    rest = m.group(2)
    if not rest or rest.startswith("+"):
        return (tuple(nums), 1, "")
    return (tuple(nums), 0, rest.lstrip("-.").split("+")[0])


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, equal to or newer than ``b`` (see version_key)."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


# --- durable file operations -----------------------------------------------------------------------

def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically; its temp file carries TMP_PREFIX so start-up cleanup finds leftovers."""
    _atomic_write(path, data, tmp_prefix=TMP_PREFIX)


# --- the store ---------------------------------------------------------------------------------------

@dataclass
class ModelEntry:
    """One installed model as recorded in the pointer."""

    dir: str
    version: str
    sha256: str
    installed_at: str
    origin: str = ""  # where it came from, e.g. "mqtt", "group:lobby", "http://...", "inbox:x.bundle"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelEntry":
        if not isinstance(d, dict) or not _MODEL_DIR.match(str(d.get("dir", ""))):
            raise StoreError(f"bad model entry {d!r}")
        return cls(dir=str(d["dir"]), version=str(d.get("version", "?")), sha256=str(d.get("sha256", "")),
                   installed_at=str(d.get("installed_at", "")), origin=str(d.get("origin", "")))

    def brief(self) -> dict[str, str]:
        return {"version": self.version, "sha256": self.sha256, "installed_at": self.installed_at}


@dataclass
class Pointer:
    """Contents of active.json. ``active`` None = the base model; ``previous`` newest first."""

    active: ModelEntry | None = None
    previous: list[ModelEntry] = field(default_factory=list)
    # While a freshly installed model proves itself: {"sha256", "since", "starts"}; None once it passed.
    probation: dict[str, Any] | None = None
    updated_at: str = ""
    retired: list[ModelEntry] = field(default_factory=list)  # rolled back from, newest first (see Retention)

    def to_json(self) -> bytes:
        obj = {"format": POINTER_FORMAT, "active": asdict(self.active) if self.active else None,
               "previous": [asdict(e) for e in self.previous], "probation": self.probation,
               "retired": [asdict(e) for e in self.retired], "updated_at": self.updated_at or utc_now()}
        return (json.dumps(obj, indent=1) + "\n").encode()


class ModelStore:
    """Models installed by updates, under ``root`` (= <state_dir>/models). Not thread-safe: one writer."""

    def __init__(self, root: str | Path, keep_previous: int = 1):
        self.root = Path(root)
        self.keep_previous = max(0, int(keep_previous))

    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER

    def model_path(self, entry: ModelEntry) -> Path:
        return self.root / entry.dir / MODEL_FILE

    def ensure(self) -> None:
        """Create the store directory (and its parents); StoreError if that is not possible."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create model store {self.root}: {e.strerror or e}; check "
                             "device.state_dir exists and is writable by the daemon's user") from None

    def read_pointer(self) -> Pointer:
        """The pointer; an empty one (base model) when there is none. StoreError if it is corrupt."""
        try:
            raw = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return Pointer()
        except OSError as e:
            raise StoreError(f"cannot read {self.pointer_path}: {e.strerror or e}") from None
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or obj.get("format") != POINTER_FORMAT:
                raise ValueError(f"format is not {POINTER_FORMAT}")
            active = ModelEntry.from_dict(obj["active"]) if obj.get("active") else None
            previous = [ModelEntry.from_dict(e) for e in obj.get("previous") or []]
            retired = [ModelEntry.from_dict(e) for e in obj.get("retired") or []]
            probation = obj.get("probation")
            if probation is not None and not isinstance(probation, dict):
                raise ValueError("probation must be an object")
        except (ValueError, KeyError, TypeError, StoreError) as e:
            raise StoreError(f"{self.pointer_path} is corrupt ({e}); delete it to fall back to the base "
                             "model") from None
        return Pointer(active, previous, probation, str(obj.get("updated_at", "")), retired)

    def write_pointer(self, ptr: Pointer) -> None:
        ptr.updated_at = utc_now()
        self.ensure()
        try:
            atomic_write(self.pointer_path, ptr.to_json())
        except OSError as e:
            raise StoreError(f"cannot write {self.pointer_path}: {e.strerror or e}") from None

    def cleanup(self, keep: tuple[Path, ...] = ()) -> list[dict]:
        """Remove what an interrupted install left behind and model directories nothing points to.

        Returns the request records (request.json) of interrupted installs, so they can be reported.
        ``keep``: directories inside the root that are not ours to remove (e.g. the drop-in inbox).
        """
        if not self.root.is_dir():
            return []
        interrupted = []
        try:
            referenced = self._referenced()
        except StoreError as e:
            log.error("model store: %s; leaving installed models alone", e)
            referenced = None
        keep_names = {p.name for p in keep if p.parent == self.root}
        try:
            entries = sorted(self.root.iterdir())
        except OSError as e:
            log.error("model store: cannot list %s: %s", self.root, e)
            return []
        for p in entries:
            if p.name.startswith(TMP_PREFIX):
                req = p / REQUEST_FILE
                if req.is_file():
                    try:
                        interrupted.append(json.loads(req.read_text()))
                    except (OSError, ValueError):
                        interrupted.append({})
                self._remove(p)
                log.info("model store: removed %s left by an interrupted install", p.name)
            elif (referenced is not None and p.is_dir() and p.name not in keep_names
                  and _MODEL_DIR.match(p.name) and p.name not in referenced):
                self._remove(p)
                log.info("model store: removed unreferenced model directory %s", p.name)
        fsync_dir(self.root)
        return interrupted

    def _referenced(self) -> set[str]:
        ptr = self.read_pointer()
        return {e.dir for e in ([ptr.active] if ptr.active else []) + ptr.previous + ptr.retired}

    @staticmethod
    def _remove(p: Path) -> None:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            log.warning("model store: cannot remove %s: %s", p, e)

    # --- install ---------------------------------------------------------------------------------

    def new_staging(self, request: dict) -> Path:
        """A fresh staging directory (removed by cleanup() if the install never completes)."""
        self.ensure()
        path = self.root / f"{TMP_PREFIX}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            write_durable(path / REQUEST_FILE, json.dumps(request).encode())
        except OSError as e:
            raise StoreError(f"cannot write to {self.root}: {e.strerror or e}") from None
        return path

    @staticmethod
    def write_model(staging: Path, manifest_bytes: bytes, model_bytes: bytes, bundle: bytes | None = None) -> Path:
        """Write a model, its manifest and the bundle it came from into ``staging`` (fsynced); returns the
        model file's path. The bundle is what :func:`verify_installed` re-checks at every start."""
        try:
            write_durable(staging / MANIFEST_FILE, manifest_bytes)
            write_durable(staging / MODEL_FILE, model_bytes)
            if bundle is not None:
                write_durable(staging / BUNDLE_FILE, bundle)
        except OSError as e:
            raise StoreError(f"cannot write the model to {staging}: {e.strerror or e} (disk full?)") from None
        fsync_dir(staging)
        return staging / MODEL_FILE

    def discard(self, staging: Path | None) -> None:
        """Remove a staging directory after a refused or failed install."""
        if staging is not None and staging.exists():
            self._remove(staging)

    def commit(self, staging: Path, *, version: str, sha256: str, origin: str) -> ModelEntry:
        """Move a validated staging directory into place and make it the active model (on probation).

        The previous active model is kept (up to ``keep_previous``); older ones are deleted.
        """
        ptr = self.read_pointer()
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", version).strip("._-")[:40] or "model"
        name = f"{safe}-{sha256[:12]}-{secrets.token_hex(3)}"
        entry = ModelEntry(dir=name, version=version, sha256=sha256, installed_at=utc_now(), origin=origin)
        try:
            for extra in (REQUEST_FILE, "bundle.part"):
                (staging / extra).unlink(missing_ok=True)
            os.rename(staging, self.root / name)
        except OSError as e:
            raise StoreError(f"cannot move the model into {self.root}: {e.strerror or e}") from None
        fsync_dir(self.root)
        old = ([ptr.active] if ptr.active else []) + ptr.previous
        new = Pointer(active=entry, previous=old[: self.keep_previous],
                      probation={"sha256": sha256, "since": utc_now(), "starts": 0}, retired=ptr.retired)
        try:
            self.write_pointer(new)
        except StoreError:
            self._remove(self.root / name)
            raise
        for gone in old[self.keep_previous:]:
            self._remove(self.root / gone.dir)
        return entry

    # --- after install ---------------------------------------------------------------------------

    def rollback(self) -> tuple[ModelEntry | None, ModelEntry | None]:
        """Make the previous model active (the base model when none is left); returns (new, retired).

        The model rolled back from is kept as the newest "retired" entry; only a retired model pushed past
        ``keep_previous`` of them is deleted (see Retention). StoreError when the base model is already active.
        """
        ptr = self.read_pointer()
        if ptr.active is None:
            raise StoreError("the base model is active: nothing to roll back to")
        left = ptr.active
        retired = [left] + [e for e in ptr.retired if e.dir != left.dir]
        keep = max(1, self.keep_previous)
        new = Pointer(active=ptr.previous[0] if ptr.previous else None, previous=ptr.previous[1:],
                      retired=retired[:keep])
        self.write_pointer(new)
        for gone in retired[keep:]:
            self._remove(self.root / gone.dir)
        fsync_dir(self.root)
        return new.active, left

    def end_probation(self, sha256: str) -> bool:
        """Mark the active model as proven (if it is still the one with this sha256)."""
        ptr = self.read_pointer()
        if ptr.probation is None or ptr.probation.get("sha256") != sha256:
            return False
        ptr.probation = None
        self.write_pointer(ptr)
        return True

    def count_start(self) -> Pointer:
        """Record a daemon start while the active model is on probation; returns the updated pointer."""
        ptr = self.read_pointer()
        if ptr.probation is not None:
            ptr.probation["starts"] = int(ptr.probation.get("starts", 0)) + 1
            self.write_pointer(ptr)
        return ptr


# --- re-verification at start -------------------------------------------------------------------------

def verify_installed(store: ModelStore, entry: ModelEntry, public_keys: dict[str, bytes], *,
                     allow_unsigned: bool = False, max_bytes: int = 1 << 30, check_signature: bool = True) -> str:
    """Check an installed model against the signed bundle kept beside it; returns the signing key id.

    The bundle's signature is checked over its exact bytes with today's trusted keys (a key removed from
    update.public_keys revokes the models it signed), then its manifest and model must be byte-identical
    to the files that will be loaded. StoreError says what is wrong. Without a bundle file (placed by
    hand, or installed before bundle format 2) the model is refused unless ``allow_unsigned``.
    ``check_signature=False`` (one-off tools without the keys) checks everything but the signature.
    """
    from edge.bundle import BundleError, load_verified, read_bundle

    d = store.root / entry.dir
    try:
        with open(d / BUNDLE_FILE, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        if not allow_unsigned:
            raise StoreError(f"installed model {entry.version} ({entry.dir}) has no signed bundle beside it "
                             "(placed by hand, or installed by fer-edge before bundle format 2): not loaded; "
                             "push it again as a signed bundle") from None
        data = None
    except OSError as e:
        raise StoreError(f"cannot read {d / BUNDLE_FILE}: {e.strerror or e}") from None
    try:
        model = (d / MODEL_FILE).read_bytes()
        manifest = (d / MANIFEST_FILE).read_bytes()
    except OSError as e:
        raise StoreError(f"installed model {entry.version}: {e.filename}: {e.strerror or e}") from None
    import hashlib

    if hashlib.sha256(model).hexdigest() != entry.sha256:
        raise StoreError(f"installed model {entry.version}: {MODEL_FILE} does not hash to the sha256 recorded "
                         "at install (altered or damaged on disk)")
    if data is None:
        return "unsigned"
    if len(data) > max_bytes:
        raise StoreError(f"installed model {entry.version}: its bundle is over the update.max_bundle_mb limit")
    try:
        if check_signature:
            bundle, kid = load_verified(data, public_keys, allow_unsigned=allow_unsigned)
        else:
            bundle, kid = read_bundle(data), "not checked"
    except BundleError as e:
        raise StoreError(f"installed model {entry.version}: {e}") from None
    if bundle.model_bytes != model or bundle.manifest_bytes != manifest:
        raise StoreError(f"installed model {entry.version}: its files differ from the signed bundle it came "
                         "from (altered on disk)")
    return kid


# --- validation and self-test ------------------------------------------------------------------------

def current_model_path(state_dir: str | Path, configured: str = "", update=None) -> str | None:
    """The model the daemon starts with, read-only: the store's active model, else ``configured``, else None
    (= the bundled model). For one-off commands (predict, snapshot, doctor, bench) on an updated device.

    The active model is checked like the daemon checks it at start (:func:`verify_installed`) with the
    keys, ``allow_unsigned`` and bundle size bound of ``update`` (the config's UpdateConfig: every command
    passes it, so a model signed by a key no longer trusted is not used); without one, only its bundle's
    presence and contents are checked.
    """
    store = ModelStore(Path(state_dir).expanduser() / "models")
    try:
        ptr = store.read_pointer()
    except StoreError as e:
        log.warning("%s; using the base model", e)
        ptr = None
    if ptr is not None and ptr.active is not None and store.model_path(ptr.active).is_file():
        try:
            if update is not None:
                from edge.bundle import BundleError, load_public_keys

                try:
                    keys = load_public_keys(update.public_keys)
                except BundleError as e:
                    raise StoreError(f"update.public_keys: {e}") from None
                verify_installed(store, ptr.active, keys, allow_unsigned=update.allow_unsigned,
                                 max_bytes=update.max_bytes)
            else:
                verify_installed(store, ptr.active, {}, check_signature=False)
            return str(store.model_path(ptr.active))
        except StoreError as e:
            log.warning("%s; using the base model", e)
    return configured or None


def load_reference_faces(path: Path = SELFTEST_PATH) -> tuple[np.ndarray, list[str], float]:
    """Reference faces for the self-test: (faces uint8 (N, S, S) framed with context, labels, context margin)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            faces = np.asarray(data["faces"], dtype=np.uint8)
            labels = [str(x) for x in data["labels"]]
            context = float(data["context_margin"])
    except (OSError, KeyError, ValueError) as e:
        raise ModelError(f"{path}: self-test reference faces unreadable ({e}); reinstall fer-edge") from None
    if faces.ndim != 3 or faces.shape[0] < 2 or faces.shape[1] != faces.shape[2]:
        raise ModelError(f"{path}: self-test reference faces have shape {faces.shape}, expected (N, S, S)")
    return faces, labels, context


def reference_inputs(clf: Classifier, faces: np.ndarray, context: float) -> np.ndarray:
    """The reference faces framed the way this model wants them (its input size and margin)."""
    from edge.preprocess import inner_box

    box = inner_box(faces.shape[1], context)  # the face box inside each stored crop
    return np.stack([clf.face_input(f, box) for f in faces])


def _raw_output_finite(clf: Classifier) -> bool:
    """Whether the interpreter's last raw output is finite: Classifier.predict maps NaN rows to a uniform
    distribution (safe for the live pipeline), which would otherwise read as "no answer" here."""
    it, out = getattr(clf, "_it", None), getattr(clf, "_out", None)
    if it is None or out is None:
        return True
    try:
        raw = np.asarray(it.get_tensor(out))
    except Exception:  # an interpreter without the tensor: nothing more to learn
        return True
    return raw.dtype.kind != "f" or bool(np.all(np.isfinite(raw)))


def self_test(clf: Classifier, reference: tuple[np.ndarray, list[str], float] | None = None,
              min_agreement: float = SELFTEST_MIN_AGREEMENT) -> dict:
    """Run the model on the labelled reference faces; ValidationError unless it reads faces like a classifier.

    Sane = right shape, finite, each row a distribution (sums to ~1, not all-zero logits), not the same
    answer for every face, and at least ``min_agreement`` of the faces labelled right (the figure a user
    can act on: far below the model card's accuracy means the manifest frames or scales faces wrongly).
    Returns a summary: faces, correct, agreement, floor, predictions.
    """
    faces, labels, context = reference if reference is not None else load_reference_faces()
    x = reference_inputs(clf, faces, context)
    try:
        probs = np.asarray(clf.predict(x), dtype=np.float64)
    except Exception as e:  # interpreter failures surface as various exception types
        raise ValidationError(f"self-test: the model fails on the reference faces ({type(e).__name__}: {e})") from None
    n, n_labels = len(faces), len(clf.labels)
    if probs.shape != (n, n_labels):
        raise ValidationError(f"self-test: output shape {list(probs.shape)}, expected [{n}, {n_labels}]")
    if not np.all(np.isfinite(probs)) or not _raw_output_finite(clf):
        raise ValidationError("self-test: the model outputs NaN/inf on the reference faces")
    if np.any(probs < -1e-6) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValidationError("self-test: outputs are not probabilities (negative or not summing to 1)")
    if np.allclose(probs, 1.0 / n_labels, atol=1e-6):
        raise ValidationError("self-test: the model outputs nothing (all-zero scores) for every reference face")
    if np.max(np.abs(probs - probs[0])) < 1e-4:
        raise ValidationError("self-test: the model gives the same output for every reference face "
                              "(broken or untrained model)")
    predicted = [clf.labels[i] for i in probs.argmax(axis=1)]
    agree = sum(p == t for p, t in zip(predicted, labels))
    if agree < min_agreement * n:
        raise ValidationError(
            f"self-test: only {agree} of {n} labelled reference faces right ({agree / n:.0%}; chance is "
            f"{1 / n_labels:.0%}, the floor {min_agreement:.0%}): the manifest's label order, normalisation or "
            "input size does not match the model, or the model is untrained")
    return {"faces": n, "correct": agree, "predicted": predicted, "agreement": round(agree / n, 3),
            "floor": min_agreement, "chance": round(1 / n_labels, 3)}


def describe_self_test(summary: dict) -> str:
    """One line for operators: what the self-test measured and against what."""
    return (f"self-test: {summary['correct']} of {summary['faces']} labelled FER-2013 test faces right "
            f"({summary['agreement']:.0%}; refused below {summary['floor']:.0%}, chance {summary['chance']:.0%})")


def validate_model(model_path: Path, *, threads: int = 1, expect_labels: list[str] | None = None,
                   reference: tuple[np.ndarray, list[str], float] | None = None) -> tuple[Classifier, dict]:
    """Load a candidate model and check it fits the pipeline; returns (classifier, self-test summary).

    Raises ModelError (not loadable, manifest problems, output size vs labels) or ValidationError
    (labels differ from ``expect_labels``, input size out of range, self-test failed).
    """
    clf = Classifier(model_path, threads)
    man = clf.manifest
    if not man.get("sha256"):
        raise ValidationError("manifest has no sha256 of the model file; rebuild it with `fer-edge model sign`")
    if expect_labels is not None and list(clf.labels) != list(expect_labels):
        raise ValidationError(f"labels {','.join(clf.labels)} differ from the running pipeline's "
                              f"{','.join(expect_labels)} (same names in the same order required)")
    if not MIN_INPUT <= clf.input_size <= MAX_INPUT:
        raise ValidationError(f"input size {clf.input_size} outside {MIN_INPUT}..{MAX_INPUT}")
    if not 0.0 <= clf.margin <= 2.0:
        raise ValidationError(f"input margin {clf.margin} outside 0..2")
    return clf, self_test(clf, reference)


# --- reference data generator (run once; the result is committed as edge/data/selftest.npz) -------------

SELFTEST_PER_CLASS = 10
SELFTEST_SEED = 2013


def make_reference_faces(data_dir: Path, out: Path = SELFTEST_PATH) -> Path:
    """Pick SELFTEST_PER_CLASS FER-2013 test faces per class (seeded, from sorted names) into ``out``.

    The faces are stored as the dataset has them (48x48 gray, the face filling the image, so context 0).
    Regenerate with ``python -c "from pathlib import Path; from edge.model_store import make_reference_faces;
    make_reference_faces(Path('../shared/data/fer2013/test'))"``. Chosen from the test split, never trained on.
    """
    import random

    import cv2

    rng = random.Random(SELFTEST_SEED)
    faces, labels, files = [], [], []
    for cls in sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir()):
        names = sorted((Path(data_dir) / cls).glob("*.jpg"))
        for f in rng.sample(names, SELFTEST_PER_CLASS):
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            if img is None or img.shape != (48, 48):
                raise RuntimeError(f"{f}: not a 48x48 FER-2013 face")
            faces.append(img)
            labels.append(cls)
            files.append(f"{cls}/{f.name}")
    np.savez_compressed(out, faces=np.stack(faces), labels=np.array(labels), context_margin=0.0,
                        files=np.array(files))
    return out
