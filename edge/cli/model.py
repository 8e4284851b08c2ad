"""``fer-edge model keygen|sign|verify|push|status|rollback``: the operator side of signed model updates.

Workflow: ``keygen`` once (keep the .key offline, put the .pub in the devices' ``update.public_keys``),
``sign`` each new model (a .tflite with its .json manifest, or an existing bundle), ``push`` it to a device
or a group over MQTT (inline, or as a URL the device downloads), watch ``status``, ``rollback`` if needed.
``push`` and ``rollback`` sign the command itself with the same key (edge.commands: target, issue time,
bundle sha256/size/version and force are covered), so a broker client without the key cannot install,
replay, downgrade or roll back. The device-side checks are in edge/updates.py.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge.fsutil import atomic_write

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
FINAL_RESULTS = ("installed", "refused", "failed", "rolled_back")


class CommandError(Exception):
    """A user-facing failure of a model command: printed as one line, exit status ``code``."""

    def __init__(self, msg: str, code: int = EXIT_FAIL):
        super().__init__(msg)
        self.code = code


def register(sub) -> None:
    """Add the ``model`` command and its actions."""
    p = sub.add_parser("model", help="signed model updates: keygen, sign, verify, push, status, rollback",
                       description="Operator side of model updates. Devices accept a bundle only if it is "
                                   "signed by a key in their update.public_keys and passes their checks.")
    actions = p.add_subparsers(dest="model_action", metavar="ACTION")
    actions.required = True

    a = actions.add_parser("keygen", help="make an Ed25519 signing key pair (NAME.key, NAME.pub)",
                           description="Writes NAME.key (private, mode 0600: keep it off the devices, "
                                       "ideally offline) and NAME.pub (goes into update.public_keys).")
    a.add_argument("--out", default="fer-edge-signing", metavar="NAME", help="file name prefix (default %(default)s)")
    a.add_argument("--force", action="store_true", help="overwrite existing files")
    a.set_defaults(func=cmd_keygen)

    a = actions.add_parser("sign", help="sign a model (.tflite + .json manifest) or a bundle",
                           description="Makes a signed bundle from MODEL.tflite and the MODEL.json manifest "
                                       "beside it (or re-signs a bundle), after checking locally that the "
                                       "model loads and passes the same self-test the device runs.")
    a.add_argument("model", metavar="MODEL.tflite|BUNDLE")
    a.add_argument("--key", required=True, metavar="KEY", help="private key from `fer-edge model keygen`")
    a.add_argument("-o", "--output", metavar="FILE",
                   help="bundle to write (default: <stem>-<version>.bundle beside a .tflite; a bundle in place)")
    a.add_argument("--no-check", action="store_true", help="skip the local load + self-test")
    a.set_defaults(func=cmd_sign)

    a = actions.add_parser("verify", help="check a bundle's structure, manifest and signature offline")
    a.add_argument("bundle", metavar="BUNDLE")
    a.add_argument("--pub", action="append", default=[], metavar="KEY",
                   help="trusted public key (file or base64; repeatable; default: update.public_keys of the config)")
    _add_config_args(a, mqtt=False)
    a.set_defaults(func=cmd_verify)

    a = actions.add_parser("push", help="send a signed bundle to a device or group over MQTT",
                           description="Publishes an install command on <prefix>/<device>/cmd/model (or "
                                       "<prefix>/group/<name>/cmd/model) with the bundle inline, or with --url "
                                       "where the device downloads it (the local BUNDLE gives the sha256). "
                                       "Waits for the device's answer on model/status.")
    a.add_argument("bundle", metavar="BUNDLE")
    _add_target_args(a)
    a.add_argument("--url", metavar="URL", help="let the device download the bundle from this http(s) URL")
    a.add_argument("--force", action="store_true", help="install even if not newer than the active model")
    _add_key_args(a)
    _add_config_args(a)
    a.set_defaults(func=cmd_push)

    a = actions.add_parser("status", help="show a device's model status (retained on model/status)")
    a.add_argument("--device", required=True, metavar="ID", help="device id, or '+' for every device")
    a.add_argument("--json", action="store_true", help="print the raw status JSON")
    a.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for status messages (default %(default)s)")
    _add_config_args(a)
    a.set_defaults(func=cmd_status)

    a = actions.add_parser("rollback", help="make a device go back to its previous model",
                           description="The device swaps back to the previous installed model (the base model "
                                       "when none is left) between two frames; the one it left is kept as "
                                       "retired (see the README's retention rule).")
    _add_target_args(a)
    _add_key_args(a)
    _add_config_args(a)
    a.set_defaults(func=cmd_rollback)


def _add_target_args(a: argparse.ArgumentParser) -> None:
    target = a.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID", help="one device")
    target.add_argument("--group", metavar="NAME", help="every device with NAME in update.groups")
    a.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long to wait for the answer(s) (default %(default)s; groups: all answers in this time)")
    a.add_argument("--no-wait", action="store_true", help="publish and return without waiting for an answer")


def _add_key_args(a: argparse.ArgumentParser) -> None:
    a.add_argument("--key", default=os.environ.get("FER_EDGE_SIGNING_KEY"), metavar="KEY",
                   help="private key that signs the command (default $FER_EDGE_SIGNING_KEY); devices obey only "
                        "commands signed by a key in their update.public_keys")
    a.add_argument("--unsigned", action="store_true",
                   help="send an unsigned (format 1) command: only devices with update.allow_unsigned (install) "
                        "or update.allow_unsigned_rollback (rollback) obey it")


def _signed(args, body: dict, extra: dict | None = None) -> dict:
    """The wire message for a command body: signed with --key (format 2), or unsigned with --unsigned."""
    from edge.bundle import load_private_key
    from edge.commands import sign_command

    rid = secrets.token_hex(6)
    if args.unsigned:
        return {"id": rid, **body, **(extra or {})}
    if not args.key:
        raise CommandError("no signing key: pass --key KEY (the .key from `fer-edge model keygen`) or set "
                           "FER_EDGE_SIGNING_KEY; devices refuse unsigned commands", EXIT_USAGE)
    target = {"device": args.device} if args.device else {"group": args.group}
    signed = {"id": rid, "target": target, "issued_at": round(time.time(), 3), **body}
    return {"id": rid, **sign_command(signed, load_private_key(args.key)), **(extra or {})}


def _add_config_args(a: argparse.ArgumentParser, mqtt: bool = True) -> None:
    a.add_argument("-c", "--config", metavar="FILE",
                   help="TOML config for the broker settings (default: $FER_EDGE_CONFIG, else /etc/fer-edge/config.toml)")
    a.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set mqtt.tls=true (repeatable)")
    if mqtt:
        a.add_argument("--host", help="broker host (mqtt.host)")
        a.add_argument("--port", help="broker port (mqtt.port)")
        a.add_argument("--prefix", help="topic prefix (mqtt.prefix)")


def _run(fn, args) -> int:
    from edge.bundle import BundleError

    try:
        return fn(args)
    except (CommandError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "code", EXIT_FAIL)


def _config(args):
    from edge.config import find_config_path, load_config, parse_set_option

    overrides = dict(parse_set_option(item) for item in args.sets)
    for attr, key in (("host", "mqtt.host"), ("port", "mqtt.port"), ("prefix", "mqtt.prefix")):
        if getattr(args, attr, None) is not None:
            overrides[key] = str(getattr(args, attr))
    return load_config(find_config_path(args.config), overrides)  # ConfigError: reported by the CLI


# --- offline actions ------------------------------------------------------------------------------------

def cmd_keygen(args) -> int:
    return _run(_keygen, args)


def _keygen(args) -> int:
    from edge.bundle import generate_keypair, key_id, public_key_text

    key_path, pub_path = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    for p in (key_path, pub_path):
        if p.exists() and not args.force:
            raise CommandError(f"{p} exists; use --force to overwrite it (devices trusting the old key will "
                               "refuse bundles signed with the new one)", EXIT_USAGE)
    pem, raw = generate_keypair()
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_text(public_key_text(raw))
    b64 = base64.b64encode(raw).decode()
    print(f"private key {key_path} (keep it secret and off the devices)")
    print(f"public key  {pub_path}, key id {key_id(raw)}")
    print("on each device, in /etc/fer-edge/config.toml:")
    print(f'  [update]\n  public_keys = ["{b64}"]')
    return EXIT_OK


def cmd_sign(args) -> int:
    return _run(_sign, args)


def _sign(args) -> int:
    from edge.bundle import load_bundle_file, load_private_key, sha256_hex, sign_bundle, write_bundle

    src = Path(args.model)
    bundle = load_bundle_file(src, allow_v1=True)  # a format 1 bundle is re-signed as format 2
    key = load_private_key(args.key)
    if not args.no_check:
        _local_check(bundle)
    signed = sign_bundle(bundle, key)
    data = write_bundle(signed)
    if args.output:
        out = Path(args.output)
    elif src.suffix == ".tflite":
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in signed.version)
        out = src.with_name(f"{src.stem}-{safe}.bundle")
    else:
        out = src
    try:
        atomic_write(out, data, tmp_prefix=f".{out.name}.tmp-")
    except OSError as e:
        raise CommandError(f"{out}: cannot write ({e.strerror})") from None
    print(f"signed {out}: model version {signed.version}, model sha256 {signed.model_sha256[:12]}…, "
          f"key id {signed.signature['key_id']}, bundle {len(data)} bytes sha256 {sha256_hex(data)}")
    return EXIT_OK


def _local_check(bundle) -> None:
    """Load the model and run the device's self-test here, so a broken model is caught before a push."""
    from edge.classify import ModelError
    from edge.model_store import describe_self_test, validate_model

    with tempfile.TemporaryDirectory(prefix="fer-edge-sign-") as tmp:
        (Path(tmp) / "model.tflite").write_bytes(bundle.model_bytes)
        (Path(tmp) / "model.json").write_bytes(bundle.manifest_bytes)
        try:
            clf, summary = validate_model(Path(tmp) / "model.tflite")
        except ModelError as e:
            if "no TFLite interpreter" in str(e):
                print(f"warning: local check skipped: {e}", file=sys.stderr)
                return
            raise CommandError(f"the model fails the device checks: {e} (--no-check signs it anyway)") from None
    print(f"local check: loads on {clf.backend}, labels {','.join(clf.labels)}, input {clf.input_size}px; "
          f"{describe_self_test(summary)}")


