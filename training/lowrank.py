"""Start a cheaper network from a shipped int8 bundle: its 3x3 convolutions factored at low rank.

    python -m training.lowrank --bundle edge/models/fer_emotion.tflite --arch vgg-l-lr --data ../shared/data/fer2013 \
        --out runs/lowrank/vgg-l-lr-init.h5

Why not fewer channels (``training.prune``): a VGG's conv responses are highly correlated, so most of a layer's
output lies in a few directions (on 1.3.1, 32 of the last layer's 256 directions keep 99.2% of its response
variance, ``--spectrum``). Factoring a 3x3 conv Cin -> C into a 3x3 conv Cin -> r and a 1x1 conv r -> C keeps every
output channel and costs 9*Cin*r + r*C multiply-adds a pixel instead of 9*Cin*C. Started this way, without
training, the factored network keeps most of the accuracy that dropping channels loses (model card, Latency).

For each factored layer, in order (data-driven channel decomposition, as in Zhang et al., "Accelerating Very Deep
Convolutional Networks for Classification and Detection", 2015):

* the 1x1 conv is the top ``r`` principal directions M of the original layer's responses on training faces;
* the 3x3 part is fitted by least squares from the inputs the *factored* network feeds that layer (earlier layers
  already approximated) to the original responses projected on M, so errors do not pile up layer after layer;
* the response mean the projection leaves out goes into the bias.

Layers the target ``--arch`` does not factor keep the bundle's kernels. BatchNorm is then set from the data, as
``training.prune`` does, so batch statistics in training reproduce the network. The output is a ``--init`` for
``training.train`` (distillation from the source network then recovers the rest).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training import models
from training.data import DataError, load_dataset
from training.prune import accuracy, bundle_weights, conv_names, sample_faces, set_bn_stats, set_folded
from training.tfenv import keras, tf

MAX_SAMPLES = 300_000  # response vectors per layer for the statistics (pixels of --faces faces, subsampled)
RIDGE = 1e-3  # keeps the least-squares fit defined when an input channel is always zero (a dead ReLU)


def principal_directions(y: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, top-``r`` principal directions (C x r) of response vectors ``y`` (N x C), and the share of their
    variance those directions keep."""
    mu = y.mean(axis=0)
    w, v = np.linalg.eigh(np.cov(y - mu, rowvar=False))
    w, v = w[::-1], v[:, ::-1]
    return mu, v[:, :r], float(w[:r].sum() / max(w.sum(), 1e-12))


def spectrum(y: np.ndarray, ranks=(8, 16, 32, 48, 64, 96, 128, 192)) -> dict[int, float]:
    """Share of the response variance kept by the top r directions, for each r below the width."""
    w = np.linalg.eigvalsh(np.cov(y - y.mean(axis=0), rowvar=False))[::-1]
    c = np.cumsum(w) / max(w.sum(), 1e-12)
    return {r: round(float(c[r - 1]), 4) for r in ranks if r < len(w)}


