"""Float model -> PTQ baseline and QAT int8 models -> the shipped model bundle.

    TF_USE_LEGACY_KERAS=1 python -m quantization.qat --float runs/vgg-s/best.h5 \
        --data ../shared/data/fer2013 --out runs/vgg-s/quant --bundle edge/models/fer_emotion

1. Evaluate the float Keras model on the validation split (PublicTest).
2. PTQ baseline: full-integer conversion (int8 input and output) with representative training faces.
3. QAT: ``tfmot.quantization.keras.quantize_model``, a short fine-tune with the training augmentation,
   then the same full-integer conversion. ``--qat-targets distill`` fine-tunes towards the distilled run's own
   soft targets (labels blended with its teachers') with a cosine decay, instead of the hard labels.
   Before both, temperature scaling (``training.calibrate``): T fitted on the validation split's NLL is
   folded into the ``probs`` layer, so scores are calibrated; decisions (argmax) do not change.
4. Both int8 models are evaluated through the daemon's code (``training.evaluate``); the bundle
   (``.tflite`` + JSON manifest) is written from the QAT model, or from whichever int8 model scores
   higher with ``--ship best``. ``quant_report.json`` records float vs PTQ vs QAT.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from training.tfenv import keras, tf  # sets TF_USE_LEGACY_KERAS before TF loads

from training.calibrate import (calibration_metrics, crossfit_ece, fit_temperature, fold_temperature, head_logits,
                                softmax)
from training.data import FER_LABELS, DataError, load_dataset
from training.evaluate import evaluate_bundle
from training.train import class_weights, make_datasets

MARGIN = 0.0  # python -m training.framing: Haar's box is 47/48 of a FER face, YuNet's 49/48


def representative(x: np.ndarray, n: int, seed: int):
    idx = np.random.default_rng(seed).permutation(len(x))[:n]

    def gen():
        for i in idx:
            yield [x[i][None, ..., None].astype(np.float32) / 255.0]
    return gen


def to_int8(model, rep) -> bytes:
    """Full-integer conversion: int8 weights, activations, input and output."""
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return conv.convert()


def tensor_quant(tfl: bytes) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=tfl)
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    q = lambda d: {"dtype": str(np.dtype(d["dtype"])), "scale": float(d["quantization"][0]),  # noqa: E731
                   "zero_point": int(d["quantization"][1])}
    return {"input": q(i), "output": q(o)}


def history_summary(history_csv: Path) -> dict:
    """Epochs actually run (a run may be stopped early) and the best one, from a run's history.csv."""
    if not history_csv.exists():
        return {}
    rows = list(csv.DictReader(open(history_csv)))
    if not rows:
        return {}
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    return {"epochs_run": len(rows), "best_epoch": int(best["epoch"]),
            "best_val_accuracy": round(float(best["val_accuracy"]), 4)}


