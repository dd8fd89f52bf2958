"""Which GPU this machine has, and which of a bundle's TensorRT engines can run on it.

A TensorRT plan loads only on the TensorRT version that built it and is tuned for one GPU model,
so `select_engine` takes an engine only on an exact match of GPU name, compute capability and
TensorRT version (major.minor.patch), with a profile large enough for the agent's batches.
Detection asks the CUDA runtime through cuda-python, else `nvidia-smi`; both are optional and
their absence means "no GPU", never an error.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from ..bundle import EngineInfo

log = logging.getLogger(__name__)

# Fastest first: every engine in a bundle passed the same parity check when it was built.
PRECISION_PREFERENCE = ("int8", "fp16", "fp32")
NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One CUDA device: its name as the driver gives it and its compute capability, e.g. "9.0"."""

    name: str
    compute_capability: str
    index: int = 0

    @property
    def sm(self) -> str:
        """ "sm90" for compute capability 9.0."""
        return "sm" + self.compute_capability.replace(".", "")


@dataclass(frozen=True, slots=True)
class EngineChoice:
    """The engine to run, or None with the reason none fits."""

    engine: EngineInfo | None
    reason: str


def gpu_slug(name: str) -> str:
    """ "NVIDIA H200" -> "nvidia-h200": a GPU name fit for a file name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "gpu"


def short_version(version: str) -> str:
    """TensorRT "10.3.0.30" -> "10.3.0": the part a plan must match."""
    return ".".join(version.split(".")[:3])


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Devices from `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader` output."""
    devices = []
    for index, line in enumerate(row for row in text.splitlines() if row.strip()):
        name, _, capability = line.rpartition(",")
        capability = capability.strip()
        if not name.strip() or not re.fullmatch(r"[0-9]+\.[0-9]+", capability):
            msg = f"unexpected nvidia-smi line {line!r}; expected 'NAME, MAJOR.MINOR'"
            raise ValueError(msg)
        devices.append(GpuInfo(name=name.strip(), compute_capability=capability, index=index))
    return devices


def detect_gpu(index: int = 0) -> GpuInfo | None:
    """The CUDA device `index`, or None when there is none (or no way to ask)."""
    found = _from_cuda_runtime(index)
    if found is None:
        found = _from_nvidia_smi(index)
    return found


def _from_cuda_runtime(index: int) -> GpuInfo | None:
    from .cuda import runtime

    try:
        cudart = runtime()
    except ImportError:
        return None  # cuda-python is not installed
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or index >= count:
        log.debug("CUDA runtime reports no device %d (%s)", index, error)
        return None
    error, props = cudart.cudaGetDeviceProperties(index)
    if error != cudart.cudaError_t.cudaSuccess:
        return None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name=name.rstrip("\0").strip(), compute_capability=f"{props.major}.{props.minor}", index=index)


def _from_nvidia_smi(index: int) -> GpuInfo | None:
    program = shutil.which("nvidia-smi")
    if program is None:
        return None
    try:
        result = subprocess.run(
            [program, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        )
        devices = parse_nvidia_smi(result.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        log.warning("nvidia-smi could not list the GPUs: %s", error)
        return None
    return devices[index] if index < len(devices) else None


def select_engine(
    engines: Sequence[EngineInfo], gpu: GpuInfo | None, tensorrt_version: str | None, *, max_batch: int
) -> EngineChoice:
    """The fastest engine built for this GPU and TensorRT version with room for max_batch frames."""
    if not engines:
        return EngineChoice(None, "the bundle has no TensorRT engine (build one with `lineguard-train build-engine`)")
    if gpu is None:
        return EngineChoice(None, "no CUDA GPU found")
    if tensorrt_version is None:
        return EngineChoice(None, "tensorrt is not installed")
    fitting, misfits = [], []
    for engine in engines:
        problem = _mismatch(engine, gpu, tensorrt_version, max_batch)
        if problem:
            misfits.append(f"{engine.file}: {problem}")
        else:
            fitting.append(engine)
    if not fitting:
        return EngineChoice(
            None, f"no engine fits {gpu.name} ({gpu.sm}) with TensorRT {tensorrt_version}: " + "; ".join(misfits)
        )
    best = min(fitting, key=lambda e: PRECISION_PREFERENCE.index(e.precision))
    return EngineChoice(best, f"{best.file} matches {gpu.name} ({gpu.sm}), TensorRT {tensorrt_version}")


def _mismatch(engine: EngineInfo, gpu: GpuInfo, tensorrt_version: str, max_batch: int) -> str:
    if engine.compute_capability != gpu.compute_capability:
        return f"built for compute capability {engine.compute_capability}, this GPU is {gpu.compute_capability}"
    if engine.gpu_name != gpu.name:
        return f"built on {engine.gpu_name}, this GPU is {gpu.name}"
    if short_version(engine.tensorrt_version) != short_version(tensorrt_version):
        return f"built with TensorRT {engine.tensorrt_version}, this agent has {tensorrt_version}"
    if engine.max_batch < max_batch:
        return f"its profile stops at batch {engine.max_batch}, engine.max_batch is {max_batch}"
    return ""
