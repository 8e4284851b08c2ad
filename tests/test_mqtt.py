"""MqttPublisher against a real mosquitto: status/LWT, ordering, outages, overflow, auth, TLS, MQTT 5."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker import Subscriber, free_port
from edge.mqtt import MqttConfig, MqttError, MqttPublisher

REPO = Path(__file__).resolve().parents[1]
DEV = "dev1"


def make_cfg(b, **kw) -> MqttConfig:
    base = dict(host=b.host, port=b.port, keepalive=5, reconnect_min_s=0.1, reconnect_max_s=0.4)
    base.update(kw)
    cfg = MqttConfig(**base)
    cfg.validate()
    return cfg


@pytest.fixture
def publishers():
    made: list[MqttPublisher] = []

    def _make(cfg: MqttConfig, device_id: str = DEV, **kwargs) -> MqttPublisher:
        p = MqttPublisher(cfg, device_id, **kwargs)
        made.append(p)
        return p

    yield _make
    for p in made:
        p.stop(timeout=0.5)


def seqs(sub: Subscriber, topic: str) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in sub.on_topic(topic)]


def first_occurrences(xs: list[int]) -> list[int]:
    seen, out = set(), []
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def wait_until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def retained(b, topic: str) -> str | None:
    """What a fresh subscriber gets as retained message on topic (None if nothing retained)."""
    s = Subscriber(b.host, b.port, topic).start()
    try:
        s.wait_for(lambda m: bool(m), timeout=1.0)
        msgs = [m for m in s.messages if m.retain]
        return msgs[-1].text if msgs else None
    finally:
        s.stop()


def test_topic_names_and_stats_shape(broker, publishers):
    p = publishers(make_cfg(broker, prefix="site/a"))
    assert p.topic("faces") == "site/a/dev1/faces"
    assert p.client_id == "fer-edge-dev1"
    assert p.stats() == {"connected": False, "buffered": 0, "dropped": 0, "sent": 0, "reconnects": 0}
    assert p.dropped_by_type() == {}


def test_online_offline_retained_on_clean_start_stop(broker, subscriber, publishers):
    sub = subscriber("fer-edge/#")
    p = publishers(make_cfg(broker))
    p.start()
    status = p.topic("status")
    assert sub.wait_topic(status, lambda ms: ms and ms[-1].text == "online")
    assert retained(broker, status) == "online"
    assert p.stop(timeout=2.0) == 0
    assert sub.wait_topic(status, lambda ms: ms[-1].text == "offline")
    assert retained(broker, status) == "offline"


def test_events_arrive_in_order_with_qos1(broker, subscriber, publishers):
    sub = subscriber("fer-edge/+/faces")
    p = publishers(make_cfg(broker))
    p.start()
    n = 300
    for i in range(n):
        p.publish_event({"seq": i, "label": "happy"})
    faces = p.topic("faces")
    assert sub.wait_topic(faces, lambda ms: len(ms) >= n, timeout=10), p.stats()
    assert seqs(sub, faces) == list(range(n))
    assert wait_until(lambda: p.stats()["sent"] == n)
    st = p.stats()
    assert st["buffered"] == 0 and st["dropped"] == 0 and st["connected"]
    assert not any(m.retain for m in sub.on_topic(faces))


def test_events_queued_before_start_are_sent(broker, subscriber, publishers):
    sub = subscriber("fer-edge/#")
    p = publishers(make_cfg(broker))
    p.publish_event({"seq": 0})
    p.publish_event({"seq": 1})
    assert p.stats()["buffered"] == 2
    p.start()
    assert sub.wait_topic(p.topic("faces"), lambda ms: len(ms) == 2)
    assert seqs(sub, p.topic("faces")) == [0, 1]


def test_last_will_offline_on_abrupt_death(broker, subscriber, tmp_path):
    sub = subscriber("fer-edge/#")
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from edge.mqtt import MqttConfig, MqttPublisher
        p = MqttPublisher(MqttConfig(host={broker.host!r}, port={broker.port}, keepalive=5), "victim")
        p.start()
        while not p.stats()["connected"]:
            time.sleep(0.02)
        print("ready", flush=True)
        time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        status = "fer-edge/victim/status"
        assert sub.wait_topic(status, lambda ms: ms and ms[-1].text == "online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        # The broker sees the socket close and publishes the Last Will, retained.
        assert sub.wait_topic(status, lambda ms: ms[-1].text == "offline", timeout=5)
        assert retained(broker, status) == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_broker_outage_mid_stream_loses_nothing(persistent_broker, subscriber, publishers):
    b = persistent_broker
    sub = subscriber("fer-edge/+/faces", on=b, persistent=True)
    p = publishers(make_cfg(b))
    p.start()
    assert wait_until(lambda: p.stats()["connected"])
    faces = p.topic("faces")
    n, down_at, up_at = 240, 80, 160
    max_call = 0.0
    for i in range(n):
        if i == down_at:
            b.stop()
        if i == up_at:
            b.start()
        t = time.perf_counter()
        p.publish_event({"seq": i})
        max_call = max(max_call, time.perf_counter() - t)
        time.sleep(0.01 if down_at <= i < up_at else 0.002)  # ~0.8 s of events while the broker is down
    assert sub.wait_topic(faces, lambda ms: len({json.loads(m.payload)["seq"] for m in ms}) >= n, timeout=15), \
        (p.stats(), b.log_tail())
    got = seqs(sub, faces)
    assert first_occurrences(got) == list(range(n))  # at-least-once, in order
    assert wait_until(lambda: p.stats()["buffered"] == 0)
    st = p.stats()
    assert st["dropped"] == 0 and st["reconnects"] >= 1 and st["sent"] >= n
    assert max_call < 0.05


def test_broker_restart_while_events_in_flight(persistent_broker, subscriber, publishers):
    """Stop the broker in the middle of a burst: events handed to paho but not acknowledged are resent."""
    b = persistent_broker
    sub = subscriber("fer-edge/+/faces", on=b, persistent=True)
    p = publishers(make_cfg(b))
    p.start()
    assert wait_until(lambda: p.stats()["connected"])
    faces = p.topic("faces")
    n = 3000
    for i in range(n):
        p.publish_event({"seq": i})
    assert wait_until(lambda: p.stats()["sent"] >= 100, timeout=5)
    b.stop()
    at_stop = p.stats()
    assert 0 < at_stop["sent"] < n and at_stop["buffered"] > 0  # really cut mid-stream
    time.sleep(0.3)
    b.start()
    assert sub.wait_topic(faces, lambda ms: len({json.loads(m.payload)["seq"] for m in ms}) >= n, timeout=20), \
        p.stats()
    assert first_occurrences(seqs(sub, faces)) == list(range(n))
    assert wait_until(lambda: p.stats()["buffered"] == 0)
    assert p.stats()["dropped"] == 0


def test_buffer_overflow_drops_oldest_and_counts(persistent_broker, subscriber, publishers, caplog):
    b = persistent_broker
    sub = subscriber("fer-edge/+/faces", on=b, persistent=True)
    b.stop()
    p = publishers(make_cfg(b, buffer_size=5))
    p.start()
    with caplog.at_level(logging.WARNING, logger="edge.mqtt"):
        for i in range(12):
            p.publish_event({"seq": i})
    st = p.stats()
    assert st["dropped"] == 7 and st["buffered"] == 5
    assert "outbox full" in caplog.text
    b.start()
    faces = p.topic("faces")
    assert sub.wait_topic(faces, lambda ms: len(ms) >= 5, timeout=10), p.stats()
    assert first_occurrences(seqs(sub, faces)) == [7, 8, 9, 10, 11]


def ev(kind: str, face: str, seq: int) -> dict:
    return {"type": kind, "face_id": face, "seq": seq}


def delivered(sub: Subscriber, topic: str) -> list[tuple[str, str]]:
    return list(dict.fromkeys((e["type"], e["face_id"], e["seq"]) for e in map(json.loads,
                                                                                  (m.payload for m in sub.on_topic(topic)))))


def check_pairs(got: list[tuple], already: set[str] = frozenset()) -> None:
    """What a consumer relies on: no update/end of a face without its new (unless delivered earlier), one end."""
    seen = set(already)
    ended = set()
    for kind, face, *_ in got:
        if kind == "new":
            assert face not in seen, got
            seen.add(face)
        else:
            assert face in seen and face not in ended, (kind, face, got)
            if kind == "end":
                ended.add(face)


def test_full_outbox_drops_updates_first(persistent_broker, subscriber, publishers, caplog):
    b = persistent_broker
    sub = subscriber("fer-edge/+/faces", on=b, persistent=True)
    b.stop()
    p = publishers(make_cfg(b, buffer_size=5))
    p.start()
    events = [ev("new", "a", 0), ev("update", "a", 1), ev("update", "a", 2), ev("update", "a", 3),
              ev("new", "b", 4), ev("update", "b", 5), ev("update", "b", 6), ev("update", "b", 7),
              ev("end", "a", 8), ev("end", "b", 9)]
    with caplog.at_level(logging.WARNING, logger="edge.mqtt"):
        for e in events:
            p.publish_event(e)
    assert p.stats()["dropped"] == 5 and p.stats()["buffered"] == 5
    assert p.dropped_by_type() == {"update": 5}
    assert "outbox full" in caplog.text and "update" in caplog.text
    b.start()
    faces = p.topic("faces")
    assert sub.wait_topic(faces, lambda ms: len(ms) >= 5, timeout=10), p.stats()
    got = delivered(sub, faces)
    # Every new and end kept; of the updates only the newest survives.
    assert got == [("new", "a", 0), ("new", "b", 4), ("update", "b", 7), ("end", "a", 8), ("end", "b", 9)]
    check_pairs(got)


def test_full_outbox_without_updates_drops_whole_faces(persistent_broker, subscriber, publishers):
    """No update left to drop: the oldest face whose new is still queued goes, with all its events, and the rest
    of that face's events are dropped as they come, so a consumer never sees half a face."""
    b = persistent_broker
    sub = subscriber("fer-edge/+/faces", on=b, persistent=True)
    b.stop()
    p = publishers(make_cfg(b, buffer_size=4))
    p.start()
    seq = [("new", "a"), ("new", "b"), ("end", "a"), ("new", "c"), ("end", "c"), ("new", "d"), ("update", "b"),
           ("end", "d"), ("update", "b"), ("end", "b"), ("new", "e"), ("end", "e")]
    for i, (kind, face) in enumerate(seq):
        p.publish_event(ev(kind, face, i))
    assert p.stats()["buffered"] == 4
    b.start()
    faces = p.topic("faces")
    assert sub.wait_topic(faces, lambda ms: len(ms) >= 4, timeout=10), p.stats()
    assert wait_until(lambda: p.stats()["buffered"] == 0)
    got = delivered(sub, faces)
    check_pairs(got)
    assert [(k, f) for k, f, _ in got] == [("new", "d"), ("end", "d"), ("new", "e"), ("end", "e")]
    assert p.stats()["dropped"] == len(seq) - 4
    assert p.dropped_by_type() == {"new": 3, "update": 2, "end": 3}


