"""Run `python -m flows.fineweb_pretrain` and SIGKILL it from inside as its Nth file starts tokenizing.

    python -m tests.kill_flow N -- <flows.fineweb_pretrain arguments>

With `runner.workers=1` the files are tokenized one after another, so exactly N - 1 of them
are finished (published and cached) when the process dies.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import tasks.tokenize
from flows.fineweb_pretrain import main


def arm(n: int) -> None:
    tokenize_parquet, started, lock = tasks.tokenize.tokenize_parquet, [0], threading.Lock()

    def tokenize_or_die(*args, **kwargs):
        with lock:
            started[0] += 1
            if started[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return tokenize_parquet(*args, **kwargs)

    tasks.tokenize.tokenize_parquet = tokenize_or_die


if __name__ == "__main__":
    count, separator, *flow_args = sys.argv[1:]
    if separator != "--":
        raise SystemExit(__doc__)
    arm(int(count))
    main(flow_args)
    sys.exit(f"the flow ended before file {count} started")
