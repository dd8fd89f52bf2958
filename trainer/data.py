"""Datasets: MVTec-style folders or a CSV manifest, validated, split, and loaded as uint8 arrays.

MVTec-style layout (masks optional; `calibration/` optional, HALCON calls it validation):
    DATA/train/good/*.png
    DATA/test/<good|defect-type>/*.png          DATA/ground_truth/<defect-type>/<stem>_mask.png
    DATA/calibration/<good|defect-type>/*.png   DATA/calibration_ground_truth/<defect-type>/<stem>_mask.png
CSV manifest: a header `path,label[,mask][,split]`; label ok|nok; split train|calibration|test;
paths relative to the CSV's folder.
Several datasets merge into one (merge_datasets: the original plus exports of line samples): each image
keeps its split, each dataset keeps its own image size, and the digest covers all of them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lineguard.agent.model_input import PixelFormat, to_model_input

from .errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "calibration", "test")
GOOD = "good"
_MASK_FOLDERS = {"test": "ground_truth", "calibration": "calibration_ground_truth"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of a split. label: 0 = ok, 1 = nok; defect_type is "good" for ok images.

    source: which dataset of a merge the image comes from (0 = the first); images of one source share a size.
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None
    source: int = 0


@dataclass(frozen=True, slots=True)
class Dataset:
    """A validated dataset. `notes` say how splits were made, for the report."""

    name: str
    root: Path
    train: tuple[Sample, ...]
    calibration: tuple[Sample, ...]
    test: tuple[Sample, ...]
    notes: tuple[str, ...] = ()
    parts: tuple[Dataset, ...] = ()  # the datasets a merge was made of (merge_datasets); empty otherwise

    def split(self, name: str) -> tuple[Sample, ...]:
        if name not in SPLITS:
            msg = f"unknown split {name!r}; choose one of {', '.join(SPLITS)}"
            raise DatasetError(msg)
        return getattr(self, name)

    def digest(self) -> str:
        """sha256 over every split, relative path, label and file content: names the exact data.

        A merge: sha256 over its parts' names and digests, in order.
        """
        hasher = hashlib.sha256()
        if self.parts:
            for part in self.parts:
                hasher.update(f"{part.name}\t{part.digest()}\n".encode())
            return hasher.hexdigest()
        for split_name in SPLITS:
            for sample in self.split(split_name):
                relative = sample.path.relative_to(self.root) if sample.path.is_relative_to(self.root) else sample.path
                hasher.update(f"{split_name}\t{relative}\t{sample.label}\t{_file_sha256(sample.path)}\n".encode())
        return hasher.hexdigest()


def discover_dataset(
    path: Path,
    *,
    calibration_fraction: float = 0.5,
    seed: int = 0,
    allow_train_defects: bool = False,
    partial: bool = False,
) -> Dataset:
    """Read an MVTec-style folder or a CSV manifest; derive a calibration split if there is none.

    Labelled defects in the train split (CSV rows `nok,train` or train/<defect-type>/ folders) are
    refused unless allow_train_defects: only semi-supervised models (FCDD) learn from them.
    partial: a dataset merged into another (an export of line samples) may lack splits and folders;
    it needs one image somewhere.
    """
    if not path.exists():
        msg = f"dataset {path} does not exist: pass an MVTec-style folder or a CSV manifest"
        raise DatasetError(msg)
    if not 0.0 < calibration_fraction < 1.0:
        msg = f"calibration_fraction must be in (0, 1), got {calibration_fraction}"
        raise DatasetError(msg)
    if path.is_file():
        dataset = _read_csv_manifest(path, calibration_fraction, seed)
    else:
        dataset = _read_mvtec_folder(path, calibration_fraction, seed, partial=partial)
    if partial:
        if not (dataset.train or dataset.calibration or dataset.test):
            msg = f"{path} holds no images in train/, calibration/ or test/"
            raise DatasetError(msg)
        return dataset
    check_complete(dataset, str(path), allow_train_defects=allow_train_defects)
    return dataset


def check_complete(dataset: Dataset, where: str, *, allow_train_defects: bool) -> None:
    """DatasetError unless train and test hold images, train holds goods, and defects only where allowed."""
    for split_name in ("train", "test"):
        if not dataset.split(split_name):
            msg = f"{where}: the {split_name} split holds no images"
            raise DatasetError(msg)
    if not allow_train_defects and any(s.label == 1 for s in dataset.train):
        msg = (
            f"{where}: the train split holds defect (nok) images; one-class models learn from good images only: "
            "move them to calibration/test, or train fcdd, which can use a few labelled defects"
        )
        raise DatasetError(msg)
    if not any(s.label == 0 for s in dataset.train):
        msg = f"{where}: the train split holds no good (ok) images"
        raise DatasetError(msg)


def merge_datasets(datasets: Sequence[Dataset], *, allow_train_defects: bool = False) -> Dataset:
    """One dataset of several (the original first): every image keeps its split and is tagged with its source.

    The merge must be complete as one dataset would (check_complete); each part keeps its own notes.
    """
    if len(datasets) == 1:
        return datasets[0]
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    notes = [f"Merged {len(datasets)} datasets; each image keeps its split:"]
    for source, part in enumerate(datasets):
        for name in SPLITS:
            splits[name] += [dataclasses.replace(sample, source=source) for sample in part.split(name)]
        counts = ", ".join(f"{len(part.split(name))} {name}" for name in SPLITS)
        notes.append(f"{part.name} ({part.root}): {counts}. " + " ".join(part.notes))
    merged = Dataset(
        "+".join(part.name for part in datasets),
        datasets[0].root,
        train=tuple(splits["train"]),
        calibration=tuple(splits["calibration"]),
        test=tuple(splits["test"]),
        notes=tuple(notes),
        parts=tuple(datasets),
    )
    check_complete(merged, merged.name, allow_train_defects=allow_train_defects)
    return merged


def _read_mvtec_folder(root: Path, calibration_fraction: float, seed: int, *, partial: bool = False) -> Dataset:
    if partial:
        return _read_partial_folder(root, calibration_fraction, seed)
    if not (root / "train" / GOOD).is_dir():
        msg = (
            f"{root} has no train/good folder: an MVTec-style dataset needs DATA/train/good/ with good images "
            "and DATA/test/<good|defect-type>/; or pass a CSV manifest (path,label[,mask][,split])"
        )
        raise DatasetError(msg)
    if not (root / "test").is_dir():
        msg = f"{root} has no test folder: add DATA/test/good/ and DATA/test/<defect-type>/ with labelled images"
        raise DatasetError(msg)
    train = tuple(Sample(p, 0, GOOD) for p in _images_in(root / "train" / GOOD))
    train_defects = sorted(p for p in (root / "train").iterdir() if p.is_dir() and p.name != GOOD)
    train += tuple(Sample(p, 1, folder.name) for folder in train_defects for p in _images_in(folder))
    test = _read_labelled_folder(root, "test")
    notes: list[str] = []
    if (root / "calibration").is_dir():
        calibration = _read_labelled_folder(root, "calibration")
        notes.append("Calibration split: the dataset's calibration/ folder.")
    else:
        calibration, test = stratified_split(test, calibration_fraction, seed)
        notes.append(
            f"No calibration/ folder: calibration is a seeded (seed {seed}) stratified {calibration_fraction:.0%} "
            f"of test/ ({len(calibration)} images); the test metrics use the other {len(test)}."
        )
    return Dataset(root.name, root, train, calibration, test, tuple(notes))


def _read_partial_folder(root: Path, calibration_fraction: float, seed: int) -> Dataset:
    """An MVTec-style folder whose train/, calibration/ or test/ may be missing (an export of line samples)."""
    if not root.is_dir():
        msg = f"{root} is neither a folder nor a CSV manifest"
        raise DatasetError(msg)
    train_dirs = sorted(p for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    train = tuple(Sample(p, 0 if d.name == GOOD else 1, d.name) for d in train_dirs for p in _images_in(d))
    test = _read_labelled_folder(root, "test") if (root / "test").is_dir() else ()
    if (root / "calibration").is_dir():
        calibration = _read_labelled_folder(root, "calibration")
        notes = ("Calibration split: the dataset's calibration/ folder.",)
    else:
        calibration, test = stratified_split(test, calibration_fraction, seed)
        notes = (f"No calibration/ folder: a seeded (seed {seed}) stratified {calibration_fraction:.0%} of test/.",)
    return Dataset(root.name, root, train, calibration, test, notes)


def _read_labelled_folder(root: Path, split_name: str) -> tuple[Sample, ...]:
    """Samples of split_name/<class>/, with masks from its ground-truth folder."""
    split_dir = root / split_name
    mask_dir = root / _MASK_FOLDERS[split_name]
    samples: list[Sample] = []
    image_stems: set[tuple[str, str]] = set()
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        images = _images_in(class_dir)
        label = 0 if class_dir.name == GOOD else 1
        for image in images:
            mask = _find_mask(mask_dir / class_dir.name, image.stem) if label else None
            samples.append(Sample(image, label, class_dir.name, mask))
            image_stems.add((class_dir.name, image.stem))
    if not samples:
        msg = f"{split_dir} holds no class folders with images: add {split_name}/good/ and {split_name}/<defect-type>/"
        raise DatasetError(msg)
    _check_masks_have_images(mask_dir, image_stems)
    return tuple(samples)


def _images_in(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        msg = f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the empty folder"
        raise DatasetError(msg)
    return images


def _find_mask(folder: Path, stem: str) -> Path | None:
    for suffix in (".png", ".bmp", ".tif", ".tiff"):
        candidate = folder / f"{stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _check_masks_have_images(mask_dir: Path, image_stems: set[tuple[str, str]]) -> None:
    if not mask_dir.is_dir():
        return
    for mask in sorted(mask_dir.glob("*/*_mask.*")):
        key = (mask.parent.name, mask.name.rsplit("_mask", 1)[0])
        if key not in image_stems:
            msg = f"mask {mask} has no image {mask_dir.parent.name}/.../{key[0]}/{key[1]}.*: remove the mask or add its image"
            raise DatasetError(msg)


def stratified_split(
    samples: tuple[Sample, ...], fraction: float, seed: int
) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    """Split samples into (first, rest) with `fraction` of each defect type in first, seeded."""
    rng = np.random.default_rng(seed)
    first: list[Sample] = []
    rest: list[Sample] = []
    for defect_type in sorted({s.defect_type for s in samples}):
        group = [s for s in samples if s.defect_type == defect_type]
        order = rng.permutation(len(group))
        n_first = round(fraction * len(group))
        if len(group) >= 2:
            n_first = min(max(n_first, 1), len(group) - 1)
        first.extend(group[i] for i in sorted(order[:n_first]))
        rest.extend(group[i] for i in sorted(order[n_first:]))
    return tuple(first), tuple(rest)


def _read_csv_manifest(csv_path: Path, calibration_fraction: float, seed: int) -> Dataset:
    base = csv_path.parent
    rows = _read_csv_rows(csv_path)
    has_split = "split" in rows[0][1]
    by_split: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    unsplit: list[Sample] = []
    for line_number, row in rows:
        sample = _csv_sample(csv_path, line_number, row, base)
        if has_split:
            split_name = row["split"].strip().lower()
            if split_name not in SPLITS:
                msg = f"{csv_path}:{line_number}: split {row['split']!r} is not one of {', '.join(SPLITS)}"
                raise DatasetError(msg)
            by_split[split_name].append(sample)
        else:
            unsplit.append(sample)
    notes = ["Splits: the CSV manifest's split column."]
    if not has_split:
        good = tuple(s for s in unsplit if s.label == 0)
        defects = tuple(s for s in unsplit if s.label == 1)
        train, held_out = stratified_split(good, 0.6, seed)
        by_split["train"] = list(train)
        calibration, test = stratified_split(held_out + defects, calibration_fraction, seed)
        by_split["calibration"], by_split["test"] = list(calibration), list(test)
        notes = [
            f"The CSV has no split column: 60% of ok images train; the rest and all nok images are split "
            f"{calibration_fraction:.0%} calibration / test, stratified and seeded (seed {seed})."
        ]
    if has_split and not by_split["calibration"]:
        calibration, test = stratified_split(tuple(by_split["test"]), calibration_fraction, seed)
        by_split["calibration"], by_split["test"] = list(calibration), list(test)
        notes = [
            f"No calibration rows: calibration is a seeded stratified {calibration_fraction:.0%} of the test rows."
        ]
    return Dataset(
        csv_path.stem,
        base,
        train=tuple(by_split["train"]),
        calibration=tuple(by_split["calibration"]),
        test=tuple(by_split["test"]),
        notes=tuple(notes),
    )


def _read_csv_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not {"path", "label"} <= columns or not columns <= {"path", "label", "mask", "split"}:
            msg = f"{csv_path}: the header must be path,label[,mask][,split], got {','.join(reader.fieldnames or [])}"
            raise DatasetError(msg)
        rows = [(reader.line_num, row) for row in reader]
    if not rows:
        msg = f"{csv_path} lists no images: add rows path,label"
        raise DatasetError(msg)
    return rows


def _csv_sample(csv_path: Path, line_number: int, row: dict[str, str], base: Path) -> Sample:
    label_text = (row.get("label") or "").strip().lower()
    if label_text not in ("ok", "nok"):
        msg = f"{csv_path}:{line_number}: label {row.get('label')!r} must be ok or nok"
        raise DatasetError(msg)
    image = base / (row.get("path") or "").strip()
    if not image.is_file():
        msg = f"{csv_path}:{line_number}: image {image} does not exist; fix the path (relative to the CSV's folder)"
        raise DatasetError(msg)
    mask_text = (row.get("mask") or "").strip()
    mask = base / mask_text if mask_text else None
    if mask is not None and not mask.is_file():
        msg = f"{csv_path}:{line_number}: mask {mask} does not exist; fix the path or leave the mask column empty"
        raise DatasetError(msg)
    label = 1 if label_text == "nok" else 0
    return Sample(image, label, "nok" if label else GOOD, mask)


def read_image(path: Path) -> np.ndarray:
    """Decode one image as (H, W) grey or (H, W, 3) RGB uint8; a clear error if it cannot be."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        msg = f"cannot read image {path}: the file is corrupt or not an image; replace or delete it"
        raise DatasetError(msg)
    if image.dtype != np.uint8:
        msg = f"image {path} is {image.dtype}; only 8-bit images are supported: convert it to 8-bit"
        raise DatasetError(msg)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(image, code)
    return image