def patches3x3(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N*H*W, 9*C) 'same'-padded 3x3 neighbourhoods, in a HWIO kernel's (row, col, channel)
    order."""
    p = tf.image.extract_patches(x, [1, 3, 3, 1], [1, 1, 1, 1], [1, 1, 1, 1], "SAME").numpy()
    return p.reshape(-1, p.shape[-1])


def fit_layer(x_in: np.ndarray, y: np.ndarray, kernel: np.ndarray, bias: np.ndarray, r: int, rng):
    """Factor one layer. ``x_in``: the factored network's inputs to it (N, H, W, Cin); ``y``: the original layer's
    responses to the original inputs (N, H, W, C), bias not added. Returns (3x3 kernel Cin -> r, 1x1 kernel r -> C,
    bias C, variance kept)."""
    c = kernel.shape[-1]
    yv = y.reshape(-1, c).astype(np.float64)
    pick = rng.choice(len(yv), min(len(yv), MAX_SAMPLES), replace=False)
    yv = yv[pick]
    mu, m, kept = principal_directions(yv, r)
    target = (yv - mu) @ m
    p = patches3x3(x_in)[pick].astype(np.float64)
    p = np.column_stack([p, np.ones(len(p))])
    gram = p.T @ p
    gram[np.diag_indices_from(gram)] += RIDGE * len(p)
    sol = np.linalg.solve(gram, p.T @ target)
    k3 = sol[:-1].reshape(3, 3, kernel.shape[2], r)
    new_bias = bias + mu + sol[-1] @ m.T
    return k3.astype(np.float32), m.T[None, None].astype(np.float32), new_bias.astype(np.float32), kept


def factor(convs: dict, head, target, xs: np.ndarray, rng, log=print) -> dict:
    """Load ``target`` (a models.vgg_lowrank) from a plain VGG's folded weights; returns the factored layers'
    {name: (1x1 kernel, bias)} for BatchNorm statistics and the variance each kept."""
    order = conv_names(target)
    wide = _plain_like(target, convs, head)
    originals = keras.Model(wide.input, [wide.get_layer(f"{n}_conv").output for n in order]).predict(
        xs, batch_size=256, verbose=0)
    originals = dict(zip(order, originals))
    folded, report = {}, {}
    ranks = {n: target.get_layer(f"{n}_lr").filters for n in order if _has(target, f"{n}_lr")}
    for n in order:
        k, b = convs[n]
        if n in ranks:
            x_in = keras.Model(target.input, target.get_layer(f"{n}_lr").input).predict(xs, batch_size=256,
                                                                                       verbose=0)
            k3, k1, b, kept = fit_layer(x_in, originals[n], k, b, ranks[n], rng)
            target.get_layer(f"{n}_lr").set_weights([k3])
            target.get_layer(f"{n}_conv").set_weights([k1])
            report[n] = {"rank": ranks[n], "width": int(k.shape[-1]), "variance_kept": round(kept, 4)}
            log(f"  {n}: rank {ranks[n]} of {k.shape[-1]}, {kept:.1%} of the response variance")
        else:
            target.get_layer(f"{n}_conv").set_weights([k])
        bn = target.get_layer(f"{n}_bn")
        ones = np.ones_like(b)
        bn.set_weights([ones, b, np.zeros_like(b), ones - bn.epsilon])
        folded[n] = (None, b)
    target.get_layer("probs").set_weights(list(head))
    return folded, report


def tune(model, target: np.ndarray, x: np.ndarray, xv: np.ndarray, yv: np.ndarray, epochs: int, lr: float,
         batch: int = 128, seed: int = 0, log=print) -> list[dict]:
    """Fit ``model`` to the source's probabilities ``target`` on faces ``x`` then their mirrors
    (``source_predictions``): KL divergence, BatchNorm and dropout in inference mode, no augmentation, Adam with a
    cosine decay to 0; ``model`` ends with the weights of its best epoch on the validation faces. Returns one
    history row an epoch.

    Why not training.train: that objective (augmented views, hard labels mixed in, batch statistics) moved the
    factored vgg-l-lr nowhere in 3 epochs (67.9% -> 67.6%), while this one only has to close the gap the
    factoring left between two networks that already agree on most faces (model card, Latency)."""
    import time

    t0 = time.perf_counter()
    xs = np.concatenate([x, x[:, :, ::-1]])
    steps = max(1, epochs * (len(xs) // batch))
    opt = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps, alpha=0.0))

    @tf.function
    def step(xb, pb):
        with tf.GradientTape() as tape:
            q = model(xb, training=False)
            loss = tf.reduce_mean(tf.reduce_sum(pb * (tf.math.log(pb + 1e-7) - tf.math.log(q + 1e-7)), axis=1))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(seed)
    rows, best = [], (-1.0, None)
    for e in range(epochs):
        order = rng.permutation(len(xs))
        losses = [float(step(xs[b], target[b])) for b in
                  (order[i:i + batch] for i in range(0, len(order) - batch + 1, batch))]
        acc = accuracy(model, xv, yv)
        rows.append({"epoch": e + 1, "loss": round(float(np.mean(losses)), 6), "val_accuracy": round(acc, 4),
                     "seconds": round(time.perf_counter() - t0, 1)})
        t0 = time.perf_counter()
        log(f"tune epoch {e + 1}/{epochs}: KL to the source {rows[-1]['loss']:.5f}, validation {acc:.2%}")
        if acc > best[0]:
            best = (acc, model.get_weights())
    model.set_weights(best[1])  # the best epoch's weights, as training.train's best.h5 (what qat reports)
    return rows


def source_predictions(source, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The source's probabilities on faces ``x`` then on their mirrors (what ``tune`` fits), and per face their
    normalised geometric mean: training.train's fixed distillation targets at temperature 1, which
    quantization.qat --qat-targets distill fine-tunes towards."""
    p = source.predict(np.concatenate([x, x[:, :, ::-1]]), batch_size=512, verbose=0)
    g = np.sqrt(np.clip(p[: len(x)], 1e-7, 1) * np.clip(p[len(x):], 1e-7, 1))
    return p, (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def _has(model, name: str) -> bool:
    try:
        model.get_layer(name)
    except ValueError:
        return False
    return True


def _plain_like(target, convs: dict, head):
    """The source VGG: same stages as ``target``, unfactored, with the bundle's folded weights."""
    order = conv_names(target)
    widths, reps = [], []
    for n in order:
        s = int(n[1:].split("_")[0])
        if s == len(widths):
            widths.append(int(convs[n][0].shape[-1]))
            reps.append(0)
        reps[s] += 1
    wide = models.vgg(tuple(widths), tuple(reps), n_classes=len(head[1]), size=target.input_shape[1])
    set_folded(wide, convs, head)
    return wide


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="int8 .tflite with its manifest (a plain VGG of training.models)")
    p.add_argument("--arch", required=True, choices=list(models.ARCHS),
                   help="target: the bundle's VGG with factored convs (e.g. vgg-l-lr)")
    p.add_argument("--data", required=True, help="dataset folder (training faces give the response statistics)")
    p.add_argument("--out", help=".h5 model for training.train --init (not needed with --spectrum)")
    p.add_argument("--faces", type=int, default=1500, help="training faces used for the statistics")
    p.add_argument("--spectrum", action="store_true",
                   help="print the variance each rank keeps, per layer of the bundle, and stop (to choose ranks)")
    p.add_argument("--tune-epochs", type=int, default=0,
                   help="then fit the factored network to the bundle's predictions on all training faces and their "
                        "mirrors for this many epochs (0 = off); --out's folder gets run.json and history.csv, a "
                        "--train-run for quantization.qat")
    p.add_argument("--tune-lr", type=float, default=1e-4)
    p.add_argument("--cache-dir", default=".cache/fer-data")
    a = p.parse_args(argv)
    from edge.classify import ModelError

    try:
        bundle = Path(a.bundle)
        convs, head = bundle_weights(bundle)
        splits = load_dataset(a.data, cache_dir=a.cache_dir)
        if not a.spectrum and not a.out:
            raise DataError("--out is needed (or --spectrum)")
        if not 1 <= a.faces <= 100_000:
            raise DataError(f"--faces {a.faces}: use 1..100000")
        if not 0 <= a.tune_epochs <= 100 or not 0 < a.tune_lr <= 0.1:
            raise DataError(f"--tune-epochs {a.tune_epochs} / --tune-lr {a.tune_lr}: use 0..100 epochs, lr in (0, 0.1]")
    except (DataError, ModelError, OSError, ValueError) as e:
        print(f"lowrank: {e}", file=sys.stderr)
        return 2
    xs, xv, yv = sample_faces(splits, a.faces)
    size, rng = xs.shape[1], np.random.default_rng(1)
    target = models.build(a.arch, size=size, n_classes=len(head[1]))
    order = conv_names(target)
    if set(order) != set(convs):
        print(f"lowrank: {a.arch} has convs {order}, the bundle has {sorted(convs)}: the same layers are needed",
              file=sys.stderr)
        return 2
    for n in order:
        want = target.get_layer(f"{n}_conv").filters
        if want != convs[n][0].shape[-1]:
            print(f"lowrank: {a.arch} {n} has {want} channels, the bundle {convs[n][0].shape[-1]}: low rank keeps "
                  f"the widths (training.prune narrows them)", file=sys.stderr)
            return 2
    wide = _plain_like(target, convs, head)
    wide_acc = accuracy(wide, xv, yv)
    print(f"{bundle.name} as float VGG: {wide_acc:.2%} on {len(yv)} validation faces", flush=True)
    if a.spectrum:
        outs = keras.Model(wide.input, [wide.get_layer(f"{n}_conv").output for n in order]).predict(
            xs, batch_size=256, verbose=0)
        for n, y in zip(order, outs):
            resp = y.reshape(-1, y.shape[-1]).astype(np.float64)
            resp = resp[rng.choice(len(resp), min(len(resp), MAX_SAMPLES), replace=False)]
            print(f"  {n} ({y.shape[-1]} channels, {y.shape[1]}x{y.shape[2]}): " +
                  " ".join(f"r{r} {v:.1%}" for r, v in spectrum(resp).items()), flush=True)
        return 0
    if not any(_has(target, f"{n}_lr") for n in order):
        print(f"lowrank: {a.arch} factors no layer (use an arch built by models.vgg_lowrank)", file=sys.stderr)
        return 2
    folded, report = factor(convs, head, target, xs, rng, log=lambda m: print(m, flush=True))
    before_bn = accuracy(target, xv, yv)
    set_bn_stats(target, folded, xs)
    acc = accuracy(target, xv, yv)
    print(f"{a.arch} from it, before training: {acc:.2%} ({before_bn:.2%} with identity BatchNorm)", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"bundle": str(bundle), "arch": a.arch, "faces": a.faces, "source_accuracy": round(wide_acc, 4),
            "accuracy_before_training": round(acc, 4), "layers": report}
    if a.tune_epochs:
        xt = splits["train"].x[..., None].astype(np.float32) / 255.0
        probs, soft = source_predictions(wide, xt)
        rows = tune(target, probs, xt, xv, yv, a.tune_epochs, a.tune_lr, log=lambda m: print(m, flush=True))
        info["accuracy_after_tuning"] = max(r["val_accuracy"] for r in rows)
        write_run(out.parent, rows, a, target.count_params(), argv)
        np.savez(out.parent / "teacher_targets.npz", soft=soft)
    target.save(out)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out}", flush=True)
    return 0


def write_run(folder: Path, rows: list[dict], a, params: int, argv) -> None:
    """run.json and history.csv as training.train writes them, so quantization.qat --train-run can read this
    tuning as the model's training (its manifest records the command); teacher_targets.npz beside them holds
    the source's targets for --qat-targets distill."""
    import csv
    import shlex

    words = sys.argv[1:] if argv is None else [str(v) for v in argv]
    (folder / "run.json").write_text(json.dumps({
        "arch": a.arch, "params": params, "epochs": a.tune_epochs, "data": a.data, "bundle": a.bundle,
        "distill_weight": 1.0,  # for quantization.qat --qat-targets distill: the source's targets alone
        "command": "python -m training.lowrank " + " ".join(shlex.quote(w) for w in words)}, indent=1))
    with open(folder / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
