"""The trainer's steps and the work folder they share: fit, calibrate, evaluate, report, export, bundle.

Each step reads what earlier steps wrote under OUT and writes its own part, so a step can be
re-run alone (e.g. a new threshold method without refitting):
    OUT/model/            fitted model (JSON config + weights-only state dict) and training.json
    OUT/scores/*.npz      scored calibration and test splits
    OUT/calibration.json  the chosen threshold and its expected error rates
    OUT/report/           index.html, metrics.json, assets/
    OUT/export/           model.onnx and parity.json
    OUT/bundle/           the signed model bundle
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lineguard.agent.bundle import DatasetInfo, InputSpec, Manifest, ModelInfo, Targets
from lineguard.agent.model_input import to_model_input

from . import calibrate as calibration_math
from .advice import advice
from .data import (
    Dataset,
    Sample,
    decoded_format,
    detect_channels,
    discover_dataset,
    load_images,
    load_masks,
    merge_datasets,
    read_image,
)
from .errors import TrainerError
from .evaluate import split_metrics
from .export import OPSET, check_parity, export_onnx, write_parity_report
from .models import MODELS, load_model, model_kind
from .models.base import ModelKind, TrainingImages, read_model_record, save_model
from .models.fastflow import FastFlowConfig
from .models.fcdd import FcddConfig
from .models.patchcore import PatchCoreConfig
from .package import BundleContents, write_bundle
from .report import ReportInputs, render_report
from .scoring import SplitScores, load_split_scores, save_split_scores, score_images

log = logging.getLogger(__name__)

MODEL_KINDS = tuple(MODELS)
ModelConfig = PatchCoreConfig | FastFlowConfig | FcddConfig


@dataclass(frozen=True, slots=True)
class DataOptions:
    """Where the data is and how splits are derived when the dataset has no calibration split.

    extra: more datasets merged into the first (exports of line samples), each image keeping its split.
    """

    path: Path
    calibration_fraction: float = 0.5
    seed: int = 0
    extra: tuple[Path, ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.path, *self.extra)

    def describe(self) -> str:
        return " + ".join(str(path) for path in self.paths)


@dataclass(frozen=True, slots=True)
class Workdir:
    """The OUT folder's layout."""

    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def training_file(self) -> Path:
        return self.model_dir / "training.json"

    def scores_file(self, split: str) -> Path:
        return self.root / "scores" / f"{split}.npz"

    @property
    def calibration_file(self) -> Path:
        return self.root / "calibration.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def metrics_file(self) -> Path:
        return self.report_dir / "metrics.json"

    @property
    def onnx_file(self) -> Path:
        return self.root / "export" / "model.onnx"

    @property
    def bundle_dir(self) -> Path:
        return self.root / "bundle"

    def require(self, path: Path, step: str) -> Path:
        if not path.exists():
            msg = f"{path} is missing: run `lineguard-train {step}` for this --out folder first"
            raise TrainerError(msg)
        return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def detect_dataset_channels(data: DataOptions) -> int:
    """1 when the dataset's first training image is grey, else 3."""
    return detect_channels(_discover(data).train)


def kind_of(config: ModelConfig) -> ModelKind:
    """The model kind a config belongs to."""
    for kind in MODELS.values():
        if isinstance(config, kind.config_type):
            return kind
    msg = f"{type(config).__name__} is not the config of a known model ({', '.join(MODELS)})"
    raise TrainerError(msg)


def config_of(model: torch.nn.Module) -> ModelConfig:
    """The config a fitted model was built from (every model kind keeps it as `config`)."""
    config = model.config
    if not isinstance(config, ModelConfig):
        msg = f"{type(model).__name__} holds no config of a known model ({', '.join(MODELS)})"
        raise TrainerError(msg)
    return config


def _discover(data: DataOptions, kind: ModelKind | None = None) -> Dataset:
    allow_defects = kind is None or kind.uses_defects
    first = discover_dataset(
        data.path, calibration_fraction=data.calibration_fraction, seed=data.seed, allow_train_defects=allow_defects
    )
    if not data.extra:
        return first
    extra = [
        discover_dataset(path, calibration_fraction=data.calibration_fraction, seed=data.seed, partial=True)
        for path in data.extra
    ]
    return merge_datasets([first, *extra], allow_train_defects=allow_defects)


def _training_images(
    dataset: Dataset, kind: ModelKind, config: ModelConfig, source_shape: tuple[int, int]
) -> TrainingImages:
    def load(samples: tuple[Sample, ...]) -> np.ndarray:
        return load_images(
            samples,
            height=config.input_height,
            width=config.input_width,
            channels=config.channels,
            source_size=source_shape,
        )

    defects = tuple(s for s in dataset.train if s.label == 1)
    validation = dataset.calibration if kind.uses_validation else ()
    return TrainingImages(
        good=load(tuple(s for s in dataset.train if s.label == 0)),
        validation=load(validation) if validation else None,
        validation_labels=np.array([s.label for s in validation], np.int64) if validation else None,
        defects=load(defects) if defects else None,
    )


