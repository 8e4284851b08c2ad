"""model.max_faces_per_frame in the daemon's own loop (edge.service.Service) on a generated 3-face video: once the
faces are tracked, the classifier sees at most that many a frame, every face gets its turns, and the events say
the same as with every face classified on every frame."""

from __future__ import annotations

from collections import Counter

import pytest

from edge.bench import SCENE_FPS, SceneRenderer, demo_faces, write_video
from edge.config import load_config
from edge.service import Service

FRAMES = 60


@pytest.fixture(scope="module")
def three_faces(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("scene") / "three.mp4"
    r = SceneRenderer(demo_faces(), 3, 640, 480, FRAMES, seed=5)
    write_video(path, (r.frame(i) for i in range(FRAMES)), (640, 480), SCENE_FPS)
    return str(path)


class CountingService(Service):
    """The daemon, noting how many faces each predict() call got."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches: list[int] = []

    def _process(self, frame) -> None:
        clf = self.classifier
        if not getattr(clf, "_counted", False):
            predict = clf.predict

            def counted(faces, **kw):
                self.batches.append(len(faces))
                return predict(faces, **kw)

            clf.predict, clf._counted = counted, True
        super()._process(frame)


def run(video: str, tmp_path, limit: int) -> tuple[CountingService, list[dict]]:
    events: list[dict] = []
    cfg = load_config(None, overrides={"source.kind": "opencv", "source.uri": video, "source.realtime": "false",
                                       "mqtt.enabled": "false", "service.max_frames": str(FRAMES),
                                       "device.state_dir": str(tmp_path / str(limit)),
                                       "model.max_faces_per_frame": str(limit)}, env={})
    svc = CountingService(cfg, env={}, event_sink=events.append)
    assert svc.run() == 0
    return svc, events


def test_at_most_k_faces_classified_a_frame_and_the_events_agree(three_faces, tmp_path):
    every, ev_every = run(three_faces, tmp_path, 0)
    capped, ev_capped = run(three_faces, tmp_path, 1)
    assert every.frames == capped.frames == FRAMES
    # Every frame, all three faces: the scene really holds three detectable faces.
    assert Counter(every.batches)[3] >= FRAMES - 5
    # Capped: three faces on the first frames (new faces are always classified), then one a frame.
    later = capped.batches[5:]
    assert later and set(later) == {1}, capped.batches
    assert capped.stats()["faces_classified"] == sum(capped.batches) < every.stats()["faces_classified"]
    # The same three faces were reported, with the same emotions, and each kept getting classified.
    new_every = sorted(e["emotion"] for e in ev_every if e["type"] == "new")
    new_capped = sorted(e["emotion"] for e in ev_capped if e["type"] == "new")
    assert len(new_every) == 3 and new_capped == new_every
    end_every = sorted(e["summary"]["dominant"] for e in ev_every if e["type"] == "end")
    end_capped = [e for e in ev_capped if e["type"] == "end"]
    assert sorted(e["summary"]["dominant"] for e in end_capped) == end_every
    for e in end_capped:  # frames counts every frame a face was seen, classified or not
        assert e["summary"]["frames"] >= FRAMES - 5
