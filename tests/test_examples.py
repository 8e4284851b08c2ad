"""The README's consumer examples, run for real against a running daemon on a real mosquitto: the mosquitto_sub
one-liner, examples/subscribe.py, the Home Assistant automations (parsed, entity ids checked against the discovery
configs, templates rendered on real payloads) and the Node-RED flow (structure and topics).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker import Mosquitto, MosquittoNotFound, find_mosquitto, free_port
from edge.detect import Box
from edge.discovery import HomeAssistantConfig, discovery_configs
from edge.events import build_event, load_schema
from edge.mqtt import MqttConfig
from edge.track import TrackEvent

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEVICE = "kitchen"  # the device id the examples are written for
LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
# The README's one-liner, exactly; the test only points it at the test broker and bounds it (-p, -C, -W).
ONE_LINER = "mosquitto_sub -h raspberrypi.local -t 'fer-edge/#' -v"


def model_path() -> Path:
    from edge.classify import DEFAULT_MODEL

    return Path(os.environ.get("FER_EDGE_MODEL__PATH") or DEFAULT_MODEL)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A mosquitto and a daemon (device "kitchen", Home Assistant discovery on) looping the demo clip."""
    if not model_path().is_file():
        pytest.skip(f"no emotion model at {model_path()} (it ships in git: git checkout -- edge/models, or set "
                    "FER_EDGE_MODEL__PATH)")
    tmp = tmp_path_factory.mktemp("examples")
    try:
        broker = Mosquitto(tmp / "mosquitto")
    except MosquittoNotFound as e:
        pytest.skip(str(e))
    broker.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_EDGE_") or k == "FER_EDGE_MODEL__PATH"}
    log = open(tmp / "daemon.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--device-id", DEVICE, "--mqtt-host", broker.host,
         "--mqtt-port", str(broker.port), "--set", "source.loop=true", "--set", "homeassistant.enabled=true",
         "--set", "track.min_hits=2", "--set", "track.update_interval_s=1", "--set", "mqtt.stats_interval_s=2"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield broker
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        broker.kill()


def sample_event(kind: str, emotion: str = "happy", confidence: float = 0.8) -> dict:
    scores = {lab: (confidence if lab == emotion else (1 - confidence) / 6) for lab in LABELS}
    now = time.time()
    summary = None
    if kind == "end":
        summary = {"dominant": emotion, "mean_scores": scores, "time_share": {k: float(k == emotion) for k in scores},
                   "frames": 40}
    ev = TrackEvent(type=kind, face_id="3-a1b2", bbox=Box(60, 50, 180, 180), scores=scores, emotion=emotion,
                    confidence=confidence, first_seen=now - 4.2, last_seen=now, duration_s=4.2, summary=summary)
    return build_event(ev, device_id=DEVICE, model_version="1.0", model_sha256="0" * 64, source="demo")


# --- mosquitto_sub -----------------------------------------------------------------------------------------------

def test_mosquitto_sub_one_liner(live):
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub not installed (sudo apt-get install mosquitto-clients; .ci/run installs it): "
                    "the README one-liner is not exercised")
    argv = [live.host if a == "raspberrypi.local" else a for a in shlex.split(ONE_LINER)]
    argv += ["-p", str(live.port), "-C", "15", "-W", "60"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    by_topic: dict[str, list[str]] = {}
    for line in lines:
        topic, _, payload = line.partition(" ")
        by_topic.setdefault(topic, []).append(payload)
    base = f"fer-edge/{DEVICE}"
    assert by_topic.get(f"{base}/status") == ["online"], lines[:5]  # retained, first
    state = json.loads(by_topic[f"{base}/state"][0])  # retained too
    assert state["device_id"] == DEVICE and state["faces"] == len(state["emotions"])
    assert f"{base}/faces" in by_topic, f"no face event among {len(lines)} messages: {sorted(by_topic)}"
    jsonschema = pytest.importorskip("jsonschema",
                                     reason="jsonschema not installed (pip install -e '.[test]'): events not validated")
    validator = jsonschema.Draft202012Validator(load_schema())
    for payload in by_topic[f"{base}/faces"]:
        ev = json.loads(payload)
        assert not list(validator.iter_errors(ev)), ev
    for payload in by_topic.get(f"{base}/stats", []):
        assert json.loads(payload)["device_id"] == DEVICE


# --- examples/subscribe.py -----------------------------------------------------------------------------------------

def test_python_subscriber_prints_live_events(live):
    r = subprocess.run([sys.executable, str(EXAMPLES / "subscribe.py"), "--host", live.host, "--port",
                        str(live.port), "--count", "3"], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "subscribed to fer-edge/+/faces" in r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    for line in lines:
        assert re.fullmatch(rf"{DEVICE} [0-9a-f]+-[0-9a-f]{{4}} ((new|update) [a-z]+ [01]\.\d\d"
                            rf"|end after \d+\.\ds, mostly [a-z]+)", line), line


def test_python_subscriber_reports_an_unreachable_broker():
    port = free_port()
    r = subprocess.run([sys.executable, str(EXAMPLES / "subscribe.py"), "--host", "127.0.0.1", "--port", str(port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and f"cannot connect to 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


# --- Home Assistant automations -------------------------------------------------------------------------------------

def entity_ids() -> dict[str, dict]:
    """entity_id -> discovery payload, as Home Assistant names entities: <component>.<slug(device + entity name)>."""
    configs = discovery_configs(HomeAssistantConfig(enabled=True), MqttConfig(), DEVICE, labels=LABELS,
                                model_version="1.0")
    out = {}
    for topic, p in configs.items():
        slug = re.sub(r"[^a-z0-9]+", "_", f"{p['device']['name']} {p['name']}".lower()).strip("_")
        out[f"{topic.split('/')[1]}.{slug}"] = p
    return out


def ha_render(template: str, **variables) -> str:
    sandbox = pytest.importorskip("jinja2.sandbox",
                                  reason="jinja2 not installed (pip install -e '.[test]'): templates not rendered")
    env = sandbox.ImmutableSandboxedEnvironment()
    env.filters["to_json"] = json.dumps
    return env.from_string(template).render(**variables).strip()


def test_home_assistant_automations_parse_and_match_discovery():
    yaml = pytest.importorskip("yaml",
                               reason="pyyaml not installed (pip install -e '.[test]'): automation YAML not checked")
    automations = yaml.safe_load((EXAMPLES / "home_assistant_automation.yaml").read_text())
    assert isinstance(automations, list) and len(automations) >= 2
    ids = [a["id"] for a in automations]
    assert len(set(ids)) == len(ids)
    known = entity_ids()
    for a in automations:
        assert {"id", "alias", "triggers", "actions"} <= set(a), a
        for part in (*a["triggers"], *a.get("conditions", [])):
            if "entity_id" in part:
                assert part["entity_id"] in known, (part["entity_id"], sorted(known))

    happy_face, sad_room, face_left = automations[:3]
    # 1: the event entity fires on a real "new" event; the condition sees the attributes the template produced.
    event_cfg = known[happy_face["triggers"][0]["entity_id"]]
    assert happy_face["triggers"][0]["entity_id"].startswith("event.")

    def attributes(ev: dict) -> dict:
        return json.loads(ha_render(event_cfg["value_template"], value_json=ev))

    cond = happy_face["conditions"][0]["value_template"]
    trig = {"to_state": {"attributes": attributes(sample_event("new", "happy"))}}
    assert ha_render(cond, trigger=trig) == "True"
    assert ha_render(cond, trigger={"to_state": {"attributes": attributes(sample_event("new", "sad"))}}) == "False"
    assert ha_render(cond, trigger={"to_state": {"attributes": attributes(sample_event("end", "happy"))}}) == "False"
    msg = ha_render(happy_face["actions"][0]["data"]["message"], trigger=trig)
    assert msg == "Happy face 3-a1b2 (80% sure)", msg
    # 2: the dominant-emotion sensor can take the state the trigger waits for.
    trigger = sad_room["triggers"][0]
    assert trigger["to"] in known[trigger["entity_id"]]["options"]
    assert sad_room["conditions"][0]["entity_id"].startswith("binary_sensor.")
    # 3: plain MQTT trigger on every device's faces topic, on "end" events only.
    trigger = face_left["triggers"][0]
    assert trigger["trigger"] == "mqtt" and mqtt.topic_matches_sub(trigger["topic"], f"fer-edge/{DEVICE}/faces")
    end = sample_event("end", "surprise")
    assert ha_render(trigger["value_template"], value_json=end) == trigger["payload"]
    assert ha_render(trigger["value_template"], value_json=sample_event("update")) != trigger["payload"]
    data = face_left["actions"][0]["data"]
    assert ha_render(data["name"], trigger={"payload_json": end}) == f"fer-edge {DEVICE}"
    assert ha_render(data["message"], trigger={"payload_json": end}) == \
        "face 3-a1b2 left after 4.2 s, mostly surprise"


# --- Node-RED -------------------------------------------------------------------------------------------------------

def test_node_red_flow_is_wired_to_the_real_topics():
    flow = json.loads((EXAMPLES / "node_red_flow.json").read_text())
    nodes = {n["id"]: n for n in flow}
    assert len(nodes) == len(flow)
    for n in flow:
        for outputs in n.get("wires", []):
            for target in outputs:
                assert target in nodes, (n["id"], target)
        if "z" in n:
            assert nodes[n["z"]]["type"] == "tab"
    inputs = [n for n in flow if n["type"] == "mqtt in"]
    assert inputs and all(nodes[n["broker"]]["type"] == "mqtt-broker" for n in inputs)
    topics = {n["topic"] for n in inputs}
    for real in (f"fer-edge/{DEVICE}/faces", f"fer-edge/{DEVICE}/status"):
        assert any(mqtt.topic_matches_sub(t, real) for t in topics), real
    faces_in = next(n for n in inputs if mqtt.topic_matches_sub(n["topic"], f"fer-edge/{DEVICE}/faces"))
    assert faces_in["datatype"] == "json"
    switch = nodes[faces_in["wires"][0][0]]
    assert switch["type"] == "switch" and switch["property"] == "payload.type"
    assert [r["v"] for r in switch["rules"]] == load_schema()["properties"]["type"]["enum"]
    assert switch["outputs"] == len(switch["rules"]) == len(switch["wires"])


# --- the README itself ------------------------------------------------------------------------------------------------

def test_readme_shows_the_tested_examples():
    readme = ROOT / "README.md"
    if not readme.is_file() or "mosquitto_sub" not in readme.read_text():
        pytest.skip("README.md has no topic reference yet (nothing to keep in sync)")
    text = readme.read_text()
    assert ONE_LINER in text, f"README's mosquitto_sub line differs from the tested one: {ONE_LINER}"
    for name in ("subscribe.py", "home_assistant_automation.yaml"):
        assert f"examples/{name}" in text, name


def _readme_samples():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_samples", ROOT / "scripts" / "readme_samples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_test_command_is_what_ci_runs():
    """The README's demo and test commands are .ci/run's (which adds only the fresh venv and clone)."""
    ci = (ROOT / ".ci" / "run").read_text()
    demo = re.search(r"^DEMO_COMMAND='(.+)'$", ci, re.M)[1]
    pip = re.search(r"^PIP_INSTALL='(.+)'$", ci, re.M)[1]
    test = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.M)[1]
    assert 'eval "$DEMO_COMMAND"' in ci and 'eval "$PIP_INSTALL' in ci and 'eval "$TEST_COMMAND"' in ci
    assert "python3 -m venv" in ci and "git clone" in ci, ".ci/run no longer tests a fresh venv on a fresh clone"
    readme = (ROOT / "README.md").read_text()
    apt = "sudo apt-get install -y mosquitto mosquitto-clients"
    assert f"\n{apt} && {pip} && {test}\n" in readme, "README's test command differs from .ci/run's"
    assert f"\n{demo}\n" in readme, "README's demo command differs from .ci/run's"
    for package in apt.split()[4:]:
        assert f"need+=({package})" in ci, package


def test_readme_table_of_contents_lists_every_section():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- toc[^\n]*-->\n(.*?)<!-- /toc -->", readme, re.S)
    assert m, "README.md lost its table of contents markers"
    assert m[1] == _readme_samples().toc(readme), "table of contents is stale: python3 scripts/readme_samples.py --toc"
    lines = readme.splitlines()
    assert any("fer-edge demo" in ln for ln in lines[:30]), "the quick start left the first screen"


def _shape(name: str, body: str):
    """What must stay the same from run to run: JSON key paths (face ids as one key), or per text line its first
    word with digits and device names generalised."""
    m = re.match(r"```(\w*)\n(.*)```\n$", body, re.S)
    if m is None:
        return ("prose", bool(body.strip()))
    kind, text = m[1], m[2]
    if kind == "json":
        def paths(obj, prefix=""):
            if isinstance(obj, dict):
                out = set()
                for k, v in obj.items():
                    k = "<face_id>" if re.fullmatch(r"\d+-[0-9a-f]{4}", k) else k
                    out |= {f"{prefix}/{k}"} | paths(v, f"{prefix}/{k}")
                return out
            return set()
        return ("json", sorted(paths(json.loads(text))))
    words = [re.sub(r"\d", "0", ln.split()[0]) for ln in text.splitlines() if ln.strip()]
    return ("text", sorted(re.sub(r"^(kitchen|hallway)\b", "DEVICE", w) for w in words))


def test_readme_samples_are_what_a_real_run_prints(tmp_path):
    """scripts/readme_samples.py re-captures every sample block from a real run; each keeps the README's shape."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (sudo apt-get install mosquitto): the samples cannot be captured")
    out, blocks = tmp_path / "README.md", tmp_path / "blocks.json"
    r = subprocess.run([sys.executable, "scripts/readme_samples.py", "--fast", "--out", str(out), "--json",
                        str(blocks)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    new = json.loads(blocks.read_text())
    readme = (ROOT / "README.md").read_text()
    shown = {m["name"]: m["body"] for m in _readme_samples().SAMPLE.finditer(readme)}
    assert set(shown) == set(new), "README sample blocks and what the script captures differ"
    for name, body in shown.items():
        assert _shape(name, new[name]) == _shape(name, body), (name, new[name][:400])
    assert _readme_samples().SAMPLE.sub("", out.read_text()) == _readme_samples().SAMPLE.sub("", readme)


def test_readme_quotes_the_config_error_the_cli_prints():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"`(config error: mqtt\.port: [^`]+)`", readme)
    assert m, "README no longer quotes a config error"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "config", "--check", "--set", "mqtt.port=70000"], cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if not k.startswith("FER_EDGE_")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == m[1]
