"""Checkpoints: one folder per step, complete only once its manifest exists.

    <run_dir>/checkpoints/step_000120/model.pt        model state dict (no wrapper prefixes)
    <run_dir>/checkpoints/step_000120/optimizer.pt    optimizer state dict
    <run_dir>/checkpoints/step_000120/state.json      format, iteration, val_loss (measured at this step),
                                                      one key per stateful object of the trainer (progress,
                                                      loader, schedule, rng, grad_scaler), config, code version
    <run_dir>/checkpoints/step_000120/manifest.json   size and sha256 of the three files: written last

This module is the one place that knows this layout; everything else asks it
(`read_state`, `checkpoint_iteration`, `checkpoint_path`). state.json says its `format`;
format 1 (before the stateful objects, progress figures at the top level) is read too.

A checkpoint is written into a temporary sibling `.step_000120.tmp-xxxxxxxx`, fsynced and
renamed into place, so a crash (even SIGKILL) leaves either the old set of checkpoints
or the new one. `latest_checkpoint` also checks the sha256 sums, so a checkpoint damaged
after the fact (a truncated file) is skipped with a warning and the previous one used.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from configs.errors import UserError
from configs.schema import ModelConfig
from gpt.model import GPT, GPTConfig, load_nanogpt_state_dict, strip_wrapper_prefixes, unwrap_model
from storage.artifacts import FileEntry, list_files, mismatched_files, publish_folder, sha256_file, write_json_atomic

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
FORMAT = 2
STEP_PATTERN = re.compile(r"^step_(\d+)$")
TEMPORARY_PATTERN = re.compile(r"^\.step_\d+\.tmp-[0-9a-f]+$")

logger = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be read; the message is one line."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the folder, both state dicts and state.json."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    state: dict[str, Any]

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_name(iteration: int) -> str:
    return f"step_{iteration:06d}"


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    """Where the checkpoint after `iteration` iterations of a run lives."""
    return checkpoints_dir(run_dir) / step_name(iteration)


def save_checkpoint(
    run_dir: str | Path,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write the checkpoint of `iteration` atomically, then apply retention. Returns its folder.

    `state` must be JSON-able; `format` and `iteration` are added to it. A compiled or
    DDP-wrapped model is unwrapped, so the saved keys carry no `_orig_mod.`/`module.` prefixes.
    """
    final = checkpoint_path(run_dir, iteration)
    final.parent.mkdir(parents=True, exist_ok=True)

    def fill(folder: Path) -> None:
        _save_torch(unwrap_model(model).state_dict(), folder / MODEL_FILE)
        _save_torch(optimizer.state_dict(), folder / OPTIMIZER_FILE)
        write_json_atomic(folder / STATE_FILE, {**state, "format": FORMAT, "iteration": iteration})
        files = [entry.model_dump() for entry in list_files(folder)]  # model, optimizer, state
        write_json_atomic(folder / MANIFEST_FILE, {"iteration": iteration, "created_at": time.time(), "files": files})

    publish_folder(final, fill)  # replaces a damaged checkpoint of the same step, found bad and retrained
    prune_checkpoints(run_dir, keep_last)
    return final


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def checkpoint_identity(checkpoint_dir: str | Path) -> str:
    """What identifies a checkpoint's content: its manifest, which holds the checksum of every file."""
    return sha256_file(Path(checkpoint_dir) / MANIFEST_FILE)[:16]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders that have a manifest, oldest first (checksums not verified)."""
    parent = checkpoints_dir(run_dir)
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if STEP_PATTERN.match(p.name) and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def damaged_files(checkpoint_dir: str | Path, only: tuple[str, ...] | None = None) -> list[str]:
    """Files of a checkpoint (or just those named in `only`) whose size or sha256 differ from
    its manifest (empty: intact)."""
    folder = Path(checkpoint_dir)
    try:
        entries = [FileEntry.model_validate(entry) for entry in json.loads((folder / MANIFEST_FILE).read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return [MANIFEST_FILE]
    return mismatched_files(folder, [entry for entry in entries if only is None or entry.path in only])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums, or None.

    A damaged newer checkpoint is skipped with a warning naming the bad file.
    """
    for folder in reversed(list_checkpoints(run_dir)):
        bad = damaged_files(folder)
        if not bad:
            return folder
        named = ", ".join(str(folder / name) for name in bad)
        message = f"checkpoint {folder} is damaged ({named} does not match its manifest); skipping it and using an older one"
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
    return None


def select_checkpoint(run_dir: str | Path, which: str | int = "latest") -> Path:
    """One checkpoint of a run: "latest" (the newest intact one), "best" (the lowest val loss
    measured at a checkpoint, among those kept) or a step number; a CheckpointError naming the
    steps there are otherwise."""
    folders = list_checkpoints(run_dir)
    steps = [int(STEP_PATTERN.match(folder.name).group(1)) for folder in folders]
    listing = ", ".join(map(str, steps)) or "none"
    if which == "latest":
        found = latest_checkpoint(run_dir)
    elif which == "best":
        scored = [(loss, folder) for folder in folders if (loss := _val_loss(folder)) is not None]
        found = min(scored, key=lambda pair: pair[0])[1] if scored else None
    else:
        try:
            step = int(which)
        except ValueError:
            raise CheckpointError(f"checkpoint {which!r}: name latest, best or a step number") from None
        found = checkpoint_path(run_dir, step) if step in steps else None
    if found is None:
        raise CheckpointError(f"{run_dir} has no {which} checkpoint (steps there: {listing}); "
                              "name one of those steps, or train the run first")
    return found