def decoded_format(image: np.ndarray) -> PixelFormat:
    """The pixel format of a trainer image (read_image's or a model input): mono8 for (H, W) or (H, W, 1), else rgb8."""
    return "mono8" if image.ndim == 2 or image.shape[2] == 1 else "rgb8"


def detect_channels(samples: tuple[Sample, ...]) -> int:
    """1 when the first image is grey, else 3."""
    return 1 if read_image(samples[0].path).ndim == 2 else 3


def load_images(
    samples: tuple[Sample, ...], *, height: int, width: int, channels: int, source_size: tuple[int, int] | None = None
) -> np.ndarray:
    """(N, height, width, channels) uint8 model input, by the agent's rule (agent/model_input.py).

    source_size: (h, w) every image of the first source must have; defaults to its first image's size.
    Mixed sizes within a source are refused: a line camera delivers one size, and the model must see it the
    same way. Each other source of a merge (Sample.source) must be of one size too, its own.
    """
    out = np.empty((len(samples), height, width, channels), np.uint8)
    sizes: dict[int, tuple[int, int]] = {0: source_size} if source_size else {}
    for index, sample in enumerate(samples):
        image = read_image(sample.path)
        expected = sizes.setdefault(sample.source, image.shape[:2])
        if image.shape[:2] != expected:
            msg = (
                f"image {sample.path} is {image.shape[1]}x{image.shape[0]}, but this dataset's images are "
                f"{expected[1]}x{expected[0]}: crop or resize all images to one size, or split the dataset"
            )
            raise DatasetError(msg)
        to_model_input(image, pixel_format=decoded_format(image), input_shape=(height, width, channels), out=out[index])
    return out


def load_masks(
    samples: tuple[Sample, ...], *, height: int, width: int, source_size: tuple[int, int]
) -> np.ndarray | None:
    """(N, height, width) bool ground truth, or None when no sample of the split has a mask.

    source_size: (h, w) of the split's images (load_images checked they all share it).
    """
    if not any(s.mask_path for s in samples):
        return None
    masks = np.zeros((len(samples), height, width), bool)
    for index, sample in enumerate(samples):
        if sample.mask_path is None:
            continue
        mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            msg = f"cannot read mask {sample.mask_path}: replace it with an 8-bit PNG (0 = ok, 255 = defect)"
            raise DatasetError(msg)
        image_size = source_size if sample.source == 0 else read_image(sample.path).shape[:2]
        if mask.shape != image_size:
            msg = (
                f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image_size[1]}x{image_size[0]}: masks must match their images pixel for pixel"
            )
            raise DatasetError(msg)
        masks[index] = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST) > 127
    return masks


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
