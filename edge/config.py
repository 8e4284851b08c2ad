"""One TOML config for the whole daemon, composed from each module's config dataclass.

Precedence (lowest first): dataclass defaults < TOML file < environment (``FER_EDGE_<SECTION>__<KEY>``)
< command-line overrides (``--set section.key=value`` and the dedicated flags). Every value is checked
against its dataclass field type, unknown sections/keys are rejected with a suggestion, and then each
section's own ``validate()`` runs. Problems raise :class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
import stat
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edge.classify import ModelConfig
from edge.detect import DetectConfig
from edge.discovery import HomeAssistantConfig
from edge.mqtt import MqttConfig
from edge.sources import SourceConfig
from edge.track import TrackConfig
from edge.update_config import UpdateConfig
from edge.web.config import WebConfig

ENV_PREFIX = "FER_EDGE_"
# Searched in this order when no -c/--config and no FER_EDGE_CONFIG is given.
DEFAULT_CONFIG_PATHS = ("/etc/fer-edge/config.toml",)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# MQTT topic levels must not contain these; the device id becomes one topic level.
_BAD_ID_CHARS = re.compile(r"[/+#\s\x00]")
# A real config is a few KiB (config/default.toml, every key with comments, is under 20 KiB); anything much
# larger is a mistake (or /dev/zero) and must not be read into memory.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(Exception):
    """A user-facing configuration problem; ``key`` is the dotted key (or file) at fault."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}" if key else msg)
        self.key = key
        self.msg = msg


@dataclass
class DeviceConfig:
    """Identity of this appliance."""

    id: str = ""  # "" = derived from the hostname; becomes the MQTT topic level <prefix>/<id>/...
    state_dir: str = "/var/lib/fer-edge"  # writable directory for runtime state (snapshots, caches)

    def validate(self) -> None:
        if self.id and _BAD_ID_CHARS.search(self.id):
            raise ValueError(f"id: must not contain '/', '+', '#' or whitespace (got {self.id!r}); "
                             "it is used as an MQTT topic level")
        if len(self.id) > 64:
            raise ValueError(f"id: at most 64 characters (got {len(self.id)})")
        state = Path(self.state_dir).expanduser()
        if state.exists() and not state.is_dir():
            raise ValueError(f"state_dir: {self.state_dir} exists but is not a directory")


@dataclass
class ServiceConfig:
    """Behaviour of the daemon loop itself."""

    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR
    log_stats_interval_s: float = 60.0  # also log a one-line stats summary this often (0 = never)
    latency_window: int = 200  # frames kept for the rolling p50/p95 stage latencies
    read_timeout_s: float = 0.5  # longest wait for a frame before housekeeping (stats, watchdog, ending tracks)
    error_log_interval_s: float = 10.0  # per-frame errors of one kind are logged at most this often
    shutdown_timeout_s: float = 5.0  # time allowed to flush buffered events to the broker on exit
    print_events: bool = False  # also write every event as one JSON line to stdout
    max_frames: int = 0  # stop after this many frames (0 = no limit); for tests and benchmarks
    duration_s: float = 0.0  # stop after this many seconds (0 = no limit)
    cpu_temp_path: str = "/sys/class/thermal/thermal_zone0/temp"  # millidegrees C; reported in stats if readable

    def validate(self) -> None:
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level: must be one of {', '.join(LOG_LEVELS)} (got {self.log_level!r})")
        self.log_level = self.log_level.upper()
        if not 0 <= self.log_stats_interval_s <= 86_400:
            raise ValueError(f"log_stats_interval_s: must be 0..86400 s (got {self.log_stats_interval_s}; 0 = never)")
        if not 10 <= self.latency_window <= 100_000:
            raise ValueError(f"latency_window: must be 10..100000 (got {self.latency_window})")
        if not 0.01 <= self.read_timeout_s <= 10:
            raise ValueError(f"read_timeout_s: must be 0.01..10 (got {self.read_timeout_s})")
        if not 0 <= self.error_log_interval_s <= 86_400:
            raise ValueError(f"error_log_interval_s: must be 0..86400 s (got {self.error_log_interval_s})")
        # The shipped unit's TimeoutStopSec is 30 s: a longer flush is cut short by SIGKILL there.
        if not 0 <= self.shutdown_timeout_s <= 300:
            raise ValueError(f"shutdown_timeout_s: must be 0..300 s (got {self.shutdown_timeout_s}); keep it below "
                             "the unit's TimeoutStopSec (30 s)")
        if not 0 <= self.max_frames <= 1_000_000_000:
            raise ValueError(f"max_frames: must be 0..1000000000 (got {self.max_frames}; 0 = no limit)")
        if not 0 <= self.duration_s <= 315_360_000:
            raise ValueError(f"duration_s: must be 0..315360000 s, ten years (got {self.duration_s}; 0 = no limit)")


