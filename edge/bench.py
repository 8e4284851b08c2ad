"""On-device latency benchmark of the real pipeline (``fer-edge bench``).

Every scenario runs the daemon's own stages, in the daemon's order, on a reproducible video:
edge.sources (a looping, lossless file source) -> edge.detect -> edge.preprocess.crop_face ->
edge.classify (one batched predict per frame) -> edge.track -> edge.events.build_event ->
MqttPublisher.publish_event. The publisher is never started, so publish_event does its real work
(json.dumps + append to the bounded outbox) without a broker or network.

Inputs: the bundled demo clip, any video file, or generated scenes with K faces. Scenes paste the
demo clip's real FER-2013 faces (cut from demo.mp4 with the boxes in demo.json, so a fresh clone
needs nothing else) onto a textured background, drift them slowly on a loop-seamless path and encode
the result to a temporary mp4, so scenes are decoded exactly like any file.

Stages per frame: ``capture`` (the source's time to deliver the next frame to an instant consumer:
decode + hand-off, measured in a separate pass over the same video), ``detect`` (on skipped frames of
every_n > 1: reusing tracked boxes), ``preprocess``, ``classify``, ``track_publish`` and ``total``
(detect..track_publish, the daemon's per-frame work). ``fps`` is frames / wall time of the measured
loop while the source decodes in its own thread, as in the daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

import edge
from edge.classify import Classifier, ModelConfig, ModelError, load_classifier
from edge.detect import DetectConfig, make_detector
from edge.events import build_event
from edge.mqtt import MqttConfig, MqttPublisher
from edge.sources import DEMO_CLIP, SourceConfig, open_source
from edge.track import TrackConfig, Tracker

log = logging.getLogger(__name__)

STAGES = ("capture", "detect", "preprocess", "classify", "track_publish", "total")
BACKENDS = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}
BACKEND_ALIASES = {"litert": "ai-edge-litert", "ai-edge-litert": "ai-edge-litert", "ai_edge_litert": "ai-edge-litert",
                   "tflite": "tflite-runtime", "tflite-runtime": "tflite-runtime", "tflite_runtime": "tflite-runtime"}
DEMO_META = DEMO_CLIP.with_suffix(".json")
PUBLISH_MEASURES = ("build_event + MqttPublisher.publish_event (json.dumps + enqueue) into a publisher that is "
                    "never connected")
# Budget of issue 6 (x86, one thread, shipped int8 model).
BUDGET_CLASSIFY_MS_PER_FACE = 1.0
BUDGET_TOTAL_P95_MS = 15.0
BUDGET_RSS_MB = 150.0
SCENE_FPS = 10.0
# Cells of a 3x2 grid in the order faces are added: spread out, never overlapping.
SCENE_CELLS = ((0, 0), (2, 1), (1, 0), (0, 1), (2, 0), (1, 1))
MAX_SCENE_FACES = len(SCENE_CELLS)


class BenchError(Exception):
    """Bad benchmark input (file, model, option); the message says what to do."""


@dataclass
class BenchOptions:
    """What to benchmark; the sweep lists are combined by plan()."""

    input: str = "scenes"  # "scenes" | "demo" | path to a video file
    faces: list[int] = field(default_factory=lambda: [0, 1, 3, 5])  # scenes only
    resolutions: list[str] = field(default_factory=lambda: ["640x480", "1280x720"])  # [] = native (video inputs)
    threads: list[int] = field(default_factory=lambda: [1, 2, 4])
    every_n: list[int] = field(default_factory=lambda: [1, 3])
    backends: list[str] = field(default_factory=lambda: ["ai-edge-litert", "tflite-runtime"])
    grid: bool = False  # full cartesian product instead of one factor at a time around the baseline
    detector: str = "yunet"
    detector_model: str = ""  # "" = the bundled YuNet (detector "yunet")
    detect_width: int = 320
    fine_scale: float = 1.0  # detect.fine_scale: YuNet's fine search (0 = off, the 320 pass alone)
    fine_tile: int = 256  # detect.fine_tile: its sweep tile (160 costs less and finds fewer far faces)
    fine_angles: list[float] = field(default_factory=lambda: [0.0, 30.0, -30.0])  # detect.fine_angles
    model: str = ""  # "" = the bundled model
    compare: str = ""  # second model, run interleaved on the same crops
    flip_average: bool = False  # model.flip_average: each face classified twice (mirrored), as the daemon would
    # model.max_faces_per_frame: tracked faces beyond it take turns, as in the daemon (0 = every face every frame)
    max_faces_per_frame: int = field(default_factory=lambda: ModelConfig().max_faces_per_frame)
    iterations: int = 200
    warmup: int = 20
    scene_frames: int = 50  # length of a generated scene loop (5 s at 10 fps)
    seed: int = 2013

    def validate(self) -> None:
        """Raise BenchError for options that cannot run."""
        if self.iterations < 5:
            raise BenchError(f"--iterations: {self.iterations} is too few for percentiles; use >= 5")
        if self.warmup < 0:
            raise BenchError(f"--warmup: {self.warmup} must be >= 0")
        if self.input == "scenes":
            bad = [k for k in self.faces if not 0 <= k <= MAX_SCENE_FACES]
            if bad or not self.faces:
                raise BenchError(f"--faces: {bad or 'none'}: generated scenes hold 0..{MAX_SCENE_FACES} faces")
            if not self.resolutions:
                raise BenchError("--resolution: generated scenes need at least one WxH")
        elif self.input != "demo":
            p = Path(self.input).expanduser()
            if not p.is_file():
                raise BenchError(f"--input: {self.input} is not a file; use 'scenes', 'demo' or a video file")
            cap = cv2.VideoCapture(str(p))
            ok = cap.isOpened() and cap.read()[0]
            cap.release()
            if not ok:
                raise BenchError(f"--input: OpenCV cannot decode a frame of {self.input}; use an mp4/avi video file")
        for r in self.resolutions:
            parse_resolution(r)
        if not self.threads or any(not 1 <= t <= 16 for t in self.threads):
            raise BenchError(f"--threads: {self.threads} must be 1..16")
        if not self.every_n or any(n < 1 for n in self.every_n):
            raise BenchError(f"--every-n: {self.every_n} must be >= 1")
        if not 0 <= self.max_faces_per_frame <= 1000:
            raise BenchError(f"--max-faces-per-frame: {self.max_faces_per_frame} must be 0..1000 (0 = every face)")
        for b in self.backends:
            if b not in BACKEND_ALIASES:
                raise BenchError(f"--backend: {b!r} is not one of {', '.join(BACKENDS)}")
        if self.detector not in ("yunet", "haar"):
            raise BenchError(f"--detector: {self.detector!r} is not one of yunet, haar")
        if self.detect_width != 0 and self.detect_width < 64:
            raise BenchError(f"--detect-width: {self.detect_width} is too small; use 0 (full resolution) or >= 64")
        try:
            self.detect_config().validate()
        except ValueError as e:  # "fine_scale: ..." / "fine_tile: ...": the daemon's own bounds
            raise BenchError(f"--{str(e).replace('_', '-', 1)}") from None
        for label, path in (("--model", self.model), ("--compare", self.compare), ("--detector-model",
                                                                                  self.detector_model)):
            if path and not Path(path).expanduser().is_file():
                raise BenchError(f"{label}: model file {path} not found")


    def detect_config(self, every_n: int = 1) -> DetectConfig:
        """The daemon's [detect] settings these options stand for."""
        return DetectConfig(backend=self.detector, model_path=self.detector_model, detect_width=self.detect_width,
                            fine_scale=self.fine_scale, fine_tile=self.fine_tile,
                            fine_angles=list(self.fine_angles), every_n=every_n)


