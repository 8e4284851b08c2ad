"""Face crop -> model input. The one function the daemon and training's evaluation share.

FER-2013 faces are framed wider than a face detector's box (forehead to chin, some hair and
background). ``crop_face`` squares the detector box around its centre, widens it by ``margin``
(from the model manifest) and resizes the gray crop to the model's input size. Regions outside the
frame are filled by edge replication so faces at the border keep their scale.
"""
from __future__ import annotations

import cv2
import numpy as np


def square_box(x: float, y: float, w: float, h: float, margin: float) -> tuple[int, int, int]:
    """Return (x0, y0, side) of the square of side max(w, h) * (1 + margin) centred on the box."""
    side = max(w, h) * (1.0 + margin)
    cx, cy = x + w / 2.0, y + h / 2.0
    side_i = max(1, int(round(side)))
    return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side_i


def crop_face(image: np.ndarray, box, size: int, margin: float) -> np.ndarray:
    """Crop ``box`` (anything with x, y, w, h) from a BGR or gray image as a (size, size) uint8 gray face."""
    x0, y0, side = square_box(box.x, box.y, box.w, box.h, margin)
    h, w = image.shape[:2]
    # Crop the in-frame part first, then convert and pad: never convert or copy the whole frame.
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(w, x0 + side), min(h, y0 + side)
    if cx1 <= cx0 or cy1 <= cy0:
        raise ValueError(f"face box {box} lies outside the {w}x{h} frame")
    crop = image[cy0:cy1, cx0:cx1]
    if crop.ndim == 3:
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY if crop.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if (cx0, cy0, cx1, cy1) != (x0, y0, x0 + side, y0 + side):
        crop = cv2.copyMakeBorder(crop, cy0 - y0, y0 + side - cy1, cx0 - x0, x0 + side - cx1, cv2.BORDER_REPLICATE)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def inner_box(size: int, margin: float):
    """The detector-like box whose ``crop_face`` is the whole ``size`` x ``size`` image.

    Used to run already-framed faces (FER-2013 images) through ``crop_face`` exactly as the daemon does.
    """
    from types import SimpleNamespace

    inner = size / (1.0 + margin)
    off = (size - inner) / 2.0
    return SimpleNamespace(x=off, y=off, w=inner, h=inner)
