"""Per-face int8 latency of each registered architecture (the latency axis of the model card's comparison).

    python -m training.archbench [--arch vgg-s dsep vgg-m] [--threads 1]

Each architecture is converted untrained to full int8 (latency does not depend on the weights' values)
and timed with LiteRT on batches of 1 and 8 faces after a warm-up.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from training.tfenv import tf
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


def time_model(tfl: bytes, batch: int, threads: int, iters: int = 200) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=tfl, num_threads=threads)
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], [batch, 48, 48, 1])
    it.allocate_tensors()
    x = np.zeros((batch, 48, 48, 1), np.int8)
    for _ in range(20):
        it.set_tensor(d["index"], x)
        it.invoke()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        it.set_tensor(d["index"], x)
        it.invoke()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1000 / batch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["vgg-s", "dsep", "vgg-l", "vgg-m"], choices=models.ARCHS)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    print(f"{'arch':8} {'params':>9} {'int8 KB':>8} {'ms/face b1':>11} {'ms/face b8':>11}")
    for arch in a.arch:
        tfl, n = int8_untrained(arch)
        print(f"{arch:8} {n:>9,} {len(tfl) / 1e3:>8.0f} {time_model(tfl, 1, a.threads):>11.3f} "
              f"{time_model(tfl, 8, a.threads):>11.3f}", flush=True)


if __name__ == "__main__":
    main()
