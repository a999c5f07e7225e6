"""What each stage's artifact version is made of, computed without running the stage.

A version hashes the inputs' versions, the config slice that shapes the output, and the
code that builds it. The code is found, not listed: the modules that build the stage's
artifact (for tokenize, tasks/tokenize.py, which publishes it, and gpt/tokenizer.py, which
writes the shards) and every project module they import, directly or through others (their
import closure, read from the import statements), so editing any of them gives the stage —
and every stage after it — a new version. Prefect and other third-party code are not the
project's and are left out; a project module that is named or imported but has no file is
an error, never an empty part of a version. Two things are left out on
purpose: configs/schema.py, whose effect on an artifact is the values of the config slice,
which the version already holds; and settings that change only speed
(`tokenize.num_workers`, `profile.memory_limit`, `eval.hellaswag_items_per_batch`), so
changing them reuses what exists.

Nothing here imports Prefect: the trainer's CLI uses it to find the artifact the flow would use.
"""

from __future__ import annotations

import ast
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.schema import DataConfig, EvalConfig, ProfileConfig, SampleConfig, TokenizeConfig
from configs.secrets import redact
from storage.artifacts import PROJECT_ROOT, ArtifactStore, stable_hash
from storage.demo_corpus import resolve_demo_source
from storage.download import local_names
from storage.fs import SourceError, SourceUnreachable, expand_sources, retrying, source_fingerprint

PROJECT_PACKAGES = ("configs", "flows", "gpt", "storage", "tasks")
# The modules whose code builds each stage's artifact: the task module, which writes part of
# it (samples.md, profile.md, the data/ folder, ...) and publishes it, and the room that does
# the work; what they import is found from them. Task modules are named, never imported here:
# storage does not import tasks or Prefect.
STAGE_MODULES = {
    "download": ("tasks.download", "storage.download"),
    "profile": ("tasks.profile", "storage.profile"),
    "tokenize": ("tasks.tokenize", "gpt.tokenizer"),
    "hellaswag": ("tasks.hellaswag", "storage.download", "gpt.evaluate"),  # gpt.evaluate.read_hellaswag checks the file
    "train": ("tasks.train", "gpt.train"),
    "evaluate": ("tasks.evaluate", "gpt.evaluate"),
    "sample": ("tasks.sample", "gpt.sample"),
}
# Shapes artifacts only through config values, which versions hash themselves (see above).
NOT_CODE_OF_A_STAGE = ("configs/schema.py",)


