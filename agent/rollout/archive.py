"""A bundle as a deterministic tar: pack, check and unpack it; read its model id.

See agent/rollout/wire.py for how archives travel.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path, PurePosixPath

from lineguard.agent.bundle import MANIFEST_FILE, BundleError
from lineguard.agent.rollout.wire import MAX_ARCHIVE_BYTES, MAX_MEMBERS, ArchiveError

# -- the archive ----------------------------------------------------------------------------------------------

_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


def pack_bundle(bundle_dir: Path) -> bytes:
    """The bundle's files as an uncompressed tar, byte-identical for identical files (sorted, mtime 0, mode 644)."""
    if not bundle_dir.is_dir():
        msg = f"bundle folder {bundle_dir} does not exist"
        raise ArchiveError(msg)
    files: list[Path] = []
    for folder, subfolders, names in os.walk(bundle_dir):
        for name in (*subfolders, *names):
            path = Path(folder) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                msg = f"{path} is a link or special file; a bundle holds plain files only: copy the real file in"
                raise ArchiveError(msg)
            if path.is_file():
                files.append(path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(files, key=lambda each: each.relative_to(bundle_dir).as_posix()):
            info = tarfile.TarInfo(path.relative_to(bundle_dir).as_posix())
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as handle:
                archive.addfile(info, handle)
    return buffer.getvalue()


def unpack_bundle(
    archive: bytes | Path, dest_dir: Path, *, max_bytes: int = MAX_ARCHIVE_BYTES, max_members: int = MAX_MEMBERS
) -> None:
    """Unpack a tar (bytes or a file) into the new or empty `dest_dir`; regular files and folders only.

    Raises ArchiveError, before writing anything, for absolute paths, `..`, links, devices, fifos, sparse files,
    more than `max_bytes` of content or more than `max_members` files and folders (headers are read one at a
    time and reading stops at the first member past the cap); then extracts with tarfile's "data" filter where
    Python has it.
    """
    if dest_dir.exists() and any(dest_dir.iterdir()):
        msg = f"cannot unpack into {dest_dir}: it is not empty"
        raise ArchiveError(msg)
    try:
        with (
            tarfile.open(fileobj=io.BytesIO(archive), mode="r:")
            if isinstance(archive, bytes)
            else tarfile.open(archive, mode="r:")
        ) as tar:
            _check_members(_members(tar, max_members), max_bytes)
            dest_dir.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):  # 3.12, 3.11.4+, 3.10.12+
                tar.extractall(dest_dir, filter="data")
            else:  # every member was checked above: plain files and folders inside dest_dir
                tar.extractall(dest_dir)
    except tarfile.TarError as error:
        msg = f"bundle archive is not a valid tar: {error}"
        raise ArchiveError(msg) from error


def _members(tar: tarfile.TarFile, max_members: int) -> list[tarfile.TarInfo]:
    """The archive's members, read one header at a time; ArchiveError past `max_members`."""
    members: list[tarfile.TarInfo] = []
    while (member := tar.next()) is not None:
        members.append(member)
        if len(members) > max_members:
            msg = f"archive holds more than {max_members} files and folders (rollout.max_archive_members); refused"
            raise ArchiveError(msg)
    return members


def _check_members(members: list[tarfile.TarInfo], max_bytes: int) -> None:
    total = 0
    for member in members:
        parts = PurePosixPath(member.name).parts
        if member.name.startswith("/") or PurePosixPath(member.name).is_absolute():
            msg = f"archive member {member.name!r} has an absolute path; refused"
            raise ArchiveError(msg)
        if ".." in parts:
            msg = f"archive member {member.name!r} points outside the bundle folder (..); refused"
            raise ArchiveError(msg)
        if not (member.isfile() or member.isdir()) or member.issparse():
            kind = "sparse file" if member.issparse() else _KINDS.get(member.type, f"type {member.type!r} entry")
            msg = f"archive member {member.name!r} is a {kind}; a bundle holds plain files and folders only"
            raise ArchiveError(msg)
        total += member.size
        if total > max_bytes:
            msg = f"archive unpacks to more than {max_bytes} bytes (rollout.max_archive_bytes); refused"
            raise ArchiveError(msg)


def read_model_id(bundle_dir: Path) -> tuple[str, str]:
    """(model_id, model_version) from the bundle's manifest; the agent verifies signature and digests."""
    try:
        manifest = json.loads((bundle_dir / MANIFEST_FILE).read_bytes())
        model_id, model_version = manifest["model_id"], manifest["model_version"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        msg = f"{bundle_dir} is not a model bundle: cannot read model_id and model_version from {MANIFEST_FILE} ({error!r})"
        raise BundleError(msg) from error
    return str(model_id), str(model_version)
