"""A throw-away MQTT broker for ``fer-edge demo`` when none is reachable: mosquitto if installed, else amqtt."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """A throw-away broker for the demo: mosquitto if installed, else an embedded amqtt."""

    def __init__(self):
        self.kind = None
        self.port = None
        self._proc = None
        self._tmp = None
        self._amqtt = None

    def start(self) -> bool:
        return self._start_mosquitto() or self._start_amqtt()

    def _start_mosquitto(self) -> bool:
        import shutil
        import subprocess
        import tempfile

        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
        if not exe:
            return False
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="fer-edge-demo-")
        conf = Path(self._tmp.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._wait_ready():
            self.kind = "mosquitto"
            return True
        self.stop()
        return False

    def _start_amqtt(self) -> bool:
        import asyncio
        import threading

        try:
            from amqtt.broker import Broker
        except ImportError:
            return False
        # amqtt logs every bare TCP probe (our readiness check) as an ERROR: keep the demo's output readable.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        self.port = free_port()
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                  "sys_interval": 0, "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
                  "topic-check": {"enabled": False}}
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def serve():
            asyncio.set_event_loop(loop)
            try:
                broker = Broker(config, loop=loop) if "loop" in Broker.__init__.__code__.co_varnames else Broker(config)
                loop.run_until_complete(broker.start())
                self._amqtt = (loop, broker)
            except BaseException as e:  # any amqtt version mismatch: fall back to no broker
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()

        threading.Thread(target=serve, name="amqtt", daemon=True).start()
        started.wait(10)
        if failure or not self._wait_ready():
            log.warning("embedded amqtt broker failed to start: %s", failure[0] if failure else "timeout")
            return False
        self.kind = "amqtt"
        return True

    def _wait_ready(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                return False
            if port_open("127.0.0.1", self.port, 0.2):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except Exception:
                self._proc.kill()
            self._proc = None
        if self._amqtt is not None:
            import asyncio

            loop, broker = self._amqtt
            try:
                asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(5)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
            self._amqtt = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