def test_full_outbox_keeps_the_end_of_a_face_already_announced(persistent_broker, subscriber, publishers):
    """A face whose new reached the broker before the outage gets its end, even if newer faces must go."""
    b = persistent_broker
    sub = subscriber("fer-edge/+/faces", on=b, persistent=True)
    p = publishers(make_cfg(b, buffer_size=2))
    p.start()
    assert wait_until(lambda: p.stats()["connected"])
    faces = p.topic("faces")
    p.publish_event(ev("new", "a", 0))
    assert sub.wait_topic(faces, lambda ms: len(ms) >= 1)
    assert wait_until(lambda: p.stats()["buffered"] == 0)
    b.stop()
    assert wait_until(lambda: not p.stats()["connected"])
    for i, (kind, face) in enumerate([("new", "b"), ("new", "c"), ("update", "a"), ("end", "a"), ("end", "b"),
                                      ("new", "d")], start=1):
        p.publish_event(ev(kind, face, i))
    b.start()
    assert wait_until(lambda: p.stats()["connected"] and p.stats()["buffered"] == 0, timeout=10), p.stats()
    assert sub.wait_topic(faces, lambda ms: ("end", "a") in [(json.loads(m.payload)["type"],
                                                              json.loads(m.payload)["face_id"]) for m in ms])
    got = delivered(sub, faces)
    check_pairs(got)
    assert ("end", "a", 4) in got


