"""The two kinds of failure every room raises, and what each means for retries and CLIs.

- `UserError`: input the user must change — a config value, a source, the data, a
  checkpoint, a run another process holds. Its message is one line naming the problem and
  the fix. It is never retried; a CLI prints the line and exits 1.
- `TransientError`: a failure that may pass by itself — the network, a 5xx, a killed
  process. It is retried with backoff where it happens (the downloader retries its own
  requests; Prefect retries the train task, which resumes from the last checkpoint, and the
  tokenize task once); when retries run out, a CLI prints the line and exits 1.
- `DiskFull`: a UserError for "no space left" wherever the pipeline writes; nothing
  partial is published.

Anything else is a bug: never retried, and CLIs let its traceback through so it can be reported. Messages
of both kinds pass through `redact`, so no credential reaches a log or an error.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from configs.secrets import redact


class UserError(Exception):
    """Input the user must change; the message is one line naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(redact(str(message)))


class TransientError(Exception):
    """A failure that may pass on its own (network, 5xx, a killed process); one line."""

    def __init__(self, message: str):
        super().__init__(redact(str(message)))


def _chain(error: BaseException, implicit: bool = False) -> Iterator[BaseException]:
    """`error` and the errors it was explicitly raised from (`raise ... from`); with `implicit`,
    also those it was raised while handling."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (current.__context__ if implicit else None)


def is_user_error(error: BaseException) -> bool:
    """Whether `error`, or an error it was explicitly raised from (`raise ... from`), is the user's to fix."""
    return any(isinstance(seen, UserError) for seen in _chain(error))


def is_transient(error: BaseException) -> bool:
    """Whether `error`, or an error it was explicitly raised from (`raise ... from`), is a
    TransientError, and none of them is the user's to fix."""
    return any(isinstance(seen, TransientError) for seen in _chain(error)) and not is_user_error(error)


class DiskFull(UserError):
    """No space left (or the quota is spent) where the pipeline writes. The user's to fix:
    free space or move the store; the write that failed published nothing."""


def disk_full_error(error: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind `error` (itself, one it was raised from, or one it was
    raised while handling: torch.save reports a full disk as a RuntimeError raised while
    handling the OSError), or None."""
    return next((seen for seen in _chain(error, implicit=True)
                 if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)), None)


@contextmanager
def disk_full_is_one_line(where: str | Path, what: str) -> Iterator[None]:
    """Turn "no space left on device" inside the block into one DiskFull line naming `where`
    and the fix; every other error passes unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, DiskFull) or disk_full_error(exc) is None:
            raise
        raise DiskFull(f"no space left on the device holding {where} while writing {what}; nothing partial was kept — "
                       "free some space (or point storage.root elsewhere), then run again") from None