def load_checkpoint(
    checkpoint_dir: str | Path, map_location: str | torch.device = "cpu", verify: bool = True, optimizer: bool = True
) -> Checkpoint:
    """Read a checkpoint folder. `verify` checks the sha256 sums first (skip it only
    right after `latest_checkpoint`, which already did); `optimizer=False` neither reads nor
    checks the optimizer state, which evaluation and sampling do not need."""
    folder = Path(checkpoint_dir)
    if not (folder / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MANIFEST_FILE}); pass a runs/<name>/checkpoints/step_N folder")
    if verify and (bad := damaged_files(folder, None if optimizer else (MODEL_FILE, STATE_FILE))):
        raise CheckpointError(f"checkpoint {folder} is damaged ({', '.join(bad)} does not match the manifest); use an earlier step")
    state = read_state(folder)
    model_state = strip_wrapper_prefixes(load_tensors(folder / MODEL_FILE, map_location))
    optimizer_state = load_tensors(folder / OPTIMIZER_FILE, map_location) if optimizer else None
    return Checkpoint(path=folder, model=model_state, optimizer=optimizer_state, state=state)


def load_tensors(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only: tensors, numbers and containers come back; a pickle that
    would build anything else (run code) is refused, in one line, before it runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} was refused: it holds more than weights ({first}); load only checkpoints you trust "
                              "— this one is not loaded") from None


def load_nanogpt_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Read a nanoGPT `ckpt.pt` into our GPT (weights only, as load_tensors).

    Returns the model and nanoGPT's bookkeeping: iter_num, best_val_loss (a float)
    and its training config dict.
    """
    checkpoint = load_tensors(path, map_location)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    load_nanogpt_state_dict(model, checkpoint["model"])
    best = checkpoint.get("best_val_loss")
    info = {
        "iter_num": int(checkpoint.get("iter_num", 0)),
        "best_val_loss": float(best) if best is not None else None,
        "config": checkpoint.get("config", {}),
    }
    return model.to(map_location), info


def read_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's state.json in the current format (format 1 is converted)."""
    folder = Path(checkpoint_dir)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / STATE_FILE} cannot be read ({exc}); use an earlier step") from None
    found = state.get("format", 1)
    if found == 1:
        return _from_format_1(state)
    if found != FORMAT:
        raise CheckpointError(
            f"{folder} is in checkpoint format {found}, and this fineweb-pretrain reads formats 1 to {FORMAT}; "
            "update fineweb-pretrain, or train into a new train.run_name"
        )
    return state


def _from_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept the trainer's progress at the top level, under other names."""
    renamed = {"tokens_trained": "tokens_trained", "last_val_loss": "val_loss", "last_val_loss_iter": "val_loss_iter",
               "best_val_loss": "best_val_loss"}
    progress = {new: state[old] for old, new in renamed.items() if old in state}
    rest = {key: value for key, value in state.items() if key not in renamed}
    return {**rest, "format": FORMAT, "progress": {"iteration": state.get("iteration"), **progress}}


def checkpoint_iteration(checkpoint_dir: str | Path) -> int:
    """The number of iterations a checkpoint was taken after."""
    return int(read_state(checkpoint_dir)["iteration"])


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The GPT of a checkpoint, on `device` and in eval mode, with its state.json."""
    checkpoint = load_checkpoint(checkpoint_dir, map_location="cpu", optimizer=False)
    model_config = ModelConfig.model_validate(checkpoint.state["config"]["model"])
    model = GPT(GPTConfig.from_model_config(model_config))
    model.load_state_dict(checkpoint.model)
    return model.to(device).eval(), checkpoint.state


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all complete checkpoints but the newest `keep_last` and the one with the
    lowest val loss (state.json's `val_loss`, measured at that step). Returns the deleted."""
    folders = list_checkpoints(run_dir)
    keep = set(folders[-keep_last:])
    scored = [(loss, folder) for folder in folders if (loss := _val_loss(folder)) is not None]
    if scored:
        keep.add(min(scored, key=lambda pair: pair[0])[1])
    removed = [folder for folder in folders if folder not in keep]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def _val_loss(folder: Path) -> float | None:
    try:
        return json.loads((folder / STATE_FILE).read_text()).get("val_loss")
    except (OSError, ValueError):
        return None


def remove_temporaries(run_dir: str | Path) -> None:
    """Delete half-written `.step_N.tmp-*` folders that a killed writer left behind."""
    parent = checkpoints_dir(run_dir)
    if parent.is_dir():
        for path in parent.iterdir():
            if TEMPORARY_PATTERN.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
