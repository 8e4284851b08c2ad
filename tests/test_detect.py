"""Face detectors on real FER-2013 faces (from ../shared) and on the bundled demo clip; the bundled YuNet, its
fallback to Haar, and the config checks that refuse a model file the daemon could not use."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.detect import (BUNDLED_YUNET, BUNDLED_YUNET_TFLITE, Box, DetectConfig, DetectorError, HaarDetector,
                         YuNetDetector, make_detector)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FER_TEST = SHARED / "data" / "fer2013" / "test"
YUNET = SHARED / "models" / "face_detection_yunet_2026may.onnx"
DEMO_JSON = REPO / "edge" / "data" / "demo.json"

# Test faces both detectors find when upscaled (the ones the demo clip uses).
FACES = ["happy/PublicTest_848748.jpg", "sad/PublicTest_44164524.jpg", "surprise/PublicTest_54005456.jpg"]
PLACES = [(30, 30, 220), (380, 60, 160), (220, 300, 130)]  # x, y, side in a 640x480 frame


def need_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} missing: ../shared, the read-only data folder beside the checkout (FER-2013 in "
                    "Kaggle layout + YuNet), is absent; README 'Test data' says how to get it")


@pytest.fixture(scope="module")
def faces_image() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A 640x480 gray frame with three upscaled FER-2013 test faces, and their true boxes."""
    need_shared(FER_TEST)
    img = np.full((480, 640, 3), 128, np.uint8)
    truth = []
    for name, (x, y, s) in zip(FACES, PLACES):
        face = cv2.imread(str(FER_TEST / name), cv2.IMREAD_GRAYSCALE)
        assert face is not None, name
        img[y:y + s, x:x + s] = cv2.resize(face, (s, s), interpolation=cv2.INTER_CUBIC)[..., None]
        truth.append((x, y, s, s))
    return img, truth


def iou(b: Box, g) -> float:
    gx, gy, gw, gh = g
    ix = max(0, min(b.x + b.w, gx + gw) - max(b.x, gx))
    iy = max(0, min(b.y + b.h, gy + gh) - max(b.y, gy))
    inter = ix * iy
    return inter / (b.w * b.h + gw * gh - inter)


def yunet_cfg(**kw) -> DetectConfig:
    return DetectConfig(backend="yunet", **kw)  # the bundled model


def configs():
    return [pytest.param(lambda **kw: DetectConfig(backend="haar", **kw), id="haar"),
            pytest.param(yunet_cfg, id="yunet")]


@pytest.mark.parametrize("make_cfg", configs())
@pytest.mark.parametrize("detect_width", [320, 0])
def test_finds_real_faces_in_source_coordinates(faces_image, make_cfg, detect_width):
    img, truth = faces_image
    det = make_detector(make_cfg(detect_width=detect_width))
    boxes = det.detect(img)
    assert len(boxes) == 3, boxes
    for g in truth:  # each true face matched by a box in full-resolution pixels
        assert max(iou(b, g) for b in boxes) > 0.5, (g, boxes)
    areas = [b.area for b in boxes]
    assert areas == sorted(areas, reverse=True)
    for b in boxes:
        assert 0 <= b.x and 0 <= b.y and b.x + b.w <= 640 and b.y + b.h <= 480
        assert isinstance(b.x, int) and 0 < b.score <= 1.0


@pytest.mark.parametrize("make_cfg", configs())
def test_max_faces_keeps_largest(faces_image, make_cfg):
    img, truth = faces_image
    boxes = make_detector(make_cfg(max_faces=1)).detect(img)
    assert len(boxes) == 1
    assert iou(boxes[0], truth[0]) > 0.5  # the 220 px face is the largest


@pytest.mark.parametrize("make_cfg", configs())
def test_min_face_drops_small_faces(faces_image, make_cfg):
    img, truth = faces_image
    limit = 148  # between the 160 px and the 130 px face
    boxes = make_detector(make_cfg(min_face=limit)).detect(img)
    assert boxes and iou(boxes[0], truth[0]) > 0.5
    # The longer side counts: crop_face squares the box on it (YuNet's boxes are ~0.8 as wide as tall).
    assert all(max(b.w, b.h) >= limit for b in boxes)
    assert all(iou(b, truth[2]) < 0.1 for b in boxes)  # the small face is gone


