"""Tracker lifecycle: tentative -> new -> update -> end, association, smoothing, summaries (deterministic)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edge.detect import Box
from edge.track import TrackConfig, Tracker, iou

LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def p(label: str, conf: float = 0.9) -> np.ndarray:
    v = np.full(len(LABELS), (1.0 - conf) / (len(LABELS) - 1))
    v[LABELS.index(label)] = conf
    return v


def probs(*rows) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, len(LABELS)))


A = Box(100, 100, 80, 80)
B = Box(400, 120, 90, 90)


def make(**kw) -> Tracker:
    cfg = TrackConfig(**kw)
    cfg.validate()
    return Tracker(cfg, LABELS)


def feed(tr: Tracker, box: Box, label: str, ts: float, conf: float = 0.9):
    return tr.update([box], probs(p(label, conf)), ts)


def test_iou():
    assert iou(A, A) == 1.0
    assert iou(A, B) == 0.0
    assert iou(Box(0, 0, 10, 10), Box(5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou(Box(0, 0, 0, 0), Box(0, 0, 0, 0)) == 0.0


def test_tentative_then_confirmed_emits_new_with_stable_id():
    tr = make(min_hits=3)
    assert feed(tr, A, "happy", 10.0) == []
    assert feed(tr, A, "happy", 10.1) == []
    assert tr.active == 0 and tr.tracks() == []
    (ev,) = feed(tr, A, "happy", 10.2)
    assert ev.type == "new" and ev.emotion == "happy"
    assert re.fullmatch(r"[0-9a-f]+-[0-9a-f]{4}", ev.face_id)
    assert ev.first_seen == 10.0 and ev.last_seen == 10.2 and ev.duration_s == pytest.approx(0.2)
    assert ev.summary is None and ev.bbox == A
    assert set(ev.scores) == set(LABELS) and ev.confidence == pytest.approx(ev.scores["happy"])
    assert tr.active == 1 and tr.tracks() == [(ev.face_id, A)]
    moved = Box(104, 102, 80, 80)
    feed(tr, moved, "happy", 10.3)
    assert tr.tracks() == [(ev.face_id, moved)]  # same id, latest box


def test_min_hits_one_reports_on_first_sight():
    tr = make(min_hits=1)
    (ev,) = feed(tr, A, "sad", 0.0)
    assert ev.type == "new" and ev.emotion == "sad" and ev.duration_s == 0.0


def test_tentative_track_that_never_confirms_vanishes_silently():
    tr = make(min_hits=3, max_missed_s=1.0)
    feed(tr, A, "happy", 0.0)
    feed(tr, A, "happy", 0.1)
    assert tr.predict_only(1.0) == []  # 0.9 s unseen: still tentative
    assert tr.predict_only(1.2) == []  # expired: dropped without any event
    assert tr.flush(1.3) == []
    # It really is gone: the same place needs min_hits fresh hits again.
    assert feed(tr, A, "happy", 2.0) == []
    assert feed(tr, A, "happy", 2.1) == []
    assert [e.type for e in feed(tr, A, "happy", 2.2)] == ["new"]


def test_ema_smoothing():
    tr = make(min_hits=1, smoothing=0.6)
    p1, p2, p3 = p("happy", 0.9), p("sad", 0.7), p("sad", 0.8)
    tr.update([A], probs(p1), 0.0)
    tr.update([A], probs(p2), 0.1)
    tr.update([A], probs(p3), 0.2)
    (ev,) = tr.flush(0.3)
    expected = 0.6 * (0.6 * p1 + 0.4 * p2) + 0.4 * p3
    assert [ev.scores[lab] for lab in LABELS] == pytest.approx(list(expected))


def test_no_smoothing_follows_raw_scores():
    tr = make(min_hits=1, smoothing=0.0)
    tr.update([A], probs(p("happy")), 0.0)
    tr.update([A], probs(p("fear", 0.55)), 0.1)
    (ev,) = tr.flush(0.2)
    assert ev.emotion == "fear" and ev.confidence == pytest.approx(0.55)


def test_update_on_dominant_change_is_rate_limited():
    tr = make(min_hits=1, smoothing=0.0, min_update_gap_s=0.5, update_interval_s=0.0)
    (new,) = feed(tr, A, "happy", 0.0)
    assert new.type == "new"
    assert feed(tr, A, "happy", 0.1) == []  # unchanged: nothing
    assert feed(tr, A, "sad", 0.2) == []  # changed, but only 0.2 s since "new"
    assert feed(tr, A, "sad", 0.4) == []
    (up,) = feed(tr, A, "sad", 0.5)  # gap reached, still sad
    assert up.type == "update" and up.emotion == "sad" and up.face_id == new.face_id
    # A flip that reverts before min_update_gap_s has passed since the last event is never reported.
    assert feed(tr, A, "angry", 0.7) == []
    assert feed(tr, A, "sad", 0.8) == []
    for i in range(1, 9):  # update_interval_s = 0: no periodic updates either
        assert feed(tr, A, "sad", 0.8 + i * 0.3) == []


def test_smoothing_suppresses_single_frame_flicker():
    tr = make(min_hits=1, smoothing=0.6, min_update_gap_s=0.0, update_interval_s=0.0)
    feed(tr, A, "happy", 0.0)
    for i in range(1, 5):
        feed(tr, A, "happy", i * 0.1)
    assert feed(tr, A, "angry", 0.5) == []  # one odd frame does not move the smoothed dominant
    assert feed(tr, A, "happy", 0.6) == []


def test_periodic_update_when_unchanged():
    tr = make(min_hits=1, update_interval_s=2.0, min_update_gap_s=0.5)
    out = []
    for i in range(0, 11):  # every 0.5 s for 5 s
        out += [(e.type, e.last_seen) for e in feed(tr, A, "neutral", i * 0.5)]
    assert out == [("new", 0.0), ("update", 2.0), ("update", 4.0)]


def test_end_after_max_missed_with_summary():
    tr = make(min_hits=2, smoothing=0.0, max_missed_s=1.0, update_interval_s=0.0, min_update_gap_s=0.0)
    seq = [(0.0, "happy"), (0.5, "happy"), (1.0, "happy"), (1.5, "happy"), (2.0, "sad"), (2.5, "sad")]
    types = []
    for ts, lab in seq:
        types += [e.type for e in feed(tr, A, lab, ts)]
    assert types == ["new", "update"]
    assert tr.predict_only(3.0) == []
    assert tr.predict_only(3.5) == []  # exactly max_missed_s: not yet
    (end,) = tr.predict_only(3.6)
    assert end.type == "end" and end.last_seen == 2.5 and end.first_seen == 0.0
    assert end.duration_s == pytest.approx(2.5)
    assert end.bbox == A and end.emotion == "sad"
    s = end.summary
    assert s["frames"] == 6
    # happy dominant over [0, 2.0) = 2.0 s, sad over [2.0, 2.5] = 0.5 s
    assert s["time_share"]["happy"] == pytest.approx(0.8)
    assert s["time_share"]["sad"] == pytest.approx(0.2)
    assert sum(s["time_share"].values()) == pytest.approx(1.0)
    assert set(s["time_share"]) == set(LABELS) == set(s["mean_scores"])
    assert s["dominant"] == "happy"
    assert s["mean_scores"]["happy"] == pytest.approx((4 * 0.9 + 2 * 0.1 / 6) / 6)
    assert tr.active == 0 and tr.predict_only(10.0) == []


def test_update_also_expires_other_tracks():
    tr = make(min_hits=1, max_missed_s=1.0)
    (a,) = feed(tr, A, "happy", 0.0)
    feed(tr, B, "sad", 0.5)
    evs = feed(tr, B, "sad", 1.2)  # A unseen for 1.2 s
    assert [(e.type, e.face_id) for e in evs] == [("end", a.face_id)]
    assert tr.active == 1


def test_two_faces_keep_their_ids_while_moving():
    tr = make(min_hits=1)
    evs = tr.update([A, B], probs(p("happy"), p("sad")), 0.0)
    ids = {e.emotion: e.face_id for e in evs}
    assert len(set(ids.values())) == 2 and evs[0].bbox == A and evs[1].bbox == B
    a2, b2 = Box(110, 105, 80, 80), Box(390, 125, 90, 90)
    assert tr.update([b2, a2], probs(p("sad"), p("happy")), 0.1) == []  # detection order swapped
    got = dict(tr.tracks())
    assert got[ids["happy"]] == a2 and got[ids["sad"]] == b2


def test_greedy_association_takes_highest_iou_first():
    tr = make(min_hits=1, iou_threshold=0.1)
    t1, t2 = Box(0, 0, 100, 100), Box(60, 0, 100, 100)
    evs = tr.update([t1, t2], probs(p("happy"), p("sad")), 0.0)
    id1, id2 = evs[0].face_id, evs[1].face_id
    # d overlaps both; it is closer to t2 (IoU 0.67) than to t1 (IoU 0.25): t2 gets it, t1 is left unmatched.
    d = Box(40, 0, 100, 100)
    assert iou(d, t2) > iou(d, t1) >= 0.1
    assert tr.update([d], probs(p("sad")), 0.1) == []
    got = dict(tr.tracks())
    assert got[id2] == d and got[id1] == t1


def test_low_overlap_starts_a_new_track():
    tr = make(min_hits=1, iou_threshold=0.3)
    (a,) = feed(tr, A, "happy", 0.0)
    far = Box(A.x + 70, A.y, A.w, A.h)  # IoU ~0.07
    (b,) = feed(tr, far, "happy", 0.1)
    assert b.type == "new" and b.face_id != a.face_id
    assert tr.active == 2


def test_flush_ends_confirmed_and_drops_tentative():
    tr = make(min_hits=2)
    feed(tr, A, "happy", 0.0)
    feed(tr, A, "happy", 0.1)  # confirmed
    tr.update([A, B], probs(p("happy"), p("sad")), 0.2)  # B tentative
    evs = tr.flush(0.3)
    assert [e.type for e in evs] == ["end"] and evs[0].bbox == A
    assert evs[0].summary["frames"] == 3
    assert tr.active == 0 and tr.flush(0.4) == []


def test_face_ids_unique():
    tr = make(min_hits=1, max_missed_s=0.05)
    ids = set()
    for i in range(200):
        (ev,) = [e for e in feed(tr, A, "happy", i * 0.1) if e.type == "new"]
        ids.add(ev.face_id)
    assert len(ids) == 200


def test_empty_frames_and_bad_input():
    tr = make(min_hits=1)
    assert tr.update([], np.zeros((0, len(LABELS))), 0.0) == []
    assert tr.update([], [], 0.1) == []
    with pytest.raises(ValueError, match="does not match"):
        tr.update([A], np.zeros((1, 3)), 0.2)
    with pytest.raises(ValueError, match="NaN"):
        tr.update([A], np.full((1, len(LABELS)), np.nan), 0.3)
    with pytest.raises(ValueError, match="labels"):
        Tracker(TrackConfig(), ["only"])


def test_clock_jump_back_keeps_tracks_sane():
    tr = make(min_hits=1, max_missed_s=1.0)
    feed(tr, A, "happy", 1000.0)
    feed(tr, A, "happy", 1000.5)
    feed(tr, A, "happy", 10.0)  # wall clock stepped back ~990 s
    (end,) = tr.predict_only(11.5)  # still ends after max_missed_s of the new clock
    assert end.type == "end" and end.duration_s == pytest.approx(0.5, abs=1e-6)
    assert end.first_seen <= end.last_seen == 10.0


def test_config_changes_apply_live():
    cfg = TrackConfig(min_hits=5)
    tr = Tracker(cfg, LABELS)
    assert feed(tr, A, "happy", 0.0) == []
    cfg.min_hits = 2
    assert [e.type for e in feed(tr, A, "happy", 0.1)] == ["new"]


@pytest.mark.parametrize("kw, field", [
    (dict(iou_threshold=0.0), "iou_threshold"), (dict(iou_threshold=1.5), "iou_threshold"),
    (dict(min_hits=0), "min_hits"), (dict(max_missed_s=0), "max_missed_s"), (dict(smoothing=1.0), "smoothing"),
    (dict(smoothing=-0.1), "smoothing"), (dict(update_interval_s=-1), "update_interval_s"),
    (dict(min_update_gap_s=-1), "min_update_gap_s"),
])
def test_validate(kw, field):
    with pytest.raises(ValueError) as ei:
        TrackConfig(**kw).validate()
    assert str(ei.value).startswith(f"{field}:")
    TrackConfig().validate()


# --- select: which faces the classifier sees (model.max_faces_per_frame) -------------------------------------------

C = Box(250, 300, 85, 85)


def confirmed(tr: Tracker, boxes: list[Box], labels: list[str], ts0: float = 0.0, frames: int = 2) -> float:
    """Feed every box with its label for ``frames`` frames (min_hits=2 confirms them); returns the next ts."""
    ts = ts0
    for _ in range(frames):
        tr.update(boxes, probs(*(p(lab) for lab in labels)), ts)
        ts += 0.1
    return ts


def test_select_new_and_tentative_faces_are_always_classified():
    tr = make(min_hits=3)
    fresh, prior = tr.select([A, B, C], 0.0, 1)
    assert fresh == [True, True, True] and not prior.any()  # no track yet: every face is new
    tr.update([A, B, C], probs(p("happy"), p("sad"), p("angry")), 0.0)
    fresh, _ = tr.select([A, B, C], 0.1, 1)
    assert fresh == [True, True, True]  # tentative (1 of 3 hits): their first frames decide "new"


def test_select_confirmed_faces_take_turns_least_recently_classified_first():
    tr = make(min_hits=2, smoothing=0.0)
    ts = confirmed(tr, [A, B, C], ["happy", "sad", "angry"])
    assert tr.active == 3
    turns, last = [], ["happy", "sad", "angry"]
    for frame in range(6):
        fresh, prior = tr.select([A, B, C], ts, 1)
        assert sum(fresh) == 1
        turns.append(fresh.index(True))
        # rows left out carry their track's smoothed scores: what it was last classified as
        for i, lab in enumerate(last):
            if not fresh[i]:
                assert LABELS[int(np.argmax(prior[i]))] == lab
        now = LABELS[frame % len(LABELS)]
        last = [now if f else lab for f, lab in zip(fresh, last)]
        rows = [p(now) if f else prior[i] for i, f in enumerate(fresh)]
        tr.update([A, B, C], probs(*rows), ts, fresh)
        ts += 0.1
    assert sorted(turns[:3]) == [0, 1, 2] and turns[3:] == turns[:3]  # round robin, nobody starved
    fresh, _ = tr.select([A, B, C], ts, 2)
    assert sum(fresh) == 2
    assert tr.select([A, B, C], ts, 0)[0] == [True] * 3  # 0 = every face every frame
    assert tr.select([A, B, C], ts, 5)[0] == [True] * 3


def test_a_face_left_out_keeps_its_scores_but_its_box_and_time_move():
    tr = make(min_hits=2, smoothing=0.5, max_missed_s=1.0, update_interval_s=0.0)
    ts = confirmed(tr, [A], ["happy"])
    moved = Box(A.x + 6, A.y + 4, A.w, A.h)
    before = tr.select([moved], ts, 1)[1][0].copy()
    # A row the caller made up for a face it did not classify must not reach the scores.
    for k in range(15):  # 1.5 s: longer than max_missed_s, so only the box updates keep the track alive
        assert tr.update([moved], probs(p("angry")), ts + 0.1 * k, [False]) == []
    (end,) = tr.predict_only(ts + 0.1 * 14 + 1.01)
    assert end.type == "end" and end.bbox == moved and end.emotion == "happy"
    assert end.last_seen == pytest.approx(ts + 1.4)
    assert np.allclose([end.scores[lab] for lab in LABELS], before)
    s = end.summary
    assert s["frames"] == 17 and s["dominant"] == "happy"
    assert s["mean_scores"]["happy"] == pytest.approx(0.9)  # averaged over the 2 classified frames only


def test_update_checks_the_fresh_flags():
    tr = make()
    with pytest.raises(ValueError, match="fresh"):
        tr.update([A, B], probs(p("happy"), p("sad")), 0.0, [True])


def test_select_pairs_boxes_as_update_does_and_skips_expired_tracks():
    tr = make(min_hits=2, max_missed_s=1.0)
    ts = confirmed(tr, [A], ["happy"])
    # A box that overlaps two tracks goes to the one update() would give it: select and update agree.
    assert tr.select([A], ts + 5.0, 1)[0] == [True]  # the track expired: this face starts a new one
    fresh, _ = tr.select([Box(A.x + 2, A.y, A.w, A.h)], ts, 1)
    assert fresh == [True]  # the only confirmed face, under the limit
    fresh, _ = tr.select([Box(A.x + 2, A.y, A.w, A.h), B], ts, 1)
    assert fresh == [False, True]  # B is new (always classified) and uses the frame's one classification
