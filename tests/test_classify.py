"""edge.classify on the shipped model: mirrored-view averaging (model.flip_average) and its config key."""

from __future__ import annotations

import numpy as np
import pytest

from edge.classify import load_classifier
from edge.config import ConfigError, load_config
from edge.preprocess import crop_face, inner_box

SELFTEST = __import__("pathlib").Path(__file__).resolve().parents[1] / "edge" / "data" / "selftest.npz"


@pytest.fixture(scope="module")
def clf_and_faces():
    clf = load_classifier()
    data = np.load(SELFTEST)
    faces = data["faces"]
    box = inner_box(faces.shape[1], float(data["context_margin"]))
    crops = np.stack([crop_face(f, box, clf.input_size, clf.margin) for f in faces])
    return clf, crops


def test_flip_average_is_the_mean_of_both_views(clf_and_faces):
    clf, x = clf_and_faces
    plain = clf.predict(x)
    mirrored = clf.predict(x[:, :, ::-1])
    both = clf.predict(x, flip_average=True)
    assert both.shape == plain.shape and np.allclose(both.sum(1), 1, atol=1e-5)
    assert np.allclose(both, (plain + mirrored) / 2, atol=1e-6)
    # the two views differ (else averaging would be pointless), and the average is mirror-invariant
    assert np.abs(plain - mirrored).max() > 1e-3
    assert np.allclose(clf.predict(x[:, :, ::-1], flip_average=True), both, atol=1e-6)
    assert clf.predict(x[:0], flip_average=True).shape == (0, len(clf.labels))


def test_flip_average_config_key_is_validated():
    assert load_config(None, {"model.flip_average": "true"}).model.flip_average is True
    assert load_config(None, {}).model.flip_average is False
    with pytest.raises(ConfigError, match="model.flip_average"):
        load_config(None, {"model.flip_average": "maybe"})


def test_classify_faces_crops_each_box_as_the_manifest_says_and_predicts_once(clf_and_faces):
    """The one place that crops and classifies the faces of an image (predict, snapshot, doctor, bench use it)."""
    clf, _ = clf_and_faces
    data = np.load(SELFTEST)
    faces = data["faces"][:3]
    side = faces.shape[1]
    canvas = np.full((side + 40, 3 * side + 80, 3), 90, np.uint8)  # three faces side by side in a BGR frame
    box = inner_box(side, float(data["context_margin"]))
    boxes = []
    for i, f in enumerate(faces):
        x0 = 20 + i * (side + 20)
        canvas[20:20 + side, x0:x0 + side] = f[..., None]
        boxes.append(type(box)(x=x0 + box.x, y=20 + box.y, w=box.w, h=box.h))
    want = clf.predict(np.stack([crop_face(canvas, b, clf.input_size, clf.margin) for b in boxes]))
    got = clf.classify_faces(canvas, boxes)
    assert got.shape == (3, len(clf.labels)) and np.allclose(got, want, atol=1e-6)
    assert np.array_equal(clf.face_input(canvas, boxes[1]), crop_face(canvas, boxes[1], clf.input_size, clf.margin))
    assert np.allclose(clf.classify_faces(canvas, boxes, flip_average=True),
                       clf.predict(np.stack([clf.face_input(canvas, b) for b in boxes]), flip_average=True))
    assert clf.classify_faces(canvas, []).shape == (0, len(clf.labels))