@pytest.mark.parametrize("make_cfg", configs())
def test_blank_and_empty_images_give_no_faces(make_cfg):
    det = make_detector(make_cfg())
    assert det.detect(np.full((480, 640, 3), 128, np.uint8)) == []
    assert det.detect(np.zeros((0, 0, 3), np.uint8)) == []
    assert det.detect(np.zeros((240, 320), np.uint8)) == []  # gray input accepted


def test_face_at_frame_edge_is_clipped(faces_image):
    img, truth = faces_image
    x, y, s = PLACES[0]
    shifted = np.full_like(img, 128)
    shifted[:, :640 - 30] = img[:, 30:]  # face now starts at x = 10
    for b in make_detector(DetectConfig(detect_width=320)).detect(shifted):
        assert b.x >= 0 and b.x + b.w <= 640


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00not a protobuf" * 64)
    return path


def test_yunet_bad_model_paths(tmp_path):
    with pytest.raises(DetectorError, match="^model_path: YuNet model not found"):
        make_detector(DetectConfig(backend="yunet", model_path=str(tmp_path / "nope.onnx")))
    garbage = _garbage(tmp_path / "broken.onnx")
    with pytest.raises(DetectorError, match="corrupt or not a YuNet ONNX model"):
        YuNetDetector(DetectConfig(backend="yunet", model_path=str(garbage)))
    broken = tmp_path / "model.tflite"
    broken.write_bytes(b"TFL3")
    with pytest.raises(DetectorError, match="not a loadable LiteRT model"):
        make_detector(DetectConfig(backend="yunet", model_path=str(broken)))
    wrong = tmp_path / "model.pb"
    wrong.write_bytes(b"\x00" * 64)
    with pytest.raises(DetectorError, match="must be an .onnx or .tflite file"):
        make_detector(DetectConfig(backend="yunet", model_path=str(wrong)))
    classifier = REPO / "edge" / "models" / "fer_emotion_small.tflite"  # a real .tflite, not a face detector
    with pytest.raises(DetectorError, match="not the exported YuNet"):
        make_detector(DetectConfig(backend="yunet", model_path=str(classifier)))


def test_default_is_the_bundled_yunet_with_landmarks():
    cfg = DetectConfig()
    assert cfg.backend == "yunet" and cfg.model_path == ""
    det = make_detector(cfg)
    assert isinstance(det, YuNetDetector) and det.name == "yunet"
    assert Path(det.model_path) == BUNDLED_YUNET_TFLITE and BUNDLED_YUNET.is_file()
    assert det.reason == "bundled face_detection_yunet_2026may.tflite (LiteRT)" and not det.fallback
    clip = cv2.VideoCapture(str(DEMO_JSON.parent / "demo.mp4"))
    clip.set(cv2.CAP_PROP_POS_FRAMES, 60)
    ok, frame = clip.read()
    clip.release()
    assert ok
    boxes = det.detect(frame)
    assert len(boxes) == 2
    for b in boxes:  # eyes above the nose above the mouth, all inside the box, the person's right eye on the left
        (rex, rey), (lex, ley), (nx, ny), (rmx, rmy), (lmx, lmy) = b.landmarks
        for x, y in b.landmarks:
            assert b.x <= x <= b.x + b.w and b.y <= y <= b.y + b.h
        assert rex < lex and rmx < lmx and max(rey, ley) < ny < min(rmy, lmy)


def test_litert_yunet_finds_what_opencv_yunet_finds():
    """The bundled .tflite (LiteRT) is the bundled .onnx (OpenCV) in another runtime: the same boxes, landmarks and
    scores on the demo clip, at every input size the fine search uses."""
    lite = YuNetDetector(DetectConfig(), path=BUNDLED_YUNET_TFLITE, bundled=True)
    ocv = YuNetDetector(DetectConfig(), path=BUNDLED_YUNET, bundled=True)
    assert (lite.runtime, ocv.runtime) == ("LiteRT", "OpenCV")
    clip = cv2.VideoCapture(str(DEMO_JSON.parent / "demo.mp4"))
    compared = 0
    for f in range(0, 300, 15):
        clip.set(cv2.CAP_PROP_POS_FRAMES, f)
        ok, frame = clip.read()
        if not ok:
            break
        for size in ((320, 240), (256, 256), (144, 144)):
            small = cv2.resize(frame, size)
            a, b = ocv._detect_small(small, 1.0), lite._detect_small(small, 1.0)
            assert len(a) == len(b), (f, size)
            for fa, fb in zip(sorted(a, key=lambda r: r[0]), sorted(b, key=lambda r: r[0])):
                assert np.allclose(fa[:4], fb[:4], atol=0.05) and abs(fa[4] - fb[4]) < 1e-3
                assert np.allclose(fa[5], fb[5], atol=0.05)
                compared += 1
    clip.release()
    assert compared >= 20