# Section name -> dataclass, in the order they appear in the TOML file.
SECTIONS: dict[str, type] = {
    "device": DeviceConfig,
    "source": SourceConfig,
    "detect": DetectConfig,
    "model": ModelConfig,
    "update": UpdateConfig,
    "track": TrackConfig,
    "mqtt": MqttConfig,
    "homeassistant": HomeAssistantConfig,
    "web": WebConfig,
    "service": ServiceConfig,
}


@dataclass
class Config:
    """The whole daemon configuration, one attribute per TOML section."""

    device: DeviceConfig = field(default_factory=DeviceConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    web: WebConfig = field(default_factory=WebConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    path: str | None = None  # file it was loaded from, if any (for SIGHUP reload)

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def flat(self) -> dict[str, Any]:
        """{"section.key": value} for every key, for diffs and display."""
        out = {}
        for name in SECTIONS:
            for k, v in dataclasses.asdict(self.section(name)).items():
                out[f"{name}.{k}"] = v
        return out


def default_device_id() -> str:
    """The hostname, made safe for use as an MQTT topic level."""
    host = socket.gethostname().split(".")[0] or "fer-edge"
    return _BAD_ID_CHARS.sub("-", host)[:64]


def find_config_path(explicit: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """Config file to use: explicit path, else $FER_EDGE_CONFIG, else the first existing default path."""
    if explicit:
        return explicit
    if env.get("FER_EDGE_CONFIG"):
        return env["FER_EDGE_CONFIG"]
    for p in DEFAULT_CONFIG_PATHS:
        if Path(p).is_file():
            return p
    return None


def load_config(path: str | None = None, overrides: Mapping[str, str] | None = None,
                env: Mapping[str, str] | None = None, *, base: Mapping[str, str] | None = None) -> Config:
    """Build and validate a Config from defaults, an optional TOML file, env vars and CLI overrides.

    ``overrides`` maps dotted keys ("mqtt.host") to raw strings; ``env`` defaults to os.environ.
    ``base`` (same form) replaces dataclass defaults below the file, e.g. the demo command's defaults.
    Raises ConfigError naming the key (or file) at fault.
    """
    env = os.environ if env is None else env
    layers: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, raw in (base or {}).items():
        _set_raw(layers, key, raw, origin="built-in defaults")
    if path:
        _merge_file(layers, path)
    for key, raw in _env_overrides(env).items():
        _set_raw(layers, key, raw, origin=f"environment {ENV_PREFIX}{key.replace('.', '__').upper()}")
    for key, raw in (overrides or {}).items():
        _set_raw(layers, key, raw, origin="command line")
    sections = {name: _build_section(name, cls, layers[name]) for name, cls in SECTIONS.items()}
    cfg = Config(**sections, path=path)
    if not cfg.device.id:
        cfg.device.id = default_device_id()
    return cfg


def parse_set_option(item: str) -> tuple[str, str]:
    """Split a ``--set section.key=value`` argument; ConfigError if malformed."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(item, "expected section.key=value, e.g. mqtt.host=broker.local")
    return key, value


# --- internals ---------------------------------------------------------------------------------

_MISSING = object()


def _read_config_file(path: str) -> str:
    """The file's text, refusing anything but a regular file of at most MAX_CONFIG_BYTES before reading it."""
    def check(st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(str(path), "is a directory, expected a TOML file")
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                    else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "not a file")
            raise ConfigError(str(path), f"is {kind}, not a regular file; point -c at a TOML file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(str(path), f"too large ({st.st_size} bytes, at most {MAX_CONFIG_BYTES >> 20} MiB); "
                                         "is this really the config file?")

    try:
        check(os.stat(path))  # before open(): opening a FIFO blocks, reading /dev/zero never ends
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open() still returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            check(os.fstat(fh.fileno()))
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except OSError as e:
        raise ConfigError(str(path), f"cannot read config file: {e}") from None
    if len(data) > MAX_CONFIG_BYTES:  # grew after the check
        raise ConfigError(str(path), f"too large (over {MAX_CONFIG_BYTES >> 20} MiB); is this really the config file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"cannot read config file: not UTF-8 text ({e})") from None


def _merge_file(layers: dict[str, dict[str, Any]], path: str) -> None:
    text = _read_config_file(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The message already ends with "(at line L, column C)".
        raise ConfigError(str(path), f"invalid TOML: {e}") from None
    for section, body in data.items():
        cls = _section_cls(section)
        if not isinstance(body, dict):
            raise ConfigError(section, f"expected a [{section}] table, got a {type(body).__name__}")
        for key, value in body.items():
            _field_type(section, cls, key)  # rejects unknown keys early, with a suggestion
            layers[section][key] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX):]:
            continue  # e.g. FER_EDGE_CONFIG is not a key override
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        out[f"{section}.{key}"] = raw
    return out


def _set_raw(layers: dict[str, dict[str, Any]], dotted: str, raw: str, origin: str) -> None:
    section, sep, key = dotted.partition(".")
    if not sep or not key:
        raise ConfigError(dotted, f"expected section.key (from {origin})")
    cls = _section_cls(section)
    _field_type(section, cls, key)
    layers[section][key] = _RawString(raw)


class _RawString(str):
    """A value that came in as text (env/CLI) and must be parsed into the field's type."""


def _section_cls(section: str) -> type:
    cls = SECTIONS.get(section)
    if cls is None:
        raise ConfigError(section, f"unknown section{_did_you_mean(section, SECTIONS)}; "
                                   f"known: {', '.join(SECTIONS)}")
    return cls


def _field_type(section: str, cls: type, key: str) -> Any:
    hints = _hints(cls)
    if key not in hints:
        raise ConfigError(f"{section}.{key}", f"unknown key{_did_you_mean(key, hints, section)}")
    return hints[key]


def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _did_you_mean(word: str, choices, section: str | None = None) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean '{section + '.' if section else ''}{close[0]}'?)"


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            msg = str(e)
            field_name, sep, rest = msg.partition(":")
            if sep and field_name.strip() in hints:
                raise ConfigError(f"{name}.{field_name.strip()}", rest.strip()) from None
            raise ConfigError(name, msg) from None
    return obj


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    return {str: "string", int: "integer", float: "number", bool: "boolean (true/false)"}.get(tp, str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check (TOML values) or parse (_RawString values) ``value`` as type ``tp``."""
    raw = isinstance(value, _RawString)
    got = f"(got {str(value)!r})" if raw else f"(got {value!r})"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value == "" or (raw and value.lower() == "none"):
            return None
        if len(args) == 1:
            return _coerce(key, args[0], value)
        for a in args:
            try:
                return _coerce(key, a, value)
            except ConfigError:
                pass
        raise ConfigError(key, f"must be a {_type_name(tp)} {got}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (str,)
        if raw:
            value = _parse_list(key, str(value))
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a {_type_name(tp)} {got}")
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is bool:
        if raw:
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be a boolean: true or false {got}")
    if tp is int:
        if raw:
            try:
                return int(value.strip())
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be an integer {got}")
    if tp is float:
        number = None
        if raw:
            try:
                number = float(value.strip())
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None:
            raise ConfigError(key, f"must be a number {got}")
        # Every float key is a time, rate, size or fraction: NaN slips through every "< 0" check in validate()
        # (e.g. a NaN reconnect delay became a busy loop) and inf means nothing, so refuse both for all keys here.
        if not math.isfinite(number):
            raise ConfigError(key, f"must be a finite number {got}")
        return number
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(key, f"must be a string (quote it in TOML) {got}")
    return value  # a type this loader does not know: pass through unchecked


def _parse_list(key: str, text: str) -> list:
    text = text.strip()
    if text.startswith("["):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(key, f"invalid list {text!r}: {e}") from None
    # "0,30,-30" from --set or the environment: each item is parsed as its key's type, like a scalar's raw text.
    return [_RawString(part.strip()) for part in text.split(",") if part.strip()]


# --- writing -------------------------------------------------------------------------------------

def to_toml(cfg: Config) -> str:
    """Render the effective configuration as TOML (every key), e.g. for ``fer-edge config``."""
    lines = []
    for name in SECTIONS:
        lines.append(f"[{name}]")
        for k, v in dataclasses.asdict(cfg.section(name)).items():
            if v is None:
                lines.append(f"# {k} =  (unset)")
            else:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
