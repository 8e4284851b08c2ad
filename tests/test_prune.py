"""training.prune: a shipped int8 bundle read back into Keras and narrowed, on tiny generated data."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="training tests need the train extra: pip install -e '.[train]'")
pytestmark = [pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file"),
              pytest.mark.filterwarnings("ignore:Statistics for quantized inputs were expected")]

from tests.test_training import synth_faces, tool, write_folder  # noqa: E402


T = 1.7  # the calibration temperature folded into the bundle's head


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny VGG with random weights and BatchNorm statistics (so every channel and class matters), exported
    as a PTQ int8 bundle with a temperature folded into its head, as quantization.qat ships one."""
    from quantization.qat import representative, to_int8, write_bundle
    from training import models
    from training.calibrate import fold_temperature
    from training.tfenv import keras

    root = tmp_path_factory.mktemp("prune")
    data = root / "ds"
    write_folder(data / "train", 24, 0)
    write_folder(data / "test", 6, 1)
    keras.utils.set_random_seed(3)
    model = models.build("tiny")
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if layer.name.endswith("_bn"):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.2, 1.0, n)])
    x, _ = synth_faces(6, seed=2)
    # faces of every brightness and contrast: features that differ more than int8 rounding does
    x = np.clip(x * rng.uniform(0.2, 1.0, (len(x), 1, 1)) + rng.uniform(0, 200, (len(x), 1, 1)), 0, 255)
    x = x.astype(np.uint8)
    xf = x[..., None].astype(np.float32) / 255.0
    # a head that reads the faces' differences (random weights read the shared mean and pick one class for all)
    f = keras.Model(model.input, model.get_layer("gap").output).predict(xf, verbose=0)
    w = rng.normal(0, 1, (f.shape[1], 7))
    w *= 2.0 / (((f - f.mean(0)) @ w).std() + 1e-9)
    model.get_layer("probs").set_weights([w, -f.mean(0) @ w])
    reference = model.predict(xf, verbose=0)
    fold_temperature(model, T)
    stem = root / "bundle" / "fer_emotion"
    write_bundle(to_int8(model, representative(x, 40, 0)), stem, name="fer-emotion-tiny", version="1.0.0",
                 extra={"calibration": {"method": "temperature", "temperature": T}, "training": {"arch": "tiny"}})
    return data, stem.with_suffix(".tflite"), root, reference, x


def prune(data, bundle_path, arch, out):
    return tool([sys.executable, "-m", "training.prune", "--bundle", bundle_path, "--arch", arch, "--data", data,
                 "--out", out, "--faces", "100", "--cache-dir", out.parent / "cache"])


def test_same_width_prune_reproduces_the_bundle(bundle, tmp_path):
    """Keeping every channel gives back the bundle's network: its weights, folded BN and head read correctly,
    the calibration temperature taken out (the argmax of the float model is the int8 bundle's)."""
    from edge.classify import load_classifier
    from training.tfenv import keras

    data, path, _, reference, x = bundle
    out = tmp_path / "same.h5"
    r = prune(data, path, "tiny", out)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["kept"] == {"s0_0": list(range(8)), "s1_0": list(range(16))}
    assert info["accuracy_before_training"] == pytest.approx(info["source_accuracy"], abs=1e-9)

    model = keras.models.load_model(out)
    xf = x[..., None].astype(np.float32) / 255.0
    infer = model.predict(xf, verbose=0)
    # the float network before its temperature was folded in, up to int8 rounding
    assert len(set(reference.argmax(1))) >= 3
    assert (infer.argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert np.abs(infer - reference).max() < 0.1
    assert (load_classifier(path).predict(x).argmax(1) == infer.argmax(1)).mean() >= 0.9
    # BN holds the training faces' statistics: on them, a training-mode pass (batch statistics) is the same
    # network as inference, so fine-tuning starts from the bundle instead of a rescaled copy of it
    from training.data import load_dataset

    tr = load_dataset(data, cache_dir=tmp_path / "cache")["train"]
    xt = tr.x[..., None].astype(np.float32) / 255.0
    for name in ("s0_0", "s1_0"):
        conv = keras.Model(model.input, model.get_layer(f"{name}_conv").output).predict(xt, verbose=0)
        bn = model.get_layer(f"{name}_bn")
        batch, moving = bn(conv, training=True).numpy(), bn(conv, training=False).numpy()
        assert np.abs(batch - moving).max() < 0.05 * np.abs(moving).max(), name


def test_narrower_arch_keeps_the_top_channels_and_trains(bundle, tmp_path):
    data, path, root, _, _ = bundle
    out = tmp_path / "slim.h5"
    r = prune(data, path, "tiny-slim", out)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert [len(v) for v in info["kept"].values()] == [5, 10]
    assert all(v == sorted(set(v)) and max(v) < n for v, n in zip(info["kept"].values(), (8, 16)))
    r = tool([sys.executable, "-m", "training.train", "--data", data, "--out", tmp_path / "ft", "--arch",
              "tiny-slim", "--epochs", "1", "--init", out, "--cache-dir", root / "cache"])
    assert r.returncode == 0 and "initialised from" in r.stdout, r.stderr[-2000:]


def test_prune_errors_exit_2_in_one_line(bundle, tmp_path):
    data, path = bundle[:2]
    r = prune(data, path, "vgg-xs", tmp_path / "deeper.h5")  # four stages against the bundle's two
    assert r.returncode == 2 and "same depth" in r.stderr and "Traceback" not in r.stderr
    r = prune(data, path, "vgg-l", tmp_path / "wider.h5")  # not the same depth either
    assert r.returncode == 2
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model")
    r = prune(data, bad, "tiny", tmp_path / "x.h5")  # no manifest
    assert r.returncode == 2 and "manifest" in r.stderr, r.stderr[-500:]
    bad.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    r = prune(data, bad, "tiny", tmp_path / "x.h5")  # a manifest, but no model
    assert r.returncode == 2 and "prune:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]
