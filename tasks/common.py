"""What every stage task shares: the cache key, the retry condition, running or submitting a task with its cache state, UI keys.

A stage's Prefect cache key is its artifact version plus the storage root, so the same
inputs give a `Cached` task run. When the artifact folder is gone (deleted by hand, or a
new storage root) the cache is refreshed instead of trusted.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from prefect import Task
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture

from configs.errors import is_transient, is_user_error
from storage.artifacts import ArtifactStore, stable_hash
from storage.markdown import human_bytes


def version_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a stage task: `<stage>-<version>-<hash of the storage root>`."""
    return f"{context.task.name}-{parameters['version']}-{stable_hash(str(parameters['store'].root), 8)}"


def run_cached_stage(task: Task, store: ArtifactStore, version: str, quiet: bool = False,
                     **parameters: Any) -> tuple[dict[str, Any], bool]:
    """Run a stage task; return (its result, whether Prefect served it from the cache)."""
    state = _with_cache_rule(task, store, version)(store=store, version=version, return_state=True, **parameters)
    result = state.result()  # raises the task's error when it failed
    if state.name == "Cached" and not quiet:
        announce_cache_hit(store, task.name, version)
    return result, state.name == "Cached"


def submit_cached_stage(task: Task, store: ArtifactStore, version: str, **parameters: Any) -> PrefectFuture:
    """Submit a stage task to the flow's task runner, with the same cache rule as run_cached_stage."""
    return _with_cache_rule(task, store, version).submit(store=store, version=version, **parameters)


def _with_cache_rule(task: Task, store: ArtifactStore, version: str) -> Task:
    """The task, its cache refreshed when the artifact it would name is gone (see the module docstring)."""
    return task.with_options(refresh_cache=not store.exists(task.name, version))


def announce_cache_hit(store: ArtifactStore, stage: str, version: str) -> None:
    print(f"{stage}: cache hit, artifact {version} reused ({store.path(stage, version)})")


def retry_if_transient(task: Task, task_run: Any, state: Any) -> bool:
    """The retry condition of every task that Prefect retries: only a TransientError (the
    network, a killed process: it may pass) is retried. A UserError would fail the same way
    again, and anything else is a bug, which must not run twice."""
    try:
        state.result()
    except BaseException as error:
        return is_transient(error)
    return False



class _UserErrorsInOneLine(logging.Filter):
    """Prefect logs a failed run's exception with its traceback. For a UserError the one line
    that names the problem and the fix is the whole story, in the terminal and in the UI; a
    bug keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_user_error(error):
            record.exc_info = record.exc_text = None
        return True


for _run_logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_run_logger).addFilter(_UserErrorsInOneLine())


def ui_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class ProgressArtifact:
    """A Prefect progress artifact, updated at most once per whole percent, echoed to the log every 10%."""

    def __init__(self, description: str, unit: str = ""):
        from prefect.artifacts import create_progress_artifact

        self._id = create_progress_artifact(progress=0.0, description=description)
        self._description = description
        self._unit = unit
        self._last = 0

    def update(self, done: float, total: float) -> None:
        from prefect.artifacts import update_progress_artifact

        percent = min(int(100 * done / total) if total else 100, 100)
        if percent <= self._last:
            return
        if percent // 10 > self._last // 10:
            amount = f" ({human_bytes(done)} of {human_bytes(total)})" if self._unit == "bytes" else ""
            print(f"{self._description}: {percent}%{amount}")
        self._last = percent
        update_progress_artifact(artifact_id=self._id, progress=float(percent))
