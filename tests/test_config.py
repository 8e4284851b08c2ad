"""Config loading: precedence, typing, unknown keys, section validation, shipped files, CLI exit status."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edge.cli import DEMO_SETTINGS, main
from edge.config import SECTIONS, Config, ConfigError, load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOML = ROOT / "config" / "default.toml"
DEMO_TOML = ROOT / "config" / "demo.toml"


def write(tmp_path: Path, text: str, name: str = "c.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def raises_key(key: str, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_config(*args, **kwargs)
    assert ei.value.key == key, str(ei.value)
    assert str(ei.value).startswith(f"{key}: ")
    return ei.value


# --- defaults and shipped files -------------------------------------------------------------------

def test_defaults_without_file_and_hostname_device_id():
    cfg = load_config(None, {}, env={})
    assert isinstance(cfg, Config)
    assert cfg.mqtt.port == 1883 and cfg.mqtt.enabled is True
    assert cfg.source.kind == "demo"
    assert cfg.service.log_level == "INFO"
    assert cfg.device.id  # derived from the hostname, usable as a topic level
    assert not any(c in cfg.device.id for c in "/+# ")


def test_default_toml_lists_every_key_with_its_default():
    data = tomllib.loads(DEFAULT_TOML.read_text())
    assert list(data) == list(SECTIONS), "sections missing/extra/out of order in config/default.toml"
    for name, cls in SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(data[name]) == set(fields), f"[{name}] keys differ from {cls.__name__} fields"
        defaults = cls()
        for key, value in data[name].items():
            assert value == getattr(defaults, key), f"{name}.{key}: default.toml says {value!r}, " \
                                                     f"code default is {getattr(defaults, key)!r}"
    # And it loads to exactly the built-in defaults.
    assert load_config(str(DEFAULT_TOML), env={}).flat() == load_config(None, env={}).flat()


def test_demo_toml_matches_the_demo_commands_builtin_defaults():
    from_file = load_config(str(DEMO_TOML), env={}).flat()
    builtin = load_config(None, env={}, base=DEMO_SETTINGS).flat()
    assert from_file == builtin
    assert from_file["source.kind"] == "demo" and from_file["device.id"] == "demo"


def test_to_toml_round_trips(tmp_path):
    cfg = load_config(None, {"mqtt.host": 'bro"ker', "track.min_hits": "7", "source.loop": "true"}, env={})
    again = load_config(write(tmp_path, to_toml(cfg)), env={})
    assert again.flat() == cfg.flat()


# --- precedence -----------------------------------------------------------------------------------

def test_precedence_defaults_file_env_cli(tmp_path):
    path = write(tmp_path, '[mqtt]\nport = 1884\nhost = "file-host"\n[track]\nmin_hits = 4\n')
    cfg = load_config(path, {}, env={})
    assert (cfg.mqtt.port, cfg.mqtt.host, cfg.track.min_hits) == (1884, "file-host", 4)

    env = {"FER_EDGE_MQTT__PORT": "1885", "FER_EDGE_TRACK__SMOOTHING": "0.25", "FER_EDGE_CONFIG": "ignored",
           "UNRELATED": "x"}
    cfg = load_config(path, {}, env=env)
    assert (cfg.mqtt.port, cfg.mqtt.host, cfg.track.smoothing) == (1885, "file-host", 0.25)

    cfg = load_config(path, {"mqtt.port": "1886", "mqtt.host": "cli-host"}, env=env)
    assert (cfg.mqtt.port, cfg.mqtt.host, cfg.track.min_hits, cfg.track.smoothing) == (1886, "cli-host", 4, 0.25)


def test_base_defaults_sit_below_the_file(tmp_path):
    path = write(tmp_path, "[track]\nmin_hits = 9\n")
    cfg = load_config(path, {}, env={}, base={"track.min_hits": "2", "track.max_missed_s": "0.5"})
    assert cfg.track.min_hits == 9 and cfg.track.max_missed_s == 0.5


def test_uses_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("FER_EDGE_MQTT__HOST", "env-host")
    assert load_config(None, {}).mqtt.host == "env-host"


# --- types ----------------------------------------------------------------------------------------

def test_string_values_are_coerced_to_field_types():
    cfg = load_config(None, {"mqtt.tls": "yes", "mqtt.enabled": "off", "source.loop": "1", "mqtt.keepalive": " 45 ",
                             "track.iou_threshold": "0.5", "source.fps": "15", "device.id": "pi-7"}, env={})
    assert cfg.mqtt.tls is True and cfg.mqtt.enabled is False and cfg.source.loop is True
    assert cfg.mqtt.keepalive == 45 and cfg.track.iou_threshold == 0.5
    assert cfg.source.fps == 15.0 and isinstance(cfg.source.fps, float)
    assert cfg.device.id == "pi-7"
    for text in ("0, 20,-20", "[0, 20, -20]"):  # a list key from --set or the environment, both spellings
        assert load_config(None, {"detect.fine_angles": text}, env={}).detect.fine_angles == [0.0, 20.0, -20.0]
    with pytest.raises(ConfigError, match=r"detect\.fine_angles\[1\]: must be a number"):
        load_config(None, {"detect.fine_angles": "0,x"}, env={})


def test_toml_int_accepted_for_float_field(tmp_path):
    cfg = load_config(write(tmp_path, "[source]\nfps = 12\n"), env={})
    assert cfg.source.fps == 12.0 and isinstance(cfg.source.fps, float)


@pytest.mark.parametrize("key,raw,expect", [
    ("mqtt.port", "abc", "must be an integer (got 'abc')"),
    ("mqtt.port", "1883.5", "must be an integer"),
    ("source.fps", "fast", "must be a number (got 'fast')"),
    ("mqtt.tls", "maybe", "must be a boolean"),
])
def test_bad_string_values_name_the_key(key, raw, expect):
    err = raises_key(key, None, {key: raw}, env={})
    assert expect in err.msg


@pytest.mark.parametrize("toml,key,expect", [
    ('[mqtt]\nport = "1883"\n', "mqtt.port", "must be an integer"),
    ("[mqtt]\ntls = 1\n", "mqtt.tls", "must be a boolean"),
    ("[mqtt]\nport = true\n", "mqtt.port", "must be an integer"),
    ("[mqtt]\nhost = 5\n", "mqtt.host", "must be a string"),
    ("[source]\nfps = false\n", "source.fps", "must be a number"),
])
def test_bad_toml_types_name_the_key(tmp_path, toml, key, expect):
    err = raises_key(key, write(tmp_path, toml), env={})
    assert expect in err.msg


def test_bad_env_value_names_the_key():
    err = raises_key("track.min_hits", None, {}, env={"FER_EDGE_TRACK__MIN_HITS": "three"})
    assert "must be an integer" in err.msg


# --- unknown sections and keys --------------------------------------------------------------------

def test_unknown_key_in_file_suggests_the_right_one(tmp_path):
    err = raises_key("mqtt.hots", write(tmp_path, '[mqtt]\nhots = "x"\n'), env={})
    assert "unknown key" in err.msg and "did you mean 'mqtt.host'" in err.msg


def test_unknown_section_suggests_the_right_one(tmp_path):
    err = raises_key("mqqt", write(tmp_path, '[mqqt]\nhost = "x"\n'), env={})
    assert "unknown section" in err.msg and "did you mean 'mqtt'" in err.msg


def test_unknown_keys_from_env_and_cli():
    raises_key("track.min_hit", None, {}, env={"FER_EDGE_TRACK__MIN_HIT": "3"})
    err = raises_key("nosuch", None, {"nosuch.key": "1"}, env={})
    assert "known: device, source" in err.msg
    raises_key("mqtt", None, {"mqtt": "1"}, env={})


def test_top_level_key_outside_a_section(tmp_path):
    err = raises_key("host", write(tmp_path, 'host = "x"\n'), env={})
    assert "unknown section" in err.msg


# --- section validate() -----------------------------------------------------------------------------

def test_section_validation_errors_name_section_and_field():
    err = raises_key("mqtt.port", None, {"mqtt.port": "70000"}, env={})
    assert "70000" in err.msg
    raises_key("service.log_level", None, {"service.log_level": "loud"}, env={})
    raises_key("device.id", None, {"device.id": "kitchen/door"}, env={})
    raises_key("track.min_hits", None, {"track.min_hits": "0"}, env={})
    raises_key("detect.backend", None, {"detect.backend": "magic"}, env={})
    raises_key("service.max_frames", None, {"service.max_frames": "-1"}, env={})


def test_log_level_is_case_insensitive():
    assert load_config(None, {"service.log_level": "debug"}, env={}).service.log_level == "DEBUG"


# --- files ----------------------------------------------------------------------------------------------

def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, '[mqtt]\nhost = "ok"\nport = = 3\n', name="broken.toml")
    with pytest.raises(ConfigError) as ei:
        load_config(path, env={})
    msg = str(ei.value)
    assert "broken.toml" in msg and "invalid TOML" in msg and "line 3" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(str(tmp_path / "nope.toml"), env={})
    assert "nope.toml" in str(ei.value) and "not found" in str(ei.value)


# --- through the CLI -----------------------------------------------------------------------------------

def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("FER_EDGE_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=60)


def test_cli_config_error_exit_2_no_traceback(tmp_path):
    path = write(tmp_path, "[mqtt]\nport = 70000\n")
    r = run_cli("run", "-c", path)
    assert r.returncode == 2, r.stderr
    assert "config error: mqtt.port: " in r.stderr and "70000" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_bad_set_and_env_exit_2(tmp_path):
    cases = [
        (("run", "--set", "mqtt.prot=1"), {}, "config error: mqtt.prot: unknown key (did you mean 'mqtt.port'?)"),
        (("run", "--set", "novalue"), {}, "config error: novalue: expected section.key=value"),
        (("config", "--check"), {"FER_EDGE_MQTT__PORT": "x"}, "config error: mqtt.port: must be an integer (got 'x')"),
        (("run", "-c", str(tmp_path / "missing.toml")), {}, "missing.toml: config file not found"),
    ]
    for args, env, expect in cases:
        r = run_cli(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert expect in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_cli_config_shows_effective_values(tmp_path, capsys):
    path = write(tmp_path, '[mqtt]\nhost = "from-file"\npassword = "s3cret"\nusername = "u"\n')
    assert main(["config", "-c", path, "--set", "track.min_hits=6"]) == 0
    out = capsys.readouterr().out
    shown = tomllib.loads(out)
    assert shown["mqtt"]["host"] == "from-file" and shown["track"]["min_hits"] == 6
    assert "s3cret" not in out
    assert main(["config", "--check", "-c", path]) == 0
    assert "OK" in capsys.readouterr().out


def test_cli_usage_error_exit_2(capsys):
    assert main(["run", "--no-such-flag"]) == 2
    assert main([]) == 2
    assert "Traceback" not in capsys.readouterr().err


# --- hostile values: every number finite and bounded, the file itself bounded ----------------------------------

def _numeric_keys(kind: type, *, skip_sections: tuple[str, ...] = ()) -> list[str]:
    from edge.config import _hints

    return [f"{name}.{key}" for name, cls in SECTIONS.items() if name not in skip_sections
            for key, tp in _hints(cls).items() if tp is kind]


FLOAT_KEYS = _numeric_keys(float)
# [update] bounds belong to the update path (tests/test_model_update.py); non-finite values are refused for it too,
# centrally, by the loader.
BOUNDED_FLOAT_KEYS = _numeric_keys(float, skip_sections=("update",))
BOUNDED_INT_KEYS = _numeric_keys(int, skip_sections=("update",))


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e999", "-NaN"])
def test_non_finite_floats_are_refused_for_every_float_key(key, raw):
    err = raises_key(key, None, {key: raw}, env={})
    assert "finite" in err.msg, err.msg


@pytest.mark.parametrize("toml_value", ["nan", "inf", "-inf", "+nan"])
def test_non_finite_floats_in_the_file_are_refused(tmp_path, toml_value):
    for key in FLOAT_KEYS:
        section, name = key.split(".")
        err = raises_key(key, write(tmp_path, f"[{section}]\n{name} = {toml_value}\n"), env={})
        assert "finite" in err.msg, err.msg


@pytest.mark.parametrize("key", BOUNDED_FLOAT_KEYS + BOUNDED_INT_KEYS)
@pytest.mark.parametrize("raw", ["1e12", "-1e12"])
def test_every_number_has_a_lower_and_an_upper_bound(key, raw):
    if key in BOUNDED_INT_KEYS:
        raw = str(int(float(raw)))
    err = raises_key(key, None, {key: raw}, env={})
    assert any(ch.isdigit() for ch in err.msg), f"the message should state the range: {err.msg}"


@pytest.mark.parametrize("key,raw", [
    ("source.width", "100000000"), ("source.height", "100000000"), ("source.fps", "100000"),
    ("mqtt.reconnect_min_s", "0.000001"), ("mqtt.reconnect_max_s", "1e9"), ("mqtt.buffer_size", "1000000000"),
    ("track.max_missed_s", "1e9"), ("service.shutdown_timeout_s", "1e9"), ("detect.detect_width", "100000000"),
    ("detect.max_faces", "1000000"), ("source.reconnect_min_s", "0.0000001"),
])
def test_values_from_the_fault_run_are_refused(key, raw):
    raises_key(key, None, {key: raw}, env={})


def test_documented_ranges_still_accept_ordinary_values():
    cfg = load_config(None, {"source.width": "4056", "source.height": "3040", "source.fps": "120",
                             "mqtt.reconnect_min_s": "0.1", "mqtt.reconnect_max_s": "600",
                             "service.shutdown_timeout_s": "25", "track.max_missed_s": "30",
                             "mqtt.buffer_size": "100000", "service.duration_s": "86400"}, env={})
    assert (cfg.source.width, cfg.source.height, cfg.source.fps) == (4056, 3040, 120.0)


def _check_in_subprocess(path: str) -> subprocess.CompletedProcess:
    # A subprocess with a memory cap: the old loader read /dev/zero until memory ran out, and blocked on a FIFO.
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from edge.config import load_config, ConfigError\n"
            "try:\n    load_config(sys.argv[1], env={})\nexcept ConfigError as e:\n"
            "    print(e)\n    sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, capture_output=True, text=True, timeout=20)


def test_config_from_dev_zero_fails_fast_with_one_line():
    r = _check_in_subprocess("/dev/zero")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stdout.strip().startswith("/dev/zero: ") and "regular file" in r.stdout, r.stdout
    assert len(r.stdout.strip().splitlines()) == 1


def test_config_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    r = _check_in_subprocess(str(fifo))  # old code: blocks in open() until the 20 s timeout
    assert r.returncode == 2 and "regular file" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_config_directory_and_oversized_file(tmp_path):
    err = raises_key(str(tmp_path), str(tmp_path), env={})
    assert "directory" in err.msg
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)  # 2 MB of comments
    err = raises_key(str(big), str(big), env={})
    assert "too large" in err.msg and "MiB" in err.msg


def _readme_ranges() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("| Key | Range | Key | Range |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for keys, rng in zip(cells[0::2], cells[1::2]):
            for key in re.findall(r"`([a-z_]+\.[a-z_]+)`", keys):
                rows.append((key, re.sub(r"\s+\(.*\)$", "", rng)))  # drop "(0 = native)"-style notes
    return rows


def test_readme_range_table_matches_validation():
    """Each documented range: its ends accepted (or refused, for open ends), just outside refused."""
    from edge.config import _hints

    rows = _readme_ranges()
    assert len(rows) >= 30, rows
    problems = []

    def ok(key: str, value, extra: dict | None = None) -> bool:
        try:
            load_config(None, {key: str(value), **(extra or {})}, env={})
            return True
        except ConfigError as e:
            if e.key != key:
                problems.append(f"{key}={value}: error names {e.key}: {e}")
            return False

    for key, rng in rows:
        section, name = key.split(".")
        is_int = _hints(SECTIONS[section])[name] is int
        sibling = {key.replace("_min_s", "_max_s"): "3600"} if name.endswith("_min_s") else {}

        def step(x):
            return 1 if is_int else max(abs(x) * 1e-3, 1e-4)

        num = int if is_int else float
        if re.fullmatch(r"[\d, ]+", rng):  # a set such as "0, 1, 2"
            allowed = [int(v) for v in rng.split(",")]
            checks = [(v, True) for v in allowed] + [(min(allowed) - 1, False), (max(allowed) + 1, False)]
        elif m := re.fullmatch(r"([(\[])([\d.]+), ([\d.]+)([)\]])", rng):
            lo, hi = num(m[2]), num(m[3])
            checks = [(lo, m[1] == "["), (hi, m[4] == "]"), (lo - step(lo), False), (hi + step(hi), False),
                      ((lo + hi) / 2, True)]
        elif m := re.fullmatch(r"(0 or )?([\d.]+|[a-z_]+)\.\.([\d.]+)", rng):
            hi = num(m[3])
            checks = [(hi, True), (hi + step(hi), False)]
            if m[2][0].isdigit():
                lo = num(m[2])
                checks += [(lo, True), (lo - step(lo), m[1] is not None and lo - step(lo) == 0)]
            else:  # bounded below by another key: its default
                lo = getattr(SECTIONS[section](), m[2])
                checks += [(lo, True), (lo - step(lo), False)]
            if m[1]:
                checks.append((0, True))
        else:
            problems.append(f"{key}: cannot read the documented range {rng!r}")
            continue
        for value, accepted in checks:
            if ok(key, value, sibling if accepted else None) != accepted:
                problems.append(f"{key}={value}: README says {rng}, validation {'refused' if accepted else 'took'} it")
    assert not problems, "\n".join(problems)
