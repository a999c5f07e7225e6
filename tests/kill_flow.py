"""Run `python -m flows.fineweb_pretrain` and SIGKILL it from inside as its Nth file starts tokenizing.

    python -m tests.kill_flow N -- <flows.fineweb_pretrain arguments>

With `runner.workers=1` the files are tokenized one after another, so exactly N - 1 of them
are finished (published and cached) when the process dies. The dataset's profile stage runs
in the flow beside the files' tokenizing; the kill waits until it has returned, so the run
dies with it cached, however fast the first files tokenize.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import flows.dataset
import tasks.tokenize
from flows.fineweb_pretrain import main

PROFILE_WAIT_SECONDS = 300


def arm(n: int) -> None:
    tokenize_parquet, started, lock = tasks.tokenize.tokenize_parquet, [0], threading.Lock()
    run_cached_stage, profiled = flows.dataset.run_cached_stage, threading.Event()

    def run_and_note(task, *args, **kwargs):
        result = run_cached_stage(task, *args, **kwargs)
        if task is flows.dataset.profile:
            profiled.set()
        return result

    def tokenize_or_die(*args, **kwargs):
        with lock:
            started[0] += 1
            if started[0] == n:
                if not profiled.wait(PROFILE_WAIT_SECONDS):
                    raise RuntimeError("the dataset's profile stage did not return before the kill")
                os.kill(os.getpid(), signal.SIGKILL)
        return tokenize_parquet(*args, **kwargs)

    flows.dataset.run_cached_stage = run_and_note
    tasks.tokenize.tokenize_parquet = tokenize_or_die


if __name__ == "__main__":
    count, separator, *flow_args = sys.argv[1:]
    if separator != "--":
        raise SystemExit(__doc__)
    arm(int(count))
    main(flow_args)
    sys.exit(f"the flow ended before file {count} started")