def test_haar_has_no_landmarks_and_says_why_it_runs():
    det = make_detector(DetectConfig(backend="haar"))
    assert det.name == "haar" and det.reason == 'detect.backend = "haar"'


def test_broken_bundled_model_falls_back_to_haar_with_one_line(tmp_path, caplog):
    garbage = [_garbage(tmp_path / "face_detection_yunet_2026may.tflite"),
               _garbage(tmp_path / "face_detection_yunet_2026may.onnx")]
    with caplog.at_level(logging.WARNING, logger="edge.detect"):
        det = make_detector(DetectConfig(), bundled=garbage)
    assert isinstance(det, HaarDetector) and det.name == "haar"
    assert det.reason.startswith("fallback from YuNet: ") and "corrupt" in det.reason
    assert "not a loadable LiteRT model" in det.reason
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "falling back to Haar" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_broken_bundled_tflite_runs_the_onnx_through_opencv_with_one_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="edge.detect"):
        det = make_detector(DetectConfig(), bundled=[_garbage(tmp_path / "yunet.tflite"), BUNDLED_YUNET])
    assert det.name == "yunet" and det.runtime == "OpenCV" and Path(det.model_path) == BUNDLED_YUNET
    assert det.reason.startswith("bundled face_detection_yunet_2026may.onnx (OpenCV); ")
    assert "not a loadable LiteRT model" in det.fallback
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "through OpenCV" in warnings[0].getMessage()
    assert det.detect(np.zeros((480, 640, 3), np.uint8)) == []


def test_opencv_too_old_for_yunet_says_so_instead_of_calling_the_model_corrupt(monkeypatch, caplog, tmp_path):
    """32-bit Pi OS: Debian's OpenCV 4.6 cannot run YuNet 2023+ graphs. LiteRT runs the bundled .tflite there; where
    only the .onnx is left, the fallback line must not tell the user to reinstall a 'damaged' package (seen in the
    armhf userland check)."""
    import edge.detect as detect

    def old_create(*args, **kwargs):
        raise cv2.error("OpenCV(4.6.0) net_impl.cpp:280: error: (-204:Requested object was not found) "
                        "Layer with requested id=-1 not found in function 'getLayerData'")

    monkeypatch.setattr(cv2.FaceDetectorYN, "create", old_create)
    monkeypatch.setattr(detect.cv2, "__version__", "4.6.0")
    det = make_detector(DetectConfig())
    assert det.name == "yunet" and det.runtime == "LiteRT" and not det.fallback  # OpenCV's age does not matter
    assert len(det.detect(_demo_frame())) == 2
    with pytest.raises(DetectorError, match="is too old for YuNet"):
        make_detector(DetectConfig(model_path=str(BUNDLED_YUNET)))
    # Without a LiteRT model (here: a missing one) only OpenCV's runtime is left.
    monkeypatch.setattr(detect, "BUNDLED_YUNET_TFLITE", tmp_path / "absent.tflite")
    with caplog.at_level(logging.WARNING, logger="edge.detect"):
        det = make_detector(DetectConfig(), bundled=BUNDLED_YUNET)
    assert det.name == "haar" and "is too old for YuNet" in det.reason and "needs OpenCV >= 4.8" in det.reason
    assert "corrupt" not in det.reason and "damaged" not in det.reason
    assert "64-bit OS" in det.reason and 'backend = "haar"' in det.reason
    from edge.doctor import WARN, check_detector

    monkeypatch.setattr("platform.machine", lambda: "armv7l")  # where pip has no OpenCV to offer
    check, _ = check_detector(DetectConfig())  # both bundled files: the missing .tflite, then the .onnx
    assert check.status == WARN and "64-bit Raspberry Pi OS" in check.fix and "pip install" not in check.fix
    monkeypatch.setattr(detect.cv2, "__version__", "4.10.0-dev")  # a new OpenCV failing: the file is the suspect
    assert "corrupt" in make_detector(DetectConfig(), bundled=BUNDLED_YUNET).reason