@dataclass(frozen=True)
class Scenario:
    input: str
    faces: Optional[int]  # generated scenes: faces per frame; None for video inputs
    width: int  # 0 = native resolution of a video input
    height: int
    threads: int
    every_n: int
    backend: str

    @property
    def id(self) -> str:
        src = f"scenes/{self.faces}f" if self.input == "scenes" else ("demo" if self.input == "demo"
                                                                       else Path(self.input).name)
        res = f"{self.width}x{self.height}" if self.width else "native"
        short = {"ai-edge-litert": "litert", "tflite-runtime": "tflite-rt"}.get(self.backend, self.backend)
        return f"{src} {res} t{self.threads} n{self.every_n} {short}"


def parse_resolution(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480); BenchError otherwise."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BenchError(f"--resolution: {text!r} is not WIDTHxHEIGHT, e.g. 640x480") from None
    if not (64 <= w <= 7680 and 64 <= h <= 4320):
        raise BenchError(f"--resolution: {text} out of range (64x64 .. 7680x4320)")
    return w, h


def plan(opts: BenchOptions) -> list[Scenario]:
    """Scenarios to run: faces x resolution at the baseline, then each other setting varied alone (or --grid)."""
    faces = list(opts.faces) if opts.input == "scenes" else [None]
    res = [parse_resolution(r) for r in opts.resolutions] or [(0, 0)]
    backends = [BACKEND_ALIASES[b] for b in opts.backends]
    axes = dict(faces=faces, res=res, threads=list(opts.threads), every_n=list(opts.every_n), backend=backends)
    if opts.grid:
        combos = [dict(zip(axes, vals)) for vals in itertools.product(*axes.values())]
    else:
        base = {k: v[0] for k, v in axes.items()}
        base["faces"] = 3 if 3 in faces else faces[-1]
        combos = [dict(base, faces=f, res=r) for r in res for f in faces]
        for axis in ("threads", "every_n", "backend"):
            combos += [dict(base, **{axis: v}) for v in axes[axis][1:]]
    out: list[Scenario] = []
    for c in combos:
        sc = Scenario(opts.input, c["faces"], c["res"][0], c["res"][1], c["threads"], c["every_n"], c["backend"])
        if sc not in out:
            out.append(sc)
    return out


