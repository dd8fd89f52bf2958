"""`lineguard-train build-engine`: memory budget, calibration data, parity rule, bundle update, CLI.

Everything but TensorRT itself runs here; the builder and the agent's back end run against the
fakes of tests/fake_gpu.py (the real model scored by ONNX Runtime behind TensorRT's API), and a
real engine is built only where tensorrt and a GPU exist (skipped otherwise).
"""

import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from fake_gpu import FakeCudart, FakeTensorRT, install

from lineguard.agent.bundle import (
    MANIFEST_FILE,
    BundleError,
    EngineInfo,
    EngineParity,
    InputSpec,
    parse_manifest,
    verify_bundle,
)
from lineguard.agent.signing import SignatureError, generate_key_pair, load_public_key, public_key_path
from lineguard.trainer.__main__ import main
from lineguard.trainer.engines import graph_cost
from lineguard.trainer.engines.calibration import calibration_batches, load_calibration_images
from lineguard.trainer.engines.command import engine_file
from lineguard.trainer.engines.parity import engine_parity
from lineguard.trainer.engines.tensorrt_build import BuildOptions, profile_shapes
from lineguard.trainer.errors import EngineBuildError
from lineguard.trainer.package import add_engine

GREY = InputSpec(height=64, width=96, channels=1, pixel_format="mono8")


@pytest.fixture
def bundle(trained_work: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_work / "bundle", tmp_path / "bundle"))


@pytest.fixture(scope="module")
def model(trained_work: Path):
    return graph_cost.load_model(trained_work / "bundle" / "model.onnx")


def trusted(key: Path):
    return [load_public_key(public_key_path(key))]


def info(file: str = "engines/nvidia-h200-sm90-trt10.3.0-fp16.plan") -> EngineInfo:
    parity = EngineParity(n_golden=8, max_score_rel_diff=2e-3, score_rtol=1e-2, n_verdicts=8, verdicts_changed=0)
    return EngineInfo(
        file=file,
        precision="fp16",
        search_precision="fp16",
        gpu_name="NVIDIA H200",
        compute_capability="9.0",
        tensorrt_version="10.3.0.26",
        max_batch=8,
        built_utc="2026-11-30T00:00:00Z",
        parity=parity,
    )


# --- the graph: memory, cost, bank search --------------------------------------------------------


def test_the_memory_estimate_grows_with_the_batch_and_a_build_over_budget_is_refused(model):
    one = graph_cost.estimate_memory(model, batch=1, workspace_bytes=0)
    eight = graph_cost.estimate_memory(model, batch=8, workspace_bytes=256 * graph_cost.MIB)
    assert one.weights_bytes == eight.weights_bytes > 0
    assert eight.largest_activation.nbytes == 8 * one.largest_activation.nbytes
    assert eight.total_bytes == eight.weights_bytes + 2 * eight.largest_activation.nbytes + 256 * graph_cost.MIB
    graph_cost.check_memory_budget(eight, budget_mb=eight.total_bytes / graph_cost.MIB + 1)
    with pytest.raises(EngineBuildError, match=r"over the 100 MiB budget: lower --max-batch"):
        graph_cost.check_memory_budget(eight, budget_mb=100)


def test_the_bank_search_flops_are_counted_exactly_and_its_nodes_found(model):
    matrix = next(t for t in model.graph.initializer if len(t.dims) == 3 and 1024 in t.dims)
    _, inner, bank_size = matrix.dims  # the search matrix (regions, D + 1, K): -2 b over |b|^2
    cost1, cost8 = graph_cost.graph_cost(model, batch=1), graph_cost.graph_cost(model, batch=8)
    search = 2 * (256 // 8) ** 2 * inner * bank_size  # stride-8 patches x bank entries x (features + 1)
    blur = 2 * (2 * 256 * 256 * 33)  # the separable 33-tap Gaussian after the search (sigma 4)
    assert cost1.search_flops == search + blur and cost8.search_flops == 8 * (search + blur)
    assert cost1.matmul_flops > search and cost8.matmul_flops == 8 * cost1.matmul_flops
    assert cost1.min_bytes == graph_cost.weights_bytes(model) + 256 * 256 * (1 + 4) + 4
    nodes = graph_cost.bank_search_nodes(model)
    assert {"/MatMul", "/ReduceMin", "/Sqrt", "/ReduceMax"} <= set(nodes)
    assert {"/ReduceSum", "/Add"} <= set(nodes)  # |p|^2 (from the features above the Pad) and its sum with the min
    assert not [n for n in nodes if n.startswith("/embedder/")]  # the backbone keeps the build precision


# --- calibration images and the parity rule -----------------------------------------------------


def test_calibration_images_are_read_at_the_model_input_and_batched_whole(sample_root, tmp_path):
    images = load_calibration_images(sample_root / "train" / "good", GREY, max_images=10)
    assert images.shape == (10, 64, 96, 1) and images.dtype == np.uint8
    colour = load_calibration_images(sample_root / "train" / "good", GREY.model_copy(update={"channels": 3}))
    assert colour.shape[1:] == (64, 96, 3)
    assert [len(b) for b in calibration_batches(images, 4)] == [4, 4]  # the partial last batch is dropped
    few = tmp_path / "few"
    few.mkdir()
    cv2.imwrite(str(few / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(EngineBuildError, match="holds 1 images; INT8 calibration needs at least 8"):
        load_calibration_images(few, GREY)
    with pytest.raises(EngineBuildError, match="does not exist"):
        load_calibration_images(tmp_path / "missing", GREY)


def parity(
    precision="fp16",
    *,
    golden=(10.0, 20.0),
    engine_golden=(10.05, 20.1),
    reference=(10.0, 20.0, 5.0),
    engine=(10.05, 20.1, 5.1),
):
    return engine_parity(
        precision=precision,
        golden_expected=np.array(golden),
        golden_scores=np.array(engine_golden),
        reference_scores=np.array(reference),
        engine_scores=np.array(engine),
        threshold=15.0,
    )


def test_an_engine_within_its_precision_tolerance_and_with_the_same_verdicts_passes():
    result = parity()
    assert result.score_rtol == 1e-2 and result.max_score_rel_diff == pytest.approx(5e-3)
    assert (result.n_golden, result.n_verdicts, result.verdicts_changed) == (2, 3, 0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"precision": "fp32"}, r"up to 5.00e-03 relative \(limit 1e-03\)"),
        ({"engine": (10.0, 20.0, 15.2)}, r"1 of 3 verdicts change at threshold 15 \(image 2: 5 -> 15.2\)"),
        ({"engine_golden": (float("nan"), 20.0)}, "non-finite scores"),
    ],
)
def test_an_engine_past_tolerance_or_with_a_changed_verdict_is_refused(changes, message):
    with pytest.raises(EngineBuildError, match=message):
        parity(**changes)


