"""Convert the bundled YuNet ONNX face detector to a LiteRT (.tflite) model the daemon runs through XNNPACK.

Why: LiteRT, already the classifier's runtime, runs the same weights in about half OpenCV DNN's time (6.56 vs
3.81 ms a 320x240 frame on one Zen 2 core, ``--time``; model card, "Detector runtime") and needs no OpenCV >= 4.8,
which 32-bit Pi OS lacks. The graph is small and plain
(Conv, depthwise Conv, ReLU, MaxPool, nearest 2x upsampling, Add, Sigmoid), so it is rebuilt layer by layer in
Keras from the ONNX initializers instead of going through a general ONNX converter, and the input keeps dynamic
height and width: one file serves the coarse frame, the sweep tile and the re-detection window.

The .tflite stops before YuNet's output reshapes: per stride (8, 16, 32) one NHWC map of 16 channels,
[cls, obj, bbox dx dy dw dh, 5 x landmark dx dy], cls and obj already through their sigmoid.
``edge.detect_litert`` decodes it exactly as cv2.FaceDetectorYN does; ``--check`` compares the two on real faces.

    python3 -m quantization.yunet --onnx edge/models/face_detection_yunet_2026may.onnx \
        --out edge/models/face_detection_yunet_2026may.tflite --check ../shared/data/fer2013/test
    python3 -m quantization.yunet --onnx edge/models/face_detection_yunet_2026may.onnx \
        --out edge/models/face_detection_yunet_2026may.tflite --no-convert --time     # both runtimes' times

Converting needs the ``train`` extra (TensorFlow and onnx); ``--no-convert --check/--time`` and the daemon need
neither.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

# Channel order of each stride's output map (edge.detect_litert reads it by these offsets).
HEAD_ORDER = ("cls", "obj", "bbox", "kps")


def _load_onnx(path: Path):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        sys.exit("quantization.yunet needs the onnx package: pip install onnx")
    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        nodes.append((n.op_type, list(n.input), list(n.output), attrs))
    outputs = [o.name for o in model.graph.output]
    return nodes, init, outputs


def build_keras(onnx_path: Path):
    """Keras model equal to YuNet up to its output Transposes; 3 outputs (strides 8, 16, 32), NHWC, 16 channels."""
    from training.tfenv import keras
    L = keras.layers

    nodes, init, outputs = _load_onnx(onnx_path)
    producer = {out: (op, ins, attrs) for op, ins, outs, attrs in nodes for out in outs}
    inp = keras.Input((None, None, 3), batch_size=1, name="image")
    tensors = {"input": inp}
    count = [0]

    def name(prefix):
        count[0] += 1
        return f"{prefix}_{count[0]}"

    def conv(x, ins, attrs):
        w = init[ins[1]]  # (out, in/group, kh, kw)
        b = init[ins[2]] if len(ins) > 2 else np.zeros(w.shape[0], np.float32)
        group, (kh, kw) = attrs.get("group", 1), w.shape[2:]
        stride = attrs.get("strides", [1, 1])[0]
        pad = attrs.get("pads", [0, 0, 0, 0])[0]
        if attrs.get("dilations", [1, 1]) != [1, 1] or len(set(attrs.get("pads", [0]))) > 1:
            raise ValueError(f"unsupported Conv attributes {attrs}")
        # PyTorch pads symmetrically; TF's "same" with stride 2 pads only bottom/right, so pad explicitly.
        if pad and stride > 1:
            x = L.ZeroPadding2D(pad, name=name("pad"))(x)
            padding = "valid"
        else:
            padding = "same" if pad == kh // 2 else "valid"
        cin = x.shape[-1]
        if group == 1:
            layer = L.Conv2D(w.shape[0], (kh, kw), strides=stride, padding=padding, name=name("conv"))
            y = layer(x)
            layer.set_weights([w.transpose(2, 3, 1, 0), b])
        elif group == cin == w.shape[0]:
            layer = L.DepthwiseConv2D((kh, kw), strides=stride, padding=padding, name=name("dw"))
            y = layer(x)
            layer.set_weights([w.transpose(2, 3, 0, 1), b])
        else:
            raise ValueError(f"unsupported grouped Conv: group {group}, {cin} -> {w.shape[0]} channels")
        return y

    def value(t):
        if t in tensors:
            return tensors[t]
        op, ins, attrs = producer[t]
        if op == "Conv":
            y = conv(value(ins[0]), ins, attrs)
        elif op == "Relu":
            y = L.ReLU(name=name("relu"))(value(ins[0]))
        elif op == "Sigmoid":
            y = L.Activation("sigmoid", name=name("sigmoid"))(value(ins[0]))
        elif op == "MaxPool":
            if attrs.get("kernel_shape") != [2, 2] or attrs.get("strides") != [2, 2] or any(attrs.get("pads", [0])):
                raise ValueError(f"unsupported MaxPool {attrs}")
            y = L.MaxPool2D(2, name=name("pool"))(value(ins[0]))
        elif op == "Resize":
            scales = init.get(ins[2]) if len(ins) > 2 else None
            if attrs.get("mode") != b"nearest" or scales is None or list(scales) != [1, 1, 2, 2]:
                raise ValueError(f"unsupported Resize {attrs} scales {scales}")
            y = L.UpSampling2D(2, interpolation="nearest", name=name("up"))(value(ins[0]))
        elif op == "Add":
            y = L.Add(name=name("add"))([value(ins[0]), value(ins[1])])
        elif op in ("Transpose", "Reshape"):
            # The NCHW -> (1, anchors, k) reshapes are left to the decoder: NHWC already has that order.
            y = value(ins[0])
        else:
            raise ValueError(f"unsupported ONNX op {op}")
        tensors[t] = y
        return y

    heads = {}
    for out in outputs:
        kind, stride = out.split("_")
        heads[(kind, int(stride))] = value(out)
    if sorted({s for _, s in heads}) != [8, 16, 32] or {k for k, _ in heads} != set(HEAD_ORDER):
        raise ValueError(f"not a YuNet graph: outputs {outputs}")
    maps = [L.Concatenate(name=f"stride_{s}")([heads[(k, s)] for k in HEAD_ORDER]) for s in (8, 16, 32)]
    return keras.Model(inp, maps, name="yunet")


def convert(onnx_path: Path, out: Path) -> bytes:
    import tensorflow as tf

    model = build_keras(onnx_path)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    data = conv.convert()
    out.write_bytes(data)
    return data


def check(onnx_path: Path, tflite_path: Path, faces_dir: Path, n: int = 40) -> int:
    """Compare cv2.FaceDetectorYN (ONNX) with the LiteRT model + edge.detect_litert's decoder on real faces."""
    import cv2

    from edge.detect_litert import LiteYuNet

    rng = np.random.default_rng(0)
    files = sorted(p for p in faces_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        print(f"no images under {faces_dir}", file=sys.stderr)
        return 2
    worst, pairs, counts = 0.0, 0, [0, 0]
    for size in ((320, 240), (256, 256), (144, 144)):
        cv_net = cv2.FaceDetectorYN.create(str(onnx_path), "", size, 0.3, 0.3, 50)
        lite = LiteYuNet(tflite_path, size, 0.3, 0.3, 50, threads=1)
        for i in range(n):
            canvas = np.full((size[1], size[0], 3), rng.integers(40, 220), np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                face = cv2.imread(str(files[rng.integers(len(files))]))
                side = int(rng.integers(40, min(size) - 10))
                face = cv2.resize(face, (side, side))
                x, y = int(rng.integers(0, size[0] - side)), int(rng.integers(0, size[1] - side))
                canvas[y:y + side, x:x + side] = face
            _, a = cv_net.detect(canvas)
            _, b = lite.detect(canvas)
            a = np.zeros((0, 15), np.float32) if a is None else a
            b = np.zeros((0, 15), np.float32) if b is None else b
            counts[0] += len(a)
            counts[1] += len(b)
            for row in a:
                if len(b) == 0:
                    worst = max(worst, 1e9)
                    continue
                j = int(np.argmin(np.abs(b[:, :4] - row[:4]).sum(axis=1)))
                worst = max(worst, float(np.abs(b[j, :4] - row[:4]).max()), float(abs(b[j, 14] - row[14])) * 100)
                pairs += 1
    print(f"OpenCV found {counts[0]} faces, LiteRT {counts[1]}; largest box difference over {pairs} pairs "
          f"{worst:.3f} px (score differences count x100)")
    return 0 if counts[0] == counts[1] and worst < 1.0 else 1


def time_runtimes(onnx_path: Path, tflite_path: Path, n: int = 200) -> None:
    """Per-call time of both runtimes at the fine search's input sizes, one thread, interleaved (median ms)."""
    import time

    import cv2

    from edge.detect_litert import LiteYuNet

    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    print("input     OpenCV DNN (.onnx)   LiteRT (.tflite)   ratio   (median ms per call, one thread)")
    for size in ((320, 240), (256, 256), (144, 144)):
        img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        runs = {"cv": cv2.FaceDetectorYN.create(str(onnx_path), "", size, 0.3, 0.3, 50).detect,
                "lite": LiteYuNet(tflite_path, size, 0.3, 0.3, 50).detect}
        times = {k: [] for k in runs}
        for k, f in runs.items():
            for _ in range(10):
                f(img)
        for _ in range(n):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f(img)
                times[k].append(time.perf_counter() - t0)
        cv_ms, lite_ms = (1000 * float(np.median(times[k])) for k in ("cv", "lite"))
        print(f"{size[0]}x{size[1]:<5} {cv_ms:12.2f} {lite_ms:18.2f} {lite_ms / cv_ms:13.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantization.yunet", description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--check", type=Path, metavar="FACES_DIR",
                    help="compare with cv2.FaceDetectorYN on faces pasted from this folder")
    ap.add_argument("--time", action="store_true",
                    help="time both runtimes at the fine search's input sizes (the existing --out file if "
                         "--no-convert)")
    ap.add_argument("--no-convert", action="store_true", help="use the existing --out file (with --check/--time)")
    args = ap.parse_args(argv)
    if not args.no_convert:
        data = convert(args.onnx, args.out)
        src = hashlib.sha256(args.onnx.read_bytes()).hexdigest()
        print(f"{args.out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()} (from {args.onnx.name}, "
              f"sha256 {src})")
    rc = check(args.onnx, args.out, args.check) if args.check else 0
    if args.time:
        time_runtimes(args.onnx, args.out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
