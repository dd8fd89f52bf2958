from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.agent.config import RoiConfig
from lineguard.agent.model_input import Preprocessor
from lineguard.trainer.data import (
    Sample,
    discover_dataset,
    load_images,
    load_masks,
    stratified_split,
)
from lineguard.trainer.errors import DatasetError


def write_image(path: Path, value: int = 100, size: tuple[int, int] = (40, 48), channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size if channels == 1 else (*size, channels)
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def make_mvtec(root: Path, *, calibration: bool = False, masks: bool = True) -> Path:
    for i in range(4):
        write_image(root / "train" / "good" / f"{i:03d}.png")
    splits = ["test", "calibration"] if calibration else ["test"]
    for split in splits:
        for i in range(4):
            write_image(root / split / "good" / f"{i:03d}.png")
            write_image(root / split / "scratch" / f"{i:03d}.png", value=200)
            if masks:
                folder = "ground_truth" if split == "test" else "calibration_ground_truth"
                mask = np.zeros((40, 48), np.uint8)
                mask[10:20, 10:20] = 255
                (root / folder / "scratch").mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / folder / "scratch" / f"{i:03d}_mask.png"), mask)
    return root


def test_an_mvtec_folder_without_calibration_gets_a_seeded_stratified_split(tmp_path):
    dataset = discover_dataset(make_mvtec(tmp_path / "part"), calibration_fraction=0.5, seed=1)
    assert len(dataset.train) == 4
    assert sorted(s.defect_type for s in dataset.calibration) == ["good", "good", "scratch", "scratch"]
    assert sorted(s.defect_type for s in dataset.test) == ["good", "good", "scratch", "scratch"]
    assert not {s.path for s in dataset.calibration} & {s.path for s in dataset.test}
    assert "No calibration/ folder" in dataset.notes[0]
    again = discover_dataset(tmp_path / "part", calibration_fraction=0.5, seed=1)
    assert again.calibration == dataset.calibration


def test_an_mvtec_calibration_folder_is_used_with_its_own_masks(tmp_path):
    dataset = discover_dataset(make_mvtec(tmp_path / "part", calibration=True))
    assert len(dataset.calibration) == 8 and len(dataset.test) == 8
    defect = next(s for s in dataset.calibration if s.label == 1)
    assert defect.mask_path is not None and "calibration_ground_truth" in str(defect.mask_path)
    assert all(s.mask_path is None for s in dataset.calibration if s.label == 0)


def test_masks_load_as_booleans_at_the_model_size(tmp_path):
    dataset = discover_dataset(make_mvtec(tmp_path / "part", calibration=True))
    masks = load_masks(dataset.test, height=20, width=24, source_size=(40, 48))
    assert masks is not None and masks.shape == (8, 20, 24) and masks.dtype == bool
    labels = np.array([s.label for s in dataset.test])
    assert masks[labels == 1].any(axis=(1, 2)).all()
    assert not masks[labels == 0].any()


def test_a_split_without_masks_has_none(tmp_path):
    dataset = discover_dataset(make_mvtec(tmp_path / "part", masks=False))
    assert load_masks(dataset.test, height=20, width=24, source_size=(40, 48)) is None


def test_images_load_resized_with_the_requested_channels(tmp_path):
    write_image(tmp_path / "a.png", channels=3)
    write_image(tmp_path / "b.png", channels=1)
    from lineguard.trainer.data import Sample

    samples = (Sample(tmp_path / "a.png", 0, "good"), Sample(tmp_path / "b.png", 0, "good"))
    assert load_images(samples, height=32, width=32, channels=3).shape == (2, 32, 32, 3)
    assert load_images(samples, height=32, width=32, channels=1).shape == (2, 32, 32, 1)


