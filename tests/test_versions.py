"""Stage versions cover the code each stage runs, found from its imports (storage/versions.py):
editing any module of a stage's import closure — its task module's included — gives it, and the
stages after it, a new version; editing a module outside it changes nothing; a stage module that
cannot be found is an error. Checked on a copy of the project."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from configs import load_config
from storage import versions
from storage.versions import (
    NOT_CODE_OF_A_STAGE,
    STAGE_MODULES,
    import_closure,
    plan_evaluate,
    plan_profile,
    plan_tokenize,
    stage_code_version,
)
from tests.conftest import PROJECT_ROOT

PACKAGES = ("configs", "flows", "gpt", "storage", "tasks")


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the project's source packages that a test may edit."""
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def touch(file: Path) -> None:
    file.write_text(file.read_text() + "\n# an edit\n")


def closure_names(stage: str, root: Path) -> set[str]:
    return {file.relative_to(root).as_posix() for file in import_closure(STAGE_MODULES[stage], root)}


def test_each_stage_covers_the_modules_that_once_were_missing_from_its_list(project):
    assert "gpt/tokenize_worker.py" in closure_names("tokenize", project)  # it does the encoding
    assert "gpt/encoding.py" in closure_names("tokenize", project)
    assert "storage/shards.py" in closure_names("tokenize", project)
    assert "gpt/data.py" in closure_names("evaluate", project)  # it picks the scored windows
    assert "gpt/encoding.py" in closure_names("sample", project)  # the tokenizer of the prompt and the text
    assert "gpt/model.py" not in closure_names("tokenize", project)  # what a stage does not run is not its code


@pytest.mark.parametrize(("stage", "module", "what_it_does"), [
    ("sample", "tasks/sample.py", "samples_markdown writes samples.md"),
    ("profile", "tasks/profile.py", "writes profile.json, profile.md and the histograms"),
    ("download", "tasks/download.py", "lays the files out under data/"),
    ("hellaswag", "gpt/evaluate.py", "read_hellaswag checks the file and counts its items"),
])
def test_editing_the_code_that_writes_part_of_an_artifact_changes_its_version(project, stage, module, what_it_does):
    before = stage_code_version(stage, project)
    touch(project / module)
    assert stage_code_version(stage, project) != before, f"{module} {what_it_does}"


@pytest.mark.parametrize("module", ["tasks/report.py", "flows/fineweb_pretrain.py", "flows/stack.py"])
def test_editing_code_that_writes_no_artifact_changes_no_version(project, module):
    before = {stage: stage_code_version(stage, project) for stage in STAGE_MODULES}
    touch(project / module)
    assert {stage: stage_code_version(stage, project) for stage in STAGE_MODULES} == before


def test_a_stage_module_without_a_file_is_an_error_not_a_smaller_version(project):
    (project / "tasks" / "sample.py").rename(project / "tasks" / "sampling.py")
    with pytest.raises(ModuleNotFoundError, match="tasks.sample"):
        stage_code_version("sample", project)


def test_an_import_of_a_project_module_without_a_file_is_an_error(project):
    tokenizer = project / "gpt" / "tokenizer.py"
    tokenizer.write_text(tokenizer.read_text() + "\nfrom gpt.moved_away import encode\n")
    with pytest.raises(ModuleNotFoundError, match="gpt.moved_away"):
        stage_code_version("tokenize", project)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_the_closure_holds_every_project_module_the_stage_really_imports(stage):
    probe = (f"import sys, {', '.join(STAGE_MODULES[stage])}\n"
             f"print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r})))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    modules = {name for name in loaded.stdout.split() if name}
    files = {(Path(*name.split(".")).with_suffix(".py") if (PROJECT_ROOT / Path(*name.split(".")).with_suffix(".py")).exists()
              else Path(*name.split(".")) / "__init__.py").as_posix() for name in modules}
    assert files <= closure_names(stage, PROJECT_ROOT), files - closure_names(stage, PROJECT_ROOT)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_editing_any_module_of_a_stage_changes_its_version_and_no_other_module_does(project, stage):
    inside = closure_names(stage, project) - set(NOT_CODE_OF_A_STAGE)  # the schema acts through the config slice
    every = {file.relative_to(project).as_posix() for package in PACKAGES for file in (project / package).rglob("*.py")}
    assert inside < every
    before = stage_code_version(stage, project)
    for name in sorted(every):
        touch(project / name)
        after = stage_code_version(stage, project)
        assert (after != before) == (name in inside), f"{stage} after editing {name}"
        before = after  # the edits pile up: each is judged against the version just before it


def test_a_code_change_reaches_the_stages_after_it(project, monkeypatch):
    monkeypatch.setattr(versions, "PROJECT_ROOT", project)
    config = load_config("demo")
    download = "d0wnl0ad"

    def stage_versions() -> dict[str, str]:
        tokenize = plan_tokenize(download, config.data, config.tokenize)
        return {"profile": plan_profile(download, config.data, config.profile), "tokenize": tokenize,
                "evaluate": plan_evaluate("checkpoint", tokenize, None, config.eval)}

    before = stage_versions()
    touch(project / "gpt" / "tokenize_worker.py")
    after = stage_versions()
    assert after["tokenize"] != before["tokenize"] and after["evaluate"] != before["evaluate"]
    assert after["profile"] == before["profile"]


def test_speed_only_settings_do_not_change_versions():
    config = load_config("demo")
    faster = load_config("demo", ["tokenize.num_workers=7", "profile.memory_limit=2GB", "eval.hellaswag_items_per_batch=64"])
    assert plan_tokenize("d", faster.data, faster.tokenize) == plan_tokenize("d", config.data, config.tokenize)
    assert plan_profile("d", faster.data, faster.profile) == plan_profile("d", config.data, config.profile)
    assert plan_evaluate("c", "t", "h", faster.eval) == plan_evaluate("c", "t", "h", config.eval)
    assert plan_tokenize("d", config.data, load_config("demo", ["tokenize.val_fraction=0.1"]).tokenize) != (
        plan_tokenize("d", config.data, config.tokenize))


def test_per_file_versions_name_the_file_and_only_what_shapes_its_artifact():
    from storage.versions import plan_download_file, plan_profile_files

    fingerprint = {"url": "https://user:secret@host/a.parquet", "size": 10, "etag": "e1"}
    version = plan_download_file(fingerprint, "a.parquet", None, "code")
    assert version == plan_download_file({**fingerprint, "url": "https://user:other@host/a.parquet"}, "a.parquet", None, "code")
    for changed in (plan_download_file({**fingerprint, "etag": "e2"}, "a.parquet", None, "code"),
                    plan_download_file(fingerprint, "b.parquet", None, "code"),
                    plan_download_file(fingerprint, "a.parquet", 1000, "code"),
                    plan_download_file(fingerprint, "a.parquet", None, "edited")):
        assert changed != version
    config = load_config("demo")
    files = [("a.parquet", "sha-a"), ("b.parquet", "sha-b")]
    [a, b] = plan_profile_files(files, config.data)
    assert a != b and plan_profile_files(files[:1], config.data) == [a]  # one file's version does not hang on the others
    other_settings = load_config("demo", ["profile.short_doc_chars=5", "profile.top_domains=3"])
    assert plan_profile_files(files, other_settings.data) == [a, b]  # the statistics' settings act on the merge only
    assert plan_profile_files(files, load_config("demo", ["data.text_column=body"]).data) != [a, b]