def cmd_verify(args) -> int:
    return _run(_verify, args)


def _verify(args) -> int:
    from edge.bundle import BundleError, load_public_keys, load_verified, sha256_hex

    entries = args.pub or _config(args).update.public_keys
    if not entries:
        raise CommandError("no public keys: pass --pub KEY or set update.public_keys in the config", EXIT_USAGE)
    try:
        data = Path(args.bundle).read_bytes()
    except OSError as e:
        raise BundleError(f"{args.bundle}: {e.strerror}") from None
    bundle, kid = load_verified(data, load_public_keys(entries))  # as the device does: signature first
    print(f"{args.bundle}: OK, model version {bundle.version}, model sha256 {bundle.model_sha256[:12]}…, "
          f"signed by key {kid}, bundle sha256 {sha256_hex(data)}")
    return EXIT_OK


# --- MQTT actions ---------------------------------------------------------------------------------------

class _Link:
    """A connected paho client (callback API v2) that collects model/status messages."""

    def __init__(self, mcfg, sub_topic: str):
        import paho.mqtt.client as mqtt

        self.mqtt = mqtt
        proto = mqtt.MQTTv5 if str(mcfg.protocol) == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"fer-edge-model-{os.getpid()}-{secrets.token_hex(3)}", protocol=proto)
        if mcfg.username:
            self.client.username_pw_set(mcfg.username, mcfg.password or None)
        if mcfg.tls:
            try:
                self.client.tls_set(ca_certs=mcfg.ca_file or None, certfile=mcfg.cert_file or None,
                                    keyfile=mcfg.key_file or None)
            except (OSError, ValueError) as e:
                raise CommandError(f"mqtt TLS setup failed ({e}); check mqtt.ca_file/cert_file/key_file",
                                   EXIT_USAGE) from None
            self.client.tls_insecure_set(bool(mcfg.tls_insecure))
        self.where = f"{mcfg.host}:{mcfg.port}"
        self.sub_topic = sub_topic
        self.messages: list[tuple[str, dict]] = []
        self.cond = threading.Condition()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.refused: str | None = None
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        try:
            self.client.connect(mcfg.host, int(mcfg.port), keepalive=30)
        except OSError as e:
            raise CommandError(f"cannot reach the MQTT broker at {self.where}: {e.strerror or e} "
                               "(check mqtt.host/mqtt.port or --host/--port)") from None
        self.client.loop_start()
        if not self.connected.wait(10) or self.refused:
            self.close()
            raise CommandError(f"MQTT broker {self.where} refused the connection: {self.refused or 'no answer'}"
                               " (check mqtt.username/password and the broker ACL)")
        if not self.subscribed.wait(10):
            self.close()
            raise CommandError(f"could not subscribe to {sub_topic} on {self.where}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
        else:
            client.subscribe(self.sub_topic, qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(payload, dict):
            with self.cond:
                self.messages.append((msg.topic, payload))
                self.cond.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(30)
        except (RuntimeError, ValueError) as e:
            raise CommandError(f"could not publish to {topic} on {self.where}: {e}") from None
        if not info.is_published():
            raise CommandError(f"the broker {self.where} did not acknowledge the command on {topic}")

    def wait(self, pred, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.messages), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _describe(st: dict) -> str:
    prev = st.get("previous") or {}
    lines = [f"{st.get('device_id', '?')}: model {st.get('version')} (sha256 {str(st.get('sha256'))[:12]}…), "
             f"{st.get('origin')}{', installed ' + st['installed_at'] if st.get('installed_at') else ''}; "
             f"state {st.get('state')}"
             + (f" ({st['probation']['frames']}/{st['probation']['of']} probation frames)" if st.get("probation") else "")
             + (f"; rollback goes to {prev.get('version')}" if prev else "")]
    if st.get("result"):
        lines.append(f"  last request {st.get('request_id') or '?'} ({st.get('action')}): {st.get('result')}"
                     + (f": {st['error']}" if st.get("error") else "")
                     + (f" [{st['detail']}]" if st.get("detail") and not st.get("error") else ""))
    return "\n".join(lines)


def _send(args, command: dict, action: str) -> int:
    """Publish a command and wait for the device(s) to answer it on model/status."""
    cfg = _config(args)
    prefix = cfg.mqtt.prefix
    if args.device:
        if any(c in args.device for c in "/+#"):
            raise CommandError(f"--device: expected one device id (got {args.device!r})", EXIT_USAGE)
        cmd_topic, status_topic = f"{prefix}/{args.device}/cmd/model", f"{prefix}/{args.device}/model/status"
    else:
        if any(c in args.group for c in "/+#"):
            raise CommandError(f"--group: expected a group name (got {args.group!r})", EXIT_USAGE)
        cmd_topic, status_topic = f"{prefix}/group/{args.group}/cmd/model", f"{prefix}/+/model/status"
    rid = command["id"]
    link = _Link(cfg.mqtt, status_topic)
    try:
        link.publish(cmd_topic, json.dumps(command, separators=(",", ":")).encode())
        print(f"sent {'unsigned ' if args.unsigned else 'signed '}{action} request {rid} to {cmd_topic}",
              file=sys.stderr, flush=True)
        if args.no_wait:
            return EXIT_OK

        def answers(msgs):
            return [p for _, p in msgs if p.get("request_id") == rid and p.get("result") in FINAL_RESULTS]

        if args.device:
            if not link.wait(lambda m: answers(m), args.timeout):
                raise CommandError(f"no answer from {args.device} within {args.timeout:g} s (offline? updates "
                                   "disabled? check `fer-edge model status --device ...`)")
        else:
            link.wait(lambda m: False, args.timeout)
        got = answers(link.messages)
    finally:
        link.close()
    for st in got:
        print(_describe(st), flush=True)
    if not got:
        print(f"no device answered within {args.timeout:g} s", file=sys.stderr)
        return EXIT_FAIL
    ok = ("installed",) if action == "install" else ("rolled_back",)
    return EXIT_OK if all(st.get("result") in ok for st in got) else EXIT_FAIL


def cmd_push(args) -> int:
    return _run(_push, args)


def _push(args) -> int:
    from edge.bundle import read_bundle

    try:
        data = Path(args.bundle).read_bytes()
    except OSError as e:
        raise CommandError(f"{args.bundle}: {e.strerror}", EXIT_USAGE) from None
    bundle = read_bundle(data)  # refuse to send something the device would refuse as malformed
    if bundle.signature is None:
        print("warning: the bundle is not signed; devices refuse it unless update.allow_unsigned = true "
              "(sign it with `fer-edge model sign`)", file=sys.stderr)
    digest = hashlib.sha256(data).hexdigest()
    inline = {} if args.url else {"bundle": base64.b64encode(data).decode()}
    if args.unsigned:
        body = {"action": "install", "sha256": digest, "force": bool(args.force),
                **({"url": args.url} if args.url else {})}
    else:
        body = {"action": "install", "sha256": digest, "size": len(data), "version": bundle.version,
                "force": bool(args.force), "url": args.url or None}
    command = _signed(args, body, inline)
    print(f"pushing {args.bundle}: model version {bundle.version} ({len(data)} bytes"
          f"{', by URL' if args.url else ''})", file=sys.stderr, flush=True)
    return _send(args, command, "install")


def cmd_rollback(args) -> int:
    return _run(lambda a: _send(a, _signed(a, {"action": "rollback"}), "rollback"), args)


def cmd_status(args) -> int:
    return _run(_status, args)


def _status(args) -> int:
    cfg = _config(args)
    device = args.device
    if any(c in device for c in "/#") or ("+" in device and device != "+"):
        raise CommandError(f"--device: expected a device id or '+' (got {device!r})", EXIT_USAGE)
    link = _Link(cfg.mqtt, f"{cfg.mqtt.prefix}/{device}/model/status")
    try:
        if device == "+":
            link.wait(lambda m: False, args.timeout)
        else:
            link.wait(bool, args.timeout)
        msgs = list(link.messages)
    finally:
        link.close()
    latest: dict[str, dict] = {}
    for topic, st in msgs:
        latest[topic.split("/")[-3]] = st
    if not latest:
        print(f"no model status from {'any device' if device == '+' else device} within {args.timeout:g} s "
              "(device never started with this broker/prefix?)", file=sys.stderr)
        return EXIT_FAIL
    for _, st in sorted(latest.items()):
        print(json.dumps(st) if args.json else _describe(st), flush=True)
    return EXIT_OK
