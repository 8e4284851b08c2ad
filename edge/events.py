"""Face events as JSON-ready dicts (the MQTT payload), described by edge/schema/face_event.schema.json."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from edge.track import TrackEvent

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "face_event.schema.json"


def iso_utc(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds and 'Z', e.g. 2024-05-01T12:00:00.123Z."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _unit(v: float) -> float:
    # Float error in the EMA can leave 1.0000000000000002; the schema promises 0..1.
    return min(1.0, max(0.0, float(v)))


def _scores(d: dict) -> dict[str, float]:
    return {str(k): _unit(v) for k, v in d.items()}


def build_event(ev: TrackEvent, *, device_id: str, model_version: str, model_sha256: str, source: str) -> dict:
    """The event payload for one TrackEvent (no image data); valid against load_schema()."""
    b = ev.bbox
    out = {
        "schema_version": SCHEMA_VERSION,
        "device_id": device_id,
        "type": ev.type,
        "face_id": ev.face_id,
        "timestamp": iso_utc(ev.last_seen),
        "epoch": float(ev.last_seen),
        "bbox": {"x": int(b.x), "y": int(b.y), "w": int(b.w), "h": int(b.h)},
        "emotion": ev.emotion,
        "confidence": _unit(ev.confidence),
        "scores": _scores(ev.scores),
        "first_seen": iso_utc(ev.first_seen),
        "duration_s": max(0.0, float(ev.duration_s)),
        "model": {"version": model_version, "sha256": model_sha256},
        "source": source,
    }
    if ev.type == "end" and ev.summary is not None:
        s = ev.summary
        out["summary"] = {
            "dominant": s["dominant"],
            "mean_scores": _scores(s["mean_scores"]),
            "time_share": _scores(s["time_share"]),
            "frames": int(s["frames"]),
        }
    return out


def load_schema() -> dict:
    """The face event JSON Schema (draft 2020-12), read from the installed package data."""
    text = resources.files("edge").joinpath("schema", "face_event.schema.json").read_text(encoding="utf-8")
    return json.loads(text)
