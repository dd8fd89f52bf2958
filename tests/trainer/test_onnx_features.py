"""Training-time feature extraction in ONNX Runtime gives torch's features."""

import numpy as np
import pytest
import torch

from lineguard.trainer.errors import ModelError
from lineguard.trainer.models.fastflow import FastFlow, FastFlowConfig, _RawFeatures
from lineguard.trainer.models.patchcore import PatchCoreConfig, PatchEmbedder
from lineguard.trainer.onnx_features import extract_feature_maps, extract_features


def test_onnx_runtime_features_match_torch_across_batches():
    embedder = PatchEmbedder(PatchCoreConfig(input_height=64, input_width=96, channels=1))
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 96, 1), dtype=np.uint8)
    features = extract_features(embedder, images, batch_size=2)  # batches of 2, 2 and 1
    with torch.inference_mode():
        expected = embedder(torch.from_numpy(images))
    assert features.shape == expected.shape == (5, embedder.feature_dim, 8, 12)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("images", [np.zeros((0, 64, 64, 1), np.uint8), np.zeros((2, 64, 64, 1), np.float32)])
def test_empty_or_non_uint8_images_are_refused(images):
    embedder = PatchEmbedder(PatchCoreConfig(input_height=64, input_width=64, channels=1))
    with pytest.raises(ModelError, match="uint8"):
        extract_features(embedder, images)


def test_a_module_with_one_output_per_stage_gets_each_stage_back_in_its_shape():
    backbone = _RawFeatures(FastFlow(FastFlowConfig(input_height=64, input_width=96, channels=1)))
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 96, 1), dtype=np.uint8)
    stages = extract_feature_maps(backbone, images, batch_size=2)
    with torch.inference_mode():
        expected = backbone(torch.from_numpy(images))
    assert len(stages) == len(expected) > 1
    for got, want in zip(stages, expected, strict=True):
        assert got.shape == want.shape and got.shape[0] == 3
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="uint8"):
        extract_feature_maps(backbone, images.astype(np.float32))
