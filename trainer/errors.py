"""The trainer's named errors. Each message says what failed, the value, and what to do."""


class TrainerError(Exception):
    """Base of every error the trainer reports to the user (the CLI prints it and exits 2)."""


class DatasetError(TrainerError):
    """The dataset folder or CSV manifest is missing, malformed or inconsistent."""


class CalibrationError(TrainerError):
    """A threshold cannot be chosen as asked (bad method text, or the split lacks a class)."""


class ExportError(TrainerError):
    """The ONNX export failed or its outputs do not match the torch model."""


class ModelError(TrainerError):
    """A model cannot be built, fitted or loaded with the given settings."""


class EngineBuildError(TrainerError):
    """A TensorRT engine cannot be built, fails its parity check, or would not fit its memory budget."""
