"""Trainer benchmark: fit time and peak RSS on N good images, ONNX Runtime CPU ms/image at batch 1 and 16.

    .venv/bin/python bench/trainer_bench.py [--train 500] [--category brick] [--image-size 256]

The fit runs as `lineguard-train fit` in a child process, so its peak RSS is the trainer's own.
Results print as a Markdown table row for BENCHMARKS.md, plus the JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lineguard.trainer.export import cpu_session, export_onnx
from lineguard.trainer.models import load_model
from lineguard.trainer.sample_data import SampleDataSpec, make_sample_dataset


def time_fit(data: Path, out: Path, image_size: int, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `lineguard-train fit` in a child process."""
    command = [sys.executable, "-m", "lineguard.trainer", "fit", str(data), "--out", str(out)]
    command += ["--image-size", str(image_size), *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, peak_mib


def time_onnx(onnx_path: Path, images: np.ndarray, batch: int, repeats: int) -> float:
    """Median ms per image over `repeats` runs of one batch, after one warm-up."""
    session = cpu_session(onnx_path)
    frames = images[:batch]
    session.run(None, {"image": frames})
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"image": frames})
        samples.append((time.perf_counter() - started) * 1000 / batch)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--category", default="brick")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("fit_args", nargs="*", help="extra `lineguard-train fit` options, after --")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = SampleDataSpec(
            image_size=args.image_size,
            n_train=args.train,
            n_calibration_good=4,
            n_calibration_defect=4,
            n_test_good=4,
            n_test_defect=4,
        )
        (data,) = make_sample_dataset(root / "data", categories=(args.category,), spec=spec)
        fit_seconds, peak_mib = time_fit(data, root / "out", args.image_size, args.fit_args)
        _, model = load_model(root / "out" / "model")
        config = model.config
        onnx_path = export_onnx(
            model, root / "model.onnx", height=config.input_height, width=config.input_width, channels=config.channels
        )
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (16, config.input_height, config.input_width, config.channels), dtype=np.uint8)
        batch1 = time_onnx(onnx_path, images, 1, args.repeats)
        batch16 = time_onnx(onnx_path, images, 16, max(3, args.repeats // 4))
    result = {
        "train_images": args.train,
        "image_size": args.image_size,
        "bank_size": model.bank_size,
        "fit_seconds": round(fit_seconds, 1),
        "peak_rss_mib": round(peak_mib),
        "onnx_cpu_ms_per_image_batch1": round(batch1, 1),
        "onnx_cpu_ms_per_image_batch16": round(batch16, 1),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, Python {platform.python_version()}",
    }
    print(json.dumps(result, indent=2))
    print(
        f"| {args.train} | {args.image_size} | {model.bank_size} | {result['fit_seconds']} | {result['peak_rss_mib']} "
        f"| {result['onnx_cpu_ms_per_image_batch1']} | {result['onnx_cpu_ms_per_image_batch16']} |"
    )


if __name__ == "__main__":
    main()