def test_undelivered_events_are_saved_at_stop_and_sent_first_after_restart(broker, subscriber, publishers,
                                                                          tmp_path):
    spill = tmp_path / "mqtt-outbox.jsonl"
    cfg = MqttConfig(host="127.0.0.1", port=free_port(), reconnect_min_s=0.1, reconnect_max_s=0.2)
    p = publishers(cfg, spill_path=spill)
    p.start()
    for i in range(50):
        p.publish_event(ev("update" if i % 5 else "new", f"f{i // 5}", i))
    assert p.stop(timeout=0.3) == 0 and p.saved == 50  # nothing lost: all saved
    lines = spill.read_bytes().splitlines()
    assert json.loads(lines[0])["events"] == 50 and len(lines) == 51

    sub = subscriber("fer-edge/+/faces")
    q = publishers(make_cfg(broker), spill_path=spill)
    q.publish_event(ev("new", "later", 50))  # queued before start: still after the saved ones
    q.start()
    faces = q.topic("faces")
    assert sub.wait_topic(faces, lambda ms: len(ms) >= 51, timeout=10), q.stats()
    assert first_occurrences(seqs(sub, faces)) == list(range(51))
    assert not spill.exists()
    assert q.stop(timeout=2) == 0 and not spill.exists()


def test_saved_events_of_another_device_stay_and_a_corrupt_file_is_set_aside(broker, subscriber, publishers,
                                                                             tmp_path, caplog):
    spill = tmp_path / "mqtt-outbox.jsonl"
    p = publishers(MqttConfig(host="127.0.0.1", port=free_port()), device_id="other")
    p.spill_path = spill
    p.start()
    p.publish_event(ev("new", "a", 0))
    assert p.stop(timeout=0.2) == 0 and spill.exists()
    sub = subscriber("fer-edge/+/faces")
    with caplog.at_level(logging.WARNING, logger="edge.mqtt"):
        q = publishers(make_cfg(broker), spill_path=spill)
        q.start()
        assert wait_until(lambda: q.stats()["connected"])
    assert spill.exists() and "left in place" in caplog.text  # fer-edge/other/faces is not ours to send
    q.stop(timeout=1)
    assert sub.messages == [] or all(m.topic != "fer-edge/other/faces" for m in sub.messages)

    spill.write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.ERROR, logger="edge.mqtt"):
        r = publishers(make_cfg(broker), spill_path=spill)
        r.start()
    assert not spill.exists() and spill.with_name(spill.name + ".bad").exists()
    assert "moved to" in caplog.text