def _demo_frame(index: int = 60) -> np.ndarray:
    clip = cv2.VideoCapture(str(DEMO_JSON.parent / "demo.mp4"))
    clip.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, frame = clip.read()
    clip.release()
    assert ok
    return frame


def test_opencv_without_facedetectoryn_runs_litert_but_an_explicit_onnx_is_refused(monkeypatch, tmp_path):
    copy = tmp_path / "yunet.onnx"
    shutil.copy(BUNDLED_YUNET, copy)
    lite_copy = tmp_path / "yunet.tflite"
    shutil.copy(BUNDLED_YUNET_TFLITE, lite_copy)
    monkeypatch.delattr(cv2, "FaceDetectorYN")
    det = make_detector(DetectConfig())
    assert det.name == "yunet" and det.runtime == "LiteRT"
    det = make_detector(DetectConfig(), bundled=BUNDLED_YUNET)
    assert det.name == "haar" and "has no cv2.FaceDetectorYN" in det.reason
    with pytest.raises(DetectorError, match="^model_path: .*has no cv2.FaceDetectorYN"):
        make_detector(DetectConfig(model_path=str(copy)))
    det = make_detector(DetectConfig(model_path=str(lite_copy)))
    assert det.reason == f"detect.model_path = {lite_copy} (LiteRT)" and len(det.detect(_demo_frame())) == 2


def test_explicit_model_path_is_checked_by_validate(tmp_path):
    """validate() (what config loading runs) refuses what the detector could not load, naming the key."""
    copy = tmp_path / "yunet.onnx"
    shutil.copy(BUNDLED_YUNET, copy)
    DetectConfig(model_path=str(copy)).validate()
    assert make_detector(DetectConfig(model_path=str(copy))).reason == f"detect.model_path = {copy} (OpenCV)"
    for bad, why in ((tmp_path / "missing.onnx", "not found"), (_garbage(tmp_path / "bad.onnx"), "corrupt"),
                     (_garbage(tmp_path / "bad.tflite"), "not a loadable LiteRT model")):
        with pytest.raises(ValueError, match=f"^model_path: .*{why}"):
            DetectConfig(model_path=str(bad)).validate()
    DetectConfig(backend="haar", model_path=str(tmp_path / "missing.onnx")).validate()  # unused by haar


