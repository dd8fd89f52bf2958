"""What one sample folder holds, and how it is read and written: the store's on-disk format.

    <root>/<camera>/<kind>/<sample_id>/
        sample.json   SampleMeta: why it was kept, the verdict record, which files are present
        view.png      the model's view of the frame (h, w) grey or (h, w, 3) colour, exactly what the model scored
        map.npy       its anomaly map (h, w) float16 (rejects, close calls, random picks)
        roi.png       the ROI at camera resolution (samples.full_roi)
        thumb.jpg     the thumbnail announced on MQTT (view with the map in colour)
        label.json    StoredLabel, once someone labelled it
Folders appear whole: a sample is written into `.incoming-<id>` and renamed; an evicted one is renamed to
`.evicted-<id>` before it is deleted. Either kind of leftover is removed when the store opens.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..contract import LabelKind, SampleKind, Verdict
from ..contract.codec import NAME_PATTERN

META_FILE, LABEL_FILE = "sample.json", "label.json"
VIEW_FILE, MAP_FILE, ROI_FILE, THUMB_FILE = "view.png", "map.npy", "roi.png", "thumb.jpg"
KINDS: tuple[SampleKind, ...] = ("reject", "failsafe", "close-call", "random")
INCOMING, EVICTED = ".incoming-", ".evicted-"
NONCE_FILE = "label-nonces.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CAMERA = re.compile(NAME_PATTERN)


class SampleFileError(Exception):
    """A sample folder is missing, unreadable or not one of ours; the message names it and the fix."""


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleMeta(_File):
    """sample.json: why the frame was kept, what the agent decided, and which files the folder holds."""

    schema_version: Literal[1] = 1
    sample_id: str
    kind: SampleKind
    decision: Verdict = Field(description="The verdict record published for the frame.")
    view: bool = Field(description="view.png (the model's view) is present.")
    anomaly_map: bool = Field(description="map.npy is present.")
    roi: bool = Field(False, description="roi.png (the ROI at camera resolution) is present.")
    map_range: tuple[float, float] | None = Field(None, description="Map values drawn coldest/hottest (the bundle's).")
    roi_box: tuple[int, int, int, int] | None = Field(None, description="x, y, width, height in camera pixels.")
    stored_ts: float


class StoredLabel(_File):
    """label.json: what a person said the sample shows."""

    schema_version: Literal[1] = 1
    label: LabelKind
    defect_type: str = Field("", pattern=r"^[a-z0-9_-]{0,64}$")
    by: str = Field(min_length=1, max_length=64)
    labelled_ts: float
    via: Literal["mqtt", "local"]
    key_id: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class SampleInfo:
    """One stored sample as read back from disk."""

    path: Path
    meta: SampleMeta
    label: StoredLabel | None

    @property
    def camera(self) -> str:
        return self.meta.decision.camera


def sample_id_of(camera: str, seq: int) -> str:
    """`<camera>-<seq>`: unique per agent (seq never repeats per camera); a hash for odd or long camera names."""
    candidate = f"{camera}-{seq}"
    if _ID.fullmatch(candidate):
        return candidate
    return f"c{hashlib.sha256(camera.encode()).hexdigest()[:8]}-{seq}"


def kind_dir(root: Path, camera: str, kind: str) -> Path:
    return root / camera / kind


def write_bytes_synced(path: Path, data: bytes) -> None:
    """Write and fsync one file (a sample folder is renamed into place only after all its files are on disk)."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def encode_png(image: np.ndarray, *, bgr: bool) -> bytes:
    """PNG bytes of (h, w), (h, w, 1) or (h, w, 3) uint8; bgr=False: the colour image is RGB (converted for OpenCV)."""
    plane = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    if plane.ndim == 3 and not bgr:
        plane = cv2.cvtColor(plane, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", plane)
    if not ok:
        msg = f"could not encode a {image.shape} image as PNG"
        raise SampleFileError(msg)
    return encoded.tobytes()


def encode_map(anomaly_map: np.ndarray) -> bytes:
    """map.npy bytes: (h, w) float16 (plenty for display and for telling where the model looked)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(anomaly_map, np.float16), allow_pickle=False)
    return buffer.getvalue()


def read_map(path: Path) -> np.ndarray:
    """(h, w) float32 from map.npy."""
    return np.load(path, allow_pickle=False).astype(np.float32)


def read_sample(folder: Path) -> SampleInfo:
    """The sample in `folder`; SampleFileError when its sample.json or label.json is missing or malformed."""
    try:
        meta = SampleMeta.model_validate_json((folder / META_FILE).read_bytes())
    except (OSError, ValidationError, ValueError) as error:
        msg = f"sample folder {folder} has no readable {META_FILE} ({_short(error)}); remove the folder"
        raise SampleFileError(msg) from error
    label = None
    if (folder / LABEL_FILE).exists():
        try:
            label = StoredLabel.model_validate_json((folder / LABEL_FILE).read_bytes())
        except (OSError, ValidationError, ValueError) as error:
            msg = f"{folder / LABEL_FILE} is unreadable ({_short(error)}); label the sample again"
            raise SampleFileError(msg) from error
    return SampleInfo(folder, meta, label)


def sample_folders(root: Path) -> Iterator[Path]:
    """Every finished sample folder under root (camera/kind/id), in no particular order."""
    if not root.is_dir():
        return
    for camera in root.iterdir():
        if not camera.is_dir() or not _CAMERA.fullmatch(camera.name):
            continue
        for kind in KINDS:
            folder = camera / kind
            if folder.is_dir():
                yield from (each for each in folder.iterdir() if each.is_dir() and _ID.fullmatch(each.name))


def find_sample(root: Path, sample_id: str) -> Path | None:
    """The folder of `sample_id`, or None when no camera and class holds it (never stored, or evicted)."""
    if not _ID.fullmatch(sample_id) or not root.is_dir():
        return None
    for camera in root.iterdir():
        for kind in KINDS:
            folder = camera / kind / sample_id
            if folder.is_dir():
                return folder
    return None


def write_label(folder: Path, label: StoredLabel) -> None:
    """Write label.json beside the sample atomically; SampleFileError when the sample is gone meanwhile."""
    temporary = folder / f".{LABEL_FILE}.tmp"
    try:
        write_bytes_synced(temporary, label.model_dump_json().encode())
        temporary.replace(folder / LABEL_FILE)
    except FileNotFoundError as error:
        msg = f"sample {folder.name} was evicted from the store before its label could be written"
        raise SampleFileError(msg) from error


def folder_bytes(folder: Path) -> int:
    return sum(each.stat().st_size for each in folder.iterdir() if each.is_file())


def dump_json(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), indent=1).encode()


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0][:200]
