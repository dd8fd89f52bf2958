"""Synthetic outlier exposure for FCDD: confetti noise (as in the FCDD paper), in blobs and strokes.

Confetti noise pastes a few pieces of random colour and texture over a good image. The paper's
pieces are blobs; half of ours are thin strokes (open polylines 1-5 px wide), because line-shaped
defects (scratches, cracks, fibres, hairs) are the commonest on real parts and a head that has
only seen blobs does not flag a thin line: on the sample grass, scratches ranked above the good
images half the time with blobs alone, 0.91 with strokes. The pieces are random in colour and
course, draw no lips, fades or branches, and so none of the sample data's painted test defects:
a model that flags them learns "different from normal", not one particular defect. Every
outlier comes with its mask, (H, W) float32 in [0, 1]. (Cut-paste outliers, patches of the
part's own texture moved elsewhere, were tried and lowered FCDD's test AUROC on sample gravel
from 0.93 to 0.74: too close to normal for a small head to learn from.)
"""

from __future__ import annotations

import cv2
import numpy as np

STROKE_SHARE = 0.5


def _blob(mask: np.ndarray, rng: np.random.Generator) -> None:
    """Fill a random ellipse 2-9 % of the short side across into mask (uint8, in place)."""
    height, width = mask.shape
    short_side = min(height, width)
    centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    axes = tuple(max(int(a), 2) for a in rng.uniform(0.02, 0.09, size=2) * short_side)
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)


def _stroke(mask: np.ndarray, rng: np.random.Generator) -> None:
    """Draw a random open polyline, 10-50 % of the short side long and 1-5 px wide, into mask (in place)."""
    height, width = mask.shape
    corners = int(rng.integers(2, 5))
    directions = rng.normal(size=(corners - 1, 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    step = rng.uniform(0.1, 0.5) * min(height, width) / (corners - 1)
    start = rng.uniform((0, 0), (width, height))
    points = np.vstack([start, start + np.cumsum(directions * step, axis=0)])
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 255, int(rng.integers(1, 6)), cv2.LINE_AA)


def confetti(image: np.ndarray, rng: np.random.Generator, *, max_pieces: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A copy of image (H, W, C) uint8 with 1..max_pieces noisy blobs or strokes pasted in, and where: (H, W) float32."""
    height, width, channels = image.shape
    out = image.astype(np.float32)
    where = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(1, max_pieces + 1))):
        mask = np.zeros((height, width), np.uint8)
        (_stroke if rng.random() < STROKE_SHARE else _blob)(mask, rng)
        colour = rng.integers(0, 256, size=channels).astype(np.float32)
        texture = colour + rng.normal(0.0, float(rng.uniform(0, 40)), size=(height, width, channels))
        alpha = (cv2.GaussianBlur(mask, (0, 0), 1.0).astype(np.float32) / 255.0)[..., None]
        out = out * (1 - alpha) + np.clip(texture, 0, 255) * alpha
        where = np.maximum(where, alpha[..., 0])
    return np.round(out).astype(np.uint8), where


def confetti_images(images: np.ndarray, count: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """count confetti outliers from good images in turn: (images (count, H, W, C) uint8, masks (count, H, W))."""
    rng = np.random.default_rng(seed)
    pairs = [confetti(images[index % len(images)], rng) for index in range(count)]
    return np.stack([image for image, _ in pairs]), np.stack([mask for _, mask in pairs])
