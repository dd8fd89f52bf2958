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
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from ..backbone import BACKBONES, STAGES
from ..errors import ModelError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

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
    # Every model kind keeps its config dataclass as `config`; torch types module attributes as Tensor | Module.
    config = cast("DataclassInstance", model.config)
    record = {"kind": kind.name, "config": dataclasses.asdict(config)}
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


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def restored(model: ModuleT, state: dict[str, torch.Tensor]) -> ModuleT:
    """A freshly built model with its saved weights loaded (every key must match), ready to score."""
    model.load_state_dict(state, strict=True)
    return model.eval()


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


def validation_auroc(
    score: Callable[[Any], torch.Tensor], features: Any | None, labels: np.ndarray | None
) -> float | None:
    """Image AUROC of score(features) -> (N,) scores against labels; None without validation or without both classes."""
    if features is None or labels is None or labels.min() == labels.max():
        return None
    with torch.inference_mode():
        scores = score(features).numpy()
    return float(roc_auc_score(labels, scores))


def input_problems(config: Any) -> list[str]:
    """What is wrong with the settings every model shares: backbone, stages, input size and channels."""
    problems = []
    if config.backbone not in BACKBONES:
        problems.append(f"unknown backbone {config.backbone!r}; choose one of {', '.join(BACKBONES)}")
    if not config.stages or sorted(set(config.stages)) != list(config.stages) or not set(config.stages) <= set(STAGES):
        problems.append(f"stages must be increasing values from {STAGES}, got {config.stages}")
    if config.input_height % 32 or config.input_width % 32 or min(config.input_height, config.input_width) < 64:
        problems.append(f"image size {config.input_height}x{config.input_width} must be >= 64 and a multiple of 32")
    if config.channels not in (1, 3):
        problems.append(f"channels must be 1 (grey) or 3 (RGB), got {config.channels}")
    return problems


def schedule_problems(config: Any) -> list[str]:
    """What is wrong with the settings of models trained in epochs (and scored by their hottest pixels)."""
    problems = []
    if config.epochs < 1 or config.patience < 1 or config.batch_size < 1 or config.learning_rate <= 0:
        problems.append("epochs, patience and batch_size must be >= 1 and learning_rate > 0")
    if not 0 < config.score_fraction <= 1:
        problems.append(f"score_fraction must be in (0, 1], got {config.score_fraction}")
    return problems


def check_training_size(config: Any, images: TrainingImages) -> None:
    """ModelError unless the good images have the configured (H, W, C)."""
    expected = (config.input_height, config.input_width, config.channels)
    if images.good.shape[1:] != expected:
        msg = f"training images must be (N, {', '.join(map(str, expected))}) uint8, got {images.good.shape}"
        raise ModelError(msg)


def train_epochs(
    name: str,
    model: nn.Module,
    trainable: nn.Module,
    config: Any,
    *,
    n_samples: int,
    batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    validation_auroc: Callable[[], float | None],
    progress: bool,
    clip_grad_norm: float | None = None,
) -> int:
    """Adam over shuffled batches of sample indices; early stopping on validation AUROC; the best weights restored.

    batch_loss(indices, generator) is one batch's loss; config carries epochs, patience,
    batch_size, learning_rate, weight_decay and seed. Returns the number of epochs run.
    """
    optimiser = torch.optim.Adam(trainable.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    best = BestWeights(config.patience)
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.epochs), desc=name, unit="epoch", disable=not progress)
    epochs_run, auroc = 0, None
    for epoch in bar:
        trainable.train()
        losses = []
        for batch in torch.randperm(n_samples, generator=generator).split(config.batch_size):
            loss = batch_loss(batch, generator)
            optimiser.zero_grad()
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(trainable.parameters(), clip_grad_norm)
            optimiser.step()
            losses.append(loss.item())
        trainable.eval()
        epochs_run, epoch_loss = epoch + 1, float(np.mean(losses))
        if not math.isfinite(epoch_loss):
            msg = f"{name} training diverged at epoch {epoch} (loss {epoch_loss}); lower --learning-rate"
            raise ModelError(msg)
        auroc = validation_auroc()
        best.update(model, epoch, validation=auroc, loss=epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4f}", val_auroc="—" if auroc is None else f"{auroc:.4f}")
        if best.should_stop:
            break
    best.restore(model)
    kept = f"validation AUROC {best.best:.4f}" if auroc is not None else f"lowest loss {best.best_loss:.4f}"
    log.info("%s: kept epoch %d of %d (%s)", name, best.best_epoch + 1, epochs_run, kept)
    return epochs_run
