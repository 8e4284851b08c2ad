#!/usr/bin/env python3
"""Re-capture the README's example outputs from a real run and rewrite its marked blocks, so they cannot go
stale silently.

    python3 scripts/readme_samples.py              rewrite README.md (about 75 s)
    python3 scripts/readme_samples.py --toc        only the table of contents (no run)
    python3 scripts/readme_samples.py --out X.md   write the result to X.md instead
    python3 scripts/readme_samples.py --fast ...   the clip as fast as it decodes (tests; fps and times untypical)

A run: a local mosquitto (or amqtt) on a free port, two daemons ("kitchen" with Home Assistant discovery on, and
"hallway") on the demo clip, `fer-edge listen --device +` and examples/subscribe.py beside them, a subscriber to
everything under fer-edge/; then `fer-edge demo` alone (with its own broker). A block is what sits between ``<!-- sample: NAME -->`` and
``<!-- /sample -->`` in README.md; the table of contents sits between ``<!-- toc... -->`` and ``<!-- /toc -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = re.compile(r"(<!-- sample: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /sample -->)", re.S)
TOC = re.compile(r"(<!-- toc[^\n]*-->\n)(?P<body>.*?)(<!-- /toc -->)", re.S)
WIDTH = 150  # mosquitto_sub lines are cut here, as a terminal would show them


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def toc(readme: str) -> str:
    """One line of links to the ## sections (outside code blocks)."""
    heads, fenced = [], False
    for line in readme.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            heads.append(line[3:].strip())
    return "**Contents**: " + " · ".join(f"[{h}](#{anchor(h)})" for h in heads) + "\n"


def rounded(obj, digits: int = 3):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


def fenced(kind: str, text: str) -> str:
    return f"```{kind}\n{text.rstrip()}\n```\n"


