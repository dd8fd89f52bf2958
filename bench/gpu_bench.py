"""GPU bars (issue 5): the scoring graph at batch 1 and 8 against its analytic floor; a 2448x2048 frame to the GPU.

    .venv/bin/python bench/gpu_bench.py --preset h200-sxm            # floor only where there is no GPU
    .venv/bin/python bench/gpu_bench.py --preset h200-sxm --json out.json

The graph is PatchCore at 256x256 grey (EfficientNet-Lite0 stages 3+4) with a 16,384-entry bank of
random features (its cost does not depend on their values), exported exactly as `lineguard-train
export` does. Its FLOPs and bytes come from the ONNX graph (trainer/engines/graph_cost.py) and the
floor from the peak figures given (a --preset or --peak-*): this part runs on any CPU. Where CUDA
is present it also measures, with whatever is installed: torch (the module itself, fp32 and fp16
autocast), onnxruntime-gpu (CUDA provider), TensorRT (our builder and back end, fp32 and fp16), and
the host-to-device copy of one frame from pinned and from pageable memory (torch, else CuPy).
Timings are medians of --repeats runs after warm-up, synchronised with CUDA events or the stream.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lineguard.trainer.engines import graph_cost

# Vendor datasheet peaks (dense, no sparsity): FP16/BF16 tensor TFLOPS, FP32 TFLOPS, memory GB/s, PCIe GB/s per direction.
PRESETS = {
    "h200-sxm": (989.0, 67.0, 4800.0, 64.0),
    "h100-sxm": (989.0, 67.0, 3350.0, 64.0),
    "h100-pcie": (756.0, 51.0, 2000.0, 64.0),
}
FRAME = (2048, 2448)  # 5 MP mono8, the agent benchmark's camera


def make_patchcore(*, bank_size: int, size: int, channels: int) -> Any:
    """A PatchCore module with a random bank of bank_size entries (seeded)."""
    import torch

    from lineguard.trainer.models.patchcore import PatchCore, PatchCoreConfig, PatchEmbedder

    config = PatchCoreConfig(input_height=size, input_width=size, channels=channels, max_bank_size=bank_size)
    embedder = PatchEmbedder(config)
    bank = torch.randn(bank_size, embedder.feature_dim, generator=torch.Generator().manual_seed(0))
    return PatchCore(config, embedder, bank)


def build_graph(folder: Path, *, bank_size: int, size: int, channels: int) -> Path:
    """Export the scoring graph as `lineguard-train export` does; returns the ONNX path."""
    from lineguard.trainer.export import export_onnx

    model = make_patchcore(bank_size=bank_size, size=size, channels=channels)
    return export_onnx(model, folder / "model.onnx", height=size, width=size, channels=channels)


def floor_rows(cost: graph_cost.GraphCost, peaks: tuple[float, float, float, float]) -> list[tuple[str, float]]:
    """(what, microseconds per batch): per engine plan, compute and memory floors and their maximum.

    Compute: Conv/MatMul FLOPs at the tensor-core peak where the plan runs them in fp16, else at the
    fp32 peak; every other op at the fp32 peak. Memory: weights, input and outputs once, plus the
    largest intermediate (the (N, patches, bank) distance matrix) written and read once, in the
    precision the plan computes it in; a kernel that fused it away would not pay that.
    """
    fp16, fp32, bandwidth, _ = peaks
    backbone, search, other = cost.matmul_flops - cost.search_flops, cost.search_flops, cost.other_flops
    plans = {
        "fp32 engine (TF32 off)": ((backbone + search + other) / fp32 / 1e12, 4),
        "fp16 engine, --search-precision fp32": (backbone / fp16 / 1e12 + (search + other) / fp32 / 1e12, 4),
        "fp16 engine (default: bank search fp16 too)": ((backbone + search) / fp16 / 1e12 + other / fp32 / 1e12, 2),
    }
    rows = [("memory, distance matrix fused away", cost.min_bytes / bandwidth / 1e9 * 1e6)]
    for name, (compute_s, element_bytes) in plans.items():
        traffic = cost.min_bytes + 2 * cost.largest_activation.nbytes * element_bytes // 4
        memory_s = traffic / bandwidth / 1e9
        rows += [(f"{name}: compute", compute_s * 1e6), (f"{name}: memory", memory_s * 1e6)]
        rows += [(f"{name}: FLOOR", max(compute_s, memory_s) * 1e6)]
    return rows


def median_us(run: Callable[[], object], sync: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        run()
    sync()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def measure_torch(args: argparse.Namespace, results: dict) -> None:
    import torch

    model = make_patchcore(bank_size=args.bank_size, size=args.size, channels=1).cuda().eval()
    for batch in (1, 8):
        frames = torch.zeros((batch, args.size, args.size, 1), dtype=torch.uint8, device="cuda")
        run = partial(model, frames)
        with torch.inference_mode():
            results[f"torch fp32 batch {batch} us"] = median_us(run, torch.cuda.synchronize, args.repeats)
            with torch.autocast("cuda", dtype=torch.float16):
                results[f"torch fp16 autocast batch {batch} us"] = median_us(run, torch.cuda.synchronize, args.repeats)
    pageable = torch.zeros(FRAME, dtype=torch.uint8)
    pinned = pageable.pin_memory()
    target = torch.empty(FRAME, dtype=torch.uint8, device="cuda")
    for name, source in (("pageable", pageable), ("pinned", pinned)):
        results[f"H2D 2448x2048 mono8 {name} us"] = median_us(
            lambda source=source: target.copy_(source, non_blocking=True), torch.cuda.synchronize, args.repeats
        )


def measure_cupy_copies(args: argparse.Namespace, results: dict) -> None:
    import cupy

    target = cupy.empty(FRAME, dtype=cupy.uint8)
    pageable = np.zeros(FRAME, np.uint8)
    memory = cupy.cuda.alloc_pinned_memory(pageable.nbytes)
    pinned = np.frombuffer(memory, np.uint8, pageable.size).reshape(FRAME)
    stream = cupy.cuda.Stream(non_blocking=True)
    for name, source in (("pageable", pageable), ("pinned", pinned)):
        results[f"H2D 2448x2048 mono8 {name} us (cupy)"] = median_us(
            lambda source=source: target.set(source, stream=stream), stream.synchronize, args.repeats
        )


def measure_onnxruntime(onnx_path: Path, args: argparse.Namespace, results: dict) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        results["onnxruntime CUDA"] = "not available (onnxruntime-gpu not installed)"
        return
    session = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        results["onnxruntime CUDA"] = f"fell back to {session.get_providers()}"
        return
    for batch in (1, 8):
        frames = np.zeros((batch, args.size, args.size, 1), np.uint8)
        key = f"onnxruntime CUDA batch {batch} us (incl. copies, maps back)"
        results[key] = median_us(lambda frames=frames: session.run(None, {"image": frames}), lambda: None, args.repeats)


def measure_tensorrt(onnx_path: Path, args: argparse.Namespace, results: dict) -> None:
    from lineguard.agent.engine.backends.tensorrt import TensorRTBackend
    from lineguard.trainer.engines.tensorrt_build import BuildOptions, build_plan

    model = graph_cost.load_model(onnx_path)
    for precision in ("fp32", "fp16"):
        plan = build_plan(
            onnx_path,
            BuildOptions(precision, max_batch=8, workspace_mb=2048),
            input_shape=(args.size, args.size, 1),
            search_nodes=graph_cost.bank_search_nodes(model),
            calibration_images=None,
        )
        plan_path = onnx_path.with_suffix(f".{precision}.plan")
        plan_path.write_bytes(plan)
        backend = TensorRTBackend(plan_path, max_batch=8, cuda_graph=True)
        for batch in (1, 8):
            frames = np.zeros((batch, args.size, args.size, 1), np.uint8)
            key = f"TensorRT {precision} batch {batch} us (incl. copy in, scores back, CUDA graph)"
            results[key] = median_us(lambda b=backend, f=frames: b.infer(f), lambda: None, args.repeats)
        backend.close()


def try_measure(name: str, measure: Callable[[], None], results: dict) -> None:
    try:
        measure()
    except ImportError as error:
        results[name] = f"skipped: {error}"
    except Exception as error:  # noqa: BLE001 - a benchmark reports a failed part and goes on with the rest
        results[name] = f"failed: {type(error).__name__}: {error}"


def cuda_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        from lineguard.agent.engine.gpu import detect_gpu

        return detect_gpu() is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, help="vendor peak figures for a GPU (overridden by --peak-*)")
    parser.add_argument("--peak-fp16-tflops", type=float, help="dense FP16 tensor-core peak, TFLOPS")
    parser.add_argument("--peak-fp32-tflops", type=float, help="FP32 (non-tensor) peak, TFLOPS")
    parser.add_argument("--bandwidth-gbs", type=float, help="device memory bandwidth, GB/s")
    parser.add_argument("--pcie-gbs", type=float, help="host-to-device link, GB/s per direction")
    parser.add_argument("--bank-size", type=int, default=16384)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-measure", action="store_true", help="print the floor only, even where CUDA is present")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    preset = PRESETS.get(args.preset or "", (None, None, None, None))
    given = (args.peak_fp16_tflops, args.peak_fp32_tflops, args.bandwidth_gbs, args.pcie_gbs)
    peaks = tuple(g if g is not None else p for g, p in zip(given, preset, strict=True))
    if any(p is None for p in peaks):
        parser.error("give --preset or all of --peak-fp16-tflops --peak-fp32-tflops --bandwidth-gbs --pcie-gbs")
    results: dict[str, object] = {"peaks (fp16 TFLOPS, fp32 TFLOPS, GB/s, PCIe GB/s)": peaks}
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = build_graph(Path(folder), bank_size=args.bank_size, size=args.size, channels=1)
        model = graph_cost.load_model(onnx_path)
        for batch in (1, 8):
            cost = graph_cost.graph_cost(model, batch=batch)
            print(
                f"\nbatch {batch}: {cost.matmul_flops / 1e9:.2f} GFLOP in Conv/MatMul ({cost.search_flops / 1e9:.2f} in the bank search), "
                f"{cost.other_flops / 1e9:.3f} GFLOP other, least bytes {cost.min_bytes / 1e6:.1f} MB, largest tensor "
                f"{cost.largest_activation.name} {cost.largest_activation.shape} {cost.largest_activation.nbytes / 1e6:.1f} MB"
            )
            for what, microseconds in floor_rows(cost, peaks):  # type: ignore[arg-type]
                print(f"  {what:<78} {microseconds:10.1f} us  ({microseconds / batch:.1f} us/image)")
                results[f"floor batch {batch}: {what} us"] = round(microseconds, 2)
        frame_bytes = FRAME[0] * FRAME[1]
        results["floor H2D 2448x2048 mono8 us"] = round(frame_bytes / (peaks[3] * 1e9) * 1e6, 1)  # type: ignore[operator]
        print(
            f"\nH2D floor, one 2448x2048 mono8 frame ({frame_bytes / 1e6:.2f} MB): {results['floor H2D 2448x2048 mono8 us']} us"
        )
        if args.no_measure or not cuda_present():
            print("\nno CUDA device (or --no-measure): no GPU measurement made")
        else:
            try_measure("torch", lambda: measure_torch(args, results), results)
            if not any(key.startswith("H2D") for key in results):
                try_measure("cupy", lambda: measure_cupy_copies(args, results), results)
            try_measure("onnxruntime", lambda: measure_onnxruntime(onnx_path, args, results), results)
            try_measure("tensorrt", lambda: measure_tensorrt(onnx_path, args, results), results)
            print("\nmeasured (median of", args.repeats, "runs):")
            for key, value in results.items():
                if not key.startswith(("floor", "peaks")):
                    print(f"  {key:<78} {value:.1f}" if isinstance(value, float) else f"  {key:<78} {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
