"""`lineguard-train build-engine BUNDLE`: build, check and add a TensorRT engine for this machine's GPU.

Order: the bundle verifies and may be re-signed; the memory estimate fits the budget (both
before TensorRT is touched); the plan is built; it runs the golden images (and the calibration
images) through the agent's own TensorRT back end against ONNX Runtime; only a passing engine
is written into the bundle, listed in its manifest with its target and parity, and re-signed.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lineguard.agent.bundle import EngineInfo, EngineParity, Manifest
from lineguard.agent.engine.backends import BackendUnavailable
from lineguard.agent.engine.gpu import GpuInfo, detect_gpu, gpu_slug, short_version

from ..errors import EngineBuildError
from ..export import cpu_session, run_onnx
from ..package import add_engine, check_engine_target
from . import graph_cost
from .calibration import load_calibration_images
from .parity import Precision, engine_parity, score_all
from .tensorrt_build import BuildOptions, build_plan, tensorrt_module

log = logging.getLogger(__name__)


def add_build_engine_parser(commands: argparse._SubParsersAction) -> None:
    """Register the build-engine subcommand."""
    help_text = "build a TensorRT engine for this machine's GPU, check it against ONNX Runtime, add it to the bundle"
    sub = commands.add_parser("build-engine", help=help_text, description=help_text)
    sub.add_argument("bundle", type=Path, help="bundle folder (e.g. OUT/bundle); the engine is added to it")
    sub.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16", help="default fp16")
    sub.add_argument(
        "--calibration-images",
        type=Path,
        help="folder of good images: INT8 calibration (required for int8) and extra verdict checks",
    )
    sub.add_argument(
        "--max-batch", type=int, default=8, help="largest batch, >= the agent's engine.max_batch (default 8)"
    )
    sub.add_argument("--workspace-mb", type=int, default=512, help="TensorRT builder workspace in MiB (default 512)")
    sub.add_argument(
        "--memory-budget-mb", type=float, default=2048.0, help="refuse a build estimated above this, MiB (default 2048)"
    )
    sub.add_argument(
        "--search-precision",
        choices=("fp32", "fp16"),
        help="memory-bank search precision (default: fp16 for fp16 and int8 builds, on tensor cores); fp32 if the fp16 parity check fails",
    )
    sub.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, read and updated (faster rebuilds)")
    sub.add_argument("--sign-key", type=Path, help="the key that signed the bundle; it re-signs the new manifest")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    bundle_dir: Path = args.bundle
    manifest = check_engine_target(bundle_dir, sign_key=args.sign_key)
    options = BuildOptions(args.precision, args.max_batch, args.workspace_mb, args.timing_cache, args.search_precision)
    if options.precision == "int8" and args.calibration_images is None:
        msg = "an int8 build needs good images to calibrate on: pass --calibration-images DIR"
        raise EngineBuildError(msg)
    onnx_path = bundle_dir / manifest.model.onnx_file
    model = graph_cost.load_model(onnx_path)
    estimate = graph_cost.estimate_memory(
        model, batch=options.max_batch, workspace_bytes=options.workspace_mb * graph_cost.MIB
    )
    log.info("memory estimate: %s", estimate.describe())
    graph_cost.check_memory_budget(estimate, budget_mb=args.memory_budget_mb)
    trt = tensorrt_module()
    gpu = detect_gpu()
    if gpu is None:
        msg = "no CUDA GPU found: build the engine on a machine with the GPU model the agent runs on"
        raise EngineBuildError(msg)
    spec = manifest.input
    calibration = load_calibration_images(args.calibration_images, spec) if args.calibration_images else None
    plan = build_plan(
        onnx_path,
        options,
        input_shape=(spec.height, spec.width, spec.channels),
        search_nodes=graph_cost.bank_search_nodes(model),
        calibration_images=calibration,
    )
    parity = check_plan(plan, bundle_dir, manifest, options, calibration)
    info = EngineInfo(
        file=engine_file(gpu, str(trt.__version__), options.precision),
        precision=options.precision,
        search_precision=options.search,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt_version=str(trt.__version__),
        max_batch=options.max_batch,
        built_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        parity=parity,
    )
    add_engine(bundle_dir, plan, info, sign_key=args.sign_key)
    print(
        f"engine   {bundle_dir / info.file}  ({len(plan) / 2**20:.1f} MiB, {info.precision}, {gpu.name} {gpu.sm}, "
        f"TensorRT {info.tensorrt_version}, batch 1-{info.max_batch})"
    )
    print(
        f"parity   golden scores within {parity.max_score_rel_diff:.2e} relative (limit {parity.score_rtol:.0e}); "
        f"{parity.n_verdicts - parity.verdicts_changed}/{parity.n_verdicts} verdicts unchanged"
    )


def engine_file(gpu: GpuInfo, tensorrt_version: str, precision: str) -> str:
    """engines/nvidia-h200-sm90-trt10.3.0-fp16.plan: one file per GPU model, TensorRT version and precision."""
    return f"engines/{gpu_slug(gpu.name)}-{gpu.sm}-trt{short_version(tensorrt_version)}-{precision}.plan"


def check_plan(
    plan: bytes, bundle_dir: Path, manifest: Manifest, options: BuildOptions, calibration: np.ndarray | None
) -> EngineParity:
    """Run the plan through the agent's TensorRT back end and compare with ONNX Runtime (CPU)."""
    from lineguard.agent.engine.backends.tensorrt import TensorRTBackend
    from lineguard.agent.engine.model import read_golden_images

    golden = read_golden_images(bundle_dir, manifest)
    extra = calibration if calibration is not None else golden[:0]
    expected = np.array([g.expected_score for g in manifest.golden], np.float32)
    with tempfile.TemporaryDirectory() as folder:
        plan_path = Path(folder) / "candidate.plan"
        plan_path.write_bytes(plan)
        try:
            backend = TensorRTBackend(plan_path, max_batch=options.max_batch)
        except BackendUnavailable as error:
            msg = f"the engine just built does not load: {error}"
            raise EngineBuildError(msg) from error
        try:
            golden_scores = score_all(backend, golden, max_batch=options.max_batch)
            extra_scores = score_all(backend, extra, max_batch=options.max_batch)
        finally:
            backend.close()
    reference_extra = (
        run_onnx(cpu_session(bundle_dir / manifest.model.onnx_file), extra)[0] if len(extra) else extra_scores
    )
    return engine_parity(
        precision=options.precision,
        golden_expected=expected,
        golden_scores=golden_scores,
        reference_scores=np.concatenate([expected, reference_extra]),
        engine_scores=np.concatenate([golden_scores, extra_scores]),
        threshold=manifest.threshold.value,
    )


__all__ = ["Precision", "add_build_engine_parser", "check_plan", "engine_file", "run"]