@pytest.mark.parametrize("name", ["missing.onnx", "bad.onnx"])
def test_config_check_refuses_an_unusable_yunet_model_in_one_line(tmp_path, name):
    if name == "bad.onnx":
        _garbage(tmp_path / name)
    r = subprocess.run([sys.executable, "-m", "edge", "config", "--check", "--set",
                        f"detect.model_path={tmp_path / name}"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "FER_EDGE_CONFIG": ""})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "detect.model_path" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_yunet_loads_from_a_fresh_clone_without_shared(tmp_path):
    """The committed package alone (no ../shared beside it, no download) runs the bundled YuNet."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git (sudo apt-get install git) and a git checkout of fer-edge to clone")
    clone = tmp_path / "fresh" / "fer-edge"
    r = subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (clone.parent / "shared").exists()
    code = ("import edge.detect as d, numpy as np; det = d.make_detector(d.DetectConfig()); "
            "det.detect(np.zeros((480, 640, 3), np.uint8)); print(det.name, det.model_path)")
    r = subprocess.run([sys.executable, "-c", code], cwd=clone, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(clone)})
    assert r.returncode == 0, r.stderr
    name, path = r.stdout.split()
    assert name == "yunet" and Path(path) == clone / "edge" / "models" / "face_detection_yunet_2026may.tflite"


@pytest.mark.parametrize("field,value", [("backend", "hog"), ("detect_width", 10), ("min_face", 0), ("max_faces", 0),
                                         ("score_threshold", 1.5), ("every_n", 0)])
def test_validate_names_the_field(field, value):
    cfg = DetectConfig(**{field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):
        cfg.validate()
    DetectConfig().validate()


@pytest.mark.parametrize("backend", ["yunet", "haar"])
def test_demo_clip_matches_ground_truth(backend):
    """Runs without ../shared: the committed clip and its ground truth."""
    gt = json.loads(DEMO_JSON.read_text())
    cap = cv2.VideoCapture(str(DEMO_JSON.parent / gt["clip"]))
    det = make_detector(DetectConfig(backend=backend))
    assert det.name == backend
    hits = total = 0
    for f in range(0, gt["frames"], 10):
        cap.set(cv2.CAP_PROP_POS_FRAMES, f)
        ok, frame = cap.read()
        assert ok, f"frame {f} unreadable"
        present = [t["boxes"][f - t["frames"][0]] for t in gt["tracks"]
                   if t["frames_full"][0] <= f <= t["frames_full"][1]]
        boxes = det.detect(frame)
        total += len(present)
        hits += sum(any(iou(b, g) > 0.3 for b in boxes) for g in present)
        visible = [t["boxes"][f - t["frames"][0]] for t in gt["tracks"] if t["frames"][0] <= f <= t["frames"][1]]
        assert all(any(iou(b, g) > 0.3 for g in visible) for b in boxes), f"false face at frame {f}: {boxes}"
    cap.release()
    assert total > 40 and hits / total >= 0.9


def test_doctor_says_which_detector_runs_and_warns_on_fallback(monkeypatch, tmp_path):
    from edge.doctor import FAIL, OK, WARN, check_detector

    check, det = check_detector(DetectConfig())
    assert check.status == OK and det.name == "yunet"
    assert "yunet: bundled face_detection_yunet_2026may.tflite (LiteRT)" in check.line()
    check, _ = check_detector(DetectConfig(backend="haar"))
    assert check.status == OK and 'haar: detect.backend = "haar"' in check.line()
    import edge.detect

    monkeypatch.setattr(edge.detect, "BUNDLED_YUNET_TFLITE", _garbage(tmp_path / "face_detection_yunet.tflite"))
    check, det = check_detector(DetectConfig())
    assert check.status == WARN and det.name == "yunet" and det.runtime == "OpenCV"
    assert "not a loadable LiteRT model" in check.line() and "reinstall fer-edge" in check.fix
    monkeypatch.delattr(cv2, "FaceDetectorYN")
    check, det = check_detector(DetectConfig())
    assert check.status == WARN and det.name == "haar"
    assert "fallback from YuNet" in check.line() and "FaceDetectorYN" in check.line()
    check, det = check_detector(DetectConfig(backend="haar", max_faces=0))
    assert check.status == FAIL and det is None and "max_faces" in check.line()


def test_daemon_with_a_broken_bundled_yunet_runs_haar_and_says_why(tmp_path, monkeypatch, caplog):
    """The daemon's own start-up (edge.service) with the packaged model damaged: one warning, Haar, stats say why."""
    import edge.detect
    from edge.config import load_config
    from edge.service import Service

    monkeypatch.setattr(edge.detect, "BUNDLED_YUNET", _garbage(tmp_path / "face_detection_yunet_2026may.onnx"))
    monkeypatch.setattr(edge.detect, "BUNDLED_YUNET_TFLITE",
                        _garbage(tmp_path / "face_detection_yunet_2026may.tflite"))
    events: list[dict] = []
    cfg = load_config(None, overrides={"source.kind": "demo", "source.realtime": "false", "mqtt.enabled": "false",
                                       "service.max_frames": "40", "device.state_dir": str(tmp_path)}, env={})
    svc = Service(cfg, env={}, event_sink=events.append)
    with caplog.at_level(logging.WARNING, logger="edge.detect"):
        assert svc.run() == 0
    stats = svc.stats()
    assert stats["detector"] == "haar" and stats["detector_reason"].startswith("fallback from YuNet: ")
    assert len([r for r in caplog.records if r.name == "edge.detect"]) == 1
    assert any(e["type"] == "new" for e in events)  # Haar still finds the demo's faces
