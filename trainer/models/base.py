"""What every trainer model provides, and the helpers their fitting shares.

A model kind is a pure exportable `nn.Module` (uint8 frames (N, H, W, C) in, (score (N,),
anomaly_map (N, H, W)) float32 out) plus plain functions beside it: `fit` from training images,
`build` from a saved config and state dict, `describe` for the report. The pipeline only talks
to `ModelKind`, so adding a detector never touches calibration, export, bundle or the agent.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError

MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True, slots=True)
class TrainingImages:
    """What a model may learn from; every array is (N, H, W, C) uint8 at the model's input size.

    good: the good training images.
    validation, validation_labels: labelled calibration images (0 ok, 1 nok) for early stopping,
        or None; models without epochs ignore them.
    defects: labelled defect images from the train split, for semi-supervised models, or None.
    """

    good: np.ndarray
    validation: np.ndarray | None = None
    validation_labels: np.ndarray | None = None
    defects: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.good.ndim != 4 or self.good.dtype != np.uint8 or len(self.good) == 0:
            msg = (
                f"training images must be a non-empty (N, H, W, C) uint8 array, got {self.good.shape} {self.good.dtype}"
            )
            raise ModelError(msg)
        if (self.validation is None) != (self.validation_labels is None):
            msg = "validation images and validation labels come together"
            raise ModelError(msg)
        n_labels = 0 if self.validation_labels is None else len(self.validation_labels)
        if self.validation is not None and len(self.validation) != n_labels:
            msg = f"{len(self.validation)} validation images but {n_labels} labels"
            raise ModelError(msg)


@dataclass(frozen=True, slots=True)
class ModelKind:
    """One detector: its config type and the functions that make, restore and describe it.

    fit(config, images, progress) -> module; build(config, state_dict) -> module (for loading);
    describe(module) -> report rows. variable_size: the graph scores sizes other than the trained one.
    uses_validation: it trains in epochs and stops early on the calibration split's AUROC.
    uses_defects: labelled defect images in the train split help it (the others refuse them).
    """

    name: str
    config_type: type
    fit: Callable[[Any, TrainingImages, bool], nn.Module]
    build: Callable[[Any, dict[str, torch.Tensor]], nn.Module]
    describe: Callable[[Any], dict[str, object]]
    variable_size: bool
    uses_validation: bool = False
    uses_defects: bool = False
    summary: str = ""


def config_from_dict(config_type: type, raw: dict[str, Any]) -> Any:
    """Rebuild a frozen config dataclass from its JSON form (lists back to tuples); ModelError on unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    if unknown := sorted(set(raw) - set(fields)):
        msg = f"{config_type.__name__} has no settings {', '.join(unknown)}; the model was saved by another version"
        raise ModelError(msg)
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()}
    return config_type(**values)


def save_model(kind: ModelKind, model: nn.Module, directory: Path) -> None:
    """Write model.json ({kind, config}) and the weights as a plain state dict (no pickled objects)."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind.name, "config": dataclasses.asdict(model.config)}
    (directory / MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)


def read_model_record(directory: Path) -> dict[str, Any]:
    """The {kind, config} record of a saved model; ModelError when there is none."""
    path = directory / MODEL_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        msg = f"no fitted model in {directory} (expected {MODEL_FILE} and {WEIGHTS_FILE}); run `lineguard-train fit` first"
        raise ModelError(msg)
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or "kind" not in record or "config" not in record:
        msg = f"{path} is not a model record ({{kind, config}}); refit the model"
        raise ModelError(msg)
    return record


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)


class BestWeights:
    """Early stopping: keeps the weights with the best validation metric, stops after `patience` epochs without gain.

    Without a validation metric (None), the lowest training loss counts instead, so a model
    trained on good images only still keeps its best epoch.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            msg = f"patience must be >= 1 epoch, got {patience}"
            raise ModelError(msg)
        self.patience = patience
        self.best: float | None = None
        self.best_loss = math.inf
        self.best_epoch = -1
        self.epochs_without_gain = 0
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, model: nn.Module, epoch: int, *, validation: float | None, loss: float) -> bool:
        """Record one epoch; True when its weights are kept.

        A tie on the validation metric (common once AUROC reaches 1.0 on a small split) keeps
        the weights with the lower loss but does not reset the patience.
        """
        value = validation if validation is not None else -loss
        if self.best is None or value > self.best:
            self.epochs_without_gain = 0
        elif value == self.best and loss < self.best_loss:
            self.epochs_without_gain += 1
        else:
            self.epochs_without_gain += 1
            return False
        self.best, self.best_loss, self.best_epoch = value, loss, epoch
        self._state = copy.deepcopy(model.state_dict())
        return True

    @property
    def should_stop(self) -> bool:
        return self.epochs_without_gain >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self._state is not None:
            model.load_state_dict(self._state)
