"""model.variant: one config key selecting a second bundled model (the small one for Pi Zero 2 W / Pi 3)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge import classify
from edge.classify import DEFAULT_MODEL, VARIANTS, load_classifier, manifest_path
from edge.config import ConfigError, load_config, to_toml
from edge.model_store import validate_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = VARIANTS["small"]


def _bundle_copy(dst_dir: Path, name: str) -> Path:
    """The shipped bundle under another name: a real model for the variant machinery, whatever ships."""
    dst = dst_dir / f"{name}.tflite"
    shutil.copy(DEFAULT_MODEL, dst)
    man = json.loads(manifest_path(DEFAULT_MODEL).read_text())
    man["file"] = dst.name
    manifest_path(dst).write_text(json.dumps(man))
    return dst


def test_default_variant_leaves_the_bundled_model():
    cfg = load_config(None, {}, env={})
    assert cfg.model.variant == "default" and cfg.model.path == ""


@pytest.mark.parametrize("raw", ["big", "Small", "", "default "])
def test_unknown_variant_names_the_key(raw):
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"model.variant": raw}, env={})
    assert ei.value.key == "model.variant" and "'default', 'small'" in str(ei.value)


def test_small_variant_resolves_to_its_bundle_and_classifies(tmp_path, monkeypatch):
    small = _bundle_copy(tmp_path, "fer_emotion_small")
    monkeypatch.setitem(classify.VARIANTS, "small", small)
    cfg = load_config(None, {"model.variant": "small"}, env={})
    assert Path(cfg.model.path) == small
    # what an update's candidate goes through: loads, labelled reference faces read like a classifier's
    clf, summary = validate_model(Path(cfg.model.path), expect_labels=list(load_classifier(None).labels))
    assert clf.path == small and summary["agreement"] >= summary["floor"]
    # the effective config written back (fer-edge config) loads again to the same thing
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(to_toml(cfg))
    assert load_config(str(cfg_file), env={}).model.path == cfg.model.path


def test_small_variant_and_a_path_conflict(tmp_path, monkeypatch):
    monkeypatch.setitem(classify.VARIANTS, "small", _bundle_copy(tmp_path, "fer_emotion_small"))
    other = _bundle_copy(tmp_path, "mine")
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"model.variant": "small", "model.path": str(other)}, env={})
    assert ei.value.key == "model.variant" and "path" in str(ei.value)


def test_small_variant_without_its_bundle_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(classify.VARIANTS, "small", tmp_path / "fer_emotion_small.tflite")
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"model.variant": "small"}, env={})
    assert ei.value.key == "model.variant" and "not installed" in str(ei.value)
    # a model file without its manifest is not a bundle either
    shutil.copy(DEFAULT_MODEL, tmp_path / "fer_emotion_small.tflite")
    with pytest.raises(ConfigError, match="model.variant"):
        load_config(None, {"model.variant": "small"}, env={})


def test_cli_bad_variant_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "edge.cli", "predict", "--set", "model.variant=tiny",
                        str(ROOT / "README.md")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "model.variant" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not SMALL.is_file(), reason="this version ships no small bundle (edge/models/"
                                                "fer_emotion_small.tflite); see MODEL_CARD.md for its training run")
def test_shipped_small_bundle_loads_classifies_and_matches_its_manifest():
    man = json.loads(manifest_path(SMALL).read_text())
    base = json.loads(manifest_path(DEFAULT_MODEL).read_text())
    assert man["format"] == base["format"] and man["labels"] == base["labels"]
    assert man["file"] == SMALL.name and man["size_bytes"] == SMALL.stat().st_size
    clf, summary = validate_model(Path(load_config(None, {"model.variant": "small"}, env={}).model.path),
                                  expect_labels=base["labels"])
    assert clf.sha256 == man["sha256"] and clf.input_dtype == np.int8
    assert summary["agreement"] >= 0.5, summary  # 70 labelled FER-2013 test faces (edge/data/selftest.npz)
    assert man["metrics"]["int8_accuracy"] > man["metrics"]["peer_accuracy"]