def write_bundle(tfl: bytes, stem: Path, *, name: str, version: str, extra: dict) -> Path:
    """Write ``stem.tflite`` and its manifest ``stem.json`` atomically (tmp + rename)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(tfl).hexdigest()
    man = {
        "format": "fer-edge-model/1",
        "name": name,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "file": stem.with_suffix(".tflite").name,
        "sha256": sha,
        "size_bytes": len(tfl),
        "labels": list(FER_LABELS),
        "input": {"size": 48, "channels": 1, "color": "gray", "scale": 1.0 / 255.0, "offset": 0.0, "margin": MARGIN,
                  "note": "x = pixel * scale + offset on the gray face cropped by edge.preprocess.crop_face"},
        "output": {"activation": "softmax"},
        "quantization": tensor_quant(tfl),
    } | extra
    for suffix, data in ((".tflite", tfl), (".json", json.dumps(man, indent=2).encode())):
        dst = stem.with_suffix(suffix)
        tmp = dst.with_suffix(suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(dst)
    return stem.with_suffix(".tflite")


def distill_targets(train_run: Path, n: int) -> tuple[np.ndarray, float]:
    """The soft targets and teacher weight a distilled training run used (its teacher_targets.npz, run.json)."""
    cache, run_json = train_run / "teacher_targets.npz", train_run / "run.json"
    if not cache.is_file() or not run_json.is_file():
        raise DataError(f"{train_run}: needs the distilled run's teacher_targets.npz and run.json (--train-run)")
    soft = np.load(cache, allow_pickle=False)["soft"]
    if soft.shape != (n, len(FER_LABELS)):
        raise DataError(f"{cache}: {soft.shape[0]} targets for {n} training faces (another dataset?)")
    return soft, float(json.loads(run_json.read_text()).get("distill_weight", 0.5))


def train_command(run: dict) -> str:
    """The training command a run.json records: every option that differs from training.train's default."""
    from training.train import parser

    if isinstance(run.get("command"), str):  # a run written by another tool (training.lowrank --tune-epochs)
        return run["command"]
    words = ["python -m training.train"]
    for act in parser()._actions:
        if not act.option_strings or act.dest not in run or act.dest == "help":
            continue
        v = run[act.dest]
        if act.dest not in ("data", "out", "arch") and v == act.default:
            continue
        flag = act.option_strings[-1]
        if isinstance(v, bool):
            words += [flag] if v else []
        elif isinstance(v, list):
            words += [flag, *map(str, v)]
        elif v is not None:
            words += [flag, str(v)]
    return " ".join(words)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantization.qat", description=__doc__.splitlines()[0])
    p.add_argument("--float", dest="float_model", required=True, help="trained float Keras model (.h5)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="folder for ptq/qat models and quant_report.json")
    p.add_argument("--bundle", default="", help="write the shipped bundle to this stem (e.g. edge/models/fer_emotion)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--name", help="model name in the manifest (default fer-emotion-<arch of --train-run>)")
    p.add_argument("--epochs", type=int, default=3, help="QAT fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rep-samples", type=int, default=500)
    p.add_argument("--ship", choices=["qat", "best"], default="qat")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--temperature", default="auto",
                   help="softmax temperature folded into the model: auto (fit on validation NLL), none, or a number")
    p.add_argument("--cache-dir", default=".cache/fer-data")
    p.add_argument("--limit", type=int, default=0, help="use at most N faces per split (tests)")
    p.add_argument("--train-run", default="", help="training run folder, for run.json/history in the manifest")
    p.add_argument("--qat-targets", choices=["labels", "distill"], default="labels",
                   help="what QAT fine-tunes towards: the labels, or (distill) the same blend of labels and "
                        "teacher soft targets the float model was trained on (--train-run's teacher_targets.npz "
                        "and --distill-weight), so QAT does not undo the distillation")
    p.add_argument("--peer", default="",
                   help="a reference bundle (the `fer` package's model): its PublicTest accuracy goes into the "
                        "manifest as metrics.peer_accuracy")
    a = p.parse_args(argv)
    if a.temperature not in ("auto", "none"):
        try:
            t = float(a.temperature)
            assert t > 0 and np.isfinite(t)
        except (ValueError, AssertionError):
            print(f"--temperature: expected auto, none or a positive number, got {a.temperature!r}", file=sys.stderr)
            return 2
    if not a.name:
        run_json = Path(a.train_run) / "run.json" if a.train_run else None
        arch = json.loads(run_json.read_text()).get("arch") if run_json and run_json.exists() else None
        a.name = f"fer-emotion-{arch}" if arch else "fer-emotion"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(a.seed)
    try:
        splits = load_dataset(a.data, cache_dir=a.cache_dir, seed=a.seed)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    if a.limit:
        rng = np.random.default_rng(a.seed)
        for s in splits.values():
            idx = rng.permutation(len(s.y))[: a.limit]
            s.x, s.y = s.x[idx], s.y[idx]
    tr, va = splits["train"], splits["val"]
    try:
        fmodel = keras.models.load_model(a.float_model, compile=False)
        fmodel.get_layer("probs")
    except (OSError, ValueError) as e:
        print(f"--float {a.float_model}: cannot load a trained model with a 'probs' output layer "
              f"(give the best.h5 of a training.train run): {e}", file=sys.stderr)
        return 2
    xv = va.x[..., None].astype(np.float32) / 255.0
    fprobs = fmodel.predict(xv, batch_size=256, verbose=0)
    facc = float((fprobs.argmax(1) == va.y).mean())
    print(f"float: val acc {facc:.4f}", flush=True)
    calib = {"method": "none", "temperature": 1.0}
    if a.temperature != "none":
        z = head_logits(fmodel, xv)
        t = fit_temperature(z, va.y) if a.temperature == "auto" else float(a.temperature)
        split = "PublicTest" if len(va.y) == 3589 else "validation"
        calib = {"method": "temperature", "temperature": round(t, 4),
                 "fitted_on": f"{split} ({len(va.y)} faces), NLL" if a.temperature == "auto" else "given",
                 "float_before": calibration_metrics(softmax(z), va.y),
                 "float_after": calibration_metrics(softmax(z / t), va.y),
                 "float_after_ece_crossfit": crossfit_ece(z, va.y, a.seed)}
        fold_temperature(fmodel, t)
        print(f"temperature {t:.3f}: float ECE {calib['float_before']['ece']:.4f} -> "
              f"{calib['float_after']['ece']:.4f} (cross-fitted {calib['float_after_ece_crossfit']:.4f})", flush=True)
    rep = representative(tr.x, a.rep_samples, a.seed)

    ptq = to_int8(fmodel, rep)
    (out / "ptq.tflite").write_bytes(ptq)
    ptq_path = write_bundle(ptq, out / "ptq", name=a.name + "-ptq", version=a.version, extra={})
    ptq_m, _ = evaluate_bundle(ptq_path, va.x, va.y)
    print(f"ptq:   val acc {ptq_m['accuracy']:.4f} ({len(ptq) / 1e3:.0f} KB)", flush=True)

    import tensorflow_model_optimization as tfmot

    qmodel = tfmot.quantization.keras.quantize_model(fmodel)
    soft, soft_weight = None, 0.0
    if a.qat_targets == "distill":
        try:
            soft, soft_weight = distill_targets(Path(a.train_run), len(tr.y))
        except DataError as e:
            print(f"--qat-targets distill: {e}", file=sys.stderr)
            return 2
        print(f"qat: fine-tuning towards {soft_weight:.0%} teacher soft targets", flush=True)
    ds, vds = make_datasets(splits, a.batch, class_weights(tr.y, len(FER_LABELS), 0.5), a.seed, soft=soft,
                            soft_weight=soft_weight)
    lr = a.lr
    if a.qat_targets == "distill":
        # cosine decay to zero over the fine-tune: the last steps settle the quantizer ranges instead of
        # walking away from the distilled (and weight-averaged) optimum
        lr = keras.optimizers.schedules.CosineDecay(a.lr, max(1, (len(tr.y) // a.batch) * a.epochs))
    qmodel.compile(optimizer=keras.optimizers.Adam(lr),
                   loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])
    hist = qmodel.fit(ds, validation_data=vds, epochs=a.epochs, verbose=2)
    qat = to_int8(qmodel, rep)
    qat_path = write_bundle(qat, out / "qat", name=a.name, version=a.version, extra={})
    qat_m, _ = evaluate_bundle(qat_path, va.x, va.y)
    print(f"qat:   val acc {qat_m['accuracy']:.4f} ({len(qat) / 1e3:.0f} KB)", flush=True)

    report = {"float_accuracy": round(facc, 4), "ptq": ptq_m, "qat": qat_m,
              "calibration": calib,
              "qat_history": {k: [float(v) for v in vs] for k, vs in hist.history.items()},
              "val_split": "PublicTest" if len(va.y) == 3589 else "validation", "val_n": int(len(va.y))}
    (out / "quant_report.json").write_text(json.dumps(report, indent=2))
    if a.bundle:
        use_qat = a.ship == "qat" or qat_m["accuracy"] >= ptq_m["accuracy"]
        tfl, m = (qat, qat_m) if use_qat else (ptq, ptq_m)
        run, ran = {}, {}
        if a.train_run and (Path(a.train_run) / "run.json").exists():
            run = json.loads((Path(a.train_run) / "run.json").read_text())
            ran = history_summary(Path(a.train_run) / "history.csv")
        peer = {}
        if a.peer:
            pm, _ = evaluate_bundle(a.peer, va.x, va.y)
            peer = {"peer_accuracy": pm["accuracy"], "peer": json.loads(Path(a.peer).with_suffix(".json").read_text())
                    .get("name", Path(a.peer).stem)}
        extra = {
            "quantization_method": "qat" if use_qat else "ptq",
            "calibration": calib,
            "metrics": {"val_split": report["val_split"], "val_n": report["val_n"],
                        "int8_accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                        "float_accuracy": report["float_accuracy"], "ptq_accuracy": ptq_m["accuracy"],
                        "int8_ece": m["calibration"]["ece"], "int8_nll": m["calibration"]["nll"],
                        "qat_accuracy": qat_m["accuracy"], "qat_targets": a.qat_targets,
                        **peer,
                        "int8_flip_average_accuracy": evaluate_bundle(
                            qat_path if use_qat else ptq_path, va.x, va.y,
                            flip_average=True)[0]["accuracy"],
                        "per_class_recall": {k: v["recall"] for k, v in m["per_class"].items()}},
            "training": {"data": "FER-2013 train (27,935 faces, near-duplicates of test removed)",
                         "arch": run.get("arch"), "params": run.get("params"), "epochs": run.get("epochs"), **ran,
                         "command": train_command(run),
                         "qat_epochs": a.epochs},
        }
        path = write_bundle(tfl, Path(a.bundle), name=a.name, version=a.version, extra=extra)
        # the default bundle's report keeps its name; another bundle's (fer_emotion_small) sits beside it
        stem = Path(a.bundle).name
        report_name = "quant_report.json" if stem == "fer_emotion" else f"{stem}.quant_report.json"
        shutil.copy(out / "quant_report.json", Path(a.bundle).parent / report_name)
        print(f"bundle: {path} ({extra['quantization_method']}, val acc {m['accuracy']:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
