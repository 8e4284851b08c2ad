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
