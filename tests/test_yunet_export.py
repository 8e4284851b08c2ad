"""quantization.yunet: the LiteRT export of the bundled YuNet is the same detector as the ONNX it is made from."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.detect import BUNDLED_YUNET
from edge.detect_litert import LiteYuNet

REPO = Path(__file__).resolve().parents[1]


def test_export_runs_in_litert_and_matches_cv2_facedetectoryn(tmp_path):
    pytest.importorskip("onnx", reason="needs onnx (the train extra: pip install -e '.[train]')")
    pytest.importorskip("tensorflow", reason="needs TensorFlow (the train extra: pip install -e '.[train]')")
    from quantization.yunet import convert

    out = tmp_path / "yunet.tflite"
    convert(BUNDLED_YUNET, out)
    clip = cv2.VideoCapture(str(REPO / "edge" / "data" / "demo.mp4"))
    clip.set(cv2.CAP_PROP_POS_FRAMES, 60)  # two faces on screen
    ok, frame = clip.read()
    clip.release()
    assert ok
    found = 0
    for size in ((320, 240), (160, 96)):  # heights that need padding to a multiple of 32, as OpenCV pads
        small = cv2.resize(frame, size)
        _, want = cv2.FaceDetectorYN.create(str(BUNDLED_YUNET), "", size, 0.3, 0.3, 50).detect(small)
        _, got = LiteYuNet(out, size, 0.3, 0.3, 50).detect(small)
        want = np.zeros((0, 15)) if want is None else want
        got = np.zeros((0, 15)) if got is None else got
        assert got.shape == want.shape
        assert np.allclose(got[np.argsort(got[:, 0])], want[np.argsort(want[:, 0])], atol=0.05)
        found += len(got)
    assert found >= 2
