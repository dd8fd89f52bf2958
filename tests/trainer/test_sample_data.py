"""The sample-data generator: deterministic, MVTec-shaped, with defects a detector can find."""

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from lineguard.trainer.sample_data import (
    CATEGORIES,
    DEFECT_TYPES,
    SampleDataSpec,
    _render_sample,
    make_sample_dataset,
)

SMALL = SampleDataSpec(
    image_size=64, n_train=3, n_calibration_good=2, n_calibration_defect=5, n_test_good=2, n_test_defect=8
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_same_spec_twice_writes_byte_identical_files(tmp_path):
    make_sample_dataset(tmp_path / "a", spec=SMALL)
    make_sample_dataset(tmp_path / "b", spec=SMALL)

    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first.keys() == second.keys()
    assert first == second


def test_another_seed_gives_other_images(tmp_path):
    make_sample_dataset(tmp_path / "a", categories=["brick"], spec=SMALL)
    make_sample_dataset(tmp_path / "b", categories=["brick"], spec=dataclasses.replace(SMALL, seed=1))

    assert _files(tmp_path / "a") != _files(tmp_path / "b")


def test_layout_is_mvtec_style_with_the_requested_counts(tmp_path):
    written = make_sample_dataset(tmp_path, categories=["brick", "grass"], spec=SMALL)

    assert written == [tmp_path / "brick", tmp_path / "grass"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brick", "grass"]
    root = tmp_path / "brick"
    names = {str(p.relative_to(root)) for p in root.rglob("*.png")}
    expected = {f"train/good/{i:03d}.png" for i in range(3)}
    expected |= {f"calibration/good/{i:03d}.png" for i in range(2)}
    expected |= {f"test/good/{i:03d}.png" for i in range(2)}
    # Defects go round-robin over DEFECT_TYPES: 5 calibration defects are 2 scratches and 1 of each other.
    for defect_type, n_calibration in zip(DEFECT_TYPES, (2, 1, 1, 1), strict=True):
        expected |= {f"calibration/{defect_type}/{i:03d}.png" for i in range(n_calibration)}
        expected |= {f"calibration_ground_truth/{defect_type}/{i:03d}_mask.png" for i in range(n_calibration)}
        expected |= {f"test/{defect_type}/{i:03d}.png" for i in range(2)}
        expected |= {f"ground_truth/{defect_type}/{i:03d}_mask.png" for i in range(2)}
    assert names == expected


def test_every_image_is_single_channel_uint8_of_the_spec_size(tmp_path):
    make_sample_dataset(tmp_path, categories=["gravel"], spec=SMALL)

    for path in (tmp_path / "gravel").rglob("*.png"):
        image = _read(path)
        assert image.shape == (64, 64), path
        assert image.dtype == np.uint8, path


def test_every_defect_image_has_a_non_empty_mask_of_its_size_and_every_mask_an_image(tmp_path):
    make_sample_dataset(tmp_path, spec=SMALL)

    for category in CATEGORIES:
        root = tmp_path / category
        for image_folder, mask_folder in (("calibration", "calibration_ground_truth"), ("test", "ground_truth")):
            images = sorted(p for p in (root / image_folder).glob("*/*.png") if p.parent.name != "good")
            masks = sorted((root / mask_folder).glob("*/*_mask.png"))
            assert [(p.parent.name, p.stem) for p in images] == [
                (m.parent.name, m.stem.removesuffix("_mask")) for m in masks
            ]
            for image_path, mask_path in zip(images, masks, strict=True):
                mask = _read(mask_path)
                assert mask.shape == _read(image_path).shape
                assert set(np.unique(mask)) <= {0, 255}
                assert mask.any(), mask_path


@pytest.mark.parametrize("image_size", [64, 256, 512])
@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_defect_masks_cover_a_small_but_real_part_of_the_image(defect_type, image_size):
    for category_index, category in enumerate(CATEGORIES):
        texture = getattr(skimage_data, category)()
        for image_index in range(4):
            key = (0, category_index, 2, 1, image_index)
            _, mask = _render_sample(texture, key, image_size=image_size, defect_type=defect_type)
            area_ratio = np.count_nonzero(mask) / mask.size
            assert 0.002 < area_ratio < 0.05, (category, image_index, area_ratio)


def test_good_images_differ_from_each_other(tmp_path):
    make_sample_dataset(tmp_path, categories=["brick"], spec=SampleDataSpec(image_size=128, n_train=6))

    goods = [_read(p).astype(np.float32) for p in sorted((tmp_path / "brick" / "train" / "good").glob("*.png"))]
    assert len(goods) == 6
    for i, first in enumerate(goods):
        for second in goods[i + 1 :]:
            assert np.abs(first - second).mean() > 10


@pytest.mark.parametrize("category_index", range(len(CATEGORIES)))
@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_defect_region_differs_from_the_same_surface_without_the_defect(category_index, defect_type):
    texture = getattr(skimage_data, CATEGORIES[category_index])()
    for image_index in range(3):
        key = (0, category_index, 2, 1, image_index)
        defective, mask = _render_sample(texture, key, image_size=256, defect_type=defect_type)
        clean, clean_mask = _render_sample(texture, key, image_size=256, defect_type=None)

        assert not clean_mask.any()
        difference = np.abs(defective.astype(np.float32) - clean.astype(np.float32))
        inside = mask > 0
        assert difference[inside].mean() > 30, (defect_type, image_index, difference[inside].mean())
        assert difference[~inside].mean() < 1.5


def test_one_split_does_not_depend_on_the_counts_of_another(tmp_path):
    make_sample_dataset(tmp_path / "a", categories=["grass"], spec=SampleDataSpec(image_size=64, n_train=1))
    other = SampleDataSpec(image_size=64, n_train=4, n_calibration_good=0, n_test_good=3, n_test_defect=40)
    make_sample_dataset(tmp_path / "b", categories=["grass"], spec=other)

    for name in ("train/good/000.png", "test/good/000.png", "test/crack/000.png", "ground_truth/crack/000_mask.png"):
        assert (tmp_path / "a" / "grass" / name).read_bytes() == (tmp_path / "b" / "grass" / name).read_bytes()


def test_writing_again_replaces_the_category_folder_and_nothing_else(tmp_path):
    make_sample_dataset(tmp_path, categories=["brick"], spec=SMALL)
    (tmp_path / "brick" / "stray.txt").write_text("old")
    (tmp_path / "notes.txt").write_text("keep me")

    make_sample_dataset(tmp_path, categories=["brick"], spec=SampleDataSpec(image_size=64, n_train=1, n_test_defect=0))

    assert not (tmp_path / "brick" / "stray.txt").exists()
    assert not (tmp_path / "brick" / "test" / "scratch").exists()
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_single_category_name_is_accepted_as_well_as_a_list(tmp_path):
    written = make_sample_dataset(tmp_path, categories="gravel", spec=SampleDataSpec(image_size=64, n_train=1))

    assert written == [tmp_path / "gravel"]


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": 63},
        {"image_size": 513},
        {"n_train": 0},
        {"n_calibration_good": -1},
        {"n_test_defect": -3},
        {"seed": -1},
        {"n_test_good": 2.5},
    ],
)
def test_bad_spec_values_raise_value_error(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        SampleDataSpec(**bad)


def test_unknown_category_raises_value_error_naming_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="brick, gravel, grass"):
        make_sample_dataset(tmp_path, categories=["brick", "carpet"], spec=SMALL)

    assert list(tmp_path.iterdir()) == []