# --- statistics and machine details ---------------------------------------------------------------------------

def summarize(seconds) -> dict:
    """count, mean, p50/p95/p99 and max in milliseconds."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"count": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    r = lambda v: round(float(v), 3)  # noqa: E731 - rounding is monotone, so p50 <= p95 <= p99 survives it
    return {"count": int(a.size), "mean_ms": r(a.mean()), "p50_ms": r(p50), "p95_ms": r(p95), "p99_ms": r(p99),
            "max_ms": r(a.max())}


def rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB.

    Linux: VmHWM from /proc/self/status. ru_maxrss is the fallback only: Linux carries it over execve, so a
    fresh worker would report its parent's peak (the parent that rendered the scenes).
    """
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        return ""


def cpu_model() -> str:
    """CPU name from /proc/cpuinfo ('model name' on x86; 'Model'/'Hardware' or the device tree on a Pi)."""
    info: dict[str, str] = {}
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if info.get(key):
            return info[key]
    return _read("/proc/device-tree/model") or platform.processor() or platform.machine()


# The CPU features XNNPACK's int8 and float kernels choose between, widest first: the same model runs several
# times slower per face without a dot-product instruction (VNNI on x86, dotprod/i8mm on ARM), so a timing is
# only comparable with one taken on the same features.
SIMD_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "avx512f", "avx2", "fma", "i8mm", "asimddp", "asimd", "neon")


DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "i8mm", "asimddp"})


def has_int8_dot_product(simd: list[str]) -> bool:
    """Whether these SIMD_FLAGS include an int8 dot-product instruction (the fast int8 kernels)."""
    return bool(DOT_PRODUCT_FLAGS & set(simd))


