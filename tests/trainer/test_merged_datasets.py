"""Several datasets at once: the original plus exports of line samples, merged with every image keeping its split."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.trainer import pipeline
from lineguard.trainer.data import discover_dataset, load_images
from lineguard.trainer.errors import DatasetError


def write_export(root: Path, *, size: int = 96, n_ok: int = 4, n_nok: int = 2) -> Path:
    """An export-like folder: ok in train/good and calibration/good, defects in calibration/ and test/, no masks."""
    rng = np.random.default_rng(1)
    layout = {"train/good": n_ok // 2, "calibration/good": n_ok - n_ok // 2, "calibration/crack": n_nok // 2}
    layout["test/crack"] = n_nok - n_nok // 2
    for folder, count in layout.items():
        if count:
            (root / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            cv2.imwrite(str(root / folder / f"s{index}.png"), rng.integers(0, 256, (size, size), dtype=np.uint8))
    return root


def test_a_merge_keeps_each_image_s_split_and_source_and_its_digest_covers_every_part(sample_root, tmp_path):
    export = write_export(tmp_path / "export")
    data = pipeline.DataOptions(sample_root, extra=(export,))
    merged = pipeline._discover(data)
    original = discover_dataset(sample_root)
    assert merged.name == "brick+export" and len(merged.parts) == 2
    assert len(merged.train) == len(original.train) + 2
    assert len(merged.calibration) == len(original.calibration) + 3 and len(merged.test) == len(original.test) + 1
    assert {s.source for s in merged.train if s.path.is_relative_to(export)} == {1}
    assert {s.source for s in merged.train if s.path.is_relative_to(sample_root)} == {0}
    digest = merged.digest()
    assert digest not in (original.digest(), discover_dataset(export, partial=True).digest())
    cv2.imwrite(str(export / "train" / "good" / "s0.png"), np.zeros((96, 96), np.uint8))
    assert pipeline._discover(data).digest() != digest  # the digest names the exact data of every part
    assert any("Merged 2 datasets" in note for note in merged.notes)


def test_each_dataset_of_a_merge_keeps_its_own_image_size(sample_root, tmp_path):
    export = write_export(tmp_path / "export", size=96)  # the original's images are 256x256
    merged = pipeline._discover(pipeline.DataOptions(sample_root, extra=(export,)))
    images = load_images(merged.train, height=64, width=64, channels=1, source_size=(256, 256))
    assert images.shape == (len(merged.train), 64, 64, 1)
    cv2.imwrite(str(export / "train" / "good" / "odd.png"), np.zeros((80, 96), np.uint8))
    with pytest.raises(DatasetError, match="this dataset's images are 96x80: crop or resize"):
        load_images(
            pipeline._discover(pipeline.DataOptions(sample_root, extra=(export,))).train,
            height=64,
            width=64,
            channels=1,
        )


def test_an_export_with_only_defects_can_be_merged_but_not_trained_on_alone(sample_root, tmp_path):
    export = write_export(tmp_path / "export", n_ok=0, n_nok=4)
    merged = pipeline._discover(pipeline.DataOptions(sample_root, extra=(export,)))
    assert sum(s.label for s in merged.calibration + merged.test) > sum(
        s.label for s in discover_dataset(sample_root).calibration + discover_dataset(sample_root).test
    )
    with pytest.raises(DatasetError, match="has no train/good folder"):
        discover_dataset(export)


def test_an_empty_extra_dataset_is_refused_naming_it(sample_root, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        pipeline._discover(pipeline.DataOptions(sample_root, extra=(tmp_path / "empty",)))


def test_the_cli_takes_several_datasets(sample_root, tmp_path):
    from lineguard.trainer.__main__ import _data_options, build_parser

    args = build_parser().parse_args(
        ["evaluate", str(sample_root), str(tmp_path / "a"), str(tmp_path / "b"), "--out", "x"]
    )
    assert _data_options(args).paths == (sample_root, tmp_path / "a", tmp_path / "b")