# ---------------------------------------------------------------------------------------
# Code versions from import closures
# ---------------------------------------------------------------------------------------


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of a project module (a package's __init__.py), None when there is none."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_project_module(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES


def _imported_names(file: Path, module: str) -> dict[str, bool]:
    """Every module name an import statement anywhere in the file may bring in (also inside
    functions: a conservative reading), but for those under `if TYPE_CHECKING:`, which never run;
    each with whether it must be a module. `import a.b` and the `a` of `from a import b` must;
    `a.b` of `from a import b` may be a module (`from gpt import tokenize_worker`) or a name
    inside one (`from gpt.checkpoint import load_model`)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: dict[str, bool] = {}
    tree = ast.parse(file.read_bytes(), filename=str(file))
    for guard in [node for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)]:
        guard.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((alias.name, True) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                names.setdefault(f"{base}.{alias.name}", False)
            names[base] = True
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_closure(modules: tuple[str, ...] | list[str], root: Path | None = None) -> list[Path]:
    """The source files of `modules`, of the packages they sit in, and of every project
    module they import, transitively; sorted. `root`: the project folder (default: this one).
    A ModuleNotFoundError when one of `modules`, or a module of the project that one of them
    imports, has no source file: dropping it would leave its code out of versions unseen."""
    root = root or PROJECT_ROOT
    files: dict[str, Path] = {}
    pending = [(module, True) for module in modules]  # (name, whether it must be a module, not a name inside one)
    while pending:
        module, must_exist = pending.pop()
        if module in files or not (_is_project_module(module) or module in modules):
            continue  # the standard library, Prefect, torch...: not the project's code
        file = _module_file(module, root)
        if file is None:
            if must_exist:
                raise ModuleNotFoundError(f"{module} is code of a stage, but {root} has no source file for it; "
                                          "fix its name in storage/versions.py STAGE_MODULES or in the import")
            continue  # a name inside a module (`from gpt.checkpoint import load_model`), found through the module
        files[module] = file
        parts = module.split(".")
        pending += [(".".join(parts[:depth]), True) for depth in range(1, len(parts))]  # importing a.b runs a/__init__.py
        pending += sorted(_imported_names(file, module).items())
    return sorted(files.values())


def code_version(*modules: str, root: Path | None = None) -> str:
    """Hash of the source of `modules` and their import closure."""
    root = root or PROJECT_ROOT
    digest = hashlib.sha256()
    for file in import_closure(modules, root):
        name = file.relative_to(root).as_posix()
        if name not in NOT_CODE_OF_A_STAGE:
            digest.update(name.encode() + b"\0")
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def stage_code_version(stage: str, root: Path | None = None) -> str:
    return code_version(*STAGE_MODULES[stage], root=root)


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
    names: list[str]  # each file's name in the store (storage.download.local_names)


def plan_download(data: DataConfig, storage_root: str | os.PathLike) -> DownloadPlan:
    """Expand the sources and fingerprint each file (size + etag/mtime, no content read)."""
    urls = retrying(lambda: expand_sources([resolve_demo_source(source, storage_root) for source in data.sources]))
    fingerprints = [retrying(lambda url=url: source_fingerprint(url)) for url in urls]
    version = stable_hash({"sources": redact(fingerprints), "max_rows": data.max_rows,
                           "code": stage_code_version("download")})  # credentials do not name the data
    return DownloadPlan(version=version, urls=urls, fingerprints=fingerprints, names=local_names(urls))


def plan_download_file(fingerprint: dict[str, Any], name: str, max_rows: int | None, code: str) -> str:
    """The version of one source file's copy: its fingerprint, its name in the store, the rows
    it may hold (what data.max_rows leaves for it after the files before it), and the code."""
    return stable_hash({"source": redact(fingerprint), "name": name, "max_rows": max_rows, "code": code})


def plan_hellaswag(source: str, storage_root: str | os.PathLike) -> DownloadPlan:
    """The HellaSwag file's fingerprint and the version of its copy in the store. Offline, the
    newest copy from the same URL is used (with a warning), so evaluation needs no network
    once the file has been fetched."""
    urls = expand_sources([source])
    if len(urls) != 1:
        raise SourceError(f"eval.hellaswag_path {source} names {len(urls)} files; name one HellaSwag jsonl")
    try:
        fingerprint = retrying(lambda: source_fingerprint(urls[0]))
    except SourceUnreachable:
        earlier = [m for m in ArtifactStore(storage_root).manifests("hellaswag") if m.inputs["source"]["url"] == redact(urls[0])]
        if not earlier:
            raise
        warnings.warn(f"{redact(urls[0])} cannot be reached; using the copy fetched before, hellaswag/{earlier[-1].version}",
                      stacklevel=2)
        return DownloadPlan(version=earlier[-1].version, urls=urls, fingerprints=[earlier[-1].inputs["source"]],
                            names=local_names(urls))
    version = stable_hash({"source": redact(fingerprint), "code": stage_code_version("hellaswag")})
    return DownloadPlan(version=version, urls=urls, fingerprints=[fingerprint], names=local_names(urls))


def plan_profile(download_version: str, data: DataConfig, profile: ProfileConfig) -> str:
    return stable_hash({"download": download_version, "text_column": data.text_column,
                        "profile": profile.model_dump(exclude={"memory_limit"}),  # how, not what: same report
                        "code": stage_code_version("profile")})


def plan_profile_files(files: list[tuple[str, str]], data: DataConfig) -> list[str]:
    """The version of each parquet file's document table, for `files` as (file key, sha256);
    the profile settings shape only the statistics drawn from the tables, not the tables."""
    code = stage_code_version("profile")
    return [stable_hash({"file": sha256, "key": key, "text_column": data.text_column, "code": code}) for key, sha256 in files]


def plan_tokenize_files(files: list[tuple[str, str]], data: DataConfig, tokenize: TokenizeConfig) -> list[str]:
    """The version of each parquet file's shards, for `files` as (file key, sha256): named by
    the file's content and name, not by the download that brought it, so a file is tokenized
    once whichever glob or list it arrives in. The code is read once for all the files."""
    code = stage_code_version("tokenize")
    settings = tokenize.model_dump(exclude={"num_workers", "engine", "verify_fraction"})  # speed, never bytes
    return [stable_hash({"file": sha256, "key": key, "text_column": data.text_column, "tokenize": settings, "code": code})
            for key, sha256 in files]


def plan_tokenize(download_version: str, data: DataConfig, tokenize: TokenizeConfig) -> str:
    return stable_hash({"download": download_version, "text_column": data.text_column,
                        "tokenize": tokenize.model_dump(exclude={"num_workers", "engine", "verify_fraction"}),  # speed, never bytes
                        "code": stage_code_version("tokenize")})


def plan_evaluate(checkpoint_id: str, tokenize_version: str, hellaswag_version: str | None, config: EvalConfig) -> str:
    """`checkpoint_id`: gpt.checkpoint.checkpoint_identity of the scored checkpoint; the HellaSwag
    items are named by their artifact's version, not by where they were fetched from."""
    return stable_hash({"checkpoint": checkpoint_id, "tokenize": tokenize_version, "hellaswag": hellaswag_version,
                        "eval": config.model_dump(exclude={"hellaswag_path", "hellaswag_items_per_batch"}),
                        "code": stage_code_version("evaluate")})


def plan_sample(checkpoint_id: str, config: SampleConfig) -> str:
    return stable_hash({"checkpoint": checkpoint_id, "sample": config.model_dump(),
                        "code": stage_code_version("sample")})