def test_a_missing_dataset_says_what_to_pass(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover_dataset(tmp_path / "nope")


def test_a_folder_without_train_good_explains_the_layout(tmp_path):
    (tmp_path / "part" / "test").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train/good"):
        discover_dataset(tmp_path / "part")


def test_a_missing_test_folder_is_refused(tmp_path):
    write_image(tmp_path / "part" / "train" / "good" / "0.png")
    with pytest.raises(DatasetError, match="no test folder"):
        discover_dataset(tmp_path / "part")


def test_an_empty_class_folder_is_named(tmp_path):
    root = make_mvtec(tmp_path / "part")
    (root / "test" / "crack").mkdir()
    with pytest.raises(DatasetError, match=r"test/crack holds no images"):
        discover_dataset(root)


def test_a_mask_without_its_image_is_named(tmp_path):
    root = make_mvtec(tmp_path / "part")
    cv2.imwrite(str(root / "ground_truth" / "scratch" / "099_mask.png"), np.zeros((40, 48), np.uint8))
    with pytest.raises(DatasetError, match=r"099_mask\.png has no image"):
        discover_dataset(root)


def test_an_unreadable_image_is_named_with_the_fix(tmp_path):
    root = make_mvtec(tmp_path / "part")
    bad = root / "train" / "good" / "002.png"
    bad.write_bytes(b"not a png")
    dataset = discover_dataset(root)
    with pytest.raises(DatasetError, match=r"cannot read image .*002.png.*replace or delete"):
        load_images(dataset.train, height=32, width=32, channels=1)


def test_an_odd_sized_image_is_named_with_the_expected_size(tmp_path):
    root = make_mvtec(tmp_path / "part")
    write_image(root / "train" / "good" / "003.png", size=(30, 30))
    dataset = discover_dataset(root)
    with pytest.raises(DatasetError, match=r"003.png is 30x30, but this dataset's images are 48x40"):
        load_images(dataset.train, height=32, width=32, channels=1)


def test_a_mask_of_another_size_than_its_image_is_refused(tmp_path):
    root = make_mvtec(tmp_path / "part")
    cv2.imwrite(str(root / "ground_truth" / "scratch" / "000_mask.png"), np.zeros((10, 10), np.uint8))
    dataset = discover_dataset(root)
    with pytest.raises(DatasetError, match="must match their images"):
        load_masks(dataset.test + dataset.calibration, height=20, width=24, source_size=(40, 48))


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_csv_manifest_with_splits_and_masks_is_read(tmp_path):
    for name in ("g0", "g1", "g2", "c0", "t0"):
        write_image(tmp_path / "img" / f"{name}.png")
    write_image(tmp_path / "img" / "d0.png", value=250)
    write_image(tmp_path / "img" / "d1.png", value=250)
    write_image(tmp_path / "img" / "d0_mask.png", value=255)
    manifest = write_csv(
        tmp_path / "parts.csv",
        [
            "path,label,mask,split",
            "img/g0.png,ok,,train",
            "img/g1.png,ok,,train",
            "img/g2.png,OK,,train",
            "img/c0.png,ok,,calibration",
            "img/d0.png,nok,img/d0_mask.png,calibration",
            "img/t0.png,ok,,test",
            "img/d1.png,nok,,test",
        ],
    )
    dataset = discover_dataset(manifest)
    assert (len(dataset.train), len(dataset.calibration), len(dataset.test)) == (3, 2, 2)
    assert dataset.calibration[1].mask_path == tmp_path / "img" / "d0_mask.png"
    assert dataset.name == "parts"


def test_a_csv_without_a_split_column_is_split_seeded_and_says_so(tmp_path):
    rows = ["path,label"]
    for i in range(10):
        write_image(tmp_path / f"g{i}.png")
        rows.append(f"g{i}.png,ok")
    for i in range(4):
        write_image(tmp_path / f"d{i}.png", value=250)
        rows.append(f"d{i}.png,nok")
    dataset = discover_dataset(write_csv(tmp_path / "all.csv", rows), seed=4)
    assert len(dataset.train) == 6 and all(s.label == 0 for s in dataset.train)
    assert sum(s.label for s in dataset.calibration) == 2 and sum(s.label for s in dataset.test) == 2
    assert "no split column" in dataset.notes[0]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["file,label", "a.png,ok"], "header must be path,label"),
        (["path,label", "a.png,maybe"], r"all.csv:2: label 'maybe' must be ok or nok"),
        (["path,label", "missing.png,ok"], r"all.csv:2: image .*missing.png does not exist"),
        (["path,label,split", "a.png,ok,holdout"], "split 'holdout' is not one of"),
        (["path,label,mask", "a.png,ok,nomask.png"], "mask .*nomask.png does not exist"),
        (["path,label"], "lists no images"),
        (["path,label,split", "a.png,nok,train", "a.png,ok,test"], "train split holds defect"),
    ],
)
def test_bad_csv_manifests_name_the_line_and_the_fix(tmp_path, rows, message):
    write_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=message):
        discover_dataset(write_csv(tmp_path / "all.csv", rows))


