"""YuNet through LiteRT: the bundled face detector run by the classifier's runtime instead of OpenCV's DNN.

``quantization.yunet`` rebuilds OpenCV Zoo's YuNet from its ONNX weights and exports it with dynamic height and
width; its three outputs are NHWC maps per stride (8, 16, 32) of [cls, obj, bbox(4), landmarks(10)], cls and obj
after their sigmoid. ``LiteYuNet.detect`` decodes them the way cv2.FaceDetectorYN does (same padding to a
multiple of 32, same box and landmark decoding, same NMS), so it is a drop-in for that object: ``(1, faces)``
with one row per face, [x, y, w, h, 10 landmark coordinates, score], or ``(1, None)`` when none is found.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge.native_stderr import filtered_stderr, is_litert_info

STRIDES = (8, 16, 32)
CHANNELS = 16  # cls, obj, 4 box, 10 landmark values per anchor
PAD_TO = 32  # YuNet's input must divide by its coarsest stride


class LiteYuNetError(Exception):
    """The .tflite cannot be loaded or is not the exported YuNet."""


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.mgrid[0:rows, 0:cols]
    return c.reshape(-1).astype(np.float32), r.reshape(-1).astype(np.float32)


class LiteYuNet:
    """One input size's interpreter; ``detect(bgr)`` -> (1, float32 (N, 15) or None) like cv2.FaceDetectorYN."""

    def __init__(self, path: Path | str, size: tuple[int, int], score_threshold: float, nms_threshold: float,
                 top_k: int, threads: int = 1):
        from edge.classify import ModelError, _interpreter_class

        try:
            Interpreter, self.backend = _interpreter_class()
        except ModelError as e:
            raise LiteYuNetError(str(e)) from None
        self.size = (int(size[0]), int(size[1]))
        self.score_threshold, self.nms_threshold, self.top_k = score_threshold, nms_threshold, top_k
        pw = (self.size[0] - 1) // PAD_TO * PAD_TO + PAD_TO
        ph = (self.size[1] - 1) // PAD_TO * PAD_TO + PAD_TO
        self._pad = (pw, ph)
        try:
            with filtered_stderr(is_litert_info):
                it = Interpreter(model_path=str(path), num_threads=threads)
                inp = it.get_input_details()
                if len(inp) != 1 or list(inp[0]["shape"])[-1] != 3 or len(it.get_output_details()) != 3:
                    raise LiteYuNetError(f"{path}: not the exported YuNet (one image input, three outputs)")
                it.resize_tensor_input(inp[0]["index"], [1, ph, pw, 3])
                it.allocate_tensors()
                self._buf = np.zeros((1, ph, pw, 3), np.float32)  # zero padding right/bottom, as OpenCV pads
                # With dynamic height and width the output shapes are only known after an invoke.
                it.set_tensor(inp[0]["index"], self._buf)
                it.invoke()
        except (ValueError, RuntimeError) as e:
            raise LiteYuNetError(f"{path}: not a loadable LiteRT model ({e})") from None
        self._it = it
        self._in = inp[0]["index"]
        outs = sorted((it.get_tensor(d["index"]).shape, d["index"]) for d in it.get_output_details())
        self._outs = []
        for (shape, index), stride in zip(reversed(outs), STRIDES):  # the largest map is stride 8
            rows, cols, ch = (int(v) for v in shape[1:])
            if (rows, cols, ch) != (ph // stride, pw // stride, CHANNELS):
                raise LiteYuNetError(f"{path}: output {list(shape)} is not YuNet's stride-{stride} map")
            self._outs.append((index, stride, *_grid(rows, cols)))

    def setScoreThreshold(self, value: float) -> None:  # noqa: N802 - cv2.FaceDetectorYN's name
        self.score_threshold = float(value)

    def detect(self, image: np.ndarray) -> tuple[int, np.ndarray | None]:
        h, w = image.shape[:2]
        if (w, h) != self.size:
            raise ValueError(f"image is {w}x{h}, this detector's input size is {self.size[0]}x{self.size[1]}")
        self._buf[0, :h, :w] = image
        self._it.set_tensor(self._in, self._buf)
        self._it.invoke()
        found = []
        for index, stride, cx, cy in self._outs:
            m = self._it.get_tensor(index)[0].reshape(-1, CHANNELS)
            score = np.sqrt(np.clip(m[:, 0], 0, 1) * np.clip(m[:, 1], 0, 1))
            keep = np.flatnonzero(score >= self.score_threshold)
            if not keep.size:
                continue
            m, score, gx, gy = m[keep], score[keep], cx[keep], cy[keep]
            bw = np.exp(m[:, 4]) * stride
            bh = np.exp(m[:, 5]) * stride
            x = (gx + m[:, 2]) * stride - bw / 2
            y = (gy + m[:, 3]) * stride - bh / 2
            kps = m[:, 6:16].copy()
            kps[:, 0::2] = (kps[:, 0::2] + gx[:, None]) * stride
            kps[:, 1::2] = (kps[:, 1::2] + gy[:, None]) * stride
            found.append(np.column_stack([x, y, bw, bh, kps, score]))
        if not found:
            return 1, None
        faces = np.concatenate(found).astype(np.float32)
        keep = cv2.dnn.NMSBoxes(faces[:, :4].tolist(), faces[:, 14].tolist(), self.score_threshold,
                                self.nms_threshold, 1.0, self.top_k)
        return 1, faces[np.asarray(keep, int).reshape(-1)]
