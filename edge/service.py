"""The fer-edge daemon: source -> detect -> preprocess -> classify -> track -> events -> MQTT.

Data flows one way through a single loop in the main thread; the only other threads are the source's
capture thread and the MQTT client's network thread. Signals only set flags that the loop acts on.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from edge.config import Config, ConfigError, load_config
from edge.detect import make_detector
from edge.discovery import HomeAssistant
from edge.events import build_event
from edge.mqtt import MqttPublisher
from edge.sdnotify import Notifier
from edge.sources import open_source
from edge.track import Tracker
from edge.updates import UpdateManager

log = logging.getLogger(__name__)

STAGES = ("capture_wait", "detect", "preprocess", "classify", "track_publish", "total")
# Keys that SIGHUP can apply without restarting (whole sections end with '.').
LIVE_KEYS = ("track.", "detect.", "mqtt.stats_interval_s", "service.", "model.flip_average",
             "model.max_faces_per_frame")
# Exit status when events were lost: dropped from a full outbox or still undelivered at the end of the
# shutdown flush (service.shutdown_timeout_s). 2 stays "configuration/model error" (no restart by systemd).
EXIT_EVENTS_LOST = 3
SECRET_KEYS = {"mqtt.password", "web.password_hash"}


class LatencyWindow:
    """Rolling per-stage latencies over the last ``size`` frames, summarised as p50/p95 in ms."""

    def __init__(self, size: int):
        self.size = size
        self._data = {s: collections.deque(maxlen=size) for s in STAGES}
        self.observer: Callable[[str, float], None] | None = None  # e.g. the web server's latency histograms

    def add(self, stage: str, seconds: float) -> None:
        self._data[stage].append(seconds)
        if self.observer is not None:
            self.observer(stage, seconds)

    def resize(self, size: int) -> None:
        if size != self.size:
            self.size = size
            self._data = {s: collections.deque(d, maxlen=size) for s, d in self._data.items()}

    def summary(self) -> dict[str, dict[str, float | None]]:
        out = {}
        for stage, d in self._data.items():
            if d:
                p50, p95 = np.percentile(np.fromiter(d, dtype=np.float64), [50, 95])
                out[stage] = {"p50_ms": round(p50 * 1e3, 2), "p95_ms": round(p95 * 1e3, 2)}
            else:
                out[stage] = {"p50_ms": None, "p95_ms": None}
        return out


class RateLimitedLogger:
    """Logs a recurring error at most once per interval per kind, counting what it suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float):
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter = collections.Counter()

    def error(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] += 1
            return
        self._last[kind] = now
        n = self._suppressed.pop(kind, 0)
        suffix = f" ({n} similar errors suppressed)" if n else ""
        self.logger.error(msg + suffix, *args)


