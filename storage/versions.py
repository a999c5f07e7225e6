"""What each stage's artifact version is made of, computed without running the stage.

A version hashes the inputs' versions, the config slice that shapes the output, and the
code that builds it. The code is found, not listed: the stage's task module and every
project module it imports, directly or through others (its import closure, read from the
import statements), so editing any of them gives the stage — and every stage after it — a
new version. Settings that change only speed (`tokenize.num_workers`,
`profile.memory_limit`) are left out, so changing them reuses what exists.

Nothing here imports Prefect: the trainer's CLI uses it to find the artifact the flow would use.
"""

from __future__ import annotations

import ast
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.schema import DataConfig, EvalConfig, ProfileConfig, SampleConfig, TokenizeConfig
from configs.secrets import redact
from storage.artifacts import PROJECT_ROOT, stable_hash
from storage.demo_corpus import resolve_demo_source
from storage.fs import SourceError, expand_sources, source_fingerprint

PROJECT_PACKAGES = ("configs", "flows", "gpt", "storage", "tasks")
# The module whose code builds each stage's artifact; what it imports is found from it.
STAGE_MODULES = {
    "download": "tasks.download",
    "profile": "tasks.profile",
    "tokenize": "tasks.tokenize",
    "train": "gpt.train",
    "hellaswag": "tasks.hellaswag",
    "evaluate": "tasks.evaluate",
    "sample": "tasks.sample",
}


# ---------------------------------------------------------------------------------------
# Code versions from import closures
# ---------------------------------------------------------------------------------------


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of a project module (a package's __init__.py), None for anything else."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(file: Path, module: str) -> set[str]:
    """Every module name an import statement anywhere in the file may bring in (also
    inside functions and `if TYPE_CHECKING:`: a conservative reading)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_bytes(), filename=str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from gpt import tokenize_worker`
    return names


def import_closure(modules: tuple[str, ...] | list[str], root: Path | None = None) -> list[Path]:
    """The source files of `modules`, of the packages they sit in, and of every project
    module they import, transitively; sorted. `root`: the project folder (default: this one)."""
    root = root or PROJECT_ROOT
    files: dict[str, Path] = {}
    pending = list(modules)
    while pending:
        module = pending.pop()
        if module in files or (file := _module_file(module, root)) is None:
            continue
        files[module] = file
        parts = module.split(".")
        pending += [".".join(parts[:depth]) for depth in range(1, len(parts))]  # importing a.b runs a/__init__.py
        pending += sorted(_imported_names(file, module))
    return sorted(files.values())


def code_version(*modules: str, root: Path | None = None) -> str:
    """Hash of the source of `modules` and their import closure."""
    root = root or PROJECT_ROOT
    digest = hashlib.sha256()
    for file in import_closure(modules, root):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def stage_code_version(stage: str, root: Path | None = None) -> str:
    return code_version(STAGE_MODULES[stage], root=root)


# ---------------------------------------------------------------------------------------
# Stage versions
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadPlan:
    """The concrete source files of a download and its version. URLs and fingerprints may
    hold credentials: they are for fetching, and are redacted wherever they are recorded."""

    version: str
    urls: list[str]
    fingerprints: list[dict[str, Any]]


def plan_download(data: DataConfig, storage_root: str | os.PathLike) -> DownloadPlan:
    """Expand the sources and fingerprint each file (size + etag/mtime, no content read)."""
    urls = expand_sources([resolve_demo_source(source, storage_root) for source in data.sources])
    fingerprints = [source_fingerprint(url) for url in urls]
    version = stable_hash({"sources": redact(fingerprints), "max_rows": data.max_rows,
                           "code": stage_code_version("download")})  # credentials do not name the data
    return DownloadPlan(version=version, urls=urls, fingerprints=fingerprints)


def plan_hellaswag(source: str, storage_root: str | os.PathLike) -> DownloadPlan:
    """The HellaSwag file's fingerprint and the version of its copy in the store."""
    urls = expand_sources([source])
    if len(urls) != 1:
        raise SourceError(f"eval.hellaswag_path {source} names {len(urls)} files; name one HellaSwag jsonl")
    fingerprints = [source_fingerprint(urls[0])]
    version = stable_hash({"source": redact(fingerprints[0]), "code": stage_code_version("hellaswag")})
    return DownloadPlan(version=version, urls=urls, fingerprints=fingerprints)


def plan_profile(download_version: str, data: DataConfig, profile: ProfileConfig) -> str:
    return stable_hash({"download": download_version, "text_column": data.text_column,
                        "profile": profile.model_dump(exclude={"memory_limit"}),  # how, not what: same report
                        "code": stage_code_version("profile")})


def plan_tokenize(download_version: str, data: DataConfig, tokenize: TokenizeConfig) -> str:
    return stable_hash({"download": download_version, "text_column": data.text_column,
                        "tokenize": tokenize.model_dump(exclude={"num_workers"}),  # speed, never bytes
                        "code": stage_code_version("tokenize")})


def plan_evaluate(checkpoint_id: str, tokenize_version: str, hellaswag_version: str | None, config: EvalConfig) -> str:
    """`checkpoint_id`: gpt.checkpoint.checkpoint_identity of the scored checkpoint; the HellaSwag
    items are named by their artifact's version, not by where they were fetched from."""
    return stable_hash({"checkpoint": checkpoint_id, "tokenize": tokenize_version, "hellaswag": hellaswag_version,
                        "eval": config.model_dump(exclude={"hellaswag_path"}), "code": stage_code_version("evaluate")})


def plan_sample(checkpoint_id: str, config: SampleConfig) -> str:
    return stable_hash({"checkpoint": checkpoint_id, "sample": config.model_dump(),
                        "code": stage_code_version("sample")})
