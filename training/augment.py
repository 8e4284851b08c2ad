"""Batch-level tf.data augmentation (vectorised: far cheaper on CPU than Keras' per-image affine layers).

Mimics how a face detector frames a face (scale/translation jitter, small rotation) plus flips,
brightness/contrast and random erasing. Images are float32 in [0, 1], shape (B, H, W, 1).
"""
from __future__ import annotations

import math

from .tfenv import tf


def _affine(x, rot_deg, scale, shift):
    b = tf.shape(x)[0]
    h = tf.cast(tf.shape(x)[1], tf.float32)
    w = tf.cast(tf.shape(x)[2], tf.float32)
    th = tf.random.uniform([b], -rot_deg, rot_deg) * math.pi / 180.0
    s = tf.random.uniform([b], 1.0 - scale, 1.0 + scale)
    tx = tf.random.uniform([b], -shift, shift) * w
    ty = tf.random.uniform([b], -shift, shift) * h
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    c, sn = tf.cos(th) / s, tf.sin(th) / s
    # output->input mapping: p_in = R/s (p_out - c) + c - t
    a0, a1 = c, -sn
    b0, b1 = sn, c
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    z = tf.zeros([b])
    t = tf.stack([a0, a1, a2, b0, b1, b2, z, z], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=t, output_shape=tf.shape(x)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")


def _erase(x, p, max_frac):
    b, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    eh = tf.random.uniform([b, 1, 1], 0.1, max_frac) * hf
    ew = tf.random.uniform([b, 1, 1], 0.1, max_frac) * wf
    y0 = tf.random.uniform([b, 1, 1]) * (hf - eh)
    x0 = tf.random.uniform([b, 1, 1]) * (wf - ew)
    yy = tf.cast(tf.range(h), tf.float32)[None, :, None]
    xx = tf.cast(tf.range(w), tf.float32)[None, None, :]
    m = (yy >= y0) & (yy < y0 + eh) & (xx >= x0) & (xx < x0 + ew)
    m = m & (tf.random.uniform([b, 1, 1]) < p)
    noise = tf.random.uniform(tf.shape(x))
    return tf.where(m[..., None], noise, x)


def augment_batch(x, rot_deg=12.0, scale=0.12, shift=0.08, erase_p=0.5):
    """Random flip, rotation/scale/shift, brightness/contrast and erasing for a batch."""
    b = tf.shape(x)[0]
    flip = tf.random.uniform([b, 1, 1, 1]) < 0.5
    x = tf.where(flip, tf.reverse(x, axis=[2]), x)
    x = _affine(x, rot_deg, scale, shift)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    contrast = tf.random.uniform([b, 1, 1, 1], 0.7, 1.3)
    bright = tf.random.uniform([b, 1, 1, 1], -0.12, 0.12)
    x = tf.clip_by_value((x - mean) * contrast + mean + bright, 0.0, 1.0)
    return _erase(x, erase_p, 0.4)