def test_profiles_engine_names_and_options():
    assert profile_shapes((256, 256, 1), 8) == ((1, 256, 256, 1), (8, 256, 256, 1), (8, 256, 256, 1))
    from lineguard.agent.engine.gpu import GpuInfo

    name = engine_file(GpuInfo("NVIDIA GeForce RTX 4090", "8.9"), "10.3.0.26", "int8")
    assert name == "engines/nvidia-geforce-rtx-4090-sm89-trt10.3.0-int8.plan"
    with pytest.raises(EngineBuildError, match="must be >= 1"):
        BuildOptions("fp16", max_batch=0, workspace_mb=512)
    with pytest.raises(EngineBuildError, match="keeps the bank search in fp32"):
        BuildOptions("fp32", max_batch=1, workspace_mb=512, search_precision="fp16")
    searches = [
        BuildOptions(p, 1, 512, search_precision=s).search
        for p, s in [("fp32", None), ("fp16", None), ("int8", None), ("fp16", "fp32")]
    ]
    assert searches == ["fp32", "fp16", "fp16", "fp32"]  # never int8 distances; fp32 on request


# --- adding an engine to a bundle ---------------------------------------------------------------


def test_an_engine_added_to_a_signed_bundle_is_listed_digested_and_re_signed(bundle, signing_key):
    manifest = add_engine(bundle, b"plan bytes", info(), sign_key=signing_key)
    assert [e.file for e in manifest.engines] == [info().file]
    assert (bundle / info().file).read_bytes() == b"plan bytes"
    again = add_engine(bundle, b"rebuilt plan", info(), sign_key=signing_key)  # same target: replaced, not doubled
    assert len(again.engines) == 1
    other = add_engine(bundle, b"x", info("engines/nvidia-h200-sm90-trt10.3.0-int8.plan"), sign_key=signing_key)
    assert len(other.engines) == 2
    assert verify_bundle(bundle, trusted(signing_key)).engines == other.engines


def test_a_signed_bundle_takes_an_engine_only_with_the_key_that_signed_it(bundle, signing_key, tmp_path):
    with pytest.raises(BundleError, match="is signed: pass --sign-key"):
        add_engine(bundle, b"p", info(), sign_key=None)
    stranger, _ = generate_key_pair(tmp_path / "stranger.pem")
    with pytest.raises(SignatureError, match="does not verify with --sign-key"):
        add_engine(bundle, b"p", info(), sign_key=stranger)
    with (bundle / "model.onnx").open("ab") as handle:  # an altered bundle is never re-signed
        handle.write(b"\0")
    with pytest.raises(BundleError, match="was altered"):
        add_engine(bundle, b"p", info(), sign_key=signing_key)
    assert not (bundle / "engines").exists()


def test_a_bundle_without_engines_keeps_the_manifest_older_agents_read(bundle):
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    assert "engines" not in raw  # agents before engines refuse unknown keys
    assert parse_manifest((bundle / MANIFEST_FILE).read_bytes()).engines == ()


# --- the command --------------------------------------------------------------------------------


