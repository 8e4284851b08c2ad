"""Training chain on tiny generated data: loaders (good and bad input), train -> QAT -> int8 -> edge classifier.

The tools run in this process through their ``main(argv)`` (see ``tool``): a subprocess would import TensorFlow
again for each of the ~30 commands, ~8 s apiece on a busy 2-core machine. One test runs ``python -m
training.train`` as a real subprocess, for the entry point itself.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data import FER_LABELS, DataError, canonical_label, load_csv, load_dataset, load_folder_split

pytest.importorskip("tensorflow", reason="training tests need the train extra: pip install -e '.[train]'")
# What TensorFlow's own code warns about while the tools run in this process (a subprocess kept it to itself).
pytestmark = [pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file"),
              pytest.mark.filterwarnings("ignore:Statistics for quantized inputs were expected"),
              pytest.mark.filterwarnings("ignore:distutils Version classes are deprecated")]

ROOT = Path(__file__).resolve().parents[1]
FOLDER_NAMES = ["Angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]


_progress = None


@pytest.fixture(autouse=True)
def _progress_line(request):
    """``tool`` says which command a long test is in on pytest's terminal, past output capturing."""
    global _progress
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")

    def say(text: str) -> None:
        with capman.global_and_fixture_disabled():
            reporter.write(text, flush=True)

    _progress = say if reporter is not None and capman is not None and request.config.get_verbosity() >= 0 else None
    yield
    _progress = None


def tool(cmd: list[str], **_subprocess_options) -> subprocess.CompletedProcess:
    """``python -m TOOL ARGS...`` run in this process by TOOL's main(argv), with its exit status and output.

    An exception escaping main() fails the test with its traceback, which is what a subprocess test catches
    as "Traceback" on stderr.
    """
    assert cmd[:2] == [sys.executable, "-m"], cmd
    module, args = cmd[2], [str(a) for a in cmd[3:]]
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    if _progress is not None:  # the line starts now and ends when the command does: a long one shows as running
        shown = " ".join(Path(a).name if "/" in a else a for a in args[:8])
        _progress(f"\n    {module} {shown} … ")
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if _progress is not None:
        _progress(f"exit {rc or 0}, {time.monotonic() - t0:.1f} s")
    return subprocess.CompletedProcess(cmd, int(rc or 0), out.getvalue(), err.getvalue())


def synth_faces(n_per_class: int, seed: int = 0):
    """Class-dependent synthetic 48x48 images (a learnable signal: a bar whose angle depends on the class)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(len(FER_LABELS)):
        for _ in range(n_per_class):
            img = (rng.random((48, 48)) * 60 + 60).astype(np.uint8)
            ang = c * np.pi / len(FER_LABELS)
            p1 = (int(24 - 18 * np.cos(ang)), int(24 - 18 * np.sin(ang)))
            p2 = (int(24 + 18 * np.cos(ang)), int(24 + 18 * np.sin(ang)))
            cv2.line(img, p1, p2, 250, 5)
            xs.append(img)
            ys.append(c)
    return np.stack(xs), np.array(ys)


def write_folder(root: Path, n_per_class: int, seed: int = 0, names=FOLDER_NAMES):
    x, y = synth_faces(n_per_class, seed)
    for i, (img, c) in enumerate(zip(x, y)):
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"img_{i}.png"), img)
    return x, y


@pytest.fixture
def folder_dataset(tmp_path):
    """A dataset a test may change."""
    write_folder(tmp_path / "ds" / "train", 24, 0)
    write_folder(tmp_path / "ds" / "test", 6, 1)
    return tmp_path / "ds"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The same dataset, shared read-only by the tests that train on it."""
    root = tmp_path_factory.mktemp("shared") / "ds"
    write_folder(root / "train", 24, 0)
    write_folder(root / "test", 6, 1)
    return root


@pytest.fixture(scope="module")
def quick_run(dataset, tmp_path_factory):
    """One `training.train --quick` run (2 epochs of the tiny net), shared: the chain, the second cycle and the
    distillation tests all start from such a run, and training it once saves two runs."""
    from types import SimpleNamespace

    out = tmp_path_factory.mktemp("quick") / "run"
    cmd = [sys.executable, "-m", "training.train", "--data", str(dataset), "--out", str(out), "--quick",
           "--cache-dir", str(out.parent / "cache")]
    return SimpleNamespace(dir=out, cmd=cmd, result=tool(cmd))


