"""Run `python -m gpt.train` and SIGKILL it from inside at one exact moment.

    python -m tests.kill_trainer MOMENT ITERATION -- <gpt.train arguments>

A real SIGKILL (no handler, no cleanup, nothing flushed), delivered where a timer could
never aim: half-way through a file, between two micro-steps, between fsync and rename.
The trainer's own code is unchanged; the moments are found by wrapping the functions it
calls. ITERATION is the 0-based index of the iteration in progress (for `mid-retention`,
the first pruning at or after it).
"""

from __future__ import annotations

import io
import os
import signal
import sys
import types
from pathlib import Path

import gpt.checkpoint
import gpt.data
import gpt.metrics
import gpt.train
import storage.artifacts

MOMENTS = {
    "mid-iteration": "between the two micro-steps of an iteration (one backward done, no optimizer step)",
    "mid-evaluation": "inside the val-loss estimate after an iteration",
    "mid-metrics-line": "half of an iteration's train event written to metrics.jsonl",
    "mid-checkpoint-write": "model.pt written and half of optimizer.pt, in the checkpoint's temporary folder",
    "before-checkpoint-rename": "every file and the manifest fsynced in the temporary folder, not yet renamed",
    "mid-retention": "a newer checkpoint published; an older one half deleted by retention",
}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(moment: str, at: int) -> None:
    """Wrap what the trainer calls so that the process kills itself at `moment` of iteration `at`."""
    if moment not in MOMENTS:
        raise SystemExit(f"unknown moment {moment!r}; one of {', '.join(MOMENTS)}")
    started = {"iteration": -1, "batches": 0}  # the iteration in progress, batches it has taken

    train_step = gpt.train.train_step

    def counting_train_step(*args, **kwargs):
        started["iteration"] += 1
        started["batches"] = 0
        return train_step(*args, **kwargs)

    gpt.train.train_step = counting_train_step
    now = lambda: started["iteration"] == at  # noqa: E731

    next_batch = gpt.data.TrainLoader.next_batch

    def next_batch_then_maybe_die(self):
        started["batches"] += 1
        if moment == "mid-iteration" and now() and started["batches"] == 2:
            die()
        return next_batch(self)

    gpt.data.TrainLoader.next_batch = next_batch_then_maybe_die

    estimate = gpt.train.estimate_val_loss

    def estimate_or_die(*args, **kwargs):
        if moment == "mid-evaluation" and now():
            die()
        return estimate(*args, **kwargs)

    gpt.train.estimate_val_loss = estimate_or_die

    emit = gpt.metrics.EventLog.emit

    def emit_or_tear(self, event, *args, **fields):
        if moment == "mid-metrics-line" and event == "train" and fields.get("iter") == at + 1 and self.metrics_path:
            with open(self.metrics_path, "a") as handle:
                handle.write('{"event": "train", "iter": %d, "lo' % (at + 1))
            die()
        return emit(self, event, *args, **fields)

    gpt.metrics.EventLog.emit = emit_or_tear

    save_torch = gpt.checkpoint._save_torch

    def save_half_or_all(obj, path: Path):
        if moment == "mid-checkpoint-write" and now() and path.name == gpt.checkpoint.OPTIMIZER_FILE:
            buffer = io.BytesIO()
            gpt.checkpoint.torch.save(obj, buffer)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        return save_torch(obj, path)

    gpt.checkpoint._save_torch = save_half_or_all

    fsync_dir = storage.artifacts.fsync_dir

    def fsync_then_maybe_die(path: Path):
        fsync_dir(path)
        if moment == "before-checkpoint-rename" and now() and path.name.startswith(".step_"):
            die()

    storage.artifacts.fsync_dir = fsync_then_maybe_die

    def rmtree_half(path, *args, **kwargs):
        if moment == "mid-retention" and started["iteration"] >= at:
            (Path(path) / gpt.checkpoint.MODEL_FILE).unlink()
            die()
        return real_shutil.rmtree(path, *args, **kwargs)

    real_shutil = gpt.checkpoint.shutil
    gpt.checkpoint.shutil = types.SimpleNamespace(rmtree=rmtree_half)


def main(argv: list[str]) -> int:
    moment, at, separator, *train_args = argv
    if separator != "--":
        raise SystemExit(__doc__)
    arm(moment, int(at))
    result = gpt.train.main(train_args)
    print(f"the run ended without reaching the moment {moment} at iteration {at}", file=sys.stderr)
    return 3 if result == 0 else result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