def test_build_engine_refuses_before_tensorrt_when_the_bundle_or_budget_is_wrong(bundle, signing_key, capsys):
    assert main(["build-engine", str(bundle)]) == 2
    assert "is signed: pass --sign-key" in capsys.readouterr().err
    assert main(["build-engine", str(bundle), "--sign-key", str(signing_key), "--memory-budget-mb", "64"]) == 2
    assert "over the 64 MiB budget" in capsys.readouterr().err
    assert main(["build-engine", str(bundle), "--sign-key", str(signing_key), "--precision", "int8"]) == 2
    assert "pass --calibration-images DIR" in capsys.readouterr().err


def test_build_engine_without_tensorrt_exits_2_saying_what_to_install(bundle, signing_key, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build-engine", str(bundle), "--sign-key", str(signing_key)]) == 2
    assert "tensorrt is not installed" in capsys.readouterr().err
    assert verify_bundle(bundle, trusted(signing_key)).engines == ()


@pytest.mark.parametrize(
    ("precision", "search", "pinned"),
    [("fp32", "fp32", None), ("fp16", "fp16", None), ("fp16", "fp32", "float32"), ("int8", "fp16", "float16")],
)
def test_build_engine_builds_checks_and_adds_an_engine_through_tensorrts_api(
    precision, search, pinned, bundle, signing_key, sample_root, monkeypatch, tmp_path, capsys
):
    cudart = FakeCudart()
    trt = FakeTensorRT(cudart)
    install(monkeypatch, cudart, trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"earlier")
    args = ["build-engine", str(bundle), "--precision", precision, "--sign-key", str(signing_key)]
    args += [
        "--max-batch",
        "4",
        "--timing-cache",
        str(cache),
        "--calibration-images",
        str(sample_root / "train" / "good"),
    ]
    args += ["--search-precision", search] if pinned else []
    assert main(args) == 0, capsys.readouterr().err
    manifest = verify_bundle(bundle, trusted(signing_key))
    (engine,) = manifest.engines
    assert engine.file == f"engines/nvidia-h200-sm90-trt10.3.0-{precision}.plan" and engine.max_batch == 4
    assert engine.search_precision == search
    assert engine.parity.verdicts_changed == 0 and engine.parity.n_verdicts == 8 + 16  # golden + calibration images
    assert cache.read_bytes() == b"earlier+tuned"
    config = trt.built[0].config
    assert config.profiles[0].shapes["image"] == ((1, 256, 256, 1), (4, 256, 256, 1), (4, 256, 256, 1))
    assert ("TF32" in config.flags) == (precision != "fp32")
    assert ("FP16" in config.flags) == (precision != "fp32") and ("INT8" in config.flags) == (precision == "int8")
    layers = {layer.name: layer for layer in trt.built[0].network.layers}
    assert layers["/MatMul"].precision == pinned and ("OBEY_PRECISION_CONSTRAINTS" in config.flags) == bool(pinned)
    if pinned:
        assert layers["/ReduceMin"].output_types == {0: pinned}
        backbone = [layer for name, layer in layers.items() if name.startswith("/embedder/") and name.endswith("Conv")]
        assert backbone and all(layer.precision is None for layer in backbone)
    if precision == "int8":
        assert trt.built[0].calibration_batches == [4, 4, 4, 4]
    assert not cudart.device_memory and not cudart.host  # the calibrator and the checking back end freed theirs
    assert "verdicts unchanged" in capsys.readouterr().out


def test_an_engine_that_fails_parity_is_not_added(bundle, signing_key, monkeypatch, capsys):
    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart, score_scale=1.02))
    assert main(["build-engine", str(bundle), "--precision", "fp16", "--sign-key", str(signing_key)]) == 2
    assert "does not match ONNX Runtime" in capsys.readouterr().err
    assert verify_bundle(bundle, trusted(signing_key)).engines == () and not (bundle / "engines").exists()


def test_a_tensorrt_without_int8_calibration_is_told_apart(bundle, signing_key, sample_root, monkeypatch, capsys):
    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart, version="11.0.0", with_int8=False))
    args = ["build-engine", str(bundle), "--precision", "int8", "--sign-key", str(signing_key)]
    assert main([*args, "--calibration-images", str(sample_root / "train" / "good")]) == 2
    assert "has no builder flag INT8" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_real_engine_matches_onnx_runtime_on_this_gpu(bundle, signing_key, capsys):
    pytest.importorskip("tensorrt")
    from lineguard.agent.engine.gpu import detect_gpu

    if detect_gpu() is None:
        pytest.skip("no CUDA GPU here")
    assert main(["build-engine", str(bundle), "--precision", "fp32", "--sign-key", str(signing_key)]) == 0, (
        capsys.readouterr().err
    )
    (engine,) = verify_bundle(bundle, trusted(signing_key)).engines
    assert engine.parity.max_score_rel_diff <= 1e-3


def test_int8_calibration_needs_at_least_one_whole_batch_of_images(
    bundle, signing_key, sample_root, monkeypatch, capsys
):
    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart))
    args = ["build-engine", str(bundle), "--precision", "int8", "--sign-key", str(signing_key), "--max-batch", "32"]
    assert main([*args, "--calibration-images", str(sample_root / "train" / "good")]) == 2
    assert "whole batches of 32 (--max-batch): give at least that many images, got 16" in capsys.readouterr().err