def test_canonical_label_is_tolerant():
    assert canonical_label("Disgusted") == "disgust"
    assert canonical_label("fearful") == "fear"
    assert canonical_label("surprised") == "surprise"
    assert canonical_label("3_happy") == "happy"
    assert canonical_label("anger") == "angry"
    assert canonical_label("cats") is None


def test_folder_loader_and_cache(folder_dataset, tmp_path):
    splits = load_dataset(folder_dataset, cache_dir=tmp_path / "cache")
    assert splits["train"].x.shape == (24 * 7, 48, 48)
    assert splits["val"].counts() == {lab: 6 for lab in FER_LABELS}
    assert list((tmp_path / "cache").glob("*.npz")), "decoded arrays are cached"
    again = load_dataset(folder_dataset, cache_dir=tmp_path / "cache")
    assert np.array_equal(again["train"].x, splits["train"].x) and np.array_equal(again["train"].y, splits["train"].y)


def test_folder_errors_name_the_problem(folder_dataset):
    train = folder_dataset / "train"
    bad = train / "happy" / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        load_folder_split(train)
    s = load_folder_split(train, skip_bad=True)
    assert s.skipped == 1 and len(s.y) == 24 * 7
    bad.unlink()
    cv2.imwrite(str(train / "sad" / "big.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match="big.png.*64x64"):
        load_folder_split(train)
    (train / "sad" / "big.png").unlink()
    for f in (train / "fearful").iterdir():
        f.unlink()
    (train / "fearful").rmdir()
    with pytest.raises(DataError, match="missing class folder.*fear"):
        load_folder_split(train)


def test_csv_loader_and_bad_rows(tmp_path):
    x, y = synth_faces(3)
    lines = ["emotion,pixels,Usage"]
    for i, (img, c) in enumerate(zip(x, y)):
        usage = ["Training", "PublicTest", "PrivateTest"][i % 3]
        lines.append(f"{c},{' '.join(map(str, img.ravel()))},{usage}")
    good = tmp_path / "fer2013.csv"
    good.write_text("\n".join(lines) + "\n")
    splits = load_csv(good)
    assert sum(len(s.y) for s in splits.values()) == len(y)
    assert set(splits) == {"train", "val", "test"}
    assert np.array_equal(splits["train"].x[0], x[0])
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines[:3] + ["4,1 2 3,Training"] + lines[3:]) + "\n")
    with pytest.raises(DataError, match="row 4: 3 pixels"):
        load_csv(bad)
    assert load_csv(bad, skip_bad=True)["train"].skipped == 1
    bad.write_text("emotion,pixels,Usage\n9," + " ".join(["0"] * 2304) + ",Training\n")
    with pytest.raises(DataError, match="row 2: emotion 9 out of range"):
        load_csv(bad)


def test_train_cli_reports_data_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "training.train", "--data", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "run"), "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "data error" in r.stderr and "Traceback" not in r.stderr