def read_cpu_temp(path: str) -> float | None:
    """CPU temperature in degrees C from a sysfs millidegree file, None if unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            return round(int(f.read().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


class Service:
    """Runs the pipeline until stopped by a signal, a limit, or the end of a finite source.

    ``event_sink`` (optional) receives every event payload dict as it is produced, e.g. to print events
    when MQTT is disabled. ``overrides``/``env``/``base`` are re-applied on SIGHUP reloads of ``cfg.path``.
    """

    def __init__(self, cfg: Config, *, overrides: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None,
                 event_sink: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.overrides = dict(overrides or {})
        self.env = os.environ if env is None else env
        self.base = dict(base or {})
        self.event_sink = event_sink
        self.notifier = Notifier(self.env)
        self.errors = RateLimitedLogger(log, cfg.service.error_log_interval_s)
        self.latency = LatencyWindow(cfg.service.latency_window)
        self.counts: collections.Counter = collections.Counter()  # events produced, by type
        self.error_counts: collections.Counter = collections.Counter()
        self.frames = 0
        self.detections = 0
        self.classified = 0  # faces the classifier ran on (model.max_faces_per_frame bounds it per frame)
        self.stop_reason: str | None = None
        self.exit_code = 0  # 1 when the daemon ends itself because the source is stuck (no watchdog)
        self._source_stalled = False  # the stall has been reported
        self.events_lost = 0  # set at shutdown: events that never reached the broker (exit status 3 if any)
        self._reload_requested = False
        self._stop_event = threading.Event()
        self.classifier = self.detector = self.tracker = self.publisher = self.source = None
        self.homeassistant: HomeAssistant | None = None  # discovery + state topic (also clears it when off)
        self.updates: UpdateManager | None = None  # model updates: install, hot swap, probation, rollback
        self.web = None  # edge.web.server.WebServer when [web] enabled: reads what the loop hands it, never waits
        self._frame_faces: tuple = ((), None, 0)  # (boxes, probabilities, faces classified) of the current frame
        self._started_mono = time.monotonic()
        self._last_stats_mono = self._last_log_stats_mono = self._started_mono
        self._frames_at_last_stats = 0
        self._last_fps = 0.0

    # --- control (safe from signal handlers and other threads) ---------------------------------

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the loop to finish; it flushes open tracks and delivers buffered events first."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop_event.set()

    def request_reload(self) -> None:
        self._reload_requested = True

    # --- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, run the frame loop, shut down cleanly; returns the process exit code.

        Start-up failures (model, detector, bad config) raise their own exceptions (ModelError,
        DetectorError, ConfigError) for the CLI to report.
        """
        previous = self._install_signal_handlers()
        try:
            self._start()
            try:
                self._loop()
            finally:
                self._shutdown()
        finally:
            self._restore_signal_handlers(previous)
            self.notifier.close()
        return self.exit_code or (EXIT_EVENTS_LOST if self.events_lost else 0)

    def _start(self) -> None:
        cfg = self.cfg
        self.notifier.status("loading model")
        self.updates = UpdateManager(cfg)
        self.classifier = self.updates.load_initial()  # installed model if any, else model.path / bundled
        log.debug("model input %dx%d, margin %.2f, labels %s", self.classifier.input_size,
                  self.classifier.input_size, self.classifier.margin, ",".join(self.classifier.labels))
        self.detector = make_detector(cfg.detect)
        log.info("detector %s: %s (detect_width %d, every_n %d)", self.detector.name, self.detector.reason,
                 cfg.detect.detect_width, cfg.detect.every_n)
        # Build the source before going online so a source that can never work fails before "online".
        self.source = open_source(cfg.source)
        self.tracker = Tracker(cfg.track, list(self.classifier.labels))
        if cfg.mqtt.enabled:
            # Events still undelivered at a stop are saved there and sent first by the next start.
            self.publisher = MqttPublisher(cfg.mqtt, cfg.device.id,
                                           spill_path=os.path.join(cfg.device.state_dir, "mqtt-outbox.jsonl"))
            self.homeassistant = HomeAssistant(cfg.homeassistant, self.publisher, cfg.device.id,
                                               labels=list(self.classifier.labels),
                                               model_version=self.classifier.version)
            self.publisher.start()
        else:
            log.warning("MQTT disabled (mqtt.enabled = false): events are not published")
        self.updates.start(self.publisher)
        if cfg.web.enabled:
            from edge.web.server import WebServer  # only then: prometheus_client and the HTTP server

            self.web = WebServer(cfg, STAGES, update_status=self.updates.status)
            self.web.start()  # a port that cannot be bound is a ConfigError naming web.port
            self.latency.observer = self.web.metrics.observe
        self.source.start()
        log.info("source %s started (device id %s)", self.source.name, cfg.device.id)
        self._started_mono = time.monotonic()
        self._last_stats_mono = self._last_log_stats_mono = self._started_mono
        self.notifier.ready(f"running: {self.source.name}")

    def _loop(self) -> None:
        svc = self.cfg.service
        while not self._stop_event.is_set():
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            t0 = time.monotonic()
            frame = self.source.read(timeout=svc.read_timeout_s)
            waited = time.monotonic() - t0
            if frame is None:
                if self.source.finished:
                    self.stop("source finished")
                    break
                # Nothing arrived (camera stalled/reconnecting): still age tracks so faces end.
                self._emit(self._safe_tracker("predict_only", time.time()))
            else:
                self.latency.add("capture_wait", waited)
                if self.updates is not None:  # between two frames: a new or rolled-back model, loaded and tested
                    self.classifier = self.updates.take_pending(self.classifier) or self.classifier
                try:
                    self._process(frame)
                except Exception as e:  # last line of defence: one bad frame never ends the daemon
                    self.error_counts["frame"] += 1
                    self.errors.error("frame", "frame %d skipped: %s: %s", frame.index, type(e).__name__, e)
                if self.web is not None:  # references only: the web threads annotate and encode
                    kept, probs, classified = self._frame_faces
                    self.web.feed.on_frame(frame.image, frame.timestamp, self.tracker.tracks(), kept, probs,
                                           self.classifier.labels, classified)
            now = time.monotonic()
            self._feed_watchdog(now)
            self._housekeeping(now)
            if svc.max_frames and self.frames >= svc.max_frames:
                self.stop(f"max_frames {svc.max_frames} reached")
            elif svc.duration_s and now - self._started_mono >= svc.duration_s:
                self.stop(f"duration {svc.duration_s:g}s reached")

    def _feed_watchdog(self, now: float) -> None:
        """WATCHDOG=1 only while the capture thread makes progress (frames, or reconnect attempts that return).

        A capture thread stuck inside a driver call cannot be interrupted: the pings stop and systemd restarts the
        daemon (SIGABRT; faulthandler writes every thread's stack to the journal first). Without a watchdog
        (WATCHDOG_USEC unset: a terminal, a container) the daemon exits 1 instead, for Restart=on-failure or the
        container's restart policy; a stuck source never leaves a running daemon that publishes nothing.
        """
        src = self.source
        if src is None or not src.stalled(now):
            self._source_stalled = False
            self.notifier.watchdog(now)
            return
        if self._source_stalled:
            return
        self._source_stalled = True
        why = src.health(now)["error"]
        if self.notifier.watchdog_interval is not None:
            log.error("source %s stalled: %s; no more watchdog pings, systemd will restart fer-edge", src.name, why)
            self.notifier.status(f"source {src.name} stalled: {why}; waiting for the watchdog restart")
        else:
            log.error("source %s stalled: %s; exiting (status 1) so the service manager restarts fer-edge",
                      src.name, why)
            self.exit_code = 1
            self.stop("source stalled")

    def _process(self, frame) -> None:
        """One frame through detect -> preprocess -> classify -> track -> publish; never raises."""
        self.frames += 1
        self._frame_faces = ((), None, 0)
        ts = frame.timestamp
        image = frame.image
        t_start = time.monotonic()
        every_n = max(1, self.cfg.detect.every_n)
        detect_frame = (self.frames - 1) % every_n == 0
        if detect_frame:
            try:
                boxes = list(self.detector.detect(image))
            except Exception as e:  # a detector failure on one frame must not kill the daemon
                self.error_counts["detect"] += 1
                self.errors.error("detect", "detector failed on frame %d: %s: %s", frame.index,
                                  type(e).__name__, e)
                self._emit(self._safe_tracker("predict_only", ts))
                return
            self.detections += 1
        else:
            # Skipped detection: classify the faces we are already tracking, at their last boxes.
            boxes = [box for _, box in self.tracker.tracks()]
        t_det = time.monotonic()
        if detect_frame:  # skipped frames would drag the detector's percentiles towards zero
            self.latency.add("detect", t_det - t_start)

        n_labels = len(self.classifier.labels)
        fresh, prior = [True] * len(boxes), np.zeros((len(boxes), n_labels), np.float32)
        if boxes:
            try:
                fresh, prior = self.tracker.select(boxes, ts, self.cfg.model.max_faces_per_frame)
            except Exception as e:  # classify them all rather than lose the frame
                self.error_counts["track"] += 1
                self.errors.error("track", "tracker.select failed: %s: %s", type(e).__name__, e)
        crops, kept, kept_fresh, kept_prior = [], [], [], []
        for box, new, old in zip(boxes, fresh, prior):
            if new:
                try:
                    crops.append(self.classifier.face_input(image, box))
                except Exception as e:
                    self.error_counts["preprocess"] += 1
                    self.errors.error("preprocess", "cannot crop face %s on frame %d: %s", box, frame.index, e)
                    continue
            kept.append(box)
            kept_fresh.append(new)
            kept_prior.append(old)
        t_pre = time.monotonic()
        if crops:  # per-face stages: frames without faces would report a meaningless ~0 ms
            self.latency.add("preprocess", t_pre - t_det)

        probs = np.asarray(kept_prior, dtype=np.float32).reshape(len(kept), n_labels)
        if crops:
            try:
                out = self.classifier.predict(np.stack(crops), flip_average=self.cfg.model.flip_average)
                out = np.asarray(out, dtype=np.float32)
                if out.shape != (len(crops), n_labels) or not np.all(np.isfinite(out)):
                    raise ValueError(f"classifier returned shape {out.shape} / non-finite values")
                probs[np.asarray(kept_fresh, bool)] = out
            except Exception as e:
                self.error_counts["classify"] += 1
                self.errors.error("classify", "classifier failed on frame %d: %s: %s", frame.index,
                                  type(e).__name__, e)
                if self.updates is not None:
                    self.updates.frame_result(False)  # during probation: roll the new model back
                self._emit(self._safe_tracker("predict_only", ts))
                return
            if self.updates is not None:
                self.updates.frame_result(True)
            self.classified += len(crops)
        self._frame_faces = (kept, probs, len(crops))
        t_cls = time.monotonic()
        if crops:
            self.latency.add("classify", t_cls - t_pre)

        if kept or detect_frame:
            events = self._safe_tracker("update", kept, probs, ts, kept_fresh)
        else:
            events = self._safe_tracker("predict_only", ts)
        self._emit(events)
        t_end = time.monotonic()
        self.latency.add("track_publish", t_end - t_cls)
        self.latency.add("total", t_end - t_start)

    def _safe_tracker(self, method: str, *args) -> list:
        try:
            return getattr(self.tracker, method)(*args)
        except Exception as e:
            self.error_counts["track"] += 1
            self.errors.error("track", "tracker.%s failed: %s: %s", method, type(e).__name__, e)
            return []

    def _emit(self, events) -> None:
        for ev in events:
            try:
                payload = build_event(ev, device_id=self.cfg.device.id, model_version=self.classifier.version,
                                      model_sha256=self.classifier.sha256, source=self.source.name)
            except Exception as e:
                self.error_counts["event"] += 1
                self.errors.error("event", "cannot build %s event for face %s: %s", ev.type, ev.face_id, e)
                continue
            self.counts[ev.type] += 1
            # Exact epoch (JSON repr) so tests and operators can match log lines to delivered events.
            log.debug("event %s %s %s %.2f epoch=%s", ev.type, ev.face_id, ev.emotion, ev.confidence,
                      json.dumps(payload.get("epoch")))
            if self.publisher is not None:
                self.publisher.publish_event(payload)
            if self.homeassistant is not None:
                self.homeassistant.on_event(payload)
            if self.web is not None:
                self.web.feed.on_event(payload)
            if self.cfg.service.print_events:
                print(json.dumps(payload, separators=(",", ":")), flush=True)
            if self.event_sink is not None:
                try:
                    self.event_sink(payload)
                except Exception as e:
                    self.errors.error("sink", "event sink failed: %s", e)

    def _housekeeping(self, now: float) -> None:
        if self.homeassistant is not None:
            self.homeassistant.tick(now)
        if self.web is not None and self.web.feed.state_due(now):
            self.web.feed.publish_state(self.stats(now), now)
        interval = self.cfg.mqtt.stats_interval_s
        if interval > 0 and now - self._last_stats_mono >= interval:
            stats = self.stats(now)
            self._last_stats_mono = now
            self._frames_at_last_stats = self.frames
            if self.publisher is not None:
                self.publisher.publish("stats", stats)
            self.notifier.status(self._status_line(stats))
        log_interval = self.cfg.service.log_stats_interval_s
        if log_interval > 0 and now - self._last_log_stats_mono >= log_interval:
            self._last_log_stats_mono = now
            log.info("stats: %s", self._status_line(self.stats(now)))

    def stats(self, now: float | None = None) -> dict[str, Any]:
        """Current statistics (the payload of the ``stats`` topic)."""
        now = time.monotonic() if now is None else now
        dt = now - self._last_stats_mono
        if dt >= 0.5:  # avoid a meaningless fps from a tiny interval
            self._last_fps = (self.frames - self._frames_at_last_stats) / dt
        mqtt = self.publisher.stats() if self.publisher is not None else None
        src = self.source
        return {
            "device_id": self.cfg.device.id,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "epoch": round(time.time(), 3),
            "uptime_s": round(now - self._started_mono, 1),
            "fps": round(self._last_fps, 2),
            "frames": self.frames,
            "detections": self.detections,
            "faces_classified": self.classified,
            "faces_in_view": self.tracker.active if self.tracker is not None else 0,
            "latency_ms": self.latency.summary(),
            "detector": self.detector.name if self.detector is not None else None,
            "detector_reason": getattr(self.detector, "reason", None),
            "backend": self.classifier.backend if self.classifier is not None else None,
            "model": {"version": self.classifier.version, "sha256": self.classifier.sha256}
            if self.classifier is not None else None,
            "source": {
                "name": src.name if src is not None else None,
                "connected": bool(src.connected) if src is not None else False,
                # "up", "starting", "no camera", "down", "stalled" or "finished"; error says why it is not up
                **(src.health(now) if src is not None else {"status": "down", "error": None}),
                "reconnects": src.reconnects if src is not None else 0,
                "dropped_frames": src.dropped if src is not None else 0,
            },
            "events": {"produced": sum(self.counts.values()), **{t: self.counts[t] for t in ("new", "update", "end")}},
            "mqtt": mqtt,
            "errors": dict(self.error_counts),
            "cpu_temp_c": read_cpu_temp(self.cfg.service.cpu_temp_path),
        }

    @staticmethod
    def _status_line(s: dict[str, Any]) -> str:
        mq = s["mqtt"]
        mq_txt = "mqtt off" if mq is None else (
            f"mqtt {'up' if mq['connected'] else 'DOWN'} buffered {mq['buffered']} dropped {mq['dropped']}")
        total = s["latency_ms"]["total"]["p50_ms"]
        n, ev = s["faces_in_view"], s["events"]["produced"]
        return (f"{s['fps']:.1f} fps, {n} face{'' if n == 1 else 's'}, {ev} event{'' if ev == 1 else 's'}, "
                f"p50 {total if total is not None else '-'} ms, "
                f"{Service._source_text(s['source'])}, {mq_txt}")

    @staticmethod
    def _source_text(src: dict[str, Any]) -> str:
        status = src.get("status") or ("up" if src["connected"] else "down")
        if status in ("up", "starting"):
            return f"source {status}"
        return f"source DOWN ({status}" + (f": {src['error']}" if src.get("error") else "") + ")"

    def _shutdown(self) -> None:
        reason = self.stop_reason or "error"
        log.info("stopping (%s)", reason)
        self.notifier.stopping(f"stopping: {reason}")
        if self.web is not None:
            self.web.feed.stopping(reason)  # /healthz says so while buffered events are flushed
        if self.tracker is not None and self.classifier is not None and self.source is not None:
            self._emit(self._safe_tracker("flush", time.time()))
        if self.updates is not None:
            self.updates.stop()
        if self.source is not None:
            try:
                self.source.stop()
            except Exception as e:
                log.warning("source stop failed: %s", e)
        final = self.stats() if self.classifier is not None else None
        if self.publisher is not None:
            if final is not None:
                self.publisher.publish("stats", final)
            if self.homeassistant is not None:
                self.homeassistant.close()  # final state (nobody in view) before "offline"
            unsent = self.publisher.stop(timeout=self.cfg.service.shutdown_timeout_s)  # not delivered, not saved
            mq = self.publisher.stats()
            if final is not None:
                final["mqtt"] = mq
            self.events_lost = unsent + mq["dropped"]
            if self.events_lost:
                by_type = ", ".join(f"{k} {n}" for k, n in sorted(self.publisher.dropped_by_type().items()))
                log.error("%d events lost: %d neither delivered within service.shutdown_timeout_s = %gs (broker "
                          "unreachable?) nor saved, %d dropped earlier%s; exit status %d", self.events_lost, unsent,
                          self.cfg.service.shutdown_timeout_s, mq["dropped"], f" ({by_type})" if by_type else "",
                          EXIT_EVENTS_LOST)
        if final is not None:
            log.info("final stats: %s", json.dumps(final, separators=(",", ":")))
        log.info("stopped after %d frames: %d events (new %d, update %d, end %d)", self.frames,
                 sum(self.counts.values()), self.counts["new"], self.counts["update"], self.counts["end"])
        if self.web is not None:
            self.web.stop(reason)

    # --- signals and reload ------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # e.g. embedded in a test or the demo thread: the caller stops us via stop()
        previous = {}

        def on_stop(signum, _frame):
            self.stop(signal.Signals(signum).name)

        def on_hup(_signum, _frame):
            self.request_reload()

        for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def reload(self) -> None:
        """Re-read the config file (SIGHUP): apply live-changeable keys, report the rest as needing a restart."""
        if not self.cfg.path:
            log.info("reload: no config file in use, nothing to reload")
            return
        try:
            new = load_config(self.cfg.path, self.overrides, self.env, base=self.base)
        except ConfigError as e:
            log.error("reload failed, keeping the current configuration: config error: %s", e)
            return
        old_flat, new_flat = self.cfg.flat(), new.flat()
        changed = [k for k in new_flat if new_flat[k] != old_flat[k]]
        if not changed:
            log.info("reload: %s unchanged", self.cfg.path)
            return
        live = [k for k in changed if k.startswith(LIVE_KEYS)]
        restart = [k for k in changed if k not in live]

        if any(k.startswith("detect.") for k in live):
            try:
                detector = make_detector(new.detect)
            except Exception as e:
                log.error("reload: new detector settings rejected, keeping the old ones: %s", e)
                live = [k for k in live if not k.startswith("detect.")]
            else:
                self.detector = detector
        # Update the section objects in place: the tracker holds a reference to cfg.track.
        for key in live:
            section, name = key.split(".", 1)
            setattr(self.cfg.section(section), name, getattr(new.section(section), name))
        if "service.log_level" in live:
            logging.getLogger().setLevel(self.cfg.service.log_level)
        if "service.latency_window" in live:
            self.latency.resize(self.cfg.service.latency_window)
        if "service.error_log_interval_s" in live:
            self.errors.interval_s = self.cfg.service.error_log_interval_s
        if any(k.startswith("track.") for k in live):
            self._apply_track_config()

        def show(k):
            return f"{k}={'***' if k in SECRET_KEYS else new_flat[k]!r} (was {'***' if k in SECRET_KEYS else old_flat[k]!r})"

        if live:
            log.info("reload: applied %s", ", ".join(show(k) for k in live))
        if restart:
            log.warning("reload: %s changed but need a restart to apply (systemctl restart fer-edge); "
                        "still using the old values", ", ".join(show(k) for k in restart))

    def _apply_track_config(self) -> None:
        """Make sure the tracker sees the new track settings (it may copy them at construction)."""
        tracker_cfg = getattr(self.tracker, "cfg", None)
        if tracker_cfg is not None and tracker_cfg is not self.cfg.track:
            for f in dataclasses.fields(self.cfg.track):
                setattr(tracker_cfg, f.name, getattr(self.cfg.track, f.name))