def test_unsaveable_events_are_reported_lost(publishers, tmp_path, caplog):
    spill = tmp_path / "mqtt-outbox.jsonl"
    spill.with_name(spill.name + ".tmp").mkdir()  # cannot be written (root ignores permissions, not this)
    p = publishers(MqttConfig(host="127.0.0.1", port=free_port()), spill_path=spill)
    p.start()
    for i in range(3):
        p.publish_event(ev("new", f"f{i}", i))
    with caplog.at_level(logging.ERROR, logger="edge.mqtt"):
        assert p.stop(timeout=0.2) == 3
    assert "could not save 3 undelivered events" in caplog.text and not spill.exists()


def test_publish_event_never_blocks_when_broker_down(publishers, caplog):
    cfg = MqttConfig(host="127.0.0.1", port=free_port(), reconnect_min_s=0.1, reconnect_max_s=0.2)
    p = publishers(cfg)
    with caplog.at_level(logging.WARNING, logger="edge.mqtt"):
        p.start()
        t = time.perf_counter()
        for i in range(2000):
            p.publish_event({"seq": i, "pad": "x" * 200})
        elapsed = time.perf_counter() - t
        assert wait_until(lambda: "unreachable" in caplog.text)
    assert elapsed < 1.0
    assert p.stats()["buffered"] == 2000 and not p.stats()["connected"]
    assert "connection refused" in caplog.text and "retrying in" in caplog.text
    t = time.monotonic()
    assert p.stop(timeout=0.5) == 2000  # reports what was left unsent
    assert time.monotonic() - t < 3.0


