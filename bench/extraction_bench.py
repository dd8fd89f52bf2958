"""PatchCore training-feature extraction: torch eager against ONNX Runtime on the same images, seconds per run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/extraction_bench.py DATA [--image-size 256] [--limit 500]

DATA is any MVTec-style folder; its train/good images (up to --limit) are embedded by the
default PatchCore embedder, once in torch eager mode (batch 16, as fitting used to) and once
through trainer.onnx_features (what fitting does now, export of the graph included).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lineguard.trainer.data import discover_dataset, load_images
from lineguard.trainer.models.patchcore import PatchCoreConfig, PatchEmbedder
from lineguard.trainer.onnx_features import extract_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=500)
    args = parser.parse_args()
    good = tuple(s for s in discover_dataset(args.data).train if s.label == 0)[: args.limit]
    images = load_images(good, height=args.image_size, width=args.image_size, channels=1)
    embedder = PatchEmbedder(PatchCoreConfig(input_height=args.image_size, input_width=args.image_size, channels=1))
    started = time.perf_counter()
    with torch.inference_mode():  # torch eager mode, batches of 16 as the trainer used to run it
        eager = torch.cat([embedder(torch.from_numpy(images[i : i + 16])) for i in range(0, len(images), 16)])
    eager_s = time.perf_counter() - started
    started = time.perf_counter()
    onnx = extract_features(embedder, images)
    onnx_s = time.perf_counter() - started
    difference = float((onnx - eager).abs().max() / eager.abs().max())
    print(
        f"| {len(images)} | {args.image_size}x{args.image_size} | {eager_s:.1f} | {onnx_s:.1f} | "
        f"{eager_s / onnx_s:.2f}x | {difference:.1e} |"
    )


if __name__ == "__main__":
    main()
