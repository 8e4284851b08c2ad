"""Test helpers: a real Mosquitto broker on a free loopback port and a collecting MQTT subscriber.

Usage (fixtures in conftest.py provide both)::

    def test_x(broker, subscriber):
        sub = subscriber("fer-edge/#")                 # connected and subscribed when returned
        ...                                           # point the code under test at broker.host / broker.port
        assert sub.wait_for(lambda msgs: len(msgs) >= 3, timeout=5)
        broker.stop(); broker.start()                 # outage on the SAME port

For outage tests where messages must survive a broker restart on the subscriber side too, use
``Mosquitto(..., persistence=True)`` (fixture ``persistent_broker``) together with ``Subscriber(..., persistent=True)``:
the broker then keeps the subscriber's session and queued QoS 1 messages across stop()/start().
"""

from __future__ import annotations

import hashlib
import base64
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import paho.mqtt.client as mqtt

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class MosquittoNotFound(RuntimeError):
    """The mosquitto binary is not installed; tests needing a broker should skip."""


def find_mosquitto() -> Optional[str]:
    """Path of the mosquitto binary ($PATH first, then the usual sbin folders), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in _CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def password_line(username: str, password: str) -> str:
    """One mosquitto password_file line in the salted SHA-512 ("$6$") format mosquitto 1.x/2.x reads."""
    salt = os.urandom(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{username}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


class Mosquitto:
    """A mosquitto broker process on 127.0.0.1 with a generated config, restartable on the same port.

    users: {username: password}; when given, anonymous access is disabled and a password_file is used.
    persistence: keep sessions/queued messages across stop()/start() (persistence file in workdir).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: Optional[int] = None,
        users: Optional[dict[str, str]] = None,
        persistence: bool = False,
        extra_config: Iterable[str] = (),
        binary: Optional[str] = None,
    ) -> None:
        self.binary = binary or find_mosquitto()
        if not self.binary:
            raise MosquittoNotFound("mosquitto broker not installed (sudo apt-get install mosquitto); MQTT tests skipped")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "mosquitto.log"
        self.conf_path = self.workdir / "mosquitto.conf"
        self._proc: Optional[subprocess.Popen] = None
        self._log_file = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"persistence {'true' if persistence else 'false'}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # The test subscriber may reconnect after the publisher: let the broker queue every QoS 1 message for it
            # (default 1000), so a lost message can only be the publisher's fault.
            "max_queued_messages 0",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to user "mosquitto", which cannot read the private pytest tmp dir.
            lines.append("user root")
        if persistence:
            lines += [f"persistence_location {self.workdir}/", "autosave_interval 1"]
        if users:
            pw = self.workdir / "passwd"
            pw.write_text("".join(password_line(u, p) for u, p in users.items()))
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        lines += list(extra_config)
        self.conf_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        """Start the broker and wait until its port accepts TCP connections (retries binding the same port)."""
        if self.running:
            return self
        deadline = time.monotonic() + timeout
        while True:
            self._log_file = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self._port_open():
                    return self
                time.sleep(0.02)
            # Died early (usually the port still in use right after a stop) or never opened: retry until deadline.
            self._terminate(signal.SIGKILL)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"mosquitto did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM: clients see the connection drop; persistence is saved)."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Abrupt stop (SIGKILL)."""
        self._terminate(signal.SIGKILL)

    def restart(self, down_for: float = 0.0) -> None:
        """stop(), stay down for `down_for` seconds, start() on the same port."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        """The last n characters of the broker log (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _terminate(self, sig: int, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


class Subscriber:
    """A paho (callback API v2) client that records every received message as Message(topic, payload, retain).

    It is connected and its subscriptions acknowledged when start() returns; it reconnects and resubscribes on its own
    after a broker restart. persistent=True uses a fixed client id and a non-clean session, so a broker running with
    persistence queues QoS 1 messages for it while it is disconnected.
    """

    def __init__(self, host: str, port: int, topics: Iterable[str] | str = "#", *, qos: int = 1,
                 persistent: bool = False, client_id: str = "", username: str = "", password: str = "") -> None:
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.qos = qos
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._subscribed = False
        cid = client_id or f"test-sub-{os.getpid()}-{id(self):x}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=not persistent)
        if username:
            self.client.username_pw_set(username, password or None)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.host, self.port = host, port

    def start(self, timeout: float = 5.0) -> "Subscriber":
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()
        if not self.wait_subscribed(timeout):
            self.stop()
            raise RuntimeError(f"test subscriber could not subscribe to {self.topics} at {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_subscribed(self, timeout: float = 5.0) -> bool:
        """Wait until the (re)subscription of the current connection was acknowledged."""
        with self._cond:
            return self._cond.wait_for(lambda: self._subscribed, timeout)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(t, self.qos) for t in self.topics])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._subscribed = False

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self._messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    @property
    def messages(self) -> list[Message]:
        """Snapshot of everything received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def on_topic(self, topic: str) -> list[Message]:
        """Messages received on exactly this topic."""
        return [m for m in self.messages if m.topic == topic]

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 5.0) -> bool:
        """Wait until predicate(messages snapshot) is true; returns False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(list(self._messages)), timeout)

    def wait_topic(self, topic: str, predicate: Callable[[list[Message]], bool] = bool, timeout: float = 5.0) -> bool:
        """Wait until predicate(messages on `topic`) is true (default: at least one message)."""
        return self.wait_for(lambda msgs: predicate([m for m in msgs if m.topic == topic]), timeout)

    def __enter__(self) -> "Subscriber":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
