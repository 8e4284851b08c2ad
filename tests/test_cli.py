"""The `fer-edge` command line for real: predict on composed FER-2013 faces, listen on a real broker, the demo."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker import free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FER_TEST = SHARED / "data" / "fer2013" / "test"
NO_FER = (f"FER-2013 test faces not found at {FER_TEST}: ../shared, the read-only data folder beside the checkout "
          "(FER-2013 in Kaggle layout + YuNet), is absent; README 'Test data' says how to get it")
LABELS = {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}
# Faces the demo clip uses (the detectors find them reliably once upscaled).
FACES = ["happy/PublicTest_848748.jpg", "sad/PublicTest_44164524.jpg"]


def model_path() -> Path:
    from edge.classify import DEFAULT_MODEL

    return Path(os.environ.get("FER_EDGE_MODEL__PATH") or DEFAULT_MODEL)


needs_model = pytest.mark.skipif(not model_path().is_file(),
                                 reason=f"no emotion model at {model_path()} (it ships in git: git checkout -- "
                                        "edge/models, or set FER_EDGE_MODEL__PATH)")


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def clean_env() -> dict:
    # Keep a model override (used before the bundle exists); drop any other FER_EDGE_* the developer has set.
    return {k: v for k, v in os.environ.items() if not k.startswith("FER_EDGE_") or k == "FER_EDGE_MODEL__PATH"}


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """``fer-edge ARGS`` run in this process through edge.cli.main (about 1 s less than :func:`cli`, which
    stays for what only a process shows: native stderr noise, signals, exit at a broken pipe), with the same
    environment and the root logger put back afterwards. An exception escaping main() fails the test."""
    import contextlib
    import io
    import logging

    from edge.cli import main

    saved_env, root = dict(os.environ), logging.getLogger()
    saved_log = (list(root.handlers), root.level)
    os.environ.clear()
    os.environ.update(clean_env())
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers[:] = saved_log[0]
        root.setLevel(saved_log[1])
    assert "internal error" not in err.getvalue(), err.getvalue()
    return subprocess.CompletedProcess(["fer-edge", *args], rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def faces_image(tmp_path_factory) -> tuple[Path, list[tuple[int, int, int]]]:
    """Two real FER-2013 test faces upscaled to 160 px on a plain background: (path, [(x, y, side)])."""
    if not FER_TEST.is_dir():
        pytest.skip(NO_FER)
    canvas = np.full((300, 520, 3), 110, np.uint8)
    placed = []
    for i, rel in enumerate(FACES):
        face = cv2.imread(str(FER_TEST / rel), cv2.IMREAD_GRAYSCALE)
        assert face is not None, rel
        big = cv2.resize(face, (160, 160), interpolation=cv2.INTER_CUBIC)
        x, y = 40 + i * 260, 70
        canvas[y:y + 160, x:x + 160] = big[..., None]
        placed.append((x, y, 160))
    path = tmp_path_factory.mktemp("img") / "two_faces.png"
    cv2.imwrite(str(path), canvas)
    return path, placed


def check_face(face: dict) -> None:
    assert set(face["scores"]) == LABELS
    assert math.isclose(sum(face["scores"].values()), 1.0, abs_tol=0.02)
    assert face["emotion"] == max(face["scores"], key=face["scores"].get)
    assert math.isclose(face["confidence"], face["scores"][face["emotion"]], abs_tol=1e-3)


# --- predict ------------------------------------------------------------------------------------------

@needs_model
def test_predict_finds_both_faces_and_annotates(faces_image, tmp_path):
    path, placed = faces_image
    out_png = tmp_path / "annotated.png"
    r = cli("predict", str(path), "--json", "--annotate", str(out_png))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    (result,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert result["image"] == str(path) and (result["width"], result["height"]) == (520, 300)
    assert len(result["faces"]) == 2, result
    for face in result["faces"]:
        check_face(face)
        b = face["bbox"]
        cx, cy = b["x"] + b["w"] / 2, b["y"] + b["h"] / 2
        assert any(x <= cx <= x + s and y <= cy <= y + s for x, y, s in placed), (b, placed)
    # One box per placed face, not two on the same one.
    centers = sorted(f["bbox"]["x"] for f in result["faces"])
    assert centers[1] - centers[0] > 150
    annotated = cv2.imread(str(out_png))
    assert annotated is not None and annotated.shape == (300, 520, 3)
    assert not np.array_equal(annotated, cv2.imread(str(path)))
    assert f"wrote {out_png} (2 faces marked)" in r.stderr
    assert "XNNPACK" not in r.stderr  # the runtime's INFO line is noise to a user
    # Each label sits on a filled dark box (readable on any background): the 110-gray canvas above each face
    # turns black where the label is.
    for face in result["faces"]:
        b = face["bbox"]
        band = annotated[max(0, b["y"] - 16):b["y"] - 4, b["x"] + 2:b["x"] + 40]
        assert (band.max(axis=2) < 30).mean() > 0.3, "no filled label box above the face"


@needs_model
def test_predict_annotate_refuses_a_missing_directory_before_any_work(faces_image, tmp_path):
    path, _ = faces_image
    r = cli_here("predict", str(path), "--annotate", str(tmp_path / "no" / "such" / "out.png"))
    assert r.returncode == 2 and f"directory {tmp_path / 'no' / 'such'} does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "no").exists() and r.stdout == ""
    r = cli_here("predict", str(path), "--annotate", str(tmp_path / "out.gif"))
    assert r.returncode == 2 and "unsupported extension" in r.stderr
    # several images: the directory itself is created (and said so), its parent must exist
    r = cli_here("predict", str(path), str(path), "--annotate", str(tmp_path / "gone" / "dir"))
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "gone").exists()
    r = cli_here("predict", str(path), str(path), "--annotate", str(tmp_path / "dir"))
    assert r.returncode == 0, r.stderr
    assert f"created directory {tmp_path / 'dir'}" in r.stderr
    assert f"wrote {tmp_path / 'dir' / 'two_faces_annotated.png'} (2 faces marked)" in r.stderr


@needs_model
def test_predict_reports_bad_files_and_still_processes_the_rest(faces_image, tmp_path):
    good, _ = faces_image
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    missing = tmp_path / "missing.png"
    r = cli_here("predict", str(corrupt), str(good), str(missing), "--json")
    assert r.returncode == 1
    assert f"error: {corrupt}: not a readable image" in r.stderr
    assert f"error: {missing}: file not found" in r.stderr
    assert "Traceback" not in r.stderr
    results = {d["image"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert results[str(corrupt)]["error"] and results[str(missing)]["error"]
    assert len(results[str(good)]["faces"]) == 2


@needs_model
def test_predict_pre_cropped_fer_face_text_output(tmp_path):
    if not FER_TEST.is_dir():
        pytest.skip(NO_FER)
    path = FER_TEST / FACES[0]
    r = cli_here("predict", str(path))
    assert r.returncode == 0, r.stderr
    assert f"{path}: 1 face (whole image classified as one face)" in r.stdout
    m = re.search(r"#1 at \d+,\d+ \d+x\d+: (\w+) (\d+)%", r.stdout)
    assert m and m.group(1) in LABELS, r.stdout


def test_predict_honours_model_flip_average(tmp_path):
    if not FER_TEST.is_dir():
        pytest.skip(NO_FER)
    paths = [str(FER_TEST / f) for f in FACES]
    plain = [json.loads(line) for line in cli_here("predict", "--json", *paths).stdout.splitlines()]
    flip = [json.loads(line) for line in
            cli_here("predict", "--json", "--set", "model.flip_average=true", *paths).stdout.splitlines()]
    assert len(plain) == len(flip) == len(paths)
    conf = lambda rows: [r["faces"][0]["confidence"] for r in rows]  # noqa: E731
    assert conf(plain) != conf(flip)


def test_predict_usage_errors():
    r = cli_here("predict")
    assert r.returncode == 2 and "IMAGE" in r.stderr and "Traceback" not in r.stderr
    r = cli_here("predict", "x.png", "--model", "/nonexistent/model.tflite")
    assert r.returncode == 2 and "config error: model.path:" in r.stderr and "Traceback" not in r.stderr


# --- listen ------------------------------------------------------------------------------------------------

def sample_event(device: str, face_id: str, kind: str = "new") -> dict:
    from edge.detect import Box
    from edge.events import build_event
    from edge.track import TrackEvent

    scores = {"angry": 0.05, "disgust": 0.0, "fear": 0.05, "happy": 0.7, "sad": 0.05, "surprise": 0.1,
              "neutral": 0.05}
    now = time.time()
    summary = None
    if kind == "end":
        summary = {"dominant": "happy", "mean_scores": scores, "time_share": {k: (1.0 if k == "happy" else 0.0)
                                                                                for k in scores}, "frames": 12}
    ev = TrackEvent(type=kind, face_id=face_id, bbox=Box(10, 20, 100, 100), scores=scores, emotion="happy",
                    confidence=0.7, first_seen=now - 2, last_seen=now, duration_s=2.0, summary=summary)
    return build_event(ev, device_id=device, model_version="t", model_sha256="0" * 64, source="test")


def start_listen(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "listen", *args], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # printed once the subscription is acknowledged
    assert "listening on" in line, line + proc.stderr.read()
    return proc


def publish(broker, topic: str, payloads: list, retain: bool = False) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-pub-{os.getpid()}")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        for p in payloads:
            data = p if isinstance(p, str) else json.dumps(p)
            c.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def test_listen_json_receives_published_events(broker):
    proc = start_listen("--host", broker.host, "--port", str(broker.port), "--device", "pi1", "--json",
                        "--count", "2", "--timeout", "30")
    try:
        events = [sample_event("pi1", "1-aaaa"), sample_event("pi1", "1-aaaa", "end")]
        publish(broker, "fer-edge/other/faces", [sample_event("other", "9-zzzz")])  # not ours: ignored
        publish(broker, "fer-edge/pi1/faces", events)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert [json.loads(line) for line in out.splitlines()] == events


def test_listen_all_devices_prints_lines_and_live_summary(broker):
    proc = start_listen("--host", broker.host, "--port", str(broker.port), "--count", "3", "--timeout", "30")
    try:
        publish(broker, "fer-edge/kitchen/status", ["online"], retain=True)
        publish(broker, "fer-edge/kitchen/faces", [sample_event("kitchen", "1-aaaa"), sample_event("kitchen", "2-bbbb")])
        publish(broker, "fer-edge/door/faces", [sample_event("door", "1-cccc", "end")])
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "kitchen is online" in out
    assert re.search(r"kitchen\s+face 2-bbbb\s+new\s+happy\s+70%", out), out
    assert "= kitchen [online]: 2 in view (1-aaaa happy 70%, 2-bbbb happy 70%), 2 events" in out
    assert re.search(r"door\s+face 1-cccc\s+end\s+after 2.0s: mostly happy \(100% of the time\), 12 frames", out), out
    assert "= door [online]: 0 in view, 1 event" in out and "1 events" not in out


def test_listen_into_head_exits_at_once_without_a_traceback(broker):
    """`fer-edge listen --json | head -1`: the closed pipe ends the listener quietly (it used to hang)."""
    listen = f"{sys.executable} -m edge.cli listen --host {broker.host} --port {broker.port} --json"
    proc = subprocess.Popen(["bash", "-c", f'{listen} | head -1; echo "listen exit ${{PIPESTATUS[0]}}" >&2'],
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stderr.readline()
        deadline = time.monotonic() + 30
        n = 0
        while proc.poll() is None and time.monotonic() < deadline:  # keep writing until the listener notices
            n += 1
            publish(broker, "fer-edge/pi1/faces", [sample_event("pi1", f"{n}-aaaa")])
            time.sleep(0.2)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "listen exit 0" in err and "Traceback" not in err and "BrokenPipe" not in err, err
    assert len(out.splitlines()) == 1 and json.loads(out)["face_id"] == "1-aaaa"


def test_listen_errors_are_one_line():
    port = free_port()
    r = cli("listen", "--host", "127.0.0.1", "--port", str(port), "--count", "1", "--timeout", "2")
    assert r.returncode == 1
    assert f"error: cannot connect to MQTT broker at 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    r = cli("listen", "--device", "a/b")
    assert r.returncode == 2 and "--device" in r.stderr


def test_listen_times_out_without_events(broker):
    r = cli("listen", "--host", broker.host, "--port", str(broker.port), "--count", "1", "--timeout", "1")
    assert r.returncode == 1 and "timed out after 1s with 0 of 1 events" in r.stderr


# --- demo / version ----------------------------------------------------------------------------------------

@needs_model
def test_demo_starts_its_own_broker_and_prints_events():
    port = free_port()  # nothing listens here: the demo must start mosquitto itself
    r = cli("demo", "--mqtt-port", str(port), "--duration", "6", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    from broker import find_mosquitto

    if find_mosquitto():
        assert "started mosquitto on 127.0.0.1:" in r.stdout
    lines = r.stdout.splitlines()
    assert any(re.search(r"\bdemo\s+face \S+\s+new\s+\w+", ln) for ln in lines), r.stdout
    stamps = [float(m[1]) for ln in lines if (m := re.match(r"\s*(\d+\.\d)s\s+demo\s+face", ln))]
    assert stamps == sorted(stamps), "events are printed in the order they arrive, stamped with that time"
    # the clip's labels are set beside what the model said, with what its accuracy means
    assert "clip ground truth: the FER-2013 label of each face shown, beside what the model said" in r.stdout
    assert re.search(r"face \S+\s+label happy\s+model \S+", r.stdout), r.stdout
    assert re.search(r"\d of \d labels? found\. The model is right on \d+% of FER-2013's", r.stdout), r.stdout
    assert any(re.search(r"face \S+\s+end\s+after", ln) for ln in lines), r.stdout
    m = re.search(r"demo finished: (\d+) frames .* (\d+) events produced, (\d+) events from (\d+) faces", r.stdout)
    assert m, r.stdout
    frames, produced, received = int(m[1]), int(m[2]), int(m[3])
    assert 30 <= frames <= 70  # ~6 s of a 10 fps clip
    assert produced == received >= 2


@needs_model
def test_demo_without_mqtt_prints_events_directly():
    r = cli("demo", "--no-mqtt", "--max-frames", "40", "--set", "source.realtime=false", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"face \S+\s+new\s+\w+", r.stdout), r.stdout
    m = re.search(r"demo finished: 40 frames .* (\d+) events produced, (\d+) events from", r.stdout)
    assert m and m[1] == m[2] and int(m[1]) >= 2, r.stdout


def test_event_printer_stamps_arrival_and_demo_truth_compares_labels():
    """Unit view of the demo's output: arrival-time stamps, and each clip face's label against the model's."""
    import io

    from edge.classify import read_manifest, DEFAULT_MODEL
    from edge.cli.demo import demo_truth
    from edge.cli.subscriber import EventPrinter

    meta = json.loads((ROOT / "edge" / "data" / "demo.json").read_text())
    first_box = {int(t["track"]): t["boxes"][len(t["boxes"]) // 2] for t in meta["tracks"]}
    clock = iter(range(100, 200))
    out = io.StringIO()
    printer = EventPrinter(out=out, t0=100.0, clock=lambda: float(next(clock)))

    def ev(face_id, track, emotion, kind="new"):
        x, y, w, h = first_box[track]
        printer({"type": kind, "face_id": face_id, "device_id": "demo", "emotion": emotion, "confidence": 0.5,
                 "epoch": 50.0, "scores": {emotion: 0.5}, "bbox": {"x": x + 10, "y": y + 10, "w": w - 20, "h": h - 20}})

    ev("1-a", 1, "happy")
    ev("1-a", 1, "happy", "update")
    ev("1-a", 1, "surprise", "update")
    ev("2-b", 2, "neutral")
    stamps = [float(line.split("s")[0]) for line in out.getvalue().splitlines()]
    assert stamps == [0.0, 1.0, 2.0, 3.0]  # arrival order, not the events' own epochs (all 50.0 here)
    lines = demo_truth(printer, frames_played=120, manifest=read_manifest(DEFAULT_MODEL))
    assert lines[0].startswith("clip ground truth")
    assert re.search(r"face 1-a\s+label happy -> surprise\s+model happy -> surprise\s+right$", lines[1]), lines
    assert re.search(r"face 2-b\s+label sad\s+model neutral\s+wrong$", lines[2]), lines
    assert len(lines) == 4 and lines[3].startswith("2 of 3 labels found. The model is right on ")
    assert re.search(r"recognises \d+% of sad faces \(its manifest\)", lines[3]), lines[3]
    assert demo_truth(printer, frames_played=0) == []
    # a face the tracker lost and found again (two ids on one clip face) counts as one, with both ids
    ev("4-c", 2, "sad")
    lines = demo_truth(printer, frames_played=120, manifest=read_manifest(DEFAULT_MODEL))
    assert re.search(r"face 2-b\+4-c\s+label sad\s+model neutral -> sad\s+right$", lines[2]), lines


def test_native_stderr_filter_keeps_everything_but_the_noise(capfd):
    import os as _os

    from edge.native_stderr import XNNPACK_INFO, filtered_stderr, is_litert_info

    with filtered_stderr(is_litert_info) as dropped:
        _os.write(2, f"{XNNPACK_INFO}\nsomething a user needs\n".encode())
    _os.write(2, b"after\n")
    assert capfd.readouterr().err == "something a user needs\nafter\n"
    assert dropped == [XNNPACK_INFO]


def test_wording_plurals_and_dry_run_tense():
    from edge.cli.common import plural
    from edge.install import Report

    assert (plural(1, "face"), plural(0, "face"), plural(2, "face")) == ("1 face", "0 faces", "2 faces")
    rep = Report(dry_run=True)
    rep.change("created /etc/fer-edge (mode 0755)")
    rep.change("enabled and started fer-edge.service (starts on boot)")
    rep.change("set owner a:b on /x")
    assert rep.lines == ["would create /etc/fer-edge (mode 0755)",
                         "would enable and start fer-edge.service (starts on boot)", "would set owner a:b on /x"]
    real = Report()
    real.change("created /etc/fer-edge (mode 0755)")
    assert real.lines == ["created /etc/fer-edge (mode 0755)"]
    from edge.service import Service

    stats = {"fps": 10.0, "faces_in_view": 1, "events": {"produced": 1}, "latency_ms": {"total": {"p50_ms": 5.0}},
             "source": {"connected": True}, "mqtt": None}
    assert Service._status_line(stats).startswith("10.0 fps, 1 face, 1 event, ")
    stats.update(faces_in_view=2, events={"produced": 0})
    assert Service._status_line(stats).startswith("10.0 fps, 2 faces, 0 events, ")


def test_version():
    r = cli_here("version")
    assert r.returncode == 0
    import edge

    assert r.stdout.startswith(f"fer-edge {edge.__version__}\n")
    assert "opencv" in r.stdout and "paho-mqtt" in r.stdout


def test_run_startup_errors_exit_2_without_traceback(tmp_path):
    """Model/detector problems are configuration errors: exit 2 (systemd does not restart-loop on them)."""
    bad_model = tmp_path / "broken.tflite"
    bad_model.write_bytes(b"not a flatbuffer")
    r = cli("run", "--set", f"model.path={bad_model}", "--set", "mqtt.enabled=false", "--max-frames", "1")
    assert r.returncode == 2, r.stderr
    assert "error: " in r.stderr and "broken" in r.stderr and "manifest" in r.stderr
    assert "Traceback" not in r.stderr
    bad_onnx = tmp_path / "yunet.onnx"
    bad_onnx.write_bytes(b"garbage")
    r = cli("run", "--set", "detect.backend=yunet", "--set", f"detect.model_path={bad_onnx}",
            "--set", "mqtt.enabled=false", "--max-frames", "1")
    assert r.returncode == 2, r.stderr
    assert "yunet.onnx" in r.stderr and "Traceback" not in r.stderr


def test_each_command_lives_in_its_own_module():
    """One module per command: edge/cli/<name>.py with register(subparsers), none elsewhere in edge/; helper
    modules there register nothing; and `fer-edge` still starts from edge.cli:main."""
    import importlib
    import pkgutil

    import edge.cli
    from edge.cli import build_parser

    def subparsers(parser):
        return next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)

    def handler(parser):  # a command with its own sub-commands (model keygen|sign|...) has them set func
        nested = subparsers(parser)
        return parser.get_default("func") or handler(next(iter(nested.choices.values())))

    homes = {}
    for name, parser in subparsers(build_parser()).choices.items():
        module = handler(parser).__module__
        homes[name] = module
        assert module.startswith("edge.cli."), (name, module)
    for name in ("run", "demo", "predict", "listen", "config", "version", "snapshot", "homeassistant", "model",
                 "doctor", "bench"):
        assert homes[name] == f"edge.cli.{name}", (name, homes[name])
    assert homes["install-service"] == homes["uninstall-service"] == "edge.cli.install"
    for info in pkgutil.iter_modules(edge.cli.__path__):
        if info.name.startswith("_"):  # __main__: `python -m edge.cli`
            continue
        mod = importlib.import_module(f"edge.cli.{info.name}")
        if info.name in ("common", "subscriber", "local_broker"):
            assert not hasattr(mod, "register"), info.name
        else:
            assert callable(getattr(mod, "register", None)), f"edge/cli/{info.name}.py has no register()"
    assert not [m.name for m in pkgutil.iter_modules(edge.__path__) if m.name.startswith("cmd_")]  # all moved in
    assert "fer-edge = \"edge.cli:main\"" in (ROOT / "pyproject.toml").read_text()
