"""Prometheus metrics (prometheus_client) for ``/metrics``, in a registry of our own (no global state).

Stage latencies are histograms observed by the frame loop as it measures them; everything else is read
at scrape time from the loop's latest statistics snapshot (the payload of the MQTT ``stats`` topic).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# 0.5 ms (classify on a desktop) .. 2 s (a Pi Zero detecting at full resolution)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
EVENT_TYPES = ("new", "update", "end")


class Metrics:
    def __init__(self, stages: Sequence[str], snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=False)
        hist = Histogram("fer_edge_stage_latency_seconds", "Time per pipeline stage and frame",
                         ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._stage = {s: hist.labels(s) for s in stages}  # children made once: observe() is a lock and an add
        self.registry.register(_Snapshot(snapshot))
        ProcessCollector(registry=self.registry)  # CPU seconds, memory, open fds of the daemon

    def observe(self, stage: str, seconds: float) -> None:
        child = self._stage.get(stage)
        if child is not None:
            child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot:
    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def describe(self):
        return []  # unknown until the first scrape; fine for our own registry

    def collect(self):
        snap = self.snapshot()
        s: Optional[dict] = snap.get("stats")
        yield _gauge("fer_edge_healthy", "1 while frames flow (as /healthz), else 0", 1 if snap["healthy"] else 0)
        age = snap.get("last_frame_age_s")
        if age is not None:
            yield _gauge("fer_edge_last_frame_age_seconds", "Seconds since the last processed frame", age)
        yield _counter("fer_edge_faces_classified", "Faces the classifier ran on",
                       snap.get("faces_classified", 0))
        if s is None:
            return
        yield _counter("fer_edge_frames", "Frames processed", s["frames"])
        yield _counter("fer_edge_detections", "Frames the face detector ran on", s["detections"])
        yield _gauge("fer_edge_faces_in_view", "Confirmed faces being tracked now", s["faces_in_view"])
        yield _gauge("fer_edge_fps", "Frames per second over the last statistics interval", s["fps"])
        yield _gauge("fer_edge_uptime_seconds", "Seconds since the pipeline started", s["uptime_s"])
        ev = CounterMetricFamily("fer_edge_events", "Face events produced, by type", labels=["type"])
        for t in EVENT_TYPES:
            ev.add_metric([t], s["events"].get(t, 0))
        yield ev
        err = CounterMetricFamily("fer_edge_errors", "Per-frame errors, by stage", labels=["stage"])
        for stage, n in sorted(s.get("errors", {}).items()):
            err.add_metric([stage], n)
        yield err
        src = s["source"]
        yield _gauge("fer_edge_source_up", "1 while the frame source is connected", 1 if src["connected"] else 0)
        yield _counter("fer_edge_source_reconnects", "Source reconnect attempts", src["reconnects"])
        yield _counter("fer_edge_source_dropped_frames", "Frames the source dropped because the loop was busy",
                       src["dropped_frames"])
        mq = s.get("mqtt")
        yield _gauge("fer_edge_mqtt_enabled", "1 when events are published over MQTT", 0 if mq is None else 1)
        if mq is not None:
            yield _gauge("fer_edge_mqtt_connected", "1 while connected to the broker", 1 if mq["connected"] else 0)
            yield _gauge("fer_edge_mqtt_buffered_events", "Events not yet acknowledged by the broker", mq["buffered"])
            yield _counter("fer_edge_mqtt_dropped_events", "Events dropped because the buffer was full", mq["dropped"])
            yield _counter("fer_edge_mqtt_sent", "Messages acknowledged by the broker", mq["sent"])
            yield _counter("fer_edge_mqtt_reconnects", "Broker reconnects", mq["reconnects"])
        if s.get("cpu_temp_c") is not None:
            yield _gauge("fer_edge_cpu_temperature_celsius", "CPU temperature", s["cpu_temp_c"])
        model = s.get("model") or {}
        info = InfoMetricFamily("fer_edge_model", "The emotion model in use")
        info.add_metric([], {"version": str(model.get("version") or ""), "sha256": str(model.get("sha256") or ""),
                             "backend": str(s.get("backend") or ""), "detector": str(s.get("detector") or "")})
        yield info
        upd = snap.get("update")
        if upd is not None:
            ui = InfoMetricFamily("fer_edge_model_update", "Model update state and the last request's result")
            ui.add_metric([], {"state": str(upd.get("state") or ""), "result": str(upd.get("result") or "")})
            yield ui


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
