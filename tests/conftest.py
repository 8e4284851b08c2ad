"""Shared pytest fixtures: real mosquitto brokers and collecting subscribers (see tests/broker.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker import Mosquitto, MosquittoNotFound, Subscriber  # noqa: E402


@pytest.fixture
def make_broker(tmp_path):
    """Factory: make_broker(users=None, persistence=False, extra_config=()) -> started Mosquitto, killed at teardown.

    Skips the test when mosquitto is not installed.
    """
    started: list[Mosquitto] = []

    def _make(**kwargs) -> Mosquitto:
        try:
            b = Mosquitto(tmp_path / f"mosquitto{len(started)}", **kwargs)
        except MosquittoNotFound as exc:
            pytest.skip(str(exc))
        started.append(b)
        return b.start()

    yield _make
    for b in started:
        b.kill()


@pytest.fixture
def broker(make_broker) -> Mosquitto:
    """An anonymous mosquitto on 127.0.0.1:<free port> (.host/.port), restartable with stop()/start()."""
    return make_broker()


@pytest.fixture
def persistent_broker(make_broker) -> Mosquitto:
    """Like `broker`, but sessions and queued QoS 1 messages survive stop()/start()."""
    return make_broker(persistence=True)


@pytest.fixture
def subscriber(request):
    """Factory: subscriber(topics="#", on=<Mosquitto, default the `broker` fixture>, **Subscriber kwargs).

    Returns a started Subscriber (connected, subscription acknowledged); all are stopped at teardown.
    """
    subs: list[Subscriber] = []

    def _make(topics="#", *, on=None, **kwargs) -> Subscriber:
        b = on if on is not None else request.getfixturevalue("broker")
        s = Subscriber(b.host, b.port, topics, **kwargs).start()
        subs.append(s)
        return s

    yield _make
    for s in subs:
        s.stop()
