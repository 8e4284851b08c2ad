"""Start a slimmer network from a shipped int8 bundle: the bundle's channels, the least useful ones left out.

    python -m training.prune --bundle edge/models/fer_emotion.tflite --arch vgg-l75 --data ../shared/data/fer2013 \
        --out runs/vgg-l75-init.h5

The bundle is the only copy of a released model's weights that is kept (runs are not committed), so its int8
convolutions are read back into a float Keras model of the manifest's ``training.arch`` (BatchNorm is folded into
them; the calibration temperature folded into ``probs`` is taken out again). Each convolution of the target
``--arch`` (same depth, narrower) keeps the output channels that matter most: mean ReLU activation on training
faces times the L1 norm of the weights that read the channel in the next layer (the ``probs`` kernel for the last
convolution). BatchNorm is set from the kept channels' statistics on those faces, so the slim network starts as
the wide one minus the dropped channels, in training and inference mode alike. The output is a ``--init`` for
``training.train`` (distillation then recovers what the dropped channels carried; model card).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from training import models
from training.data import DataError, load_dataset
from training.tfenv import keras

# PTQ and QAT exports name the same tensors differently (QAT: a quant_ prefix, fake-quant suffixes)
CONV = re.compile(r"^[^/]+/(?:quant_)?(s\d+_\d+)_conv/Conv2D(?:;|$)")
BIAS = re.compile(r"^[^/]+/(?:quant_)?(s\d+_\d+)_relu/Relu;")
LOWRANK = re.compile(r"^[^/]+/(?:quant_)?s\d+_\d+_lr/")  # the 3x3 half of a training.lowrank conv
HEAD = re.compile(r"^[^/]+/(?:quant_)?probs/(MatMul|BiasAdd)\d*(?:;|$)")


def bundle_weights(path: Path) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Float weights of an int8 bundle: {conv name: (kernel HWIO, folded bias)} and the ``probs`` (kernel, bias)
    with the calibration temperature taken out."""
    from edge.classify import _interpreter_class, read_manifest

    it = _interpreter_class()[0](model_path=str(path))
    it.allocate_tensors()
    kernels, biases, head_k, head_b = {}, {}, None, None
    for d in it.get_tensor_details():
        q = d["quantization_parameters"]
        if not len(q["scales"]) or len(d["shape"]) not in (1, 2, 4) or d["shape"][0] == 1:
            continue  # activations (batch 1) and float constants
        name = d["name"]
        if LOWRANK.match(name):
            raise DataError(f"{path}: a factored network (training.lowrank); prune or factor the plain VGG it "
                            f"came from instead")
        try:
            raw = it.get_tensor(d["index"])
        except ValueError:
            continue
        per_axis = [-1] + [1] * (raw.ndim - 1)  # per-channel quantization is along axis 0 here (LiteRT's)
        scale = q["scales"].reshape(per_axis if len(q["scales"]) > 1 else [1] * raw.ndim)
        zero = q["zero_points"].reshape(per_axis if len(q["zero_points"]) > 1 else [1] * raw.ndim)
        w = (raw.astype(np.float64) - zero) * scale
        if (m := CONV.match(name)) and raw.ndim == 4:
            kernels[m.group(1)] = w.transpose(1, 2, 3, 0).astype(np.float32)  # OHWI -> HWIO
        elif (m := BIAS.match(name)) and raw.ndim == 1:
            biases[m.group(1)] = w.astype(np.float32)
        elif (m := HEAD.match(name)) and m.group(1) == "MatMul" and raw.ndim == 2:
            head_k = w.T.astype(np.float32)
        elif m and m.group(1) == "BiasAdd" and raw.ndim == 1:
            head_b = w.astype(np.float32)
    if head_k is not None and head_b is None:
        head_b = np.zeros(head_k.shape[1], np.float32)  # the converter drops an all-zero bias
    if not kernels or set(kernels) != set(biases) or head_k is None:
        raise DataError(f"{path}: not a VGG bundle of training.models (convs {sorted(kernels)}, "
                        f"biases {sorted(biases)})")
    t = float(read_manifest(path).get("calibration", {}).get("temperature", 1.0))
    return {k: (kernels[k], biases[k]) for k in kernels}, (head_k * t, head_b * t)


def conv_names(model) -> list[str]:
    return [l.name[: -len("_conv")] for l in model.layers if l.name.endswith("_conv")]


def set_folded(model, convs: dict, head) -> None:
    """Load folded conv weights: BN becomes the identity plus the folded bias (in inference mode)."""
    for n in conv_names(model):
        k, b = convs[n]
        model.get_layer(f"{n}_conv").set_weights([k])
        bn = model.get_layer(f"{n}_bn")
        ones = np.ones_like(b)
        bn.set_weights([ones, b, np.zeros_like(b), ones - bn.epsilon])
    model.get_layer("probs").set_weights(list(head))


def conv_outputs(model, x: np.ndarray) -> dict[str, np.ndarray]:
    names = conv_names(model)
    probe = keras.Model(model.input, [model.get_layer(f"{n}_conv").output for n in names])
    outs = probe.predict(x, batch_size=256, verbose=0)
    return dict(zip(names, outs))