def cpu_simd() -> list[str]:
    """Which of SIMD_FLAGS this CPU has (x86 'flags' / ARM 'Features' in /proc/cpuinfo)."""
    have: set[str] = set()
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            have.update(value.split())
    return [f for f in SIMD_FLAGS if f in have]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """The machine and software the numbers were taken on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "simd": cpu_simd(),
        "board": _read("/proc/device-tree/model") or None,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or None,
        "loadavg_at_start": load,
        "os": platform.platform(),
        "python": platform.python_version(),
        "fer_edge": edge.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "ai-edge-litert": _version("ai-edge-litert"),
        "tflite-runtime": _version("tflite-runtime"),
    }


def backend_installed(name: str) -> bool:
    return importlib.util.find_spec(BACKENDS[name]) is not None


@contextlib.contextmanager
def only_backend(name: str):
    """Hide the other interpreter package while a classifier loads, so edge.classify picks ``name``.

    A None entry in sys.modules makes ``import`` of that module fail; the previous entries are restored after.
    """
    hidden = [m for other, pkg in BACKENDS.items() if other != name for m in (pkg, f"{pkg}.interpreter")]
    saved = {m: sys.modules.get(m) for m in hidden}
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for m, mod in saved.items():
            if mod is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = mod


def load_timed(model: str, threads: int, backend: str) -> tuple[Classifier, float]:
    """Load a classifier on ``backend``; returns it and the load time in ms."""
    t0 = time.perf_counter()
    with only_backend(backend):
        clf = load_classifier(model or None, threads=threads)
    ms = (time.perf_counter() - t0) * 1e3
    if not clf.backend.startswith(backend):
        raise ModelError(f"asked for backend {backend} but edge.classify loaded {clf.backend}")
    return clf, round(ms, 2)


# --- inputs ---------------------------------------------------------------------------------------------------

def demo_faces(clip: Path = DEMO_CLIP, meta_path: Path = DEMO_META) -> list[np.ndarray]:
    """The demo clip's source faces (gray), cut from demo.mp4 where each is fully shown, using demo.json's boxes."""
    try:
        meta = json.loads(meta_path.read_text())
        tracks = {t["track"]: t for t in meta["tracks"]}
        changes = meta.get("expression_changes", [])
        wanted: dict[int, list[list[int]]] = {}
        for face in meta["faces"]:
            tr = tracks[face["track"]]
            lo = max(face["frames"][0], tr.get("frames_full", tr["frames"])[0])
            hi = min(face["frames"][1], tr.get("frames_full", tr["frames"])[1])
            for ch in changes:  # skip cross-fades into or out of another expression
                if ch["track"] == face["track"]:
                    c0, c1 = ch["frames"]
                    if lo < c0 <= hi:
                        hi = c0 - 1
                    elif c0 <= lo <= c1:
                        lo = c1 + 1
            mid = (lo + hi) // 2
            wanted.setdefault(mid, []).append(tr["boxes"][mid - tr["frames"][0]])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"cannot read demo faces from {meta_path} ({type(e).__name__}: {e}); reinstall fer-edge")
    cap = cv2.VideoCapture(str(clip))
    faces: list[np.ndarray] = []
    try:
        for idx in range(max(wanted) + 1):
            ok, frame = cap.read()
            if not ok:
                break
            for x, y, w, h in wanted.get(idx, []):
                faces.append(cv2.cvtColor(frame[y:y + h, x:x + w], cv2.COLOR_BGR2GRAY))
    finally:
        cap.release()
    if len(faces) != sum(len(v) for v in wanted.values()):
        raise BenchError(f"cannot decode the demo clip {clip} (got {len(faces)} faces); reinstall fer-edge")
    return faces


class SceneRenderer:
    """Frames of ``k`` real faces drifting on a textured background; frame ``i`` and ``i + n_frames`` are equal."""

    def __init__(self, faces: list[np.ndarray], k: int, width: int, height: int, n_frames: int, seed: int):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx / width + yy / height) / 2.0
        bg = np.stack([110 + 60 * t, 100 + 62 * t, 90 + 65 * t], axis=-1)  # blue-gray diagonal gradient, BGR
        bg += rng.standard_normal(bg.shape, dtype=np.float32) * 4.0
        self.bg = cv2.GaussianBlur(np.clip(bg, 0, 255).astype(np.uint8), (3, 3), 0)
        self.n_frames = n_frames
        cw, ch = width / 3.0, height / 2.0
        self.side = side = int(min(cw, ch) * 0.62)
        ramp = np.clip(np.minimum(np.arange(side), np.arange(side)[::-1]) / max(1.0, side * 0.04), 0.0, 1.0)
        self.alpha = np.minimum.outer(ramp, ramp)[..., None].astype(np.float32)  # feathered edges, like the demo
        self.items = []
        for j in range(k):
            col, row = SCENE_CELLS[j]
            face = cv2.resize(faces[j % len(faces)], (side, side), interpolation=cv2.INTER_CUBIC)
            cx, cy = (col + 0.5) * cw, (row + 0.5) * ch
            self.items.append((cv2.cvtColor(face, cv2.COLOR_GRAY2BGR).astype(np.float32), cx, cy,
                               float(rng.uniform(0, 1)), float(rng.uniform(0.03, 0.07)) * side))

    def frame(self, i: int) -> np.ndarray:
        img = self.bg.copy()
        s = self.side
        for face, cx, cy, phase, amp in self.items:
            a = 2 * math.pi * (i / self.n_frames + phase)
            x, y = int(round(cx - s / 2 + amp * math.sin(a))), int(round(cy - s / 2 + amp * math.cos(a)))
            roi = img[y:y + s, x:x + s].astype(np.float32)
            img[y:y + s, x:x + s] = (self.alpha * face + (1 - self.alpha) * roi).astype(np.uint8)
        return img


def write_video(path: Path, frames, size: tuple[int, int], fps: float) -> None:
    """Encode BGR frames to an mp4 (mp4v), the demo clip's codec."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise BenchError(f"OpenCV cannot write {path} (no mp4v encoder in this OpenCV build)")
    n = 0
    try:
        for img in frames:
            writer.write(img)
            n += 1
    finally:
        writer.release()
    if n == 0:
        raise BenchError(f"no frames to write to {path}")


def _video_frames(path: str, size: Optional[tuple[int, int]]):
    cap = cv2.VideoCapture(path)
    try:
        while True:
            ok, img = cap.read()
            if not ok:
                return
            yield img if size is None or img.shape[1::-1] == size else cv2.resize(img, size,
                                                                                interpolation=cv2.INTER_AREA)
    finally:
        cap.release()


