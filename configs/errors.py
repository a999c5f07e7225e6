"""The two kinds of failure every room raises, and what each means for retries and CLIs.

- `UserError`: input the user must change — a config value, a source, the data, a
  checkpoint, a run another process holds. Its message is one line naming the problem and
  the fix. It is never retried; a CLI prints the line and exits 1.
- `TransientError`: a failure that may pass by itself — the network, a 5xx, a killed
  process. It is retried with backoff where it happens (the downloader retries its own
  requests; Prefect retries the train task, which resumes from the last checkpoint); when
  retries run out, a CLI prints the line and exits 1.

Anything else is a bug: CLIs let its traceback through so it can be reported. Messages
of both kinds pass through `redact`, so no credential reaches a log or an error.
"""

from __future__ import annotations

from configs.secrets import redact


class UserError(Exception):
    """Input the user must change; the message is one line naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(redact(str(message)))


class TransientError(Exception):
    """A failure that may pass on its own (network, 5xx, a killed process); one line."""

    def __init__(self, message: str):
        super().__init__(redact(str(message)))


def is_user_error(error: BaseException) -> bool:
    """Whether `error`, or an error it was explicitly raised from (`raise ... from`), is the user's to fix."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, UserError):
            return True
        seen = seen.__cause__
    return False
