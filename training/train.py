"""Train a float emotion CNN on FER-2013 with checkpoints that resume.

    python -m training.train --data ../shared/data/fer2013 --out runs/vgg-s --arch vgg-s --epochs 60
    python -m training.train --data DIR --out runs/q --quick        # minutes-long smoke run (tests)
    python -m training.train --data DIR --out runs/b --init runs/a/best.h5 --lr 1e-3 --ema 0.999  # second cycle
    python -m training.train --data DIR --out runs/c --arch vgg-l --distill runs/a/best.h5 runs/b/best.h5  # student

A killed run continues from its last epoch when started again with the same --out.
Outputs in --out: best.h5 (best validation accuracy), ckpt/ (resume state), history.csv, run.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .data import FER_LABELS, DataError, check_sharpness, load_dataset
from .tfenv import keras, tf
from . import augment, models

log = logging.getLogger("training")


def class_weights(y: np.ndarray, n: int, power: float) -> np.ndarray:
    """Inverse-frequency class weights raised to ``power`` (0 = none, 0.5 = sqrt), mean 1 over samples."""
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = (counts.sum() / np.maximum(counts, 1)) ** power
    return (w / (w[y].mean())).astype(np.float32)


def mixup(x, y, w, alpha: float):
    """Mix each sample with a random partner of the batch: x, one-hot y and weight by lambda ~ Beta(a, a)."""
    b = tf.shape(x)[0]
    g1 = tf.random.gamma([b], alpha)
    g2 = tf.random.gamma([b], alpha)
    lam = g1 / (g1 + g2)
    lam = tf.maximum(lam, 1.0 - lam)  # the sample keeps the larger share, so its own label dominates
    idx = tf.random.shuffle(tf.range(b))
    lx = tf.reshape(lam, [-1, 1, 1, 1])
    ly = tf.reshape(lam, [-1, 1])
    x = lx * x + (1.0 - lx) * tf.gather(x, idx)
    y = ly * y + (1.0 - ly) * tf.gather(y, idx)
    w = lam * w + (1.0 - lam) * tf.gather(w, idx)
    return x, y, w


def load_teachers(paths, size: tuple[int, int]) -> list:
    """Load the --distill models, checking each takes ``size`` faces and predicts the FER-2013 classes."""
    teachers = []
    for path in paths:
        try:
            teacher = keras.models.load_model(path, compile=False)
        except (OSError, ValueError) as e:
            raise DataError(f"--distill {path}: cannot load teacher model: {e}") from e
        if teacher.output_shape[-1] != len(FER_LABELS) or tuple(teacher.input_shape[1:3]) != tuple(size):
            raise DataError(f"--distill {path}: expects {teacher.input_shape[1:3]} faces and has "
                            f"{teacher.output_shape[-1]} outputs; needs {tuple(size)} and {len(FER_LABELS)}")
        teachers.append(teacher)
    return teachers


def bundle_teacher(path, size: tuple[int, int]):
    """A model bundle (``.tflite`` + manifest, e.g. a shipped release) as a teacher: uint8 faces -> probabilities.

    Runs through the daemon's own classifier, so any released bundle (``git show`` an old version) can teach
    without its training checkpoint. A calibration temperature folded into the bundle is undone (p ** T,
    renormalised), so its targets have the scale of the network's own logits, like a Keras teacher's.
    """
    from edge.classify import ModelError, load_classifier

    try:
        clf = load_classifier(path)
    except ModelError as e:
        raise DataError(f"--distill {path}: cannot load teacher bundle: {e}") from e
    if clf.labels != list(FER_LABELS) or (clf.input_size, clf.input_size) != tuple(size):
        raise DataError(f"--distill {path}: predicts {clf.labels} on {clf.input_size}px faces; needs "
                        f"{list(FER_LABELS)} on {tuple(size)} faces")
    t = float((clf.manifest.get("calibration") or {}).get("temperature") or 1.0)

    def predict(x: np.ndarray) -> np.ndarray:
        p = np.concatenate([clf.predict(x[i : i + 1024]) for i in range(0, len(x), 1024)]).astype(np.float64)
        if t != 1.0:
            p = np.clip(p, 1e-7, 1.0) ** t
            p /= p.sum(1, keepdims=True)
        return p

    return predict


def teacher_targets(paths, x: np.ndarray, temperature: float = 2.0, batch: int = 512) -> np.ndarray:
    """Soft targets for distillation: teacher probabilities averaged over models and mirror images, tempered.

    ``x`` holds uint8 faces (N, H, W); a teacher is a Keras model (``best.h5``) or a model bundle
    (``.tflite``, see ``bundle_teacher``). Tempering p**(1/T), renormalised, equals softmax(logits / T): it
    spreads the teacher's "dark knowledge" (which wrong classes look alike) over the runner-up classes.
    Computed once on the un-augmented faces, so distillation costs no time per epoch.
    """
    keras_paths = [p for p in paths if not str(p).endswith(".tflite")]
    run = [bundle_teacher(p, x.shape[1:3]) for p in paths if str(p).endswith(".tflite")]
    for teacher in load_teachers(keras_paths, x.shape[1:3]):
        run.append(lambda v, t=teacher: t.predict(v[..., None].astype(np.float32) / 255.0, batch_size=batch,
                                                  verbose=0))
    logp = np.zeros((len(x), len(FER_LABELS)), np.float64)
    for predict in run:
        for view in (x, np.ascontiguousarray(x[:, :, ::-1])):
            logp += np.log(np.clip(predict(view), 1e-7, 1.0))
    logp /= 2 * len(run)
    z = logp / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def cached_teacher_targets(out: Path, paths, x: np.ndarray, temperature: float) -> np.ndarray:
    """``teacher_targets``, kept in the run folder so that a resumed run does not recompute them (minutes of
    teacher inference for bundles); reused only for the same teachers (path, size, mtime), temperature and faces."""
    if not all(Path(p).is_file() for p in paths):  # teacher_targets names the missing one (DataError: exit 2)
        return teacher_targets(paths, x, temperature)
    key = {"teachers": [[str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths],
           "temperature": temperature, "faces": int(len(x)), "checksum": int(x[:, ::7, ::7].sum(dtype=np.int64))}
    cache = out / "teacher_targets.npz"
    if cache.exists():
        try:
            z = np.load(cache, allow_pickle=False)
            if json.loads(str(z["key"])) == key:
                print(f"teacher targets reused from {cache}", flush=True)
                return z["soft"]
        except (OSError, ValueError, KeyError):
            pass
    soft = teacher_targets(paths, x, temperature)
    np.savez(cache, soft=soft, key=json.dumps(key))
    return soft


def online_teacher(teachers, temperature: float = 2.0, bf16: bool = False):
    """A function from an augmented batch to its distillation targets ("consistent" teaching).

    The teachers see exactly the view the student is trained on (crop, rotation, erasing, mixup), so the
    student matches their function on every view instead of memorising one target per face, which is
    what makes fixed targets overfit on long schedules (Beyer et al. 2022, "Knowledge distillation: a good
    teacher is patient and consistent"). Costs one teacher forward pass per step; with ``bf16`` the
    teachers whose architecture is known run in bfloat16 as well.
    """
    run = []
    for t in teachers:
        arch = t.name.replace("_", "-")
        if bf16 and arch in models.ARCHS:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            try:
                fast = models.build(arch, size=t.input_shape[1], n_classes=t.output_shape[-1])
            finally:
                keras.mixed_precision.set_global_policy("float32")
            fast.set_weights(t.get_weights())
            t = fast
        run.append(t)

    def targets(x):
        logp = tf.add_n([tf.math.log(tf.clip_by_value(tf.cast(t(x, training=False), tf.float32), 1e-7, 1.0))
                         for t in run]) / len(run)
        return tf.nn.softmax(logp / temperature)

    return targets


def make_datasets(splits, batch, weights, seed, aug=True, mixup_alpha: float = 0.0, soft=None,
                  soft_weight: float = 0.0, teacher=None):
    """tf.data pipelines: shuffled, augmented, class-weighted training set and a plain validation set.

    ``soft`` (N, classes) are distillation targets blended into the one-hot labels with ``soft_weight``;
    ``teacher`` (from `online_teacher`) instead computes them on each augmented batch.
    """
    n = len(FER_LABELS)
    tr, va = splits["train"], splits["val"]
    xtr = tr.x[..., None]
    ytr = tr.y
    sw = weights[ytr]
    online = teacher is not None and soft_weight > 0
    if soft is None:
        soft = np.zeros((len(ytr), n), np.float32)
        if not online:
            soft_weight = 0.0
    ds = tf.data.Dataset.from_tensor_slices((xtr, ytr, sw, soft))
    ds = ds.shuffle(len(ytr), seed=seed, reshuffle_each_iteration=True).batch(batch, drop_remainder=True)

    def prep(x, y, w, q):
        x = tf.cast(x, tf.float32) / 255.0
        if aug:
            x = augment.augment_batch(x)
        y = tf.one_hot(y, n) if online else (1.0 - soft_weight) * tf.one_hot(y, n) + soft_weight * q
        if mixup_alpha > 0:
            x, y, w = mixup(x, y, w, mixup_alpha)
        if online:
            y = (1.0 - soft_weight) * y + soft_weight * teacher(x)
        return x, y, w

    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    vds = tf.data.Dataset.from_tensor_slices((va.x[..., None], va.y)).batch(256)
    vds = vds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, tf.one_hot(y, n))).prefetch(2)
    return ds, vds


class WeightEMA:
    """Exponential moving average of all model weights (BatchNorm statistics included).

    Evaluating and saving the averaged weights smooths out the last steps' noise, which is worth a few
    tenths of a point on FER-2013 at no inference cost. The shadow variables live in the resume checkpoint.
    """

    def __init__(self, model, momentum: float):
        self.model, self.m = model, momentum
        self.shadow = [tf.Variable(w, trainable=False) for w in model.weights]

    def update(self):
        for s, w in zip(self.shadow, self.model.weights):
            s.assign(self.m * s + (1.0 - self.m) * w)

    def swap(self):
        """Exchange model weights and shadow weights (call twice to undo)."""
        for s, w in zip(self.shadow, self.model.weights):
            tmp = tf.identity(w)
            w.assign(s)
            s.assign(tmp)


def save_float32(model, twin, path: Path) -> None:
    """Save ``model`` as a float32 Keras file; a mixed-precision model goes through its float32 ``twin``.

    Everything downstream (QAT, PTQ, evaluation, teachers) then loads a plain float32 model, whatever
    precision it was trained in.
    """
    if twin is not None:
        twin.set_weights(model.get_weights())
        model = twin
    model.save(path, include_optimizer=False)


class EpochLog(keras.callbacks.Callback):
    """One plain log line per epoch, history.csv, checkpoint for resume and best model."""

    def __init__(self, out: Path, ckpt: tf.train.CheckpointManager, epoch_var, patience: int,
                 ema: WeightEMA | None = None, val=None, twin=None):
        super().__init__()
        self.out, self.ckpt, self.epoch_var, self.patience = out, ckpt, epoch_var, patience
        self.ema, self.val, self.twin = ema, val, twin
        self.t0 = time.time()
        hist = out / "history.csv"
        self.best, self.best_epoch = -1.0, 0
        if hist.exists():
            rows = list(csv.DictReader(open(hist)))
            for r in rows:
                if float(r["val_accuracy"]) > self.best:
                    self.best, self.best_epoch = float(r["val_accuracy"]), int(r["epoch"])

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()

    def on_train_batch_end(self, batch, logs=None):
        if self.ema is not None:
            self.ema.update()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if self.ema is not None:
            # validation and best.h5 use the averaged weights; training continues from the raw ones
            self.ema.swap()
            r = self.model.evaluate(self.val, verbose=0, return_dict=True)
            logs["val_loss"], logs["val_accuracy"] = r["loss"], r["accuracy"]
        lr = self.model.optimizer.learning_rate
        lr = float(lr(self.model.optimizer.iterations)) if callable(lr) else float(lr)
        row = {"epoch": epoch + 1, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
               "val_loss": logs.get("val_loss"), "val_accuracy": logs.get("val_accuracy"), "lr": lr,
               "seconds": round(time.time() - self.t0, 1)}
        hist = self.out / "history.csv"
        new = not hist.exists()
        with open(hist, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if row["val_accuracy"] > self.best:
            self.best, self.best_epoch = row["val_accuracy"], epoch + 1
            save_float32(self.model, self.twin, self.out / "best.h5")
        if self.ema is not None:
            self.ema.swap()
        self.epoch_var.assign(epoch + 1)
        self.ckpt.save(checkpoint_number=epoch + 1)
        print(f"epoch {epoch + 1}: loss {row['loss']:.4f} acc {row['accuracy']:.4f} val_loss {row['val_loss']:.4f} "
              f"val_acc {row['val_accuracy']:.4f} (best {self.best:.4f} @ {self.best_epoch}) lr {lr:.2e} "
              f"{row['seconds']:.0f}s", flush=True)
        if self.patience and epoch + 1 - self.best_epoch >= self.patience:
            print(f"early stop: no val_acc gain for {self.patience} epochs", flush=True)
            self.model.stop_training = True


def train(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    splits = load_dataset(args.data, cache_dir=args.cache_dir, seed=args.seed, skip_bad=args.skip_bad)
    if args.limit:
        rng = np.random.default_rng(args.seed)
        for k in ("train", "val"):
            s = splits[k]
            idx = rng.permutation(len(s.y))[: args.limit]
            s.x, s.y = s.x[idx], s.y[idx]
    tr = splits["train"]
    print(f"train {len(tr.y)} faces {tr.counts()}, val {len(splits['val'].y)} faces", flush=True)
    sharp = {} if args.allow_blurry else check_sharpness({k: splits[k] for k in ("train", "val")})
    if sharp:
        print(f"sharpness (median Laplacian variance): train {sharp['train']:.0f}, val {sharp['val']:.0f}", flush=True)
    weights = class_weights(tr.y, len(FER_LABELS), args.class_weight_power)
    soft = teacher = None
    if args.distill and args.distill_mode == "consistent":
        if any(str(p).endswith(".tflite") for p in args.distill):
            raise DataError("--distill-mode consistent needs Keras teachers (best.h5); a .tflite bundle teaches "
                            "only with fixed targets")
        teacher = online_teacher(load_teachers(args.distill, tr.x.shape[1:3]), args.distill_temperature,
                                 bf16=args.bf16)
        print(f"distilling from {len(args.distill)} teacher(s), weight {args.distill_weight}, "
              f"T {args.distill_temperature}, consistent: the teachers see every augmented batch", flush=True)
    elif args.distill:
        soft = cached_teacher_targets(out, args.distill, tr.x, args.distill_temperature)
        agree = float((soft.argmax(1) == tr.y).mean())
        print(f"distilling from {len(args.distill)} teacher(s), weight {args.distill_weight}, "
              f"T {args.distill_temperature}: teacher agrees with {agree:.1%} of training labels", flush=True)
    ds, vds = make_datasets(splits, args.batch, weights, args.seed, aug=not args.no_aug, mixup_alpha=args.mixup,
                            soft=soft, soft_weight=args.distill_weight, teacher=teacher)
    steps = len(tr.y) // args.batch
    total = max(1, steps * args.epochs)
    warm = min(steps * args.warmup_epochs, total // 4)
    sched = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.lr / 10 if warm else args.lr, decay_steps=total - warm, alpha=0.01,
        warmup_target=args.lr if warm else None, warmup_steps=warm)
    opt = keras.optimizers.AdamW(learning_rate=sched, weight_decay=args.weight_decay)
    twin = None
    if args.bf16:
        # bfloat16 compute with float32 weights: 1.6-1.8x faster per step on CPUs with AVX512-BF16 or AMX
        # (python -m training.archbench --train-step); no loss scaling needed, unlike float16
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build(args.arch, size=tr.x.shape[1], n_classes=len(FER_LABELS))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    if args.bf16:
        twin = models.build(args.arch, size=tr.x.shape[1], n_classes=len(FER_LABELS))
    model.compile(optimizer=opt, loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing),
                  metrics=["accuracy"])
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    ema = WeightEMA(model, args.ema) if args.ema else None
    extra = {"ema": ema.shadow} if ema else {}
    ck = tf.train.Checkpoint(model=model, optimizer=opt, epoch=epoch_var, **extra)
    mgr = tf.train.CheckpointManager(ck, out / "ckpt", max_to_keep=2)
    if mgr.latest_checkpoint:
        ck.restore(mgr.latest_checkpoint)
        print(f"resumed from {mgr.latest_checkpoint} at epoch {int(epoch_var.numpy())}", flush=True)
    else:
        if (out / "history.csv").exists():
            (out / "history.csv").unlink()
        print(f"{args.arch}: {model.count_params():,} parameters", flush=True)
        if args.init:
            try:
                model.load_weights(args.init)
            except (OSError, ValueError) as e:
                raise DataError(f"--init {args.init}: cannot load weights into {args.arch}: {e}") from e
            if ema:
                for s, w in zip(ema.shadow, model.weights):
                    s.assign(w)
            print(f"initialised from {args.init}", flush=True)
    run = vars(args) | {"labels": FER_LABELS, "params": model.count_params(),
                        "train_counts": tr.counts(), "val_counts": splits["val"].counts(), "sharpness": sharp}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    start = int(epoch_var.numpy())
    if start >= args.epochs:
        print("already trained to --epochs; nothing to do", flush=True)
        return 0
    model.fit(ds, validation_data=None if ema else vds, epochs=args.epochs, initial_epoch=start, verbose=0,
              callbacks=[EpochLog(out, mgr, epoch_var, args.patience, ema=ema, val=vds, twin=twin)])
    print(f"done: best val_acc in {out / 'history.csv'}; model {out / 'best.h5'}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train/ and test/ (Kaggle layout) or fer2013.csv")
    p.add_argument("--out", required=True, help="run folder (resumes if it holds a checkpoint)")
    p.add_argument("--arch", default="vgg-s", choices=list(models.ARCHS))
    p.add_argument("--epochs", type=int, help="default 60 (2 with --quick)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--class-weight-power", type=float, default=0.5, help="0 = no balancing, 0.5 = sqrt inverse freq")
    p.add_argument("--patience", type=int, default=15, help="early stopping patience in epochs (0 = off)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--init", help="start from these weights (a best.h5 of the same --arch): a second training cycle")
    p.add_argument("--ema", type=float, default=0.0,
                   help="weight moving-average momentum, e.g. 0.999 (0 = off); validation and best.h5 use it")
    p.add_argument("--cache-dir", default=".cache/fer-data")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) corrupt images/rows instead of failing")
    p.add_argument("--no-aug", action="store_true")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="mixup with lambda ~ Beta(ALPHA, ALPHA), e.g. 0.2 (0 = off): regularises larger nets")
    p.add_argument("--distill", nargs="+", metavar="MODEL",
                   help="teacher model(s): best.h5 of earlier runs or released .tflite bundles (with their .json "
                        "manifest); train towards their averaged soft predictions")
    p.add_argument("--distill-weight", type=float, default=0.5, help="share of the teacher in the target (0-1)")
    p.add_argument("--distill-temperature", type=float, default=2.0, help="softens the teacher's probabilities")
    p.add_argument("--distill-mode", choices=("fixed", "consistent"), default="fixed",
                   help="fixed: targets computed once on each face and its mirror (no cost per epoch); "
                        "consistent: the teachers predict every augmented batch the student sees (one teacher "
                        "forward pass per step; resists overfitting on long schedules)")
    p.add_argument("--allow-blurry", action="store_true",
                   help="train even if the training faces are much blurrier than the validation faces")
    p.add_argument("--bf16", action="store_true",
                   help="mixed bfloat16 compute, float32 weights: ~1.7x faster on CPUs with AVX512-BF16/AMX "
                        "(slower on others); best.h5 is saved float32")
    p.add_argument("--limit", type=int, default=0, help="use at most N faces per split (debugging)")
    p.add_argument("--quick", action="store_true", help="tiny net, 2 epochs unless --epochs: a smoke test in seconds")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.warmup_epochs, args.patience = "tiny", 32, 0, 0
    args.epochs = args.epochs or (2 if args.quick else 60)
    if not 0.0 <= args.distill_weight <= 1.0 or args.distill_temperature <= 0:
        print("--distill-weight must lie in [0, 1] and --distill-temperature be > 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return train(args)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
