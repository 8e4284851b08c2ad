"""The [update] config section: trusted keys, limits, fleet groups, the drop-in directory, probation.

Its own module so that edge.config does not import the update machinery (edge.updates), which in turn
needs a Config: no import circle, and loading a config stays cheap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

_BAD_LEVEL = re.compile(r"[/+#\s\x00]")


def _finite_in(name: str, value: float, lo: float, hi: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name}: must be a finite number in {lo:g}..{hi:g} (got {value})")


@dataclass
class UpdateConfig:
    """Model updates: trusted keys, limits, fleet groups, the drop-in directory, probation."""

    enabled: bool = True  # accept updates (MQTT commands and the drop-in directory)
    public_keys: list[str] = field(default_factory=list)  # base64 Ed25519 keys or paths of .pub/PEM files
    allow_unsigned: bool = False  # accept unsigned bundles AND unsigned install commands (never on a reachable device)
    allow_unsigned_rollback: bool = False  # obey unsigned rollback commands (anyone on the broker may roll back)
    command_max_age_s: float = 900.0  # refuse signed commands issued longer ago (0 = no age limit: replay counter only)
    groups: list[str] = field(default_factory=list)  # also obey <prefix>/group/<name>/cmd/model
    max_bundle_mb: float = 16.0  # larger bundles are refused (an inline one briefly needs ~5x this in RAM)
    http_timeout_s: float = 60.0  # deadline for the whole download of a bundle given by URL
    ca_file: str = ""  # CA bundle for https URLs ("" = system CAs)
    watch_dir: str = ""  # drop-in directory for bundles ("" = <device.state_dir>/models/inbox)
    watch_interval_s: float = 2.0  # how often the drop-in directory is scanned (0 = not watched)
    keep_previous: int = 1  # installed models kept for rollback besides the active one (and as many rolled back from)
    probation_frames: int = 20  # a new model is accepted after classifying this many frames without error
    probation_s: float = 300.0  # ... or after this many seconds without an error (few faces in view)

    def validate(self) -> None:
        for i, entry in enumerate(self.public_keys):
            if not entry.strip():
                raise ValueError(f"public_keys: entry {i} is empty")
        if self.public_keys:
            from edge.bundle import BundleError, load_public_keys

            try:
                load_public_keys(self.public_keys)
            except BundleError as e:
                raise ValueError(f"public_keys: {e}") from None
        for g in self.groups:
            if not g or _BAD_LEVEL.search(g) or len(g) > 64:
                raise ValueError(f"groups: {g!r} is not a valid group name (1..64 characters, no '/', '+', "
                                 "'#' or whitespace)")
        _finite_in("max_bundle_mb", self.max_bundle_mb, 0.001, 1024)
        _finite_in("http_timeout_s", self.http_timeout_s, 1, 3600)
        _finite_in("command_max_age_s", self.command_max_age_s, 0, 7 * 86400)
        if self.ca_file and not Path(self.ca_file).expanduser().is_file():
            raise ValueError(f"ca_file: {self.ca_file} does not exist")
        if self.watch_dir and Path(self.watch_dir).expanduser().exists() \
                and not Path(self.watch_dir).expanduser().is_dir():
            raise ValueError(f"watch_dir: {self.watch_dir} exists but is not a directory")
        _finite_in("watch_interval_s", self.watch_interval_s, 0, 3600)
        if not 0 <= self.keep_previous <= 10:
            raise ValueError(f"keep_previous: must be 0..10 (got {self.keep_previous})")
        if not 1 <= self.probation_frames <= 100_000:
            raise ValueError(f"probation_frames: must be 1..100000 (got {self.probation_frames})")
        _finite_in("probation_s", self.probation_s, 1, 86400)

    @property
    def max_bytes(self) -> int:
        return int(self.max_bundle_mb * 1024 * 1024)