def importance(convs: dict, head, acts: dict, order: list[str]) -> dict[str, np.ndarray]:
    """Per output channel of each conv: mean ReLU activation x L1 norm of the next layer's weights on it."""
    out = {}
    for i, n in enumerate(order):
        a = np.maximum(acts[n] + convs[n][1], 0).mean(axis=(0, 1, 2))
        nxt = np.abs(convs[order[i + 1]][0]).sum(axis=(0, 1, 3)) if i + 1 < len(order) else np.abs(head[0]).sum(1)
        out[n] = a * nxt
    return out


def slim(convs: dict, head, keep: dict[str, np.ndarray], order: list[str]):
    """The kept channels' kernels: outputs by ``keep``, inputs by the previous conv's ``keep``."""
    res, prev = {}, None
    for n in order:
        k, b = convs[n]
        if prev is not None:
            k = k[:, :, prev, :]
        res[n] = (k[..., keep[n]], b[keep[n]])
        prev = keep[n]
    return res, (head[0][prev], head[1])


def set_bn_stats(model, convs: dict, x: np.ndarray) -> None:
    """BN from the data: moving stats are the conv outputs' mean/variance, gamma/beta undo them, so batch
    statistics in training reproduce the folded network instead of rescaling it."""
    acts = conv_outputs(model, x)
    for n, (_, b) in convs.items():
        mu = acts[n].mean(axis=(0, 1, 2))
        var = acts[n].var(axis=(0, 1, 2))
        bn = model.get_layer(f"{n}_bn")
        bn.set_weights([np.sqrt(var + bn.epsilon), mu + b, mu, var])


def sample_faces(splits, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random training faces (for statistics) and the validation faces with their labels, as model inputs."""
    tr, va = splits["train"], splits["val"]
    pick = np.random.default_rng(0).permutation(len(tr.y))[:n]
    return (tr.x[pick][..., None].astype(np.float32) / 255.0, va.x[..., None].astype(np.float32) / 255.0, va.y)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x, batch_size=512, verbose=0).argmax(1) == y).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="int8 .tflite with its manifest (a VGG of training.models)")
    p.add_argument("--arch", required=True, choices=list(models.ARCHS), help="target: same depth, fewer channels")
    p.add_argument("--data", required=True, help="dataset folder (training faces rank the channels)")
    p.add_argument("--out", required=True, help=".h5 weights for training.train --init")
    p.add_argument("--faces", type=int, default=4000, help="training faces used for ranking and BN statistics")
    p.add_argument("--cache-dir", default=".cache/fer-data")
    a = p.parse_args(argv)
    from edge.classify import ModelError, read_manifest

    try:
        bundle = Path(a.bundle)
        src_arch = read_manifest(bundle).get("training", {}).get("arch")
        if src_arch not in models.ARCHS:
            raise DataError(f"{bundle}: manifest training.arch {src_arch!r} is not in training.models")
        convs, head = bundle_weights(bundle)
        splits = load_dataset(a.data, cache_dir=a.cache_dir)
    except (DataError, ModelError, OSError, ValueError) as e:
        print(f"prune: {e}", file=sys.stderr)
        return 2
    xs, xv, yv = sample_faces(splits, a.faces)
    size = xs.shape[1]
    wide = models.build(src_arch, size=size, n_classes=len(head[1]))
    order = conv_names(wide)
    set_folded(wide, convs, head)
    wide_acc = accuracy(wide, xv, yv)
    print(f"{bundle.name} as float {src_arch}: {wide_acc:.2%} on {len(yv)} validation faces", flush=True)

    target = models.build(a.arch, size=size, n_classes=len(head[1]))
    if conv_names(target) != order:
        print(f"prune: {a.arch} has convs {conv_names(target)}, {src_arch} has {order}: same depth needed",
              file=sys.stderr)
        return 2
    score = importance(convs, head, conv_outputs(wide, xs), order)
    keep = {}
    for n in order:
        k = target.get_layer(f"{n}_conv").filters
        if k > len(score[n]):
            print(f"prune: {a.arch} {n} has {k} channels, more than {src_arch}'s {len(score[n])}", file=sys.stderr)
            return 2
        keep[n] = np.sort(np.argsort(-score[n])[:k])
    sconvs, shead = slim(convs, head, keep, order)
    set_folded(target, sconvs, shead)
    set_bn_stats(target, sconvs, xs)
    slim_acc = accuracy(target, xv, yv)
    print(f"{a.arch} from it, before training: {slim_acc:.2%}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target.save_weights(out) if str(out).endswith(".weights.h5") else target.save(out)
    out.with_suffix(".json").write_text(json.dumps({
        "bundle": str(bundle), "source_arch": src_arch, "arch": a.arch, "faces": a.faces,
        "source_accuracy": round(wide_acc, 4), "accuracy_before_training": round(slim_acc, 4),
        "kept": {n: [int(i) for i in keep[n]] for n in order}}, indent=1))
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
