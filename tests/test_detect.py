"""Face detectors on real FER-2013 faces (from ../shared) and on the bundled demo clip."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.detect import Box, DetectConfig, DetectorError, HaarDetector, YuNetDetector, make_detector

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
        pytest.skip(f"{path} missing: ../shared (FER-2013 + YuNet model) is not beside the repo")


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
    need_shared(YUNET)
    return DetectConfig(backend="yunet", model_path=str(YUNET), **kw)


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
    assert all(min(b.w, b.h) >= limit for b in boxes)
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


def test_yunet_bad_model_paths(tmp_path):
    with pytest.raises(DetectorError, match="not found"):
        make_detector(DetectConfig(backend="yunet", model_path=str(tmp_path / "nope.onnx")))
    garbage = tmp_path / "broken.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 64)
    with pytest.raises(DetectorError, match="corrupt or not a YuNet ONNX model"):
        YuNetDetector(DetectConfig(backend="yunet", model_path=str(garbage)))
    wrong = tmp_path / "model.tflite"
    wrong.write_bytes(b"TFL3")
    with pytest.raises(DetectorError, match="must be an .onnx file"):
        make_detector(DetectConfig(backend="yunet", model_path=str(wrong)))
    with pytest.raises(DetectorError, match="model_path"):
        make_detector(DetectConfig(backend="yunet"))


@pytest.mark.parametrize("field,value", [("backend", "hog"), ("detect_width", 10), ("min_face", 0), ("max_faces", 0),
                                         ("score_threshold", 1.5), ("every_n", 0)])
def test_validate_names_the_field(field, value):
    cfg = DetectConfig(**{field: value})
    with pytest.raises(ValueError, match=f"^{field}: "):
        cfg.validate()
    DetectConfig().validate()


def test_haar_on_demo_clip_matches_ground_truth():
    """Runs without ../shared: the committed clip and its ground truth."""
    gt = json.loads(DEMO_JSON.read_text())
    cap = cv2.VideoCapture(str(DEMO_JSON.parent / gt["clip"]))
    det = HaarDetector(DetectConfig())
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
