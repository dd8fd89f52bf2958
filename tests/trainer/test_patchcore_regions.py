"""Position-aware PatchCore (regions > 1): each patch is searched only against the bank of its own grid region."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lineguard.trainer.errors import ModelError
from lineguard.trainer.export import check_parity, export_onnx
from lineguard.trainer.models.patchcore import (
    PatchCoreConfig,
    build_patchcore,
    fit_patchcore,
    from_regions,
    to_regions,
)
from lineguard.trainer.scoring import score_images

SIZE = 128


def aligned_parts(n: int, seed: int, bar_rows: tuple[int, int] = (24, 32)) -> np.ndarray:
    """Grey parts as a fixtured camera sees them: a noisy bright surface with one dark bar (a busbar) at bar_rows."""
    rng = np.random.default_rng(seed)
    images = rng.normal(180, 12, (n, SIZE, SIZE, 1)).clip(0, 255)
    images[:, bar_rows[0] : bar_rows[1]] = rng.normal(50, 8, (n, bar_rows[1] - bar_rows[0], SIZE, 1)).clip(0, 255)
    return images.astype(np.uint8)


def moved_bar(images: np.ndarray) -> np.ndarray:
    """The same parts with their bar also painted where no part has one (the lower half)."""
    moved = images.copy()
    moved[:, 88:96] = images[:, 24:32]
    return moved


@pytest.fixture(scope="module")
def models():
    train = aligned_parts(8, seed=0)
    common = {"input_height": SIZE, "input_width": SIZE, "channels": 1, "max_bank_size": 512}
    return {r: fit_patchcore(PatchCoreConfig(regions=r, **common), train) for r in (1, 2)}


def test_a_patch_normal_elsewhere_but_out_of_place_scores_high_only_with_regions(models):
    good, bad = aligned_parts(4, seed=1), moved_bar(aligned_parts(4, seed=1))
    margins = {}
    for regions, model in models.items():
        good_scores, _ = score_images(model, good)
        bad_scores, bad_maps = score_images(model, bad)
        margins[regions] = float(bad_scores.min() / good_scores.max())
        if regions == 2:
            peak_rows = bad_maps.reshape(4, -1).argmax(axis=1) // SIZE
            assert np.all((peak_rows >= 72) & (peak_rows < 112))  # the moved bar, not the real one
    assert margins[2] > 1.5, margins  # every moved bar clearly above every good part
    assert margins[2] > 1.5 * margins[1], margins  # the global bank holds bar patches: it notices far less


def test_region_layout_round_trips_and_keeps_blocks_together():
    features = torch.arange(2 * 3 * 8 * 4, dtype=torch.float32).reshape(2, 3, 8, 4)
    blocks = to_regions(features, 2)
    assert blocks.shape == (2, 4, 8, 3)  # 2x2 regions of 4x2 patches, 3 channels
    torch.testing.assert_close(blocks[:, 1, 0], features[:, :, 0, 2])  # region (0, 1) starts at column 2
    torch.testing.assert_close(blocks[:, 2, 0], features[:, :, 4, 0])  # region (1, 0) starts at row 4
    torch.testing.assert_close(from_regions(blocks[..., 0], 2, 8, 4), features[:, :1])


def test_the_bank_holds_one_block_per_region_and_survives_a_reload(models):
    model = models[2]
    assert model.bank_size % 4 == 0
    rebuilt = build_patchcore(model.config, model.state_dict())
    images = aligned_parts(2, seed=5)
    torch.testing.assert_close(rebuilt(torch.from_numpy(images))[0], model(torch.from_numpy(images))[0])


def test_onnx_export_of_a_position_aware_model_matches_torch(models, tmp_path: Path):
    path = export_onnx(models[2], tmp_path / "m.onnx", height=SIZE, width=SIZE, channels=1)
    report = check_parity(models[2], path, moved_bar(aligned_parts(3, seed=2)))
    assert report.max_score_rel_diff <= 1e-4


@pytest.mark.parametrize("regions", [0, 3])
def test_regions_that_do_not_divide_the_patch_grid_are_refused(regions):
    with pytest.raises(ModelError, match="regions must be >= 1 and divide the 16x16 patch grid"):
        PatchCoreConfig(input_height=SIZE, input_width=SIZE, regions=regions)
