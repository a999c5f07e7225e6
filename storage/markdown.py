"""Markdown for the reports a person reads (the profile report, the UI artifacts): tables and sizes."""

from __future__ import annotations

import re
from typing import Any


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A table with one column per key of the first row; `_(none)_` when there are no rows."""
    if not rows:
        return "_(none)_"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def human_bytes(count: float) -> str:
    """1536 → `1.5 KB` (binary units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TB"


def fenced(text: str, language: str = "text") -> str:
    """A code block holding `text` verbatim, with a fence longer than any run of backticks in it."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}{language}\n{text}\n{fence}"
