"""`make venv` picks the torch build for the machine: tools/torch_variant.py asked through a
fake `nvidia-smi` on PATH, and the Makefile's plan (make -n) when the variant changes.
Nothing is installed and no CUDA wheel is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "tools" / "torch_variant.py"
TORCH_VERSION = next(dep.split("==")[1] for dep in tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
                     ["project"]["dependencies"] if dep.startswith("torch=="))


def fake_nvidia_smi(folder: Path, driver: str | None, gpu: str = "NVIDIA GeForce RTX 4070") -> Path:
    """A PATH folder whose nvidia-smi answers like a machine with this driver (None: no driver loaded)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    if driver is None:
        body = ('echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver. '
                'Make sure that the latest NVIDIA driver is installed and running."\nexit 9\n')
    else:
        body = f'case "$*" in *--query-gpu*) echo "{driver}, {gpu}";; *) echo "| NVIDIA-SMI {driver} |";; esac\n'
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return folder


def variant(path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT)], env={"PATH": str(path), **env}, capture_output=True, text=True)


def install_plan(path: Path, **env: str) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), "install", "--python", sys.executable, "--dry-run"],
                            env={"PATH": str(path), **env}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("driver", "expected"), [
    ("580.95.05", "cu130"),  # CUDA 13.0 needs 580.65.06: PyPI's own build of torch
    ("575.64.03", "cu128"),
    ("570.26", "cu128"),
    ("565.57.01", "cu126"),
    ("550.54.14", "cpu"),  # older than any CUDA build of this torch
])
def test_variant_is_the_newest_cuda_build_the_driver_runs(tmp_path, driver, expected):
    result = variant(fake_nvidia_smi(tmp_path / "bin", driver))
    assert result.returncode == 0 and result.stdout.strip() == expected


def test_a_driver_too_old_is_explained(tmp_path):
    plan = install_plan(fake_nvidia_smi(tmp_path / "bin", "550.54.14"))
    assert "cpu build" in plan and "driver 550.54.14 is older than" in plan and "TORCH_VARIANT" in plan


def test_no_nvidia_smi_or_no_driver_means_the_cpu_build(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert variant(empty).stdout.strip() == "cpu"
    assert "(no nvidia-smi on PATH)" in install_plan(empty)
    broken = fake_nvidia_smi(tmp_path / "broken", driver=None)
    assert variant(broken).stdout.strip() == "cpu"
    assert "nvidia-smi failed: NVIDIA-SMI has failed because it couldn't communicate" in install_plan(broken)


def test_torch_variant_overrides_detection_and_is_checked(tmp_path):
    gpu = fake_nvidia_smi(tmp_path / "bin", "580.95.05")
    assert variant(gpu, TORCH_VARIANT="cpu").stdout.strip() == "cpu"
    assert variant(gpu, TORCH_VARIANT="cu126").stdout.strip() == "cu126"
    bad = variant(gpu, TORCH_VARIANT="cuda12")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "error: TORCH_VARIANT=cuda12 is not a torch build; use one of cpu, cu130, cu128, cu126"


def test_install_plan_names_the_pinned_build_and_where_it_comes_from(tmp_path):
    gpu = fake_nvidia_smi(tmp_path / "bin", "570.86.10")
    plan = install_plan(gpu)
    assert f"torch {TORCH_VERSION}, cu128 build (NVIDIA GeForce RTX 4070, NVIDIA driver 570.86.10)" in plan
    assert f"install --quiet torch=={TORCH_VERSION}+cu128 --extra-index-url https://download.pytorch.org/whl/cu128" in plan
    installed = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                               capture_output=True, text=True).stdout.strip()
    assert f"replacing torch {installed}" in plan  # this venv holds another build
    newest = install_plan(fake_nvidia_smi(tmp_path / "new", "580.95.05"))
    assert f"install --quiet torch==={TORCH_VERSION}\n" in newest and "extra-index-url" not in newest  # PyPI's build
    cpu = install_plan(tmp_path / "new", TORCH_VARIANT="cpu")
    assert f"install --quiet torch=={TORCH_VERSION}+cpu\n" in cpu  # the local wheel first, PyTorch's CPU index after
    assert f"torch=={TORCH_VERSION}+cpu --extra-index-url https://download.pytorch.org/whl/cpu" in cpu


def make_plan(tmp_path: Path, path: Path, *variables: str) -> str:
    """What `make -n venv` would run for a venv already built with the cpu build."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / ".installed-torch-cpu").touch()
    if not (path / "make").exists():
        (path / "make").symlink_to(shutil.which("make"))
    result = subprocess.run(["make", "-n", "venv", f"VENV={venv}", f"PYTHON={sys.executable}", *variables], cwd=PROJECT_ROOT,
                            env={"PATH": str(path), "HOME": os.environ.get("HOME", "/root")}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_venv_reinstalls_torch_only_when_the_variant_changes(tmp_path):
    no_gpu = tmp_path / "no-gpu"
    no_gpu.mkdir()
    same = make_plan(tmp_path, no_gpu)
    assert "torch_variant.py install" not in same and "torch: the cpu build" in same

    switched = make_plan(tmp_path, fake_nvidia_smi(tmp_path / "gpu", "580.95.05"))
    assert "tools/torch_variant.py install --python" in switched
    assert f"touch {tmp_path / 'venv' / '.installed-torch-cu130'}" in switched

    forced = make_plan(tmp_path, no_gpu, "TORCH_VARIANT=cu128")
    assert f"touch {tmp_path / 'venv' / '.installed-torch-cu128'}" in forced