class Recorder:
    """Every message under fer-edge/#, in arrival order: (topic, payload bytes, retained)."""

    def __init__(self, host: str, port: int):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"readme-samples-{os.getpid()}")
        self.client.on_connect = lambda c, *_: c.subscribe("fer-edge/#", 1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not ready.wait(10):
            raise SystemExit("readme_samples: the local broker did not acknowledge the subscription")

    def _on_message(self, _c, _u, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Lines:
    """A subprocess whose stdout lines are collected in a thread."""

    def __init__(self, argv: list[str], env: dict):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def drained(self, timeout: float = 30) -> None:
        """After the process exited: wait until its last stdout lines are read (the pipe reaches EOF). A fixed
        short sleep lost the demo's closing lines on a loaded CI machine."""
        self._reader.join(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_for_stderr_line(proc: subprocess.Popen, words: str, timeout: float = 30) -> None:
    """Wait until a subscriber says it is subscribed (its first stderr line), so it sees the first events."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stderr.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or words not in result[0]:
        raise SystemExit(f"readme_samples: {proc.args[:4]} did not start: {result[:1]}")


def capture(fast: bool) -> dict[str, str]:
    """Run everything and return the new body of every sample block."""
    from edge.classify import DEFAULT_MODEL, read_manifest
    from edge.cli.local_broker import LocalBroker

    broker = LocalBroker()
    if not broker.start():
        raise SystemExit("readme_samples: needs mosquitto (sudo apt-get install mosquitto) or amqtt (pip install "
                         "-e '.[demo]')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_EDGE_")}
    host, port = "127.0.0.1", str(broker.port)
    procs: list = []
    try:
        rec = Recorder(host, broker.port)
        listen = Lines([sys.executable, "-m", "edge.cli", "listen", "--host", host, "--port", port, "--device", "+"],
                       env)
        sub = Lines([sys.executable, "examples/subscribe.py", "--host", host, "--port", port], env)
        procs += [listen, sub]
        wait_for_stderr_line(listen.proc, "listening on")
        wait_for_stderr_line(sub.proc, "subscribed to")
        common = ["--source-kind", "demo", "--mqtt-host", host, "--mqtt-port", port, "--set", "source.loop=false",
                  "--duration", "60"]
        if fast:
            common += ["--set", "source.realtime=false", "--set", "mqtt.stats_interval_s=2"]
        daemons = []
        for device, extra in (("kitchen", ["--set", "homeassistant.enabled=true"]), ("hallway", [])):
            daemons.append(subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--device-id", device,
                                             *common, *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True))
            time.sleep(0.4)  # the two devices' events interleave, as a fleet's do
        for d in daemons:
            _, err = d.communicate(timeout=120)
            if d.returncode != 0:
                raise SystemExit(f"readme_samples: daemon {d.args[5]} exited {d.returncode}: {err[-800:]}")
        time.sleep(1.0)  # the last events travel through the broker
        # The demo alone afterwards (its own broker), so that it runs as on an idle machine.
        demo = Lines([sys.executable, "-m", "edge.cli", "demo", *(["--set", "source.realtime=false"] if fast else [])],
                     env)
        procs.append(demo)
        if demo.proc.wait(120) != 0:
            raise SystemExit(f"readme_samples: fer-edge demo exited {demo.proc.returncode}: "
                             f"{demo.proc.stderr.read()[-800:]}")
        demo.drained()
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            p.drained(10)
        try:
            rec.stop()
        except NameError:
            pass
        broker.stop()
    version = read_manifest(DEFAULT_MODEL)["version"]
    return blocks(rec.messages, listen.lines, sub.lines, version, demo.lines)


def blocks(messages: list[tuple[str, bytes, bool]], listen: list[str], sub: list[str], version: str,
           demo: list[str]) -> dict:
    def payloads(suffix: str, device: str = "kitchen") -> list:
        return [json.loads(p) for t, p, _ in messages if t == f"fer-edge/{device}/{suffix}" and p.startswith(b"{")]

    faces = payloads("faces")
    new = next(e for e in faces if e["type"] == "new")
    end = next(e for e in faces if e["type"] == "end" and e["face_id"] == new["face_id"])
    states = payloads("state")
    state = max(states, key=lambda s: (s["faces"], s["epoch"]))
    stats = next((s for s in payloads("stats") if s["faces_in_view"] > 0), payloads("stats")[0])
    model_status = payloads("model/status")[0]

    seen, sub_lines = set(), []
    for topic, payload, _ in messages:  # what `mosquitto_sub -t 'fer-edge/#' -v` prints, one of each topic
        if not topic.startswith("fer-edge/kitchen/") or topic in seen or topic.endswith("/stats"):
            continue
        if topic.endswith("/state") and b'"faces": 0' in payload.replace(b'":0', b'": 0'):
            continue  # the state with someone in view says more than the one at connect
        seen.add(topic)
        line = f"{topic} {payload.decode('utf-8', 'replace')}"
        sub_lines.append(line if len(line) <= WIDTH else line[:WIDTH - 1] + "…")
    order = ["status", "model/status", "state", "faces"]
    sub_lines.sort(key=lambda ln: order.index(ln.split(" ")[0].split("/", 2)[2]))

    end_fields = {k: end[k] for k in ("type", "face_id", "emotion", "confidence", "duration_s", "summary")}
    listen_lines = [ln for ln in listen if ln.strip()][:8]
    return {
        "captured-with": (f"Captured by `python3 scripts/readme_samples.py` from `fer-edge run --device-id kitchen "
                          f"--set homeassistant.enabled=true` on the demo clip with model {version} (numbers "
                          "rounded to 3 decimals here; the Home Assistant discovery configs are printed by "
                          "`fer-edge homeassistant show`).\n"),
        "mosquitto-sub": fenced("text", "\n".join(sub_lines)),
        "listen-fleet": fenced("text", "\n".join(listen_lines)),
        "event-new": fenced("json", json.dumps(rounded(new), indent=2)),
        "event-end": fenced("json", json.dumps(rounded(end_fields), indent=2)),
        "state": fenced("json", json.dumps(rounded(state))),
        "stats": fenced("json", json.dumps(rounded(stats))),
        "model-status": fenced("json", json.dumps(rounded(model_status))),
        "subscriber": fenced("text", "\n".join(sub[:6])),
        "demo": fenced("text", "\n".join(demo_excerpt(demo))),
    }


def demo_excerpt(lines: list[str]) -> list[str]:
    """The demo's first events and its closing lines (summary, ground truth), the middle elided."""
    end = next((i for i, ln in enumerate(lines) if ln.startswith("demo finished")), len(lines))
    head = lines[:min(end, 8)]
    return head + (["…"] if end > len(head) else []) + lines[end:]


def rewrite(readme: str, new: dict[str, str] | None) -> tuple[str, list[str]]:
    """README text with the sample blocks in ``new`` (and the table of contents) replaced; the names missing."""
    found: list[str] = []

    def one(m: re.Match) -> str:
        found.append(m["name"])
        body = new.get(m["name"], m["body"]) if new is not None else m["body"]
        return m.group(1) + body + m.group(4)

    text = SAMPLE.sub(one, readme)
    text = TOC.sub(lambda m: m.group(1) + toc(text) + m.group(3), text)
    missing = sorted(set(new or {}) - set(found))
    return text, missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="the README to read (default README.md)")
    ap.add_argument("--out", help="write here instead of rewriting --readme")
    ap.add_argument("--toc", action="store_true", help="only the table of contents (no run)")
    ap.add_argument("--fast", action="store_true", help="play the clip as fast as it decodes")
    ap.add_argument("--json", metavar="FILE", help="also write the captured blocks as JSON (for tests)")
    args = ap.parse_args(argv)
    new = None if args.toc else capture(args.fast)
    readme = Path(args.readme).read_text(encoding="utf-8")  # read after the run: others may edit it meanwhile
    text, missing = rewrite(readme, new)
    if missing:
        print(f"readme_samples: no <!-- sample: NAME --> block for: {', '.join(missing)}", file=sys.stderr)
    out = Path(args.out or args.readme)
    out.write_text(text, encoding="utf-8")
    if args.json and new is not None:
        Path(args.json).write_text(json.dumps(new, indent=1), encoding="utf-8")
    print(f"readme_samples: wrote {out}" + ("" if new is None else f" ({len(new) - len(missing)} sample blocks)"))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
