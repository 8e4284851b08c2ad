"""training.pareto: which models are on the front, and a figure whose labels do not print over each other."""
from __future__ import annotations

from training.pareto import label_place, pareto_front, point_kind


def test_front_keeps_only_undominated_models():
    pts = [{"name": "peer", "ratio": 1.0, "accuracy": 0.6525}, {"name": "small", "ratio": 0.65, "accuracy": 0.659},
           {"name": "big", "ratio": 1.44, "accuracy": 0.6916}, {"name": "old", "ratio": 1.41, "accuracy": 0.6824},
           {"name": "tie", "ratio": 1.44, "accuracy": 0.6916}]
    # the peer is beaten on both axes by small; old is faster than big but less accurate, so both stay
    assert pareto_front(pts) == {"small", "old", "big", "tie"}
    pts.append({"name": "best", "ratio": 0.5, "accuracy": 0.70})
    assert pareto_front(pts) == {"best"}


def test_labels_of_close_points_do_not_overlap():
    box, placed = (80, 50, 870, 500), []
    for c in [(700, 200), (704, 203), (708, 206)]:  # three releases a few pixels apart
        tx, ty = label_place(c, 150, 12, placed, box)
        r = (tx, ty - 12, tx + 150, ty + 2)
        assert all(not (r[0] < q[2] and q[0] < r[2] and r[1] < q[3] and q[1] < r[3]) for q in placed)
        assert box[0] < r[0] and r[2] < box[2]
        placed.append(r)


def test_a_training_runs_export_is_a_candidate_not_a_release():
    shipped = {"edge/models/fer_emotion.tflite"}
    assert point_kind("/peer/fer_peer.tflite", "/peer/fer_peer.tflite", shipped) == "ref"
    assert point_kind("edge/models/fer_emotion.tflite", "/p.tflite", shipped) == "shipped"
    assert point_kind("runs/releases/fer_emotion-1.1.0.tflite", "/p.tflite", shipped) == "release"
    assert point_kind("runs/lean-kd3/fer_emotion_lean.tflite", "/p.tflite", shipped) == "candidate"