def test_train_qat_int8_chain_loads_in_edge(dataset, quick_run, tmp_path):
    """train --quick -> resume is a no-op -> QAT + PTQ int8 export -> edge classifier agrees with float."""
    folder_dataset, run, cmd, r = dataset, quick_run.dir, quick_run.cmd, quick_run.result
    assert r.returncode == 0, r.stderr[-2000:]
    assert "epoch 2:" in r.stdout and (run / "best.h5").exists()
    r2 = tool(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "resumed from" in r2.stdout and "nothing to do" in r2.stdout

    bundle = tmp_path / "bundle" / "fer_emotion"
    r = tool([sys.executable, "-m", "quantization.qat", "--float", str(run / "best.h5"), "--data",
                        str(folder_dataset), "--out", str(tmp_path / "quant"), "--bundle", str(bundle), "--epochs", "1",
                        "--batch", "32", "--rep-samples", "40", "--cache-dir", str(tmp_path / "cache"),
                        "--train-run", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "quant" / "quant_report.json").read_text())
    assert {"float_accuracy", "ptq", "qat", "calibration"} <= set(report)

    from edge.classify import load_classifier
    from training.evaluate import predict_split
    from training.tfenv import keras

    man = json.loads(bundle.with_suffix(".json").read_text())
    assert man["labels"] == FER_LABELS and man["input"]["size"] == 48
    assert man["training"]["epochs_run"] == 2 and man["training"]["best_epoch"] in (1, 2)
    # the name follows the trained architecture; the command reproduces the run's non-default options
    assert man["name"] == "fer-emotion-tiny"
    cmd_words = man["training"]["command"].split()
    assert cmd_words[:3] == ["python", "-m", "training.train"] and "--quick" in cmd_words
    assert cmd_words[cmd_words.index("--arch") + 1] == "tiny" and cmd_words[cmd_words.index("--out") + 1] == str(run)
    assert 0 <= man["metrics"]["int8_flip_average_accuracy"] <= 1
    assert man["quantization"]["input"]["dtype"] == "int8" and man["quantization"]["output"]["dtype"] == "int8"
    clf = load_classifier(bundle.with_suffix(".tflite"))
    assert clf.sha256 == man["sha256"] and clf.input_dtype == np.int8

    # temperature scaling fitted on validation NLL, folded into the model, recorded with before/after ECE
    cal = man["calibration"]
    assert cal["method"] == "temperature" and 0.05 <= cal["temperature"] <= 20
    assert cal["float_after"]["nll"] <= cal["float_before"]["nll"] + 1e-4
    assert 0 <= man["metrics"]["int8_ece"] <= 1 and "calibration" in report["ptq"]

    # int8 (PTQ, the same weights as float with T folded in) agrees with the float model within a stated tolerance
    ptq = load_classifier(tmp_path / "quant" / "ptq.tflite")
    x, _ = synth_faces(4, seed=5)
    fmodel = keras.models.load_model(run / "best.h5", compile=False)
    from training.calibrate import softmax
    pf = softmax(np.log(fmodel.predict(x[..., None].astype(np.float32) / 255.0, verbose=0)) / cal["temperature"])
    pq = predict_split(ptq, x)
    assert np.abs(pf - pq).max() < 0.08, "int8 probabilities within 0.08 of float"
    # decisions agree wherever the float top-2 margin is above the int8 output's resolution (1/256); a 2-epoch
    # model can be near-uniform, and the fitted temperature then rightly flattens it further
    top2 = np.sort(pf, 1)[:, -2:]
    resolvable = top2[:, 1] - top2[:, 0] > 2 / 256
    agree = pf.argmax(1) == pq.argmax(1)
    assert agree[resolvable].sum() >= 0.9 * resolvable.sum()
    probs = clf.predict(np.stack([x[0], x[1], x[2]]))
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)

    # the report: metrics through the edge classifier, PNGs, curves over two cycles
    rep = tmp_path / "report"
    r = tool([sys.executable, "-m", "training.evaluate", "--model", str(bundle.with_suffix(".tflite")),
                        "--data", str(folder_dataset), "--cache-dir", str(tmp_path / "cache"), "--report", str(rep),
                        "--float-model", str(run / "best.h5"), "--history", str(run / "history.csv"),
                        str(run / "history.csv")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((rep / "metrics.json").read_text())
    assert set(m["per_class"]) == set(FER_LABELS) and 0 <= m["accuracy"] <= 1 and "flip_average_accuracy" in m
    assert np.array(m["confusion"]).sum() == m["n"]
    assert {"ece", "nll", "mean_confidence"} <= set(m["calibration"])
    assert sum(r["n"] for r in m["reliability"]) == m["n"]
    for name in ("confusion.png", "curves.png", "reliability.png", "misclassified.jpg", "gradcam.jpg"):
        img = cv2.imread(str(rep / name))
        assert img is not None and img.shape[0] > 50 and img.std() > 5, name


def test_fold_temperature_rescales_the_softmax_and_bad_values_exit_2(tmp_path):
    from training.calibrate import fold_temperature, head_logits, softmax
    from training.models import build
    from training.tfenv import keras

    keras.utils.set_random_seed(0)
    model = build("tiny")
    x = np.random.default_rng(0).random((8, 48, 48, 1)).astype(np.float32)
    z = head_logits(model, x)
    assert np.allclose(softmax(z), model.predict(x, verbose=0), atol=1e-5)
    fold_temperature(model, 0.5)
    assert np.allclose(softmax(z / 0.5), model.predict(x, verbose=0), atol=1e-5)
    r = tool([sys.executable, "-m", "quantization.qat", "--float", "x.h5", "--data", str(tmp_path),
                        "--out", str(tmp_path / "q"), "--temperature", "-1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "--temperature" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")  # .h5 is what training.train writes
def test_report_survives_a_model_that_gets_a_class_never_or_everything_right(tmp_path):
    """A weak model (one class for every face, or never right) or a perfect one still gets every report image."""
    from types import SimpleNamespace

    from training.evaluate import metrics
    from training.models import build
    from training.report import write_report

    x, y = synth_faces(3, seed=2)
    split = SimpleNamespace(x=x, y=y)
    model = build("tiny")
    model.save(tmp_path / "f.h5")
    cases = (("constant", np.tile(np.eye(7)[3] * 0.5 + 0.5 / 7, (len(y), 1))), ("never right", np.eye(7)[(y + 1) % 7]),
             ("perfect", np.eye(7)[y]))
    for name, probs in cases:
        out = tmp_path / name
        write_report(out, split, probs, metrics(y, probs.argmax(1), FER_LABELS), float_model=str(tmp_path / "f.h5"))
        for f in ("confusion.png", "reliability.png", "misclassified.jpg", "gradcam.jpg"):
            assert cv2.imread(str(out / f)) is not None, (name, f)


def test_training_tools_report_user_errors_without_a_traceback(dataset, tmp_path):
    """A missing model, a split the dataset lacks, an empty folder, an unknown architecture: one line, exit 2."""
    folder_dataset = dataset
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_model.h5").write_bytes(b"not hdf5")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    cases = [
        (["training.evaluate", "--model", str(tmp_path / "nope.tflite"), "--data", str(folder_dataset), *cache],
         "nope.tflite"),
        (["training.evaluate", "--data", str(folder_dataset), "--split", "test", *cache], "--split test"),
        (["training.evaluate", "--data", str(folder_dataset), "--float-model", str(tmp_path / "gone.h5"), *cache],
         "--float-model"),
        (["quantization.qat", "--float", str(tmp_path / "not_a_model.h5"), "--data", str(folder_dataset), "--out",
          str(tmp_path / "q"), *cache], "--float"),
        (["training.framing", "--data", str(tmp_path / "empty")], "no .jpg faces"),
        (["training.archbench", "--arch", "vgg-xl"], "invalid choice"),
    ]
    for args, words in cases:
        r = tool([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and words in r.stderr, (args, r.returncode, r.stderr[-1500:])
        assert "Traceback" not in r.stderr, args


def test_second_cycle_init_ema_and_resume(dataset, quick_run, tmp_path):
    """--init starts from a previous best.h5; --ema saves averaged weights and resumes with its state."""
    from training.tfenv import keras

    cache = ["--cache-dir", str(tmp_path / "cache")]
    first = quick_run.dir
    base = [sys.executable, "-m", "training.train", "--data", str(dataset), "--quick", *cache]
    assert quick_run.result.returncode == 0, quick_run.result.stderr[-2000:]
    second = tmp_path / "b"
    cmd = [*base, "--out", str(second), "--init", str(first / "best.h5"), "--ema", "0.5"]
    r = tool(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "initialised from" in r.stdout and "epoch 2:" in r.stdout
    a = keras.models.load_model(first / "best.h5", compile=False)
    b = keras.models.load_model(second / "best.h5", compile=False)
    # the second cycle continued from the first one's weights: closer to them than a fresh init is
    fresh = keras.models.clone_model(a)
    dist = lambda m: sum(float(np.abs(x - y).sum()) for x, y in zip(m.get_weights(), a.get_weights()))  # noqa: E731
    assert 0 < dist(b) < dist(fresh)
    # one more epoch resumes from the checkpoint, EMA shadow included
    r = tool([*cmd, "--epochs", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "epoch 3:" in r.stdout
    assert "initialised from" not in r.stdout
    # a bad --init names the file and exits 2 without a traceback
    r = tool([*base, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "missing.h5")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "missing.h5" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_bf16_training_saves_a_float32_model_that_resumes(dataset, tmp_path):
    """--bf16 computes in bfloat16 but best.h5 is plain float32 (what QAT and evaluation load) and resumes."""
    folder_dataset = dataset
    from training import models
    from training.tfenv import keras
    from training.train import save_float32
    from training.tfenv import tf

    run = tmp_path / "bf"
    cmd = [sys.executable, "-m", "training.train", "--data", str(folder_dataset), "--quick", "--bf16", "--ema", "0.5",
           "--out", str(run), "--cache-dir", str(tmp_path / "cache")]
    r = tool(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "epoch 2:" in r.stdout, r.stderr[-2000:]
    m = keras.models.load_model(run / "best.h5", compile=False)
    assert {layer.dtype for layer in m.layers if layer.weights} == {"float32"}
    assert all(w.dtype == np.float32 for w in m.get_weights())
    r = tool([*cmd, "--epochs", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stdout and "epoch 3:" in r.stdout, r.stderr[-2000:]

    # the float32 file holds the mixed-precision model's weights: same predictions up to bfloat16 rounding
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = models.build("vgg-s")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.layers[1].compute_dtype == "bfloat16" and mixed.output.dtype == tf.float32
    twin = models.build("vgg-s")
    save_float32(mixed, twin, tmp_path / "f32.h5")
    loaded = keras.models.load_model(tmp_path / "f32.h5", compile=False)
    x = synth_faces(3, 2)[0][..., None].astype(np.float32) / 255.0
    p_mixed, p_loaded = mixed.predict(x, verbose=0), loaded.predict(x, verbose=0)
    fresh = models.build("vgg-s").predict(x, verbose=0)
    assert np.abs(p_mixed - p_loaded).max() < 0.03
    assert np.abs(fresh - p_loaded).max() > 0.03  # a fresh initialisation would not pass the check above

    # archbench --train-step times the same step in both precisions and leaves the policy at float32
    r = tool([sys.executable, "-m", "training.archbench", "--train-step", "--arch", "tiny"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line.split() for line in r.stdout.splitlines() if line.startswith("tiny"))
    assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")
    assert keras.mixed_precision.global_policy().name == "float32"
    # --float32: each architecture also as a float32 model (rows ARCH/f32), timed beside its int8 conversion
    r = tool([sys.executable, "-m", "training.archbench", "--arch", "tiny", "--float32", "--iters", "5"], cwd=ROOT,
             capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.startswith("tiny")}
    assert set(rows) == {"tiny", "tiny/f32"} and rows["tiny"][1] == rows["tiny/f32"][1]  # same parameters
    assert float(rows["tiny/f32"][2]) > float(rows["tiny"][2])  # float32 weights take about 4x the bytes


def test_blurred_training_copy_is_refused(tmp_path):
    """A blurred mirror of the training faces (as circulates for FER-2013) stops training with a clear error."""
    from training.data import check_sharpness, load_dataset

    ds = tmp_path / "ds"
    x, _ = write_folder(ds / "train", 24, 0)
    write_folder(ds / "test", 6, 1)
    assert check_sharpness(load_dataset(ds, cache_dir=None))  # the faithful copy passes
    for f in (ds / "train").rglob("*.png"):
        cv2.imwrite(str(f), cv2.GaussianBlur(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (5, 5), 0))
    with pytest.raises(DataError, match="blurrier"):
        check_sharpness(load_dataset(ds, cache_dir=None))
    r = tool([sys.executable, "-m", "training.train", "--data", str(ds), "--out", str(tmp_path / "run"),
                        "--quick", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "blurrier" in r.stderr and "--allow-blurry" in r.stderr
    assert "Traceback" not in r.stderr


def test_mixup_mixes_images_labels_and_weights_consistently():
    from training.tfenv import tf
    from training.train import mixup

    tf.random.set_seed(0)
    rng = np.random.default_rng(0)
    y_int = np.arange(16) % 7
    x = tf.constant(rng.random((16, 48, 48, 1), dtype=np.float32))
    y = tf.one_hot(y_int, 7)
    w = tf.constant(rng.random(16, dtype=np.float32) + 0.5)
    xm, ym, wm = (t.numpy() for t in mixup(x, y, w, 0.4))
    assert np.allclose(ym.sum(1), 1, atol=1e-6)
    own = ym[np.arange(16), y_int]
    assert (own >= 0.5 - 1e-6).all(), "each sample keeps the larger share of its own label"
    assert (ym.max(1) < 1 - 1e-3).sum() >= 8, "most labels are actually mixed"
    # the image is the same convex combination as the label: x_mixed = lam*x + (1-lam)*x_partner
    lam = own
    x_np = x.numpy()
    for i in range(16):
        if lam[i] > 1 - 1e-6:
            continue
        partner = (xm[i] - lam[i] * x_np[i]) / (1 - lam[i])
        assert min(np.abs(partner - x_np[j]).max() for j in range(16)) < 1e-3
    assert wm.min() >= w.numpy().min() - 1e-6 and wm.max() <= w.numpy().max() + 1e-6


def test_distillation_from_teachers(dataset, quick_run, tmp_path):
    """--distill trains towards the teachers' tempered, flip-averaged predictions; a bad teacher exits 2."""
    from training.data import load_dataset
    from training.tfenv import keras
    from training.train import load_teachers, make_datasets, online_teacher, teacher_targets

    folder_dataset = dataset
    cache = ["--cache-dir", str(tmp_path / "cache")]
    base = [sys.executable, "-m", "training.train", "--data", str(folder_dataset), "--quick", *cache]
    teacher = quick_run.dir
    assert quick_run.result.returncode == 0, quick_run.result.stderr[-2000:]
    splits = load_dataset(folder_dataset, cache_dir=None)
    x = splits["train"].x
    model = keras.models.load_model(teacher / "best.h5", compile=False)
    p = model.predict(x[..., None] / 255.0, verbose=0)
    pf = model.predict(x[:, :, ::-1, None] / 255.0, verbose=0)
    q1 = teacher_targets([teacher / "best.h5"], x, temperature=1.0)
    expect = np.sqrt(p * pf)  # geometric mean over the two views
    expect /= expect.sum(1, keepdims=True)
    assert np.allclose(q1, expect, atol=1e-4)
    q3 = teacher_targets([teacher / "best.h5"], x, temperature=3.0)
    assert np.allclose(q3.sum(1), 1, atol=1e-5)
    assert (q3.max(1) <= q1.max(1) + 1e-6).all() and (q3.max(1) < q1.max(1) - 1e-4).any()  # softer
    assert (q3.argmax(1) == q1.argmax(1)).all()
    # the training targets blend one-hot labels and teacher targets by --distill-weight
    w = np.ones(7, np.float32)
    ds, _ = make_datasets(splits, 8, w, 0, aug=False, soft=q3, soft_weight=0.25)
    xb, yb, _ = next(iter(ds))
    xb, yb = xb.numpy(), yb.numpy()
    idx = [int(np.argmin(np.abs(x / 255.0 - img[..., 0]).reshape(len(x), -1).sum(1))) for img in xb]
    onehot = np.eye(7)[splits["train"].y[idx]]
    assert np.allclose(yb, 0.75 * onehot + 0.25 * q3[idx], atol=1e-5)
    # consistent teaching: the teacher predicts the augmented (and mixed-up) batch the student is trained on
    teachers = load_teachers([teacher / "best.h5"], x.shape[1:3])
    online = online_teacher(teachers, temperature=2.0)
    ds, _ = make_datasets(splits, 16, w, 0, aug=True, mixup_alpha=0.4, soft_weight=0.3, teacher=online)
    xb, yb, _ = next(iter(ds))
    seen = online(xb).numpy()
    label_part = (yb.numpy() - 0.3 * seen) / 0.7  # what is left must be the (mixed) labels: sums to 1, >= 0
    assert np.allclose(label_part.sum(1), 1, atol=1e-4) and label_part.min() > -1e-4
    assert np.abs(seen - online(xb[:, :, ::-1]).numpy()).max() > 1e-4  # views differ: targets follow the view
    tz = np.log(np.clip(model.predict(xb.numpy(), verbose=0), 1e-7, 1)) / 2.0
    assert np.allclose(seen, np.exp(tz) / np.exp(tz).sum(1, keepdims=True), atol=1e-4)
    fast = online_teacher(teachers, temperature=2.0, bf16=True)  # a known architecture runs in bfloat16
    assert np.abs(fast(xb).numpy() - seen).max() < 0.03
    r = tool([*base, "--out", str(tmp_path / "sc"), "--distill", str(teacher / "best.h5"),
                        "--distill-mode", "consistent"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "consistent" in r.stdout and "epoch 2:" in r.stdout, r.stderr[-2000:]
    # the CLI run records its teachers and trains
    r = tool([*base, "--out", str(tmp_path / "s"), "--distill", str(teacher / "best.h5")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "distilling from 1 teacher" in r.stdout and "epoch 2:" in r.stdout
    assert json.loads((tmp_path / "s" / "run.json").read_text())["distill"] == [str(teacher / "best.h5")]
    # training.ensemble reports the flip-averaged accuracy of each subset of teachers on the validation split
    r = tool([sys.executable, "-m", "training.ensemble", "--data", str(folder_dataset), *cache,
                        str(teacher / "best.h5"), str(tmp_path / "s" / "best.h5")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[2].endswith(f"{teacher / 'best.h5'} + {tmp_path / 's' / 'best.h5'}")
    val = splits["val"]
    qv = teacher_targets([teacher / "best.h5"], val.x, temperature=1.0)
    assert lines[0] == f"{(qv.argmax(1) == val.y).mean():.4f}  {teacher / 'best.h5'}"
    r = tool([sys.executable, "-m", "training.ensemble", "--data", str(folder_dataset), *cache,
                        str(tmp_path / "nope.h5")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "nope.h5" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    for bad, msg in ((["--distill", str(tmp_path / "nope.h5")], "nope.h5"),
                     (["--distill", str(teacher / "best.h5"), "--distill-weight", "1.5"], "--distill-weight")):
        r = tool([*base, "--out", str(tmp_path / "bad"), *bad], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_released_bundle_teaches_and_bad_bundles_exit_2(dataset, tmp_path):
    """A shipped .tflite bundle is a teacher (its folded calibration undone); mismatched bundles are refused."""
    folder_dataset = dataset
    from edge.classify import DEFAULT_MODEL, load_classifier
    from training.train import bundle_teacher, teacher_targets

    x = load_dataset(folder_dataset, cache_dir=None)["train"].x
    clf = load_classifier(DEFAULT_MODEL)
    t = float((clf.manifest.get("calibration") or {}).get("temperature") or 1.0)

    def expected(p):
        p = np.clip(p.astype(np.float64), 1e-7, 1) ** t
        return p / p.sum(1, keepdims=True)

    p, pf = expected(clf.predict(x)), expected(clf.predict(x[:, :, ::-1]))
    q1 = teacher_targets([DEFAULT_MODEL], x, temperature=1.0)
    want = np.sqrt(p * pf)
    assert np.allclose(q1, want / want.sum(1, keepdims=True), atol=1e-4)
    # an uncalibrated copy of the same network gives its raw outputs: no temperature to undo
    plain = tmp_path / "plain" / "m.tflite"
    plain.parent.mkdir()
    plain.write_bytes(DEFAULT_MODEL.read_bytes())
    man = dict(clf.manifest)
    man.pop("calibration", None)
    (plain.parent / "m.json").write_text(json.dumps(man))
    assert np.allclose(bundle_teacher(plain, (48, 48))(x), clf.predict(x), atol=1e-6)
    if t != 1.0:  # the shipped bundle is calibrated: as a teacher it is measurably rescaled
        assert np.abs(bundle_teacher(DEFAULT_MODEL, (48, 48))(x) - clf.predict(x)).max() > 1e-3
    # a bundle with other labels cannot teach FER-2013; consistent teaching needs Keras teachers
    swapped = tmp_path / "swapped" / "m.tflite"
    swapped.parent.mkdir()
    swapped.write_bytes(DEFAULT_MODEL.read_bytes())
    man["labels"] = [*man["labels"][1:], man["labels"][0]]
    (swapped.parent / "m.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="m.tflite"):
        teacher_targets([swapped], x)
    base = [sys.executable, "-m", "training.train", "--data", str(folder_dataset), "--quick",
            "--cache-dir", str(tmp_path / "cache")]
    for extra, msg in (([str(swapped)], "predicts"), ([str(tmp_path / "gone.tflite")], "gone.tflite"),
                       ([str(DEFAULT_MODEL), "--distill-mode", "consistent"], "consistent")):
        r = tool([*base, "--out", str(tmp_path / "bad"), "--distill", *extra], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    # the CLI trains a student of the released bundle
    r = tool([*base, "--out", str(tmp_path / "s"), "--distill", str(DEFAULT_MODEL)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "distilling from 1 teacher" in r.stdout and "epoch 2:" in r.stdout, r.stderr[-2000:]
