"""What persisting the MQTT outbox under state_dir would cost (README, "MQTT buffering").

Two designs, timed on the disk holding DIR (default: a temporary directory; pass the device's state_dir,
e.g. /var/lib/fer-edge, to measure its SD card):
  spill    - at a clean stop, write the N buffered events once (write, fsync, rename); survives only clean stops.
  journal  - append + fsync every event as it is produced, so a crash or power cut loses nothing.

    python3 scripts/outbox_persist_cost.py [DIR] [N]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def event(i: int) -> bytes:
    scores = {k: 0.1428 for k in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")}
    return json.dumps({"schema_version": "1.0", "device_id": "kitchen", "type": "update", "face_id": f"{i:x}-ab12",
                       "timestamp": "2026-12-02T18:00:00.000Z", "epoch": 1796234400.0 + i,
                       "bbox": {"x": 10, "y": 20, "w": 150, "h": 150}, "emotion": "happy", "confidence": 0.9,
                       "scores": scores, "first_seen": "2026-12-02T18:00:00.000Z", "duration_s": 1.0,
                       "model": {"version": "1.3.1", "sha256": "b" * 64}, "source": "picamera2:0"},
                      separators=(",", ":")).encode() + b"\n"


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
    events = [event(i) for i in range(n)]
    path = os.path.join(root, "outbox-cost-test.jsonl")

    t = time.perf_counter()
    with open(path + ".tmp", "wb") as fh:
        fh.writelines(events)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".tmp", path)
    spill = time.perf_counter() - t
    size = os.path.getsize(path)
    os.unlink(path)

    k = min(n, 500)
    t = time.perf_counter()
    with open(path, "ab") as fh:
        for ev in events[:k]:
            fh.write(ev)
            fh.flush()
            os.fsync(fh.fileno())
    journal = (time.perf_counter() - t) / k
    os.unlink(path)
    print(f"dir {root}: {n} events, {size / 1e6:.1f} MB")
    print(f"spill at stop (write + fsync + rename): {spill * 1e3:.0f} ms once")
    print(f"journal (append + fsync per event): {journal * 1e3:.2f} ms per event, "
          f"{journal * 10 * 100:.1f}% of one core's time at 10 events/s, {4096 * 10 * 86400 / 1e9:.1f} GB/day "
          "of 4 KiB page writes at 10 events/s")


if __name__ == "__main__":
    main()
