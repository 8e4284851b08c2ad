"""Event payloads from real tracker events, validated against the shipped JSON Schema."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from edge.detect import Box
from edge.events import SCHEMA_PATH, SCHEMA_VERSION, build_event, iso_utc, load_schema
from edge.track import TrackConfig, TrackEvent, Tracker

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (pip install fer-edge[test])")

LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
SHA = "ab" * 32
T0 = 1714564800.25  # 2024-05-01T12:00:00.250Z
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture(scope="module")
def validator():
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def onehot(label: str, conf: float = 0.8) -> np.ndarray:
    v = np.full(len(LABELS), (1 - conf) / (len(LABELS) - 1))
    v[LABELS.index(label)] = conf
    return v


def lifecycle() -> list[TrackEvent]:
    """new -> update -> end from the real tracker."""
    tr = Tracker(TrackConfig(min_hits=2, smoothing=0.0, min_update_gap_s=0.0, update_interval_s=0.0), LABELS)
    box = Box(120, 80, 96, 96)
    out = []
    for i, lab in enumerate(["happy", "happy", "happy", "surprise", "surprise"]):
        out += tr.update([box], onehot(lab)[None], T0 + 0.2 * i)
    out += tr.predict_only(T0 + 5.0)
    assert [e.type for e in out] == ["new", "update", "end"]
    return out


def build(ev: TrackEvent) -> dict:
    return build_event(ev, device_id="kitchen-pi", model_version="1.2.0", model_sha256=SHA, source="opencv:0")


def errors(validator, payload) -> list[str]:
    return [e.message for e in validator.iter_errors(payload)]


def test_schema_document_is_complete():
    schema = load_schema()
    assert schema == json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"] and schema["description"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION

    def walk(props: dict, where: str):
        for name, sub in props.items():
            assert sub.get("description"), f"{where}{name} has no description"
            if "properties" in sub:
                assert sub.get("additionalProperties") is False, f"{where}{name} allows extra keys"
                assert set(sub["required"]) == set(sub["properties"]), f"{where}{name}: all keys required"
                walk(sub["properties"], f"{where}{name}.")

    walk(schema["properties"], "")
    # labels are model data, not schema: nothing in the schema names an emotion
    assert not any(lab in json.dumps(schema) for lab in LABELS)


def test_events_from_tracker_validate(validator):
    new, update, end = (build(e) for e in lifecycle())
    for payload in (new, update, end):
        assert errors(validator, payload) == []
        json.dumps(payload, allow_nan=False)  # plain JSON, no numpy types
        assert len(json.dumps(payload)) < 2000  # no image data
    assert new["type"] == "new" and "summary" not in new and "summary" not in update
    assert new["face_id"] == update["face_id"] == end["face_id"]
    assert new["timestamp"] == "2024-05-01T12:00:00.450Z" and new["epoch"] == pytest.approx(T0 + 0.2)
    assert new["first_seen"] == "2024-05-01T12:00:00.250Z"
    assert update["emotion"] == "surprise" and update["confidence"] == pytest.approx(0.8)
    assert new["bbox"] == {"x": 120, "y": 80, "w": 96, "h": 96}
    assert new["model"] == {"version": "1.2.0", "sha256": SHA}
    assert new["device_id"] == "kitchen-pi" and new["source"] == "opencv:0"
    assert new["schema_version"] == SCHEMA_VERSION
    assert set(new["scores"]) == set(LABELS) and sum(new["scores"].values()) == pytest.approx(1.0)
    assert end["duration_s"] == pytest.approx(0.8)
    assert set(end["summary"]) == {"dominant", "mean_scores", "time_share", "frames"}
    assert end["summary"]["frames"] == 5 and end["summary"]["dominant"] == "happy"
    assert all(type(v) is float for v in end["summary"]["mean_scores"].values())


def test_iso_utc():
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(T0) == "2024-05-01T12:00:00.250Z"
    assert ISO.match(iso_utc(1e9 + 0.0004))


def test_scores_clamped_into_unit_range(validator):
    ev = lifecycle()[0]
    ev.scores = dict(ev.scores, happy=1.0000000000000002)
    ev.confidence = 1.0000000000000002
    payload = build(ev)
    assert payload["scores"]["happy"] == 1.0 and payload["confidence"] == 1.0
    assert errors(validator, payload) == []


def test_other_label_sets_are_valid(validator):
    tr = Tracker(TrackConfig(min_hits=1), ["pos", "neg", "neutral"])
    (ev,) = tr.update([Box(0, 0, 50, 50)], np.array([[0.7, 0.2, 0.1]]), T0)
    assert errors(validator, build(ev)) == []


@pytest.mark.parametrize("mutate, expect", [
    (lambda p: p.update(summary={"dominant": "happy", "mean_scores": {}, "time_share": {}, "frames": 1}), "summary"),
    (lambda p: p.update(image="aGVsbG8="), "image"),
    (lambda p: p.update(type="gone"), "gone"),
    (lambda p: p.update(timestamp="2024-05-01 12:00:00"), "2024-05-01 12:00:00"),
    (lambda p: p.update(scores={"happy": 1.0}), "enough properties"),
    (lambda p: p["scores"].update(happy=1.5), "1.5"),
    (lambda p: p.update(confidence=-0.1), "-0.1"),
    (lambda p: p["bbox"].update(w=0), "0"),
    (lambda p: p.pop("face_id"), "face_id"),
    (lambda p: p["model"].update(sha256="xyz"), "xyz"),
    (lambda p: p.update(face_id="face one"), "face one"),
    (lambda p: p.update(schema_version="2.0"), "1.0"),
])
def test_schema_rejects_bad_new_events(validator, mutate, expect):
    payload = copy.deepcopy(build(lifecycle()[0]))
    mutate(payload)
    errs = errors(validator, payload)
    assert errs and any(expect in e for e in errs), errs


def test_end_requires_summary(validator):
    end = build(lifecycle()[2])
    assert errors(validator, end) == []
    del end["summary"]
    assert any("summary" in e for e in errors(validator, end))
    end = build(lifecycle()[2])
    end["summary"]["extra"] = 1
    assert errors(validator, end)
    end = build(lifecycle()[2])
    end["summary"]["frames"] = 0
    assert errors(validator, end)