def fit(data: DataOptions, work: Workdir, config: ModelConfig, *, progress: bool = True) -> torch.nn.Module:
    """Fit a model on the train split (early stopping on calibration where the model trains in epochs); save it."""
    kind = kind_of(config)
    dataset = _discover(data, kind)
    started = time.perf_counter()
    source_shape = read_image(dataset.train[0].path).shape[:2]
    images = _training_images(dataset, kind, config, source_shape)
    model = kind.fit(config, images, progress)
    train_seconds = time.perf_counter() - started
    save_model(kind, model, work.model_dir)
    notes = list(dataset.notes)
    if images.validation is not None:
        notes.append(
            "Early stopping watched the calibration split's image AUROC, so calibration metrics are slightly optimistic; "
            "the test split is untouched."
        )
    if images.defects is not None:
        notes.append(f"{len(images.defects)} labelled defect images of the train split were used as outliers.")
    _write_json(
        work.training_file,
        {
            "model": kind.name,
            "dataset": {"name": dataset.name, "path": data.describe(), "digest": dataset.digest()},
            "n_train": len(dataset.train),
            "source_size": list(source_shape),
            "train_seconds": round(train_seconds, 2),
            "description": {key: str(value) for key, value in kind.describe(model).items()},
            "notes": notes,
        },
    )
    log.info("fitted %s (%s) on %d images in %.1f s", kind.name, config.backbone, len(dataset.train), train_seconds)
    return model


def load_fitted(work: Workdir) -> tuple[ModelKind, torch.nn.Module]:
    """The model saved under OUT/model and its kind."""
    return load_model(work.require(work.model_dir, "fit"))


def _score_split(model: torch.nn.Module, dataset: Dataset, split: str, source_size: tuple[int, int]) -> SplitScores:
    samples = dataset.split(split)
    config = config_of(model)
    images = load_images(
        samples, height=config.input_height, width=config.input_width, channels=config.channels, source_size=source_size
    )
    masks = load_masks(samples, height=config.input_height, width=config.input_width, source_size=source_size)
    scores, maps = score_images(model, images)
    return SplitScores(
        name=split,
        paths=tuple(str(s.path) for s in samples),
        images=images,
        labels=np.array([s.label for s in samples], np.int64),
        defect_types=tuple(s.defect_type for s in samples),
        scores=scores,
        maps=maps,
        masks=masks,
    )


def calibrate(data: DataOptions, work: Workdir, method_text: str) -> dict[str, object]:
    """Score the calibration split and choose the threshold; writes OUT/calibration.json."""
    method = calibration_math.parse_threshold_method(method_text)
    _, model = load_fitted(work)
    training = _read_json(work.require(work.training_file, "fit"))
    dataset = _discover(data)
    _check_same_dataset(dataset, training)
    split = _score_split(model, dataset, "calibration", tuple(training["source_size"]))
    save_split_scores(split, work.scores_file("calibration"))
    result = calibration_math.calibrate(split.scores, split.labels, method).to_dict()
    _write_json(work.calibration_file, result)
    log.info("threshold %.4g (%s) on %d calibration images", result["threshold"], method, len(split.paths))
    return result


def _check_same_dataset(dataset: Dataset, training: dict) -> None:
    if dataset.digest() != training["dataset"]["digest"]:
        log.warning(
            "dataset %s differs from the one the model was fitted on (%s); metrics describe this data",
            dataset.root,
            training["dataset"]["path"],
        )


def evaluate(data: DataOptions, work: Workdir) -> dict[str, dict[str, object]]:
    """Score the test split and write OUT/report/metrics.json for calibration and test."""
    _, model = load_fitted(work)
    training = _read_json(work.require(work.training_file, "fit"))
    threshold = float(_read_json(work.require(work.calibration_file, "calibrate"))["threshold"])
    dataset = _discover(data)
    test = _score_split(model, dataset, "test", tuple(training["source_size"]))
    save_split_scores(test, work.scores_file("test"))
    calibration = load_split_scores(work.require(work.scores_file("calibration"), "calibrate"))
    metrics = {"calibration": split_metrics(calibration, threshold), "test": split_metrics(test, threshold)}
    _write_json(work.metrics_file, metrics)
    return metrics


def report(work: Workdir, *, title: str | None = None) -> Path:
    """Render OUT/report/index.html from the saved scores and metrics."""
    training = _read_json(work.require(work.training_file, "fit"))
    record = read_model_record(work.model_dir)
    model_config = record["config"]
    metrics = _read_json(work.require(work.metrics_file, "evaluate"))
    splits = {
        name: load_split_scores(work.require(work.scores_file(name), "evaluate")) for name in ("calibration", "test")
    }
    inputs = ReportInputs(
        title=title or f"{training['dataset']['name']} — {record['kind']} / {model_config['backbone']}",
        model={
            "model": record["kind"],
            "input size": f"{model_config['input_width']}x{model_config['input_height']}x{model_config['channels']}",
            **training["description"],
            "train images": training["n_train"],
            "train time (s)": training["train_seconds"],
            "dataset digest": training["dataset"]["digest"][:16],
        },
        calibration=_read_json(work.require(work.calibration_file, "calibrate")),
        metrics=metrics,
        splits=splits,
        notes=tuple(training["notes"]),
        advice=tuple(advice(record["kind"], model_config, metrics["calibration"].get("image_auroc"))),
    )
    return render_report(work.report_dir, inputs)


