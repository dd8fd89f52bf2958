"""The sample store on disk: per camera and class, a count and a byte budget; oldest first out; atomic folders.

Lives in its own folder (samples.dir, default <state_dir>/samples), which nothing else writes to, so its
budgets never compete with staged bundles or sequence files; it also stops writing when its file system would
fall below samples.min_free_bytes. The folders themselves are the index: opening the store scans them (a few
thousand stat calls), removes half-written and half-deleted leftovers, and rebuilds the per-class order from
the sequence numbers in the sample ids' metadata, so a restart (or a crash mid-write) loses nothing and never
leaves the budgets exceeded. When a class is over budget, its oldest unlabelled sample goes first; labelled
ones (someone spent time on them) only when no unlabelled one is left.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import AgentConfig
from ..contract import SampleKind, Verdict
from .files import (
    EVICTED,
    INCOMING,
    LABEL_FILE,
    MAP_FILE,
    META_FILE,
    ROI_FILE,
    THUMB_FILE,
    VIEW_FILE,
    SampleFileError,
    SampleMeta,
    dump_json,
    encode_map,
    encode_png,
    folder_bytes,
    kind_dir,
    read_sample,
    sample_folders,
    sample_id_of,
    write_bytes_synced,
)

log = logging.getLogger(__name__)


def samples_root(config: AgentConfig) -> Path:
    """samples.dir, or <state_dir>/samples."""
    return config.samples.dir or config.state_dir / "samples"


class SampleStoreError(Exception):
    """A sample could not be written (disk full or below the reserve, permissions); it is dropped and counted."""


@dataclass(frozen=True, slots=True)
class Budgets:
    """Per camera and class: most samples and bytes kept; min_free_bytes left on the file system."""

    max_count: int
    max_bytes: int
    min_free_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1 or self.min_free_bytes < 0:
            msg = f"budgets must be positive, got {self}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class NewSample:
    """What the writer hands the store.

    view: (h, w, c) uint8 model input (c = 1 grey, 3 RGB) or None; anomaly_map: (h, w) float32 or None;
    roi: (H, W, C) uint8 ROI at camera resolution in roi_format or None; thumbnail: JPEG bytes ("" none).
    """

    kind: SampleKind
    verdict: Verdict
    view: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None
    roi: np.ndarray | None = None
    roi_format: str = "mono8"
    roi_box: tuple[int, int, int, int] | None = None
    map_range: tuple[float, float] | None = None
    thumbnail: bytes = b""

    @property
    def sample_id(self) -> str:
        return sample_id_of(self.verdict.camera, self.verdict.seq)


@dataclass(frozen=True, slots=True)
class Stored:
    """A sample now on disk, and the samples its arrival pushed out of the budget."""

    sample_id: str
    path: Path
    n_bytes: int
    evicted: tuple[str, ...]


class SampleStore:
    """The samples of one agent under `root`, within `budgets` per (camera, class)."""

    def __init__(self, root: Path, budgets: Budgets) -> None:
        self.root, self.budgets = root, budgets
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # inspection goes on without samples; each one is dropped and counted
            log.error("sample store %s cannot be created (%s); samples are dropped until it can", root, error)
        # (camera, kind) -> {sample_id: (seq, bytes)}, oldest (lowest seq) first
        self._index: dict[tuple[str, str], OrderedDict[str, tuple[int, int]]] = {}
        self._scan()

    def _scan(self) -> None:
        for leftover in [*self.root.glob(f"*/*/{INCOMING}*"), *self.root.glob(f"*/*/{EVICTED}*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        found: dict[tuple[str, str], list[tuple[int, str, int]]] = {}  # (camera, kind) -> (seq, id, bytes)
        for folder in sample_folders(self.root):
            try:
                meta = read_sample(folder).meta
            except SampleFileError as error:
                log.warning("removing an unreadable sample: %s", error)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            key = (meta.decision.camera, meta.kind)
            found.setdefault(key, []).append((meta.decision.seq, folder.name, folder_bytes(folder)))
        for found_key, entries in found.items():
            self._index[found_key] = OrderedDict((name, (seq, size)) for seq, name, size in sorted(entries))
        for camera, kind in list(self._index):
            self._enforce(camera, kind)  # budgets may have shrunk since the last run
        if found:
            log.info("sample store %s: %d samples in %d classes", self.root, self.count(), len(self._index))

    def add(self, sample: NewSample) -> Stored:
        """Write one sample atomically, then evict what the budget no longer holds; SampleStoreError on failure."""
        camera, sample_id = sample.verdict.camera, sample.sample_id
        folder = kind_dir(self.root, camera, sample.kind)
        files = _files_of(sample)
        needed = sum(len(data) for data in files.values())
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as error:
            msg = f"cannot read the free space under {self.root}: {error}"
            raise SampleStoreError(msg) from error
        if free - needed < self.budgets.min_free_bytes:
            msg = f"only {free / 2**20:.0f} MiB free under {self.root}, samples.min_free_bytes is {self.budgets.min_free_bytes / 2**20:.0f} MiB"
            raise SampleStoreError(msg)
        final, incoming = folder / sample_id, folder / f"{INCOMING}{sample_id}"
        if final.exists():
            msg = f"sample {sample_id} is stored already (a verdict published twice?)"
            raise SampleStoreError(msg)
        try:
            shutil.rmtree(incoming, ignore_errors=True)
            incoming.mkdir(parents=True)
            for name, data in files.items():
                write_bytes_synced(incoming / name, data)
            incoming.rename(final)
        except OSError as error:
            shutil.rmtree(incoming, ignore_errors=True)
            msg = f"cannot write sample {sample_id} under {folder}: {error}"
            raise SampleStoreError(msg) from error
        entries = self._index.setdefault((camera, sample.kind), OrderedDict())
        entries[sample_id] = (sample.verdict.seq, needed)
        if next(reversed(entries)) != sample_id:  # arrived out of order (rare): keep the order by seq
            self._index[(camera, sample.kind)] = OrderedDict(sorted(entries.items(), key=lambda item: item[1][0]))
        return Stored(sample_id, final, needed, self._enforce(camera, sample.kind))

    def _enforce(self, camera: str, kind: str) -> tuple[str, ...]:
        """Evict from (camera, kind) until it fits its budgets: oldest unlabelled first, then oldest labelled."""
        entries = self._index.get((camera, kind))
        if not entries:
            return ()
        evicted: list[str] = []
        total = sum(size for _, size in entries.values())
        while len(entries) > self.budgets.max_count or total > self.budgets.max_bytes:
            victim = self._victim(camera, kind, entries)
            total -= entries.pop(victim)[1]
            self._remove(kind_dir(self.root, camera, kind), victim)
            evicted.append(victim)
        return tuple(evicted)

    def _victim(self, camera: str, kind: str, entries: OrderedDict[str, tuple[int, int]]) -> str:
        folder = kind_dir(self.root, camera, kind)
        for sample_id in entries:
            if not (folder / sample_id / LABEL_FILE).exists():
                return sample_id
        return next(iter(entries))

    @staticmethod
    def _remove(folder: Path, sample_id: str) -> None:
        """Rename out of sight first (a label written meanwhile fails cleanly), then delete."""
        doomed = folder / f"{EVICTED}{sample_id}"
        try:
            (folder / sample_id).rename(doomed)
        except FileNotFoundError:
            return  # removed by hand meanwhile
        shutil.rmtree(doomed, ignore_errors=True)

    def count(self, camera: str | None = None, kind: str | None = None) -> int:
        """Samples held, optionally of one camera and/or class."""
        return sum(
            len(entries)
            for (each_camera, each_kind), entries in self._index.items()
            if camera in (None, each_camera) and kind in (None, each_kind)
        )

    def bytes_held(self, camera: str, kind: str) -> int:
        return sum(size for _, size in self._index.get((camera, kind), {}).values())

    def ids(self, camera: str, kind: str) -> list[str]:
        """Sample ids of one class, oldest first."""
        return list(self._index.get((camera, kind), ()))


def _files_of(sample: NewSample) -> dict[str, bytes]:
    """File name -> bytes of one sample folder; sample.json last, so a folder with it is complete."""
    files: dict[str, bytes] = {}
    if sample.view is not None:
        files[VIEW_FILE] = encode_png(sample.view, bgr=False)
    if sample.anomaly_map is not None:
        files[MAP_FILE] = encode_map(sample.anomaly_map)
    if sample.roi is not None:
        files[ROI_FILE] = encode_png(sample.roi, bgr=sample.roi_format == "bgr8")
    if sample.thumbnail:
        files[THUMB_FILE] = sample.thumbnail
    meta = SampleMeta(
        sample_id=sample.sample_id,
        kind=sample.kind,
        decision=sample.verdict,
        view=sample.view is not None,
        anomaly_map=sample.anomaly_map is not None,
        roi=sample.roi is not None,
        map_range=sample.map_range,
        roi_box=sample.roi_box,
        stored_ts=time.time(),
    )
    files[META_FILE] = dump_json(meta)
    return files
