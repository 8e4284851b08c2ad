"""training.scenes: ground-truth matching by time and position, and one tiny scene video through the daemon.

Needs nothing beside the checkout: the faces are the demo clip's real FER-2013 faces (edge.bench.demo_faces) with
their labels from edge/data/demo.json, and the detector is the bundled YuNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge.bench import DEMO_META, demo_faces
from training import scenes
from training.scenes import T0, FaceImage, Plan, Scene, SceneFace, match_tracks, plan_scenes, run_daemon, score


def _face(label: str, size: int, x: float, y: float, dx: float = 0.0) -> SceneFace:
    return SceneFace(0, label, size, (x, y), (x + dx, y), 1.0, 0.0, (90, 90, 90))


def _plan() -> Plan:
    """Two scenes at 10 fps: frames 10-29 (two faces), 50-69 (one face); nothing on screen in between."""
    s0 = Scene(0, 10, 29, "gradient", 1, [_face("happy", 100, 50, 50), _face("sad", 80, 400, 300, dx=38)])
    s1 = Scene(1, 50, 69, "room", 2, [_face("angry", 120, 200, 100)])
    return Plan(640, 480, 10.0, 80, [s0, s1], fade=2)


def _iso(frame: int) -> str:
    from edge.events import iso_utc

    return iso_utc(T0 + frame / 10.0)


def _ev(kind: str, fid: str, frame: int, first: int, box, emotion: str, dominant: str | None = None) -> dict:
    ev = {"type": kind, "face_id": fid, "epoch": T0 + frame / 10.0, "first_seen": _iso(first), "emotion": emotion,
          "bbox": dict(zip("xywh", box))}
    if dominant:
        ev["summary"] = {"dominant": dominant}
    return ev


def test_tracks_belong_to_the_scene_on_screen_when_first_seen_and_to_the_face_they_overlap():
    plan = _plan()
    events = [
        _ev("new", "a", 12, 10, (55, 45, 85, 100), "happy"),  # scene 0, face 0 (YuNet-like narrower box)
        _ev("new", "b", 23, 21, (418, 300, 66, 80), "fear"),  # scene 0, face 1 where it has drifted by then
        _ev("end", "a", 29, 10, (55, 45, 85, 100), "happy", dominant="happy"),
        _ev("new", "c", 27, 25, (52, 50, 96, 100), "happy"),  # a second track on face 0: a split
        _ev("end", "b", 29, 21, (430, 300, 66, 80), "sad", dominant="sad"),
        _ev("new", "d", 40, 38, (300, 200, 60, 60), "neutral"),  # first seen in the gap: no scene on screen
        _ev("new", "e", 52, 50, (500, 20, 60, 60), "angry"),  # scene 1 but where no face is
        _ev("new", "f", 53, 51, (200, 100, 120, 120), "angry"),  # scene 1, face 0
        # Scene 0's face 0 position, but first seen while scene 1 is on screen: time decides, not position.
        _ev("new", "g", 60, 58, (50, 50, 100, 100), "happy"),
    ]
    tracks = match_tracks(plan, events)["tracks"]
    assert {k: v["face"] for k, v in tracks.items()} == {"a": (0, 0), "b": (0, 1), "c": (0, 0), "d": None,
                                                         "e": None, "f": (1, 0), "g": None}
    assert tracks["a"]["end"] == "happy" and tracks["b"]["end"] == "sad" and tracks["f"]["end"] is None

    faces = [FaceImage("x.jpg", "happy", None)]
    run = {"events": events, "calls": [], "stats": {}, "detector": "test", "reason": "test"}
    r = score(plan, faces, ["happy"], run, min_face=90)
    assert r["faces"] == 3 and r["recall_pct"] == 100.0
    assert r["faces_min_face"] == 2 and r["recall_min_face_pct"] == 100.0  # the 80 px face is below min_face
    assert r["false_tracks"] == 3 and r["split_faces"] == 1 and r["matched_tracks"] == 4
    assert r["new_accuracy_pct"] == 75.0  # b said fear for a sad face
    assert r["end_accuracy_pct"] == 100.0 and r["ended_tracks"] == 2
    # The still image (faces[0] for every scene face) is "happy": right for a and c only.
    assert r["still_accuracy_same_faces_pct"] == 50.0


def test_unmatched_face_lowers_recall():
    plan = _plan()
    r = score(plan, [FaceImage("x.jpg", "happy", None)], ["happy"],
              {"events": [_ev("new", "f", 53, 51, (200, 100, 120, 120), "angry")], "calls": [], "stats": {},
               "detector": "t", "reason": "t"}, min_face=48)
    assert r["recall_pct"] == pytest.approx(33.33) and r["false_tracks"] == 0
    assert r["recall_by_size_pct"] == {"64-95": 0.0, "96-127": 50.0}
    assert r["faces_by_size"] == {"64-95": 1, "96-127": 2}


def test_planned_scenes_keep_faces_apart_and_inside_and_leave_gaps():
    faces = [FaceImage(f"{i}.jpg", "happy", None) for i in range(10)]
    plan = plan_scenes(12, faces, sizes=(40, 200), seed=5, gap_s=1.5)
    assert all(1 <= len(sc.faces) <= 3 for sc in plan.scenes)
    for a, b in zip(plan.scenes, plan.scenes[1:]):
        assert b.first - a.last - 1 == 15  # 1.5 s without faces at 10 fps
    for sc in plan.scenes:
        for f in (sc.first, sc.last):
            boxes = [sf.box(sc.t(f)) for sf in sc.faces]
            for x, y, s, _ in boxes:
                assert 0 <= x and 0 <= y and x + s <= 640 and y + s <= 480 and 40 <= s <= 200
            for i, p in enumerate(boxes):
                assert all(scenes.iou(p, q) == 0.0 for q in boxes[i + 1:])


@pytest.fixture(scope="module")
def demo_face_images() -> list[FaceImage]:
    meta = json.loads(Path(DEMO_META).read_text())
    grays = demo_faces()
    labels = [f["class"] for f in meta["faces"]]
    assert len(grays) == len(labels)
    return [FaceImage(f["file"], lab, g) for f, lab, g in zip(meta["faces"], labels, grays)]


def test_tiny_scene_video_through_the_daemon_finds_every_face(tmp_path, demo_face_images):
    """Three short scenes of large real faces: the daemon must report each face once, at the right place and time."""
    faces = demo_face_images
    plan = plan_scenes(3, faces, scene_s=2.0, gap_s=1.5, sizes=(130, 170), max_faces=2, seed=3)
    video = tmp_path / "tiny.mp4"
    scenes.write_video(video, plan, faces)
    run = run_daemon(video, {"detect.backend": "yunet"}, str(tmp_path), plan.fps)
    assert run["detector"] == "yunet"
    assert run["stats"]["detector"] == "yunet"
    assert run["stats"]["detector_reason"] == "bundled face_detection_yunet_2026may.tflite (LiteRT)"
    n = sum(len(sc.faces) for sc in plan.scenes)
    assert n >= 4
    r = score(plan, faces, [f.label for f in faces], run, min_face=48)
    assert r["faces"] == n and r["recall_pct"] == 100.0, r
    assert r["false_tracks"] == 0 and r["split_faces"] == 0, r
    assert r["ended_tracks"] == n  # every track ended inside the gap after its scene
    assert r["frame_recall_pct"] >= 90.0, r
    assert r["detect_ms"]["p50_ms"] > 0
