"""Heatmap overlays for MQTT: the model's view of the frame with its anomaly map in colour."""

from __future__ import annotations

import cv2
import numpy as np


def render_heatmap(
    model_input: np.ndarray, anomaly_map: np.ndarray, *, low: float, high: float, image_format: str
) -> bytes:
    """Encode an overlay of anomaly_map (H, W) on model_input (H, W, C) uint8 as JPEG or PNG bytes.

    low/high: map values shown as the coldest/hottest colour (the bundle's score normalisation),
    so the same colour means the same anomaly on every frame and every camera.
    """
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    colour = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    base = model_input if model_input.shape[2] == 3 else np.repeat(model_input, 3, axis=2)
    base = cv2.cvtColor(base, cv2.COLOR_RGB2BGR) if model_input.shape[2] == 3 else base
    alpha = (0.25 + 0.45 * scaled)[:, :, np.newaxis]
    overlay = (base * (1 - alpha) + colour * alpha).astype(np.uint8)
    extension = ".jpg" if image_format == "jpeg" else ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, 85] if image_format == "jpeg" else []
    ok, encoded = cv2.imencode(extension, overlay, params)
    if not ok:
        msg = f"could not encode heatmap as {image_format}"
        raise ValueError(msg)
    return encoded.tobytes()
