"""Which build of the pinned torch `make venv` installs here: the CPU build, or a CUDA one.

    python3 tools/torch_variant.py                      # the variant for this machine: cpu, cu126, cu128 or cu130
    python3 tools/torch_variant.py install --python .venv/bin/python [--dry-run]

The variant is TORCH_VARIANT when set; otherwise `nvidia-smi` decides: no nvidia-smi, or
one that fails (no driver loaded), means cpu; a driver that answers gets the newest CUDA
build it can run (each CUDA toolkit needs a minimum driver). `install` prints the choice
and why, then installs the pinned version (read from pyproject.toml) of this variant; pip
replaces a torch of another variant only once the new one has been fetched.

It runs with the system Python before the virtualenv exists, so it uses the standard
library only.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PYTORCH_INDEX = "https://download.pytorch.org/whl"
# The CUDA builds of torch 2.13 and the oldest Linux driver each runs on (the driver that
# shipped with that CUDA toolkit), newest first. PyPI's own Linux wheel of 2.13.0 is the
# cu130 build; the others come from PyTorch's index.
CUDA_VARIANTS = {"cu130": (580, 65, 6), "cu128": (570, 26), "cu126": (560, 28, 3)}
PYPI_DEFAULT_CUDA = "cu130"
VARIANTS = ("cpu", *CUDA_VARIANTS)


class VariantError(Exception):
    """A TORCH_VARIANT that names no build; the message is one line."""


def pinned_torch_version() -> str:
    """The `torch==X` pin of pyproject.toml, the one place the version is written."""
    dependencies = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        match = re.fullmatch(r"torch\s*==\s*([\w.]+)", requirement.split(";")[0].strip())
        if match:
            return match[1]
    raise VariantError("pyproject.toml pins no torch==X in [project].dependencies")


def query_nvidia_smi() -> tuple[str | None, str]:
    """(driver version, GPU name) from nvidia-smi, or (None, why not)."""
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, "no nvidia-smi on PATH"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-smi did not answer ({exc})"
    first = answer.stdout.strip().splitlines()[:1]
    if answer.returncode or not first or "," not in first[0]:
        said = (answer.stdout + answer.stderr).strip().splitlines()[:1] or [f"exit status {answer.returncode}"]
        return None, f"nvidia-smi failed: {said[0]}"
    driver, name = (part.strip() for part in first[0].split(",", 1))
    return driver, name


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def detect_variant() -> tuple[str, str]:
    """(variant, the reason in words) for this machine, TORCH_VARIANT first."""
    chosen = os.environ.get("TORCH_VARIANT", "").strip()
    if chosen:
        return check_variant(chosen), f"TORCH_VARIANT={chosen}"
    driver, name = query_nvidia_smi()
    if driver is None:
        return "cpu", name
    for variant, minimum in CUDA_VARIANTS.items():
        if _version_tuple(driver) >= minimum:
            return variant, f"{name}, NVIDIA driver {driver}"
    oldest = min(CUDA_VARIANTS.items(), key=lambda item: item[1])
    return "cpu", (f"{name} found, but NVIDIA driver {driver} is older than the {'.'.join(map(str, oldest[1]))} "
                   f"that torch's oldest CUDA build ({oldest[0]}) needs; update the driver, or set TORCH_VARIANT")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise VariantError(f"TORCH_VARIANT={variant} is not a torch build; use one of {', '.join(VARIANTS)}")
    return variant


def requirement_and_index(version: str, variant: str) -> tuple[str, str | None]:
    """The pip requirement for torch `version` of `variant`, and the extra index that has it."""
    linux_x86 = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    if variant == "cpu":
        if not linux_x86:  # macOS and aarch64 wheels on PyPI are CPU builds, with no +cpu label
            return f"torch=={version}", None
        return f"torch=={version}+cpu", f"{PYTORCH_INDEX}/cpu"
    if variant == PYPI_DEFAULT_CUDA:  # `===`: exactly this version string, so an installed +cpu build does not satisfy it
        return f"torch==={version}", None
    return f"torch=={version}+{variant}", f"{PYTORCH_INDEX}/{variant}"


def installed_torch(python: str) -> str | None:
    """The torch version installed for `python` (e.g. 2.13.0+cpu), or None."""
    probe = "import importlib.metadata as m\ntry: print(m.version('torch'))\nexcept m.PackageNotFoundError: pass"
    answer = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return answer.stdout.strip() or None


def variant_of(installed: str) -> str:
    """The variant of an installed torch version: its +label, or PyPI's default build."""
    label = installed.partition("+")[2]
    if label:
        return label
    linux_x86 = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    return PYPI_DEFAULT_CUDA if linux_x86 else "cpu"


def install(python: str, variant: str, reason: str, dry_run: bool) -> int:
    version = pinned_torch_version()
    requirement, index = requirement_and_index(version, variant)
    print(f"torch {version}, {variant} build ({reason}); TORCH_VARIANT=cpu|{'|'.join(CUDA_VARIANTS)} overrides it")
    pip = [python, "-m", "pip"]
    installed = installed_torch(python) if Path(python).exists() else None
    if installed and (installed.split("+")[0] != version or variant_of(installed) != variant):
        print(f"replacing torch {installed} ({variant_of(installed)} build) with the {variant} build")
    # A local wheel or the configured index first (CI installs the CPU build from disk), then PyTorch's index.
    attempts = [[requirement]] + ([[requirement, "--extra-index-url", index]] if index else [])
    if dry_run:
        for attempt in attempts:
            print("+ " + " ".join(pip + ["install", "--quiet", *attempt]) + ("   # if the one above fails" if attempt is not attempts[0] else ""))
        return 0
    if any(_run(pip + ["install", "--quiet", *attempt], dry_run) for attempt in attempts):
        return 0
    where = f" or at {index}" if index else ""
    print(f"error: pip could not install {requirement} (none for this Python and platform on PyPI{where}); "
          f"pick another build with TORCH_VARIANT=cpu|{'|'.join(CUDA_VARIANTS)}", file=sys.stderr)
    return 1


def _run(command: list[str], dry_run: bool) -> bool:
    print("+ " + " ".join(command), flush=True)
    return dry_run or subprocess.run(command).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/torch_variant.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    installer = sub.add_parser("install", help="install the pinned torch of the variant into a Python")
    installer.add_argument("--python", required=True, help="the virtualenv's python")
    installer.add_argument("--dry-run", action="store_true", help="print the pip commands, run none")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            return install(args.python, *detect_variant(), dry_run=args.dry_run)
        print(detect_variant()[0])
        return 0
    except VariantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