def test_refused_credentials_logged_and_retried(make_broker, publishers, caplog):
    b = make_broker(users={"fer": "secret"})
    with caplog.at_level(logging.INFO, logger="edge.mqtt"):
        bad = publishers(make_cfg(b, username="fer", password="wrong"))
        bad.start()
        assert wait_until(lambda: "not authorized: check mqtt.username/mqtt.password" in caplog.text)
        # paho keeps retrying: the broker sees repeated connection attempts
        assert wait_until(lambda: b.log_tail(100000).count("not authorised") >= 3, timeout=5), b.log_tail()
        assert not bad.stats()["connected"]
        good = publishers(make_cfg(b, username="fer", password="secret"), device_id="dev2")
        good.start()
        # the flag is set in paho's thread just before the log line: wait for both
        assert wait_until(lambda: good.stats()["connected"] and "MQTT connected to" in caplog.text)
    # one error line per failure streak, not one per retry
    assert caplog.text.count("not authorized") == 1


def test_mqtt5_protocol(broker, subscriber, publishers):
    sub = subscriber("fer-edge/#")
    p = publishers(make_cfg(broker, protocol="5"))
    p.start()
    for i in range(20):
        p.publish_event({"seq": i})
    assert sub.wait_topic(p.topic("faces"), lambda ms: len(ms) >= 20)
    assert seqs(sub, p.topic("faces")) == list(range(20))
    assert sub.on_topic(p.topic("status"))[0].text == "online"
    assert p.stop(timeout=2.0) == 0
    assert retained(broker, p.topic("status")) == "offline"


def test_subscribe_and_best_effort_publish(broker, subscriber, publishers):
    sub = subscriber("fer-edge/#")
    p = publishers(make_cfg(broker))
    assert p.publish("stats", {"fps": 1.0}) is False  # not connected: skipped, not queued
    got: list[tuple[str, bytes]] = []
    p.subscribe("cmd", lambda t, payload: got.append((t, payload)))
    p.subscribe("fer-edge/all/cmd", lambda t, payload: got.append((t, payload)))
    p.start()
    assert wait_until(lambda: p.stats()["connected"])
    assert p.publish("stats", {"fps": 12.5}) is True
    assert sub.wait_topic(p.topic("stats"))
    assert json.loads(sub.on_topic(p.topic("stats"))[0].payload) == {"fps": 12.5}

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        time.sleep(0.2)  # let the publisher's SUBACK land
        c.publish(p.topic("cmd"), b"reload", qos=1).wait_for_publish(2)
        c.publish("fer-edge/all/cmd", b"ping", qos=1).wait_for_publish(2)
        assert wait_until(lambda: len(got) == 2)
        assert sorted(got) == sorted([(p.topic("cmd"), b"reload"), ("fer-edge/all/cmd", b"ping")])
    finally:
        c.disconnect()
        c.loop_stop()


