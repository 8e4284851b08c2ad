"""What the web server costs: the frame loop's hand-over per frame, and one preview frame's annotate + encode
(which runs in a web thread, at most web.preview_fps times a second, only while someone watches).

    python3 scripts/web_overhead.py
"""
import time, timeit, cv2, numpy as np
from edge.config import load_config
from edge.detect import Box
from edge.service import STAGES
from edge.web.server import WebServer
from pathlib import Path
cap = cv2.VideoCapture(str(Path(__file__).resolve().parents[1] / "edge" / "data" / "demo.mp4")); cap.set(cv2.CAP_PROP_POS_FRAMES, 150); ok, img = cap.read()
cfg = load_config(None, {"web.enabled": "true", "web.preview": "true", "web.port": "18099"}, env={})
srv = WebServer(cfg, STAGES)
boxes = [Box(100, 60, 150, 180), Box(430, 250, 130, 160), Box(70, 300, 150, 150)]
tracks = [(f"{i}-abcd", b) for i, b in enumerate(boxes, 1)]
probs = np.full((3, 7), 1 / 7, np.float32)
labels = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
n = 20000
t = timeit.timeit(lambda: srv.feed.on_frame(img, time.time(), tracks, boxes, probs, labels), number=n)
print(f"loop side, Feed.on_frame with 3 faces: {t / n * 1e6:.1f} us per frame")
seq = [0]
def enc():
    seq[0] += 1
    srv.preview_jpeg((seq[0], img, [(f, b, p) for (f, b), p in zip(tracks, probs)], labels, time.time()))
m = 200
t = timeit.timeit(enc, number=m)
print(f"web side, annotate + JPEG-encode one 640x480 preview frame: {t / m * 1e3:.2f} ms")
