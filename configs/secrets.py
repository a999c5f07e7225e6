"""Credentials are used, never written: one function blanks them out of anything the pipeline records.

They reach the pipeline inside source URLs (`https://user:password@host/...`, `?token=...`,
pre-signed `X-Amz-Signature=...`) and through the environment (`HF_TOKEN`, AWS keys).
Manifests, checkpoint state, error messages, log lines and UI artifacts pass through
`redact` before they are written, so `grep -r <secret>` over a run's outputs finds nothing.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# Environment variables whose values are credentials of the backends the pipeline reads.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# Query parameters that carry credentials (API tokens, S3/GCS/Azure pre-signed URLs).
SECRET_QUERY_KEYS = (
    "token", "access_token", "auth", "key", "api_key", "apikey", "password", "secret", "sig", "signature",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
)
_USERINFO = re.compile(r"(?<=://)[^/\s@'\"]+@")  # scheme://user:password@host
_SECRET_QUERY = re.compile(r"([?&;](?:" + "|".join(map(re.escape, SECRET_QUERY_KEYS)) + r")=)[^&#\s'\"]+", re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_SHORTEST_ENV_SECRET = 8  # shorter values (e.g. "test") would blank ordinary words


def redact(value: Any) -> Any:
    """`value` with every credential replaced by ***: strings, and the strings inside dicts,
    lists and tuples (keys included). Other values are returned as they are."""
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, dict):
        return {redact(key): redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def _redact_text(text: str) -> str:
    text = _USERINFO.sub(MASK + "@", text)
    text = _SECRET_QUERY.sub(r"\1" + MASK, text)
    text = _HF_TOKEN.sub("hf_" + MASK, text)
    for name in SECRET_ENV:
        secret = os.environ.get(name, "")
        if len(secret) >= _SHORTEST_ENV_SECRET:
            text = text.replace(secret, MASK)
    return text