def test_subscriptions_survive_broker_restart(broker, publishers):
    p = publishers(make_cfg(broker))
    got: list[bytes] = []
    p.subscribe("cmd", lambda t, payload: got.append(payload))
    p.start()
    assert wait_until(lambda: p.stats()["connected"])
    broker.stop()
    assert wait_until(lambda: not p.stats()["connected"])
    broker.start()
    assert wait_until(lambda: p.stats()["connected"] and p.stats()["reconnects"] == 1, timeout=5)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        assert wait_until(lambda: (c.publish(p.topic("cmd"), b"x", qos=1), time.sleep(0.1), got)[2], timeout=5)
    finally:
        c.disconnect()
        c.loop_stop()


def test_bad_event_payload_is_logged_not_raised(publishers, caplog):
    p = publishers(MqttConfig(host="127.0.0.1", port=free_port()))
    with caplog.at_level(logging.ERROR, logger="edge.mqtt"):
        p.publish_event({"x": float("nan")})
        p.publish_event({"x": object()})
    assert p.stats()["buffered"] == 0
    assert caplog.text.count("not JSON-serializable") == 2


def test_disabled_publisher_is_inert():
    p = MqttPublisher(MqttConfig(enabled=False), DEV)
    p.start()
    p.publish_event({"seq": 1})
    assert p.publish("stats", {}) is False
    assert p.stats()["buffered"] == 0
    assert p.stop() == 0


@pytest.mark.parametrize("kw, field", [
    (dict(port=0), "port"), (dict(protocol="3"), "protocol"), (dict(qos=3), "qos"),
    (dict(buffer_size=0), "buffer_size"), (dict(prefix="a/#"), "prefix"), (dict(prefix="/x"), "prefix"),
    (dict(reconnect_min_s=2.0, reconnect_max_s=1.0), "reconnect_max_s"), (dict(keepalive=1), "keepalive"),
    (dict(password="p"), "password"), (dict(ca_file="/nonexistent.crt", tls=True), "ca_file"),
    (dict(ca_file="/etc/hostname"), "ca_file"), (dict(host=" "), "host"),
])
def test_validate_messages_start_with_field(kw, field):
    with pytest.raises(ValueError) as ei:
        MqttConfig(**kw).validate()
    assert str(ei.value).startswith(f"{field}:")


def test_bad_device_id_rejected():
    with pytest.raises(MqttError, match="device id"):
        MqttPublisher(MqttConfig(), "a/b")


# ---- TLS ----------------------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_files(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed (sudo apt-get install openssl): it makes the TLS test's certificates")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "otherca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN={ca}",
                 "-days", "2", cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def test_tls_connects_with_ca_and_reports_handshake_failure(make_broker, subscriber, publishers, tls_files,
                                                           caplog):
    tls_port = free_port()
    b = make_broker(extra_config=[f"listener {tls_port} 127.0.0.1", f"cafile {tls_files / 'ca.crt'}",
                                  f"certfile {tls_files / 'server.crt'}", f"keyfile {tls_files / 'server.key'}"])
    sub = subscriber("fer-edge/#", on=b)
    good = publishers(make_cfg(b, port=tls_port, tls=True, ca_file=str(tls_files / "ca.crt")))
    good.start()
    good.publish_event({"seq": 1})
    assert sub.wait_topic(good.topic("faces")), (good.stats(), b.log_tail())

    with caplog.at_level(logging.WARNING, logger="edge.mqtt"):
        bad = publishers(make_cfg(b, port=tls_port, tls=True, ca_file=str(tls_files / "otherca.crt")),
                         device_id="dev2")
        bad.start()
        assert wait_until(lambda: "TLS handshake failed" in caplog.text), caplog.text
    assert not bad.stats()["connected"]


def test_tls_setup_error_is_clear(tmp_path):
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate")
    with pytest.raises(MqttError, match="mqtt.ca_file"):
        MqttPublisher(MqttConfig(tls=True, ca_file=str(junk)), DEV)