def export(work: Workdir) -> Path:
    """Export OUT/export/model.onnx and check its parity with torch on the calibration images."""
    kind, model = load_fitted(work)
    config = config_of(model)
    onnx_path = export_onnx(
        model,
        work.onnx_file,
        height=config.input_height,
        width=config.input_width,
        channels=config.channels,
        variable_size=kind.variable_size,
    )
    calibration = load_split_scores(work.require(work.scores_file("calibration"), "calibrate"))
    _checked_parity(model, onnx_path, calibration.images, onnx_path.with_name("parity.json"))
    if kind.variable_size:
        height, width = alternate_size(config.input_height, config.input_width)
        resized = np.stack(
            [
                to_model_input(image, pixel_format=decoded_format(image), input_shape=(height, width, config.channels))
                for image in calibration.images[:4]
            ]
        )
        _checked_parity(model, onnx_path, resized, onnx_path.with_name(f"parity-{width}x{height}.json"))
    return onnx_path


@dataclass(frozen=True, slots=True)
class BundleOptions:
    """Who signs the bundle, what it is called, and where it may serve."""

    sign_key: Path | None = None
    model_id: str | None = None  # default: <dataset>-<model>
    model_version: str | None = None  # default: UTC timestamp
    targets: Targets = field(default_factory=Targets)


def bundle(work: Workdir, options: BundleOptions) -> Manifest:
    """Gather model, threshold, metrics and golden images into OUT/bundle, signed when a key is given."""
    model_id, model_version, sign_key = options.model_id, options.model_version, options.sign_key
    training = _read_json(work.require(work.training_file, "fit"))
    record = read_model_record(work.require(work.model_dir, "fit"))
    kind, config_raw = model_kind(record["kind"]), record["config"]
    calibration_split = load_split_scores(work.require(work.scores_file("calibration"), "calibrate"))
    metrics = _read_json(work.require(work.metrics_file, "evaluate"))
    contents = BundleContents(
        model_id=model_id or _safe_id(f"{training['dataset']['name']}-{kind.name}"),
        model_version=model_version or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        onnx_path=work.require(work.onnx_file, "export"),
        model_info=ModelInfo(kind=kind.name, backbone=config_raw["backbone"], opset=OPSET, parameters=config_raw),
        input_spec=InputSpec(
            height=config_raw["input_height"],
            width=config_raw["input_width"],
            channels=config_raw["channels"],
            pixel_format="mono8" if config_raw["channels"] == 1 else "rgb8",
            variable_size=kind.variable_size,
        ),
        dataset=DatasetInfo(
            name=training["dataset"]["name"],
            digest=training["dataset"]["digest"],
            n_train=training["n_train"],
            n_calibration=len(calibration_split.paths),
            n_test=int(metrics["test"]["n_good"]) + int(metrics["test"]["n_defect"]),
        ),
        calibration=_read_json(work.require(work.calibration_file, "calibrate")),
        metrics=metrics,
        calibration_split=calibration_split,
        targets=options.targets,
    )
    return write_bundle(work.bundle_dir, contents, sign_key=sign_key)


def _checked_parity(model: torch.nn.Module, onnx_path: Path, images: np.ndarray, report_path: Path) -> None:
    """Compare ONNX Runtime with torch on images (ExportError past tolerance) and write the report."""
    parity = check_parity(model, onnx_path, images)
    write_parity_report(parity, report_path)
    height, width = images.shape[1:3]
    log.info(
        "ONNX parity on %d images at %dx%d: scores %.1e, maps %.1e",
        parity.n_images,
        width,
        height,
        parity.max_score_rel_diff,
        parity.max_map_rel_diff,
    )


def alternate_size(height: int, width: int) -> tuple[int, int]:
    """A second input size (multiples of 32, about 1.25x) to prove a variable-size graph really is one."""
    return (max(round(height * 1.25 / 32) * 32, height + 32), max(round(width * 1.25 / 32) * 32, width + 32))


def run_all(
    data: DataOptions,
    work: Workdir,
    config: ModelConfig,
    *,
    threshold: str,
    bundle_options: BundleOptions,
    progress: bool = True,
) -> tuple[dict[str, dict[str, object]], Manifest, Path]:
    """Every step in order (`lineguard-train run`): (metrics, bundle manifest, report index.html)."""
    fit(data, work, config, progress=progress)
    calibrate(data, work, threshold)
    metrics = evaluate(data, work)
    export(work)
    manifest = bundle(work, bundle_options)
    return metrics, manifest, report(work)


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
