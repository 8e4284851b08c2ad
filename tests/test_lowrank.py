"""training.lowrank: a shipped int8 bundle's convs factored at low rank, on tiny generated data."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="training tests need the train extra: pip install -e '.[train]'")
pytestmark = [pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file"),
              pytest.mark.filterwarnings("ignore:Statistics for quantized inputs were expected")]

from tests.test_prune import bundle  # noqa: E402,F401 - the fixture: a tiny random int8 VGG bundle
from tests.test_training import tool  # noqa: E402


def lowrank(data, bundle_path, arch, out, *extra):
    return tool([sys.executable, "-m", "training.lowrank", "--bundle", bundle_path, "--arch", arch, "--data", data,
                 "--out", out, "--faces", "100", "--cache-dir", out.parent / "cache", *extra])


def test_full_rank_factoring_is_the_same_network(bundle, tmp_path):  # noqa: F811
    """At rank = width the 1x1 conv is a rotation and the 3x3 part is fitted exactly: the factored network gives
    the bundle's float network back (same predictions as training.prune's same-width read-back)."""
    from training.tfenv import keras

    data, path, _, reference, x = bundle
    out = tmp_path / "full.h5"
    r = lowrank(data, path, "tiny-lr-full", out)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["layers"]["s1_0"]["rank"] == 16 and info["layers"]["s1_0"]["variance_kept"] == pytest.approx(1.0)
    assert info["accuracy_before_training"] == pytest.approx(info["source_accuracy"], abs=1e-9)
    model = keras.models.load_model(out)
    k1 = model.get_layer("s1_0_conv").get_weights()[0][0, 0]
    np.testing.assert_allclose(k1 @ k1.T, np.eye(16), atol=1e-5)  # principal directions: orthonormal
    xf = x[..., None].astype(np.float32) / 255.0
    infer = model.predict(xf, verbose=0)
    assert (infer.argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert np.abs(infer - reference).max() < 0.1


def test_low_rank_init_trains_and_is_not_pruned_again(bundle, tmp_path):  # noqa: F811
    """Rank 4 of 16: the variance kept is reported, the init trains, and its int8 export is recognised as a
    factored network by training.prune instead of being read as a plain VGG."""
    from quantization.qat import representative, to_int8, write_bundle
    from training.tfenv import keras

    data, path, root, _, x = bundle
    out = tmp_path / "lr.h5"
    r = lowrank(data, path, "tiny-lr", out)
    assert r.returncode == 0, r.stderr[-2000:]
    kept = json.loads(out.with_suffix(".json").read_text())["layers"]["s1_0"]["variance_kept"]
    assert 0.0 < kept < 1.0
    assert keras.models.load_model(out).get_layer("s1_0_lr").get_weights()[0].shape == (3, 3, 8, 4)
    r = tool([sys.executable, "-m", "training.train", "--data", data, "--out", tmp_path / "ft", "--arch", "tiny-lr",
              "--epochs", "1", "--init", out, "--cache-dir", root / "cache"])
    assert r.returncode == 0 and "initialised from" in r.stdout, r.stderr[-2000:]

    stem = tmp_path / "lrbundle" / "fer_emotion"
    write_bundle(to_int8(keras.models.load_model(out), representative(x, 20, 0)), stem, name="fer-emotion-tiny-lr",
                 version="1.0.0", extra={"training": {"arch": "tiny-lr"}})
    for module in ("training.prune", "training.lowrank"):
        r = tool([sys.executable, "-m", module, "--bundle", stem.with_suffix(".tflite"), "--arch", "tiny-lr",
                  "--data", data, "--out", tmp_path / "again.h5", "--faces", "50", "--cache-dir", root / "cache"])
        assert r.returncode == 2 and "factored network" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]


def test_tuning_fits_the_source_and_leaves_a_run_for_qat(bundle, tmp_path):  # noqa: F811
    """--tune-epochs fits the factored network to the bundle's predictions (the KL falls), and writes the
    run.json/history.csv that quantization.qat --train-run records in the manifest (the lowrank command, not a
    training.train command it never ran)."""
    from quantization.qat import history_summary, train_command

    data, path = bundle[:2]
    out = tmp_path / "run" / "best.h5"
    r = lowrank(data, path, "tiny-lr", out, "--tune-epochs", "3", "--tune-lr", "0.003")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,val_accuracy") and len(rows) == 4
    losses = [float(row.split(",")[1]) for row in rows[1:]]
    assert losses[-1] < losses[0], losses
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["arch"] == "tiny-lr" and run["epochs"] == 3
    assert train_command(run).startswith("python -m training.lowrank --bundle ") and "--tune-epochs 3" in run["command"]
    assert history_summary(tmp_path / "run" / "history.csv")["epochs_run"] == 3
    from quantization.qat import distill_targets
    from training.data import load_dataset

    n = len(load_dataset(data, cache_dir=tmp_path / "cache")["train"].y)
    soft, weight = distill_targets(tmp_path / "run", n)  # what --qat-targets distill reads
    assert weight == 1.0 and np.allclose(soft.sum(axis=1), 1.0, atol=1e-5) and (soft > 0).all()
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["accuracy_after_tuning"] == max(float(row.split(",")[2]) for row in rows[1:])


def test_lowrank_errors_exit_2_in_one_line(bundle, tmp_path):  # noqa: F811
    data, path = bundle[:2]
    r = lowrank(data, path, "tiny", tmp_path / "plain.h5")  # factors nothing
    assert r.returncode == 2 and "factors no layer" in r.stderr and "Traceback" not in r.stderr
    r = lowrank(data, path, "tiny-slim", tmp_path / "slim.h5")  # narrower: that is training.prune's job
    assert r.returncode == 2 and "keeps the widths" in r.stderr
    r = lowrank(data, path, "vgg-l-lr", tmp_path / "deep.h5")  # other layers than the bundle's
    assert r.returncode == 2 and "the same layers" in r.stderr
    r = lowrank(data, path, "tiny-lr", tmp_path / "x.h5", "--faces", "0")
    assert r.returncode == 2 and "--faces" in r.stderr
    r = lowrank(data, path, "tiny-lr", tmp_path / "x.h5", "--tune-epochs", "-1")
    assert r.returncode == 2 and "--tune-epochs" in r.stderr and "Traceback" not in r.stderr
    r = tool([sys.executable, "-m", "training.lowrank", "--bundle", path, "--arch", "tiny-lr", "--data", data,
              "--spectrum", "--faces", "50", "--cache-dir", tmp_path / "cache"])
    assert r.returncode == 0 and "s1_0 (16 channels" in r.stdout, r.stderr[-500:]
