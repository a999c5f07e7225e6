"""A run's event log: `<run_dir>/metrics.jsonl`, the on_event callback and the log, one line each.

Events: start, train (logged iterations), eval (val loss), hellaswag (a subset's accuracy),
checkpoint, schedule (an LR change on continuation), done. In every event, `iter` is the number of iterations completed when it
happened: `{"event": "train", "iter": 10, ...}` is the loss of the 10th iteration, and
`{"event": "eval", "iter": 10, ...}` the val loss of the weights after it, so the two line
up, and `iter × tokens per iteration` is the tokens seen.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from configs.errors import disk_full_is_one_line
from storage.artifacts import write_text_atomic

METRICS_FILE = "metrics.jsonl"
METRICS_FORMAT = 2  # in every start event; format 1 counted train events' `iter` from 0

logger = logging.getLogger("gpt.train")


class EventLog:
    """Sends each event to metrics.jsonl, the on_event callback and the log (rank 0 only)."""

    def __init__(self, metrics_path: Path | None, on_event: Callable[[dict], None] | None, enabled: bool):
        self.metrics_path = metrics_path
        self.on_event = on_event
        self.enabled = enabled

    def emit(self, event: str, log_level: int = logging.INFO, **fields: Any) -> dict[str, Any]:
        record = {"event": event, **fields, "time": time.time()}
        if not self.enabled:
            return record
        if self.metrics_path is not None:
            with disk_full_is_one_line(self.metrics_path.parent, self.metrics_path.name), open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.on_event is not None:
            self.on_event(record)
        logger.log(log_level, describe_event(record))
        return record


def describe_event(event: dict[str, Any]) -> str:
    """One human-readable log line per event."""
    kind = event["event"]
    if kind == "start":
        resumed = f", resumed from iteration {event['resumed_from_iter']}" if event["resumed_from_iter"] is not None else ""
        return (
            f"training {event['params'] / 1e6:.2f}M parameters on {event['device']} ({event['dtype']}, "
            f"{event['world_size']} process(es)), {event['tokens_per_iter']:,} tokens/iter, "
            f"iterations {event['start_iter']}→{event['max_iters']}{resumed}"
        )
    if kind == "train":
        mfu_text = f"{event['mfu'] * 100:.1f}%" if event["mfu"] is not None else "n/a"
        return (
            f"iter {event['iter']}: loss {event['loss']:.4f}, lr {event['lr']:.3e}, grad norm {event['grad_norm']:.3f}, "
            f"{event['ms_per_iter']:.1f} ms/iter, {event['tokens_per_sec']:,.0f} tokens/s, mfu {mfu_text}"
        )
    if kind == "eval":
        return f"iter {event['iter']}: val loss {event['val_loss']:.4f}"
    if kind == "checkpoint":
        return f"iter {event['iter']}: saved checkpoint {event['path']}"
    if kind == "hellaswag":
        return f"iter {event['iter']}: HellaSwag acc_norm {_fmt(event['acc_norm'])}, acc {_fmt(event['acc'])} ({event['items']} items)"
    if kind in ("schedule", "warning"):
        return event["message"]
    if kind == "done":
        return (
            f"done at iteration {event['iterations']}: val loss {_fmt(event['val_loss'])}, "
            f"best {_fmt(event['best_val_loss'])}, {event['tokens_trained']:,} tokens trained"
        )
    return json.dumps(event)


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


def _metric_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, event) for each whole line of a metrics file; a line torn by a kill is skipped.

    Files written before METRICS_FORMAT 2 (their start events name no format) counted a train
    event's `iter` from 0; such events are read with the iterations completed, like the rest."""
    if not path.exists():
        return
    written_as = 1
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "start":
            written_as = event.get("metrics_format", 1)
        if written_as == 1 and event.get("event") == "train" and event.get("iter") is not None:
            event["iter"] += 1
        yield line, event


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl, oldest first (none when it does not exist)."""
    return [event for _, event in _metric_lines(path)]


def trim_metrics(path: Path, iteration: int) -> None:
    """Keep only the history that led to the checkpoint after `iteration` iterations: drop the
    events of later iterations and a line torn by a kill. The resumed run writes those
    iterations again (identically)."""
    if not path.exists():
        return
    kept = [line for line, event in _metric_lines(path) if event.get("iter") is None or event["iter"] <= iteration]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