def _video_fps(path: str) -> float:
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return fps if 0 < fps < 1000 else 25.0


# --- the benchmark ----------------------------------------------------------------------------------------------

class Bench:
    """Runs scenarios; the generated/rescaled input videos are made once and shared between scenarios."""

    def __init__(self, opts: BenchOptions, isolate: bool = True):
        self.opts = opts
        self.isolate = isolate
        self._tmp = tempfile.TemporaryDirectory(prefix="fer-edge-bench-")
        self._videos: dict[tuple, tuple[str, float]] = {}
        self._faces: Optional[list[np.ndarray]] = None

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> "Bench":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def video(self, sc: Scenario) -> tuple[str, float]:
        """(path, fps) of the scenario's input video, generating or rescaling it once."""
        key = (sc.input, sc.faces, sc.width, sc.height)
        if key in self._videos:
            return self._videos[key]
        size = (sc.width, sc.height) if sc.width else None
        out = Path(self._tmp.name) / f"input{len(self._videos)}.mp4"
        if sc.input == "scenes":
            if self._faces is None:
                self._faces = demo_faces()
            r = SceneRenderer(self._faces, sc.faces or 0, sc.width, sc.height, self.opts.scene_frames,
                              self.opts.seed)
            write_video(out, (r.frame(i) for i in range(self.opts.scene_frames)), size, SCENE_FPS)
            result = (str(out), SCENE_FPS)
        else:
            src = str(DEMO_CLIP) if sc.input == "demo" else str(Path(sc.input).expanduser())
            cap = cv2.VideoCapture(src)
            native = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            cap.release()
            if size is None or size == native:
                result = (src, _video_fps(src))
            else:
                write_video(out, _video_frames(src, size), size, _video_fps(src))
                result = (str(out), _video_fps(src))
        self._videos[key] = result
        return result

    def run_scenario(self, sc: Scenario) -> dict:
        """Measure one scenario, in a fresh process unless ``isolate`` is False.

        A fresh process per scenario makes RSS, peak RSS and model load time those of a daemon started with
        these settings, untouched by earlier scenarios and by generating the input videos here.
        """
        out: dict = {"id": sc.id, "input": sc.input, "faces": sc.faces,
                     "resolution": f"{sc.width}x{sc.height}" if sc.width else "native", "threads": sc.threads,
                     "every_n": sc.every_n, "backend": sc.backend}
        if not backend_installed(sc.backend):
            return dict(out, status="not installed")
        path, fps = self.video(sc)
        if not self.isolate:
            return dict(out, **measure(self.opts, sc, path, fps))
        job = {"options": dataclasses.asdict(self.opts), "scenario": dataclasses.asdict(sc), "video": path,
               "fps": fps}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(edge.__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        limit = 120 + 2.0 * (self.opts.warmup + self.opts.iterations)
        try:
            proc = subprocess.run([sys.executable, "-m", "edge.bench", "--worker"], input=json.dumps(job),
                                  capture_output=True, text=True, timeout=limit, env=env)
        except subprocess.TimeoutExpired:
            raise BenchError(f"scenario took longer than {limit:.0f} s") from None
        last = proc.stdout.strip().splitlines()[-1:] or [""]
        try:
            result = json.loads(last[0])
        except ValueError:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise BenchError(f"worker exited with status {proc.returncode}: {tail or 'no output'}") from None
        return dict(out, **result)


def capture_times(path: str, n: int, warm: int) -> list[float]:
    """Per-frame decode time of ``path``: cv2.VideoCapture.read(), the work edge.sources' capture thread does.

    Timed directly rather than through Source.read(): the source decodes one frame ahead in its thread, so
    read() alternates between ~0 and a full decode and its percentiles would not mean decode time.
    """
    times: list[float] = []
    cap = cv2.VideoCapture(path)
    try:
        i = 0
        while len(times) < n:
            t0 = time.perf_counter()
            ok, img = cap.read()
            dt = time.perf_counter() - t0
            if not ok or img is None:
                if i == 0:
                    raise BenchError(f"OpenCV cannot decode {path}")
                cap.release()
                cap, i = cv2.VideoCapture(path), 0  # loop like the source (reopen not counted)
                continue
            i += 1
            if warm:
                warm -= 1
            else:
                times.append(dt)
    finally:
        cap.release()
    return times


def measure(opts: BenchOptions, sc: Scenario, path: str, fps: float) -> dict:
    """Load the model and detector for ``sc`` and time the pipeline on the video at ``path`` (in this process)."""
    clf, load_ms = load_timed(opts.model, sc.threads, sc.backend)
    other = load_timed(opts.compare, sc.threads, sc.backend)[0] if opts.compare else None
    t0 = time.perf_counter()
    det = make_detector(opts.detect_config(sc.every_n))
    out = {"status": "ok", "backend_version": clf.backend, "model_load_ms": load_ms,
           "detector_load_ms": round((time.perf_counter() - t0) * 1e3, 2)}
    capture = capture_times(path, opts.iterations, min(opts.warmup, 5))
    out.update(_pipeline(opts, sc, path, fps, clf, det, other))
    out["stages"] = dict(capture=summarize(capture), **out["stages"])
    out["rss_mb"] = rss_mb()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _pipeline(opts: BenchOptions, sc: Scenario, path: str, fps: float, clf: Classifier, det,
              other: Optional[Classifier]) -> dict:
    """The daemon's per-frame work (edge.service.Service._process) with every stage timed on its own."""
    tracker = Tracker(TrackConfig(), list(clf.labels))
    publisher = MqttPublisher(MqttConfig(), "bench")  # never started: publish_event serialises and buffers
    size, margin, n_labels = clf.input_size, clf.margin, len(clf.labels)
    same_crops = other is not None and (other.input_size, other.margin) == (size, margin)
    samples = {s: [] for s in STAGES if s != "capture"}
    per_face, faces_seen, classified, waits, events = [], [], [], [], {"new": 0, "update": 0, "end": 0}
    cmp = {"ms_a": [], "ms_b": [], "agree": 0, "faces": 0}
    src = open_source(SourceConfig(kind="opencv", uri=path, loop=True, realtime=False))
    name = f"bench:{Path(path).name}"
    perf = time.perf_counter
    t_start = cpu_start = 0.0
    with src:
        for i in range(opts.warmup + opts.iterations):
            if i == opts.warmup:
                t_start, cpu_start = perf(), time.process_time()
            tw = perf()
            frame = src.read(timeout=10.0)
            wait = perf() - tw
            if frame is None:
                raise BenchError(f"source {src.name} delivered no frame within 10 s")
            ts = i / fps  # video time: tracker timeouts and update intervals behave as at the clip's fps
            image = frame.image
            detect_frame = i % sc.every_n == 0
            t0 = perf()
            boxes = list(det.detect(image)) if detect_frame else [b for _, b in tracker.tracks()]
            t1 = perf()
            fresh, probs = tracker.select(boxes, ts, opts.max_faces_per_frame)  # who is classified this frame
            todo = [b for b, f in zip(boxes, fresh) if f]
            crops = []
            if todo:  # as the daemon does: crop_face converts only the crop to gray
                crops = [clf.face_input(image, b) for b in todo]
            t2 = perf()
            batch = np.stack(crops) if crops else None  # one batched invoke per frame, as the daemon does
            t2a = perf()
            if other is not None and batch is not None and i % 2:  # alternate the order: no cache favourite
                pb, db = _classify_other(other, image, todo, batch if same_crops else None)
            t2b = perf()
            if batch is not None:
                probs[np.asarray(fresh, bool)] = clf.predict(batch, flip_average=opts.flip_average)
            t3 = perf()
            if other is not None and batch is not None and not i % 2:
                pb, db = _classify_other(other, image, todo, batch if same_crops else None)
            t4 = perf()
            evs = tracker.update(boxes, probs, ts, fresh) if boxes or detect_frame else tracker.predict_only(ts)
            for ev in evs:
                publisher.publish_event(build_event(ev, device_id="bench", model_version=clf.version,
                                                    model_sha256=clf.sha256, source=name))
            t5 = perf()
            if i < opts.warmup:
                continue
            d = {"detect": t1 - t0, "preprocess": t2 - t1, "classify": (t2a - t2) + (t3 - t2b),
                 "track_publish": t5 - t4}
            d["total"] = sum(d.values())
            for k, v in d.items():
                samples[k].append(v)
            waits.append(wait)
            faces_seen.append(len(boxes))
            classified.append(len(todo))
            for ev in evs:
                events[ev.type] = events.get(ev.type, 0) + 1
            if todo:
                per_face.append(d["classify"] / len(todo))
                if other is not None:
                    cmp["ms_a"].append((t3 - t2b) / len(todo))  # predict only, like the compare model's
                    cmp["ms_b"].append(db / len(todo))
                    cmp["agree"] += int(np.sum(np.argmax(probs[np.asarray(fresh, bool)], 1) == np.argmax(pb, 1)))
                    cmp["faces"] += len(todo)
        wall = perf() - t_start
        cpu = time.process_time() - cpu_start
    publisher.stop(timeout=0)
    n = opts.iterations
    result = {
        "frames": n,
        "faces_detected_mean": round(float(np.mean(faces_seen)), 3),
        "faces_classified_mean": round(float(np.mean(classified)), 3),
        "max_faces_per_frame": opts.max_faces_per_frame,
        "events": events,
        "stages": {k: summarize(v) for k, v in samples.items()},
        "classify_per_face": summarize(per_face),
        "source_wait": summarize(waits),
        "fps": round(n / wall, 2) if wall > 0 else None,
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_frame": round(cpu / n * 1e3, 3),
    }
    if other is not None:
        result["compare"] = compare_summary(cmp, other)
    return result


def _classify_other(other: Classifier, image, boxes, batch) -> tuple[np.ndarray, float]:
    """The compare model on the same faces (cropped for its own input size/margin if they differ, untimed)."""
    if batch is None:
        batch = np.stack([other.face_input(image, b) for b in boxes])
    t0 = time.perf_counter()
    probs = other.predict(batch)
    return probs, time.perf_counter() - t0


def compare_summary(cmp: dict, other: Classifier) -> dict:
    """Latency ratio (other / bundled, per face, p50) and top-1 agreement on the same faces."""
    a, b = summarize(cmp["ms_a"]), summarize(cmp["ms_b"])
    ratio = None
    if a.get("count") and a["p50_ms"] > 0:
        ratio = round(b["p50_ms"] / a["p50_ms"], 3)
    return {"model": str(other.path), "version": other.version, "sha256": other.sha256,
            "classify_per_face": b, "baseline_classify_per_face": a, "latency_ratio": ratio,
            "top1_agreement": round(cmp["agree"] / cmp["faces"], 4) if cmp["faces"] else None,
            "faces_compared": cmp["faces"],
            "note": "per face, predict only, order alternating per frame; "
                    "this scenario's fps and CPU include both models"}


# --- report -----------------------------------------------------------------------------------------------------

def command_line(opts: BenchOptions) -> str:
    """The ``fer-edge bench`` command that reproduces ``opts``."""
    d = BenchOptions()
    args = ["fer-edge", "bench", "--input", opts.input]
    if opts.input == "scenes":
        args += ["--faces", *map(str, opts.faces)]
    if opts.resolutions:
        args += ["--resolution", *opts.resolutions]
    args += ["--threads", *map(str, opts.threads), "--every-n", *map(str, opts.every_n),
             "--backend", *[BACKEND_ALIASES[b] for b in opts.backends]]
    if opts.grid:
        args.append("--grid")
    if opts.detector != d.detector:
        args += ["--detector", opts.detector]
    if opts.detector_model:
        args += ["--detector-model", opts.detector_model]
    if opts.detect_width != d.detect_width:
        args += ["--detect-width", str(opts.detect_width)]
    if opts.fine_scale != d.fine_scale:
        args += ["--fine-scale", f"{opts.fine_scale:g}"]
    if opts.fine_tile != d.fine_tile:
        args += ["--fine-tile", str(opts.fine_tile)]
    if list(opts.fine_angles) != list(d.fine_angles):
        args += ["--fine-angles", *(f"{a:g}" for a in opts.fine_angles)]
    if opts.flip_average:
        args.append("--flip-average")
    if opts.max_faces_per_frame != d.max_faces_per_frame:
        args += ["--max-faces-per-frame", str(opts.max_faces_per_frame)]
    for flag, value in (("--model", opts.model), ("--compare", opts.compare)):
        if value:
            args += [flag, value]
    args += ["--iterations", str(opts.iterations), "--warmup", str(opts.warmup)]
    return shlex.join(args)


def budget(scenarios: list[dict], model_path: str, flip_average: bool = False, max_faces_per_frame: int = 0) -> list[dict]:
    """Issue 6's budget checked on the 640x480, 3-face, 1-thread, every-frame-detection scenario."""
    ref = next((s for s in scenarios if s.get("status") == "ok" and s["input"] == "scenes" and s["faces"] == 3
                and s["resolution"] == "640x480" and s["threads"] == 1 and s["every_n"] == 1), None)
    note = "" if not model_path else " (not the shipped model: --model was given)"
    note += ", flip_average: each face classified twice" if flip_average else ""
    if ref is None:
        why = "not measured: needs --input scenes --faces 3 --resolution 640x480 --threads 1 --every-n 1"
        return [{"item": item, "limit": lim, "measured": None, "ok": None, "note": why}
                for item, lim in (("classify ms/face p50", BUDGET_CLASSIFY_MS_PER_FACE),
                                  ("640x480 3 faces total p95 ms", BUDGET_TOTAL_P95_MS),
                                  ("RSS MB", BUDGET_RSS_MB))]
    per_face = ref["classify_per_face"].get("p50_ms")
    total = ref["stages"]["total"]["p95_ms"]
    rows = [("classify ms/face p50", BUDGET_CLASSIFY_MS_PER_FACE, per_face, "int8 model, 1 thread" + note),
            ("640x480 3 faces total p95 ms", BUDGET_TOTAL_P95_MS, total, "detect..publish, 1 thread, "
             + (f"{ref.get('faces_classified_mean', 3):.1f} faces classified a frame (max_faces_per_frame "
                f"{max_faces_per_frame})" if max_faces_per_frame else "every face classified every frame")),
            ("RSS MB", BUDGET_RSS_MB, ref["rss_mb"], "scenario process (fresh): pipeline + bench bookkeeping")]
    return [{"item": item, "limit": lim, "measured": val, "ok": None if val is None else val <= lim,
             "scenario": ref["id"], "note": n} for item, lim, val, n in rows]


def run(opts: BenchOptions, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Validate ``opts``, run every planned scenario and return the report (a JSON-ready dict)."""
    opts.validate()
    machine = machine_info()
    # Fail on a bad model/compare/detector before spending minutes on scenarios.
    first = next((b for b in map(BACKEND_ALIASES.get, opts.backends) if backend_installed(b)), None)
    if first is None:
        raise BenchError(f"--backend: none of {', '.join(opts.backends)} is installed; pip install ai-edge-litert")
    clf, load_ms = load_timed(opts.model, 1, first)
    other = load_timed(opts.compare, 1, first)[0] if opts.compare else None
    det = make_detector(opts.detect_config())
    scenarios = plan(opts)
    results = []
    t0 = time.monotonic()
    with Bench(opts) as bench:
        for k, sc in enumerate(scenarios, 1):
            progress(f"[{k}/{len(scenarios)}] {sc.id}")
            try:
                results.append(bench.run_scenario(sc))
            except Exception as e:  # one failing scenario must not cost the others' numbers; exit status says so
                log.error("scenario %s failed: %s: %s", sc.id, type(e).__name__, e)
                results.append({"id": sc.id, "input": sc.input, "faces": sc.faces, "threads": sc.threads,
                                "every_n": sc.every_n, "backend": sc.backend, "status": "error",
                                "error": f"{type(e).__name__}: {e}"})
    try:
        load_end = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load_end = None
    machine["loadavg_at_end"] = load_end
    report = {
        "tool": "fer-edge bench",
        "command": command_line(opts),
        "machine": machine,
        "model": dict(clf.info(), load_ms=load_ms, manifest_name=clf.manifest.get("name"),
                      flip_average=opts.flip_average),
        "compare_model": other.info() if other is not None else None,
        "detector": {"backend": opts.detector, "detect_width": opts.detect_width, "fine_scale": opts.fine_scale,
                     "fine_tile": opts.fine_tile, "fine_angles": list(opts.fine_angles),
                     "model_path": opts.detector_model or None, "runs": det.name, "reason": det.reason},
        "settings": {"iterations": opts.iterations, "warmup": opts.warmup, "grid": opts.grid,
                     "max_faces_per_frame": opts.max_faces_per_frame,
                     "scene_frames": opts.scene_frames, "seed": opts.seed},
        "publish_measures": PUBLISH_MEASURES,
        "stage_notes": {
            "capture": "decode of the next frame (cv2.VideoCapture.read, the per-frame work of edge.sources' "
                       "capture thread), timed in a separate pass over the same video",
            "source_wait": "time the pipeline waited in Source.read() for the next frame (the daemon's capture_wait)",
            "total": "detect + preprocess + classify + track_publish: the daemon's work per frame",
            "fps": "frames / wall time while the source decodes in its own thread, as in the daemon",
        },
        "scenarios": results,
        "budget": budget(results, opts.model, opts.flip_average, opts.max_faces_per_frame),
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    return report


def _worker() -> int:
    """``python -m edge.bench --worker``: one scenario from a JSON job on stdin, its result as JSON on stdout."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        job = json.loads(sys.stdin.read())
        opts, sc = BenchOptions(**job["options"]), Scenario(**job["scenario"])
        result = measure(opts, sc, job["video"], float(job["fps"]))
    except Exception as e:  # reported as this scenario's error by the parent
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(_worker())
