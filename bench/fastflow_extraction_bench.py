"""FastFlow's fit-time feature extraction: good and validation images in two calls (as before) or one (now).

    OMP_NUM_THREADS=2 .venv/bin/python bench/fastflow_extraction_bench.py DATA [--image-size 256] [--rounds 3]

DATA is any MVTec-style folder: its train/good and calibration images go through FastFlow's own
extraction (`trainer/models/fastflow.py` `_extract`: a temporary ONNX graph of the frozen backbone
in ONNX Runtime, its export included), twice (good, then calibration) and once (both together),
alternating round by round. Prints seconds each way and the largest difference of the features.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lineguard.trainer.data import discover_dataset, load_images, read_image
from lineguard.trainer.models.fastflow import FastFlow, FastFlowConfig, _extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dataset = discover_dataset(args.data)
    source = read_image(dataset.train[0].path).shape[:2]
    size = {"height": args.image_size, "width": args.image_size, "channels": 1, "source_size": source}
    good = load_images(dataset.split("train"), **size)
    validation = load_images(dataset.split("calibration"), **size)
    model = FastFlow(FastFlowConfig(input_height=args.image_size, input_width=args.image_size, channels=1))
    print("| round | images | two calls s | one call s | ratio | max difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for round_index in range(args.rounds):
        started = time.perf_counter()
        apart = [torch.cat(pair) for pair in zip(_extract(model, good), _extract(model, validation), strict=True)]
        two_s = time.perf_counter() - started
        started = time.perf_counter()
        together = _extract(model, np.concatenate([good, validation]))
        one_s = time.perf_counter() - started
        difference = max(float((a - b).abs().max()) for a, b in zip(apart, together, strict=True))
        print(
            f"| {round_index + 1} | {len(good)} + {len(validation)} | {two_s:.2f} | {one_s:.2f} "
            f"| {two_s / one_s:.2f}x | {difference:.1e} |"
        )


if __name__ == "__main__":
    main()