def test_stratified_split_keeps_every_class_on_both_sides():
    from lineguard.trainer.data import Sample

    samples = tuple(Sample(Path(f"{t}{i}.png"), int(t != "good"), t) for t in ("good", "crack") for i in range(5))
    first, rest = stratified_split(samples, 0.5, seed=0)
    for side in (first, rest):
        assert {s.defect_type for s in side} == {"good", "crack"}
    assert len(first) + len(rest) == 10


def test_labelled_defects_in_train_are_refused_for_one_class_models_and_read_for_fcdd(tmp_path):
    root = make_mvtec(tmp_path / "parts")
    write_image(root / "train" / "scratch" / "s0.png", value=250)
    with pytest.raises(DatasetError, match="train fcdd"):
        discover_dataset(root)
    dataset = discover_dataset(root, allow_train_defects=True)
    defects = [s for s in dataset.train if s.label == 1]
    assert [(s.path.name, s.defect_type) for s in defects] == [("s0.png", "scratch")]


# -- the trainer and the agent feed a model the same bytes ---------------------------------------------------------

ROI = RoiConfig(x=37, y=21, width=250, height=190)  # 250 x 190 -> 80 x 64: non-integer area factors


def scene(height: int = 300, width: int = 400) -> np.ndarray:
    """(height, width, 3) uint8 RGB: gradients plus seeded noise, so every rounding of the resize shows."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(7).integers(0, 64, (height, width, 3))
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=2)
    return ((base + noise) % 256).astype(np.uint8)


def camera_frame(rgb: np.ndarray, pixel_format: str) -> np.ndarray:
    """The scene as a camera with this pixel format puts it into its ring slot: (H, W, C) uint8."""
    if pixel_format == "mono8":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None]
    return rgb if pixel_format == "rgb8" else np.ascontiguousarray(rgb[:, :, ::-1])


def saved_roi(frame: np.ndarray, pixel_format: str, path: Path) -> Path:
    """The frame's ROI saved as a training image, as it would be collected from that camera (PNG: lossless)."""
    region = frame[ROI.y : ROI.y + ROI.height, ROI.x : ROI.x + ROI.width]
    on_disk = {"mono8": region[:, :, 0], "rgb8": region[:, :, ::-1], "bgr8": region}[pixel_format]
    assert cv2.imwrite(str(path), np.ascontiguousarray(on_disk))
    return path


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("pixel_format", ["mono8", "rgb8", "bgr8"])
def test_the_trainer_and_the_agent_make_byte_identical_model_input(tmp_path, pixel_format, channels):
    frame = camera_frame(scene(), pixel_format)
    input_shape = (64, 80, channels)
    agent = Preprocessor(ROI, frame.shape, input_shape, pixel_format)(frame, np.empty(input_shape, np.uint8))
    sample = Sample(saved_roi(frame, pixel_format, tmp_path / "roi.png"), 0, "good")
    trainer = load_images((sample,), height=64, width=80, channels=channels)[0]
    assert trainer.shape == agent.shape == input_shape
    assert trainer.tobytes() == agent.tobytes()


@pytest.mark.parametrize("channels", [1, 3])
def test_a_scene_reaches_the_model_the_same_from_an_rgb8_or_a_bgr8_camera(channels):
    rgb = scene()
    input_shape = (64, 80, channels)
    inputs = [
        Preprocessor(ROI, rgb.shape, input_shape, fmt)(camera_frame(rgb, fmt), np.empty(input_shape, np.uint8))
        for fmt in ("rgb8", "bgr8")
    ]
    assert inputs[0].tobytes() == inputs[1].tobytes()
