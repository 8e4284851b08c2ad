"""The ``[web]`` config section: the optional local web page, JSON API, /healthz and /metrics."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from edge.web.auth import parse_hash

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


@dataclass
class WebConfig:
    """HTTP server inside the daemon. Off by default; when on, it listens on localhost unless told otherwise."""

    enabled: bool = False
    bind: str = "127.0.0.1"  # address to listen on; "0.0.0.0" / "::" = every interface (then set a password)
    port: int = 8090
    # Images leave the device only through /api/preview.* and only when this is true.
    preview: bool = False
    preview_fps: float = 5.0  # at most this many preview frames per second (page and MJPEG stream)
    preview_width: int = 640  # preview frames are scaled down to this width (0 = source size)
    jpeg_quality: int = 75
    events: int = 100  # recent events kept for the page and /api/events
    stale_s: float = 10.0  # /healthz answers 503 when no frame was processed for this long
    username: str = "fer-edge"
    password_hash: str = ""  # "" = no authentication; else from `python3 -m edge.web.auth` (scrypt)
    # Without a password only requests addressed to an IP or "localhost" are answered (a web page elsewhere cannot
    # reach the device through DNS rebinding); names to allow as well, e.g. ["fer-edge.local"].
    hosts: list[str] = field(default_factory=list)
    timeout_s: float = 10.0  # per-connection socket timeout: a stalled client is dropped after this
    max_clients: int = 32  # concurrent connections; more are answered 503 and closed
    max_streams: int = 4  # concurrent MJPEG viewers (each holds one connection)

    @property
    def auth(self) -> bool:
        return bool(self.password_hash)

    @property
    def loopback(self) -> bool:
        """True when only this machine can connect (127.0.0.0/8, ::1, localhost)."""
        if self.bind == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.bind).is_loopback
        except ValueError:
            return False

    def validate(self) -> None:
        if self.bind != "localhost":
            try:
                ipaddress.ip_address(self.bind)
            except ValueError:
                raise ValueError(f"bind: must be an IP address such as 127.0.0.1, 0.0.0.0 or :: "
                                 f"(got {self.bind!r})") from None
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: must be 1..65535 (got {self.port})")
        if not 0.1 <= self.preview_fps <= 30:
            raise ValueError(f"preview_fps: must be 0.1..30 (got {self.preview_fps})")
        if self.preview_width != 0 and not 64 <= self.preview_width <= 4096:
            raise ValueError(f"preview_width: must be 0 (source size) or 64..4096 (got {self.preview_width})")
        if not 10 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: must be 10..100 (got {self.jpeg_quality})")
        if not 1 <= self.events <= 10_000:
            raise ValueError(f"events: must be 1..10000 (got {self.events})")
        if not 1 <= self.stale_s <= 3600:
            raise ValueError(f"stale_s: must be 1..3600 seconds (got {self.stale_s})")
        if not 0.5 <= self.timeout_s <= 300:
            raise ValueError(f"timeout_s: must be 0.5..300 seconds (got {self.timeout_s})")
        if not 1 <= self.max_clients <= 1000:
            raise ValueError(f"max_clients: must be 1..1000 (got {self.max_clients})")
        if not 0 <= self.max_streams <= self.max_clients:
            raise ValueError(f"max_streams: must be 0..max_clients ({self.max_clients}) (got {self.max_streams})")
        if len(self.hosts) > 32:
            raise ValueError(f"hosts: at most 32 names (got {len(self.hosts)})")
        for h in self.hosts:
            if len(h) > 253 or not _HOSTNAME.match(h):
                raise ValueError(f"hosts: {h[:80]!r} is not a host name such as fer-edge.local")
        if self.password_hash:
            if not self.username or ":" in self.username or len(self.username) > 64:
                raise ValueError("username: 1..64 characters without ':' when password_hash is set "
                                 f"(got {self.username!r})")
            try:
                parse_hash(self.password_hash)
            except ValueError as e:
                # Never echo the value: it is a secret, even hashed.
                raise ValueError(f"password_hash: {e}; make one with `python3 -m edge.web.auth`") from None
