"""PatchCore on small real textures: fitting, scoring, persistence, and ONNX parity."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from skimage import data as skdata

from lineguard.trainer.errors import ExportError, ModelError
from lineguard.trainer.export import (
    OUTPUT_NAMES,
    check_parity,
    compare_outputs,
    cpu_session,
    export_onnx,
    store_exact_halves,
)
from lineguard.trainer.models.patchcore import PatchCore, PatchCoreConfig, PatchEmbedder, fit_patchcore, to_regions
from lineguard.trainer.scoring import score_images


def crops(channels: int, n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    texture = skdata.gravel() if channels == 1 else skdata.astronaut()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, texture.shape[0] - size, 2)
        patch = texture[y : y + size, x : x + size]
        out.append(patch.reshape(size, size, channels))
    return np.stack(out).astype(np.uint8)


@pytest.fixture(scope="module")
def grey_model():
    config = PatchCoreConfig(input_height=64, input_width=64, channels=1, max_bank_size=256)
    return fit_patchcore(config, crops(1, 8))


def test_few_shot_training_on_eight_images_finds_a_missing_region():
    config = PatchCoreConfig(input_height=128, input_width=128, channels=1, max_bank_size=1024)
    model = fit_patchcore(config, crops(1, 8, size=128))
    good = crops(1, 4, size=128, seed=9)
    damaged = good.copy()
    damaged[:, 48:80, 40:72] = 60  # a flat, dark missing region
    good_scores, _ = score_images(model, good)
    bad_scores, bad_maps = score_images(model, damaged)
    assert np.all(bad_scores > good_scores.max())
    peak_rows, peak_cols = np.unravel_index(bad_maps.reshape(4, -1).argmax(axis=1), (128, 128))
    assert np.all((peak_rows >= 40) & (peak_rows < 88) & (peak_cols >= 32) & (peak_cols < 80))


def test_outputs_have_the_contract_shapes_and_types(grey_model):
    scores, maps = grey_model(torch.from_numpy(crops(1, 3)))
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    assert scores.dtype == torch.float32 and maps.dtype == torch.float32
    assert torch.all(scores >= 0)


@pytest.mark.parametrize("regions", [1, 2])
def test_the_search_gives_each_patch_its_exact_nearest_distance(regions):
    config = PatchCoreConfig(input_height=64, input_width=64, channels=1, regions=regions)
    embedder = PatchEmbedder(config)
    images = torch.from_numpy(crops(1, 3, seed=4))
    features = embedder(images)
    bank = torch.randn(regions * regions * 50, embedder.feature_dim, generator=torch.Generator().manual_seed(1))
    model = PatchCore(config, embedder, bank)
    blocks = bank.view(regions * regions, 50, -1)
    expected = torch.stack(
        [torch.cdist(patches, blocks).amin(dim=2) for patches in to_regions(features, regions)]
    )  # (N, R*R, P): each patch against its own region's block, brute force
    got = to_regions(model.patch_distances(images), regions)[..., 0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_float16_bank_whose_norms_overflow_half_is_refused():
    config = PatchCoreConfig(input_height=64, input_width=64, channels=1, bank_dtype="float16")
    embedder = PatchEmbedder(config)
    with pytest.raises(ModelError, match="exceeds float16's range"):
        PatchCore(config, embedder, torch.full((4, embedder.feature_dim), 30.0))


def test_the_bank_is_capped_by_count_and_by_ram():
    config = PatchCoreConfig(coreset_ratio=0.5, max_bank_size=1000, max_bank_mb=0.5, bank_dtype="float16")
    assert config.bank_size_for(100, 152) == 50
    assert config.bank_size_for(100_000, 152) == 1000
    assert config.bank_size_for(100_000, 1024) == 256  # 0.5 MiB / (1024 dims x 2 bytes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_height": 100}, "multiple of 32"),
        ({"channels": 2}, "channels must be 1"),
        ({"coreset_ratio": 0.0}, "coreset_ratio"),
        ({"neighbourhood": 2}, "odd"),
        ({"bank_dtype": "int8"}, "bank_dtype"),
        ({"backbone": "resnet50"}, "unknown backbone"),
        ({"stages": (4, 3)}, "stages must be increasing"),
    ],
)
def test_bad_model_settings_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ModelError, match=message):
        config = PatchCoreConfig(**kwargs)
        fit_patchcore(config, crops(1, 1))


def test_training_images_of_the_wrong_shape_are_refused():
    with pytest.raises(ModelError, match="training images must be"):
        fit_patchcore(PatchCoreConfig(input_height=64, input_width=64, channels=3), crops(1, 2))


@pytest.mark.parametrize(("channels", "bank_dtype"), [(1, "float32"), (3, "float16")])
def test_onnx_export_matches_torch_and_takes_raw_uint8_frames(tmp_path: Path, channels, bank_dtype):
    config = PatchCoreConfig(
        input_height=64, input_width=96, channels=channels, max_bank_size=200, bank_dtype=bank_dtype
    )
    model = fit_patchcore(config, crops(channels, 6, size=96)[:, :64])
    onnx_path = export_onnx(model, tmp_path / "m.onnx", height=64, width=96, channels=channels)
    images = crops(channels, 5, size=96, seed=3)[:, :64]
    report = check_parity(model, onnx_path, images)
    assert report.max_score_rel_diff <= 1e-4
    session = cpu_session(onnx_path)
    (graph_input,) = session.get_inputs()
    assert graph_input.type == "tensor(uint8)" and graph_input.shape[1:] == [64, 96, channels]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    scores, maps = session.run(None, {"image": images[:1]})
    assert scores.shape == (1,) and maps.shape == (1, 64, 96)
    # The bank is in the graph once, as the search matrix (a -2 b column per entry over its |b|^2),
    # at the dtype it was kept in.
    bank_elements = model.search_matrix.numel()
    assert bank_elements == model.memory_bank.numel() + model.bank_size
    stored = [t for t in onnx.load(str(onnx_path)).graph.initializer if np.prod(t.dims) == bank_elements]
    expected = onnx.TensorProto.FLOAT16 if bank_dtype == "float16" else onnx.TensorProto.FLOAT
    assert [t.data_type for t in stored] == [expected]


def test_only_large_initializers_of_exact_halves_are_stored_as_float16(tmp_path: Path):
    halves = np.linspace(-2, 2, 64, dtype=np.float16).astype(np.float32).reshape(8, 8)
    inexact = halves + np.float32(1e-4)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "halves"], ["y"]),
            onnx.helper.make_node("MatMul", ["y", "inexact"], ["z"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 8])],
        [onnx.numpy_helper.from_array(halves, "halves"), onnx.numpy_helper.from_array(inexact, "inexact")],
    )
    path = tmp_path / "g.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    x = np.ones((1, 8), np.float32)
    before = cpu_session(path).run(None, {"x": x})[0]
    assert store_exact_halves(path, min_bytes=64 * 4 + 1) == []  # both below the size floor
    assert store_exact_halves(path, min_bytes=64 * 4) == ["halves"]
    types = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert types == {"halves_float16": onnx.TensorProto.FLOAT16, "inexact": onnx.TensorProto.FLOAT}
    np.testing.assert_array_equal(cpu_session(path).run(None, {"x": x})[0], before)


def test_parity_fails_loudly_when_the_graph_is_not_the_model(grey_model, tmp_path):
    onnx_path = export_onnx(grey_model, tmp_path / "m.onnx", height=64, width=64, channels=1)
    other = fit_patchcore(
        PatchCoreConfig(input_height=64, input_width=64, channels=1, max_bank_size=64), crops(1, 2, seed=7)
    )
    with pytest.raises(ExportError, match="ONNX parity failed"):
        check_parity(other, onnx_path, crops(1, 3))


def test_compare_outputs_applies_relative_score_and_map_tolerances():
    scores, maps = np.array([10.0, 20.0]), np.ones((2, 4, 4))
    compare_outputs(scores, maps, scores * (1 + 5e-5), maps, score_rtol=1e-4, map_rtol=1e-3)
    with pytest.raises(ExportError, match="scores differ"):
        compare_outputs(scores, maps, scores * (1 + 5e-4), maps, score_rtol=1e-4, map_rtol=1e-3)
    with pytest.raises(ExportError, match="output shapes"):
        compare_outputs(scores, maps, scores[:1], maps, score_rtol=1e-4, map_rtol=1e-3)
