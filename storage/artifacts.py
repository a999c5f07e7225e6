"""The artifact store: one folder per stage and version, published atomically.

    <root>/<stage>/<version>/manifest.json   ← written last; its presence means "complete"
    <root>/<stage>/<version>/...             ← the stage's files
    <root>/<stage>/latest                    ← text file naming the newest version
    <root>/.locks/<stage>-<version>          ← held while a version is built, so two flows build it once

A version is a hash of what went in (inputs' versions, the config slice, the code
version), so the same inputs give the same version and a changed config gives a new
folder beside the old one. A stage builds into a temporary sibling folder and renames it
into place, so a crash never leaves a half-written artifact that looks complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from configs.errors import UserError, disk_full_is_one_line
from configs.secrets import redact

MANIFEST = "manifest.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ArtifactError(UserError):
    """The artifact store cannot be written or read; the message is one line."""


class FileEntry(BaseModel):
    path: str
    bytes: int
    sha256: str


class Manifest(BaseModel):
    stage: str
    version: str
    created_at: float = Field(default_factory=time.time)
    inputs: dict[str, Any] = {}
    config: dict[str, Any] = {}
    code_version: str = ""
    files: list[FileEntry] = []
    metrics: dict[str, Any] = {}


@dataclass(frozen=True)
class ArtifactRef:
    """What a stage hands to the next: enough to find and trust its output."""

    stage: str
    version: str
    path: str

    def to_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "version": self.version, "path": self.path}


def stable_hash(payload: Any, length: int = 16) -> str:
    """sha256 of canonical JSON, shortened: the identity of a set of inputs."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see the old or the new file."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


T = TypeVar("T")


def publish_folder(final: Path, fill: Callable[[Path], T]) -> T:
    """Run `fill(tmp)` on a temporary sibling `.<name>.tmp-<hex>`, fsync it, rename it to `final`.

    A crash never leaves a half-written folder at `final`; on any error the temporary
    folder is removed. An existing `final` (a leftover found incomplete or damaged) is replaced.
    """
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    with disk_full_is_one_line(final.parent, final.name):
        tmp.mkdir()
        try:
            result = fill(tmp)
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result


@contextmanager
def folder_lock(lock_file: Path, busy: Callable[[str], Exception] | None = None) -> Iterator[None]:
    """An exclusive lock (flock on `lock_file`, which names its holder) held while the block runs.
    Without `busy`, wait until it is free; with it, raise busy(holder) at once when it is not."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            handle.seek(0)
            raise busy(handle.read().strip() or "another process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield


def list_files(folder: Path) -> list[FileEntry]:
    entries = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        entries.append(FileEntry(path=file.relative_to(folder).as_posix(), bytes=file.stat().st_size, sha256=sha256_file(file)))
    return entries


def mismatched_files(folder: Path, entries: list[FileEntry]) -> list[str]:
    """Paths of the entries whose file is missing or no longer has its recorded size and sha256."""
    bad = []
    for entry in entries:
        file = folder / entry.path
        if not file.is_file() or file.stat().st_size != entry.bytes or sha256_file(file) != entry.sha256:
            bad.append(entry.path)
    return bad


class ArtifactStore:
    """Versioned, atomically published stage outputs under one root folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ArtifactError(
                f"storage root {self.root} is not writable ({exc.strerror}); "
                "pass --set storage.root=PATH or set FWP_STORAGE_ROOT to a writable folder"
            ) from None

    def check_reachable(self, *paths: str | os.PathLike) -> None:
        """On a worker of a distributed runner: the store (and `paths` inside it) must be here,
        at the same path as where the flow runs, or the work would land where no one reads it."""
        missing = [str(path) for path in (self.root, *paths) if not Path(path).exists()]
        if missing:
            raise ArtifactError(
                f"{missing[0]} is not visible on this worker ({socket.gethostname()}); workers on other machines "
                f"need the store on a filesystem they all mount at the same path (storage.root={self.root})"
            )

    def path(self, stage: str, version: str) -> Path:
        return self.root / stage / version

    def run_dir(self, run_name: str) -> Path:
        """The folder of a training run: its checkpoints and metrics.jsonl; never outside the store."""
        runs = self.root / "runs"
        folder = (runs / run_name).resolve()
        if folder.parent != runs.resolve() or run_name.startswith("."):
            raise ArtifactError(f"run name {run_name!r} would leave {runs}; use letters, digits, '.', '_' or '-'")
        return folder

    def exists(self, stage: str, version: str) -> bool:
        return (self.path(stage, version) / MANIFEST).is_file()

    def ref(self, stage: str, version: str) -> ArtifactRef:
        return ArtifactRef(stage=stage, version=version, path=str(self.path(stage, version)))

    def manifest(self, stage: str, version: str) -> Manifest:
        file = self.path(stage, version) / MANIFEST
        try:
            return Manifest.model_validate_json(file.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"artifact {stage}/{version} is missing under {self.root}; rerun its stage") from None

    def manifests(self, stage: str) -> list[Manifest]:
        """The manifests of every complete artifact of a stage, oldest first."""
        found = []
        for file in (self.root / stage).glob(f"*/{MANIFEST}"):
            try:
                found.append(Manifest.model_validate_json(file.read_text()))
            except (OSError, ValueError):  # a damaged manifest names no artifact
                continue
        return sorted(found, key=lambda manifest: manifest.created_at)

    def latest(self, stage: str) -> str | None:
        pointer = self.root / stage / "latest"
        if not pointer.is_file():
            return None
        version = pointer.read_text().strip()
        return version if self.exists(stage, version) else None

    def publish(
        self,
        stage: str,
        version: str,
        build: Callable[[Path], dict[str, Any]],
        *,
        inputs: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        code: str = "",
    ) -> Manifest:
        """Run `build(tmp_dir) -> metrics`, then checksum, write the manifest and rename into place.

        If the version already exists it is returned untouched; a flow building the same
        version at the same time is waited for, then its artifact is returned. On any error
        the temporary folder is removed and nothing published before is changed. Credentials
        in inputs, config and metrics (a source URL's password, say) are redacted.
        """
        if self.exists(stage, version):
            return self.manifest(stage, version)
        self.ensure_writable()
        with folder_lock(self.root / ".locks" / f"{stage}-{version}"):  # another flow building the same version: wait for it
            if self.exists(stage, version):
                return self.manifest(stage, version)
            return self._publish(stage, version, build, inputs, config, code)

    def _publish(self, stage: str, version: str, build: Callable[[Path], dict[str, Any]], inputs: dict[str, Any] | None,
                 config: dict[str, Any] | None, code: str) -> Manifest:
        final = self.path(stage, version)
        final.parent.mkdir(parents=True, exist_ok=True)

        def fill(folder: Path) -> Manifest:
            metrics = build(folder) or {}
            manifest = Manifest(stage=stage, version=version, inputs=redact(inputs or {}), config=redact(config or {}),
                                code_version=code, files=list_files(folder), metrics=redact(metrics))
            write_json_atomic(folder / MANIFEST, manifest.model_dump())
            return manifest

        manifest = publish_folder(final, fill)  # a folder without a manifest (older crash) is replaced
        write_text_atomic(final.parent / "latest", version + "\n")
        return manifest

    def verify(self, stage: str, version: str) -> list[str]:
        """Files whose size or sha256 no longer match the manifest (empty when intact)."""
        return mismatched_files(self.path(stage, version), self.manifest(stage, version).files)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; when the block succeeds it is fsynced and renamed
    onto `path` (readers see the old or the new file), when it fails it is removed."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with disk_full_is_one_line(path.parent, path.name):
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
