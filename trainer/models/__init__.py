"""Trainer models: each a pure, exportable torch module plus the fitting beside it, listed in MODELS."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ModelError
from .base import ModelKind, config_from_dict, load_state, read_model_record
from .fastflow import KIND as FASTFLOW
from .fcdd import KIND as FCDD
from .patchcore import KIND as PATCHCORE

MODELS: dict[str, ModelKind] = {kind.name: kind for kind in (PATCHCORE, FASTFLOW, FCDD)}


def model_kind(name: str) -> ModelKind:
    """The ModelKind called name; ModelError lists the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        msg = f"unknown model {name!r}; choose one of {', '.join(MODELS)}"
        raise ModelError(msg) from None


def load_model(directory: Path) -> tuple[ModelKind, nn.Module]:
    """The model saved in directory by base.save_model, and its kind."""
    record = read_model_record(directory)
    kind = model_kind(record["kind"])
    return kind, kind.build(config_from_dict(kind.config_type, record["config"]), load_state(directory))
