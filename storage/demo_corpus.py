"""The offline DEMO corpus: English text already on every Python install, shaped like FineWeb.

It is NOT FineWeb. Documents are the pydoc topics of the reference manual
(`pydoc_data.topics`) plus, per stdlib module of a fixed list, the docstrings of the
module and of its public classes, methods and functions — about 1.5 MB of text. The
parquet has FineWeb's column names (without `token_count`: GPT-2 counts need tiktoken,
which storage/ does not import) and says what it is in its key-value metadata.

The file is written atomically and only when its content changes, so its mtime — and
therefore the download stage's cache key — is stable across runs on the same Python.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import platform
import sys
import sysconfig
import uuid
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from configs.errors import UserError
from storage.artifacts import atomic_file

DEMO_URL = "demo://python-docs"
FILE_NAME = "demo_corpus_python_docs.parquet"
DUMP = "demo-python-docs"
ROW_GROUP_ROWS = 64
METADATA_NOTE_KEY = b"fineweb_pretrain.note"
METADATA_HASH_KEY = b"fineweb_pretrain.content_sha256"
NOTE = (
    "DEMO CORPUS, not FineWeb: Python's bundled documentation (pydoc topics and stdlib docstrings) "
    "written with FineWeb's column names so the pipeline runs offline."
)

# Pure-Python or side-effect-free stdlib modules, imported in this order; any that fails is skipped.
MODULES = sorted(
    """
    abc argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues
    asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb bisect bz2 calendar cmd code codecs
    codeop collections collections.abc colorsys compileall concurrent.futures.process
    concurrent.futures.thread configparser contextlib copy copyreg csv dataclasses datetime decimal
    difflib dis doctest email.headerregistry email.message email.mime.text email.parser email.policy
    email.utils enum filecmp fileinput fnmatch fractions ftplib functools getopt getpass gettext glob
    graphlib gzip hashlib heapq hmac html html.parser http http.client http.cookiejar http.cookies
    http.server imaplib importlib importlib.abc importlib.machinery importlib.metadata inspect io
    ipaddress itertools json json.decoder json.encoder keyword linecache locale logging logging.config
    logging.handlers lzma mailbox math mimetypes modulefinder multiprocessing.connection
    multiprocessing.managers multiprocessing.pool multiprocessing.shared_memory netrc numbers operator
    optparse os pathlib pdb pickle pickletools pkgutil platform plistlib poplib pprint profile pstats
    py_compile pyclbr queue quopri random re reprlib runpy sched secrets selectors shelve shlex shutil
    signal smtplib socket socketserver sqlite3 ssl stat statistics string stringprep struct subprocess
    symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize
    tomllib trace traceback types typing unicodedata unittest.case unittest.loader unittest.mock
    urllib.error urllib.parse urllib.request urllib.robotparser uuid warnings wave weakref
    xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler zipapp zipfile
    zipimport zlib zoneinfo
    """.split()
)


class DemoCorpusError(UserError):
    """A demo:// URL that names no known corpus; the message is one line."""


def resolve_demo_source(url: str, root: str | os.PathLike) -> str:
    """Turn demo://python-docs into a file:// URL of the corpus built under <root>/demo-corpus/;
    any other URL is returned unchanged."""
    if not url.startswith("demo://"):
        return url
    if url.rstrip("/") != DEMO_URL:
        raise DemoCorpusError(f"unknown demo corpus {url}; the one available is {DEMO_URL}")
    return build_demo_corpus(Path(root) / "demo-corpus").resolve().as_uri()


def build_demo_corpus(dest: Path) -> Path:
    """Write dest/demo_corpus_python_docs.parquet unless it already holds this content; return its path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / FILE_NAME
    rows = demo_documents()
    content_hash = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    if _stored_hash(path) == content_hash:
        return path
    table = pa.Table.from_pylist(rows, schema=_schema(content_hash))
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    return path


def demo_documents() -> list[dict[str, Any]]:
    """The corpus rows, in a fixed order: pydoc topics first, then one document per module."""
    from pydoc_data.topics import topics

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    rows = [
        _row(
            text=topics[name].strip(),
            url=f"https://docs.python.org/{version}/search.html?q={name}",
            file_path=f"python{version}/pydoc_data/topics.py#{name}",
        )
        for name in sorted(topics)
    ]
    with warnings.catch_warnings():  # reading docs of deprecated names (typing.io, …) must not warn
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # an optional C extension missing on this build: skip it
                continue
            text = _module_text(module)
            if text:
                rows.append(_row(text=text, url=f"https://docs.python.org/{version}/library/{name}.html", file_path=_source_path(module)))
    return rows


def _module_text(module: Any) -> str:
    """The module's docstring, then each public class (with its methods) and function defined in it."""
    sections = [f"Module {module.__name__}", _doc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            sections += [f"class {module.__name__}.{name}{_signature(obj)}", _doc(obj)]
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and (inspect.isroutine(method) or isinstance(method, property)):
                    doc = _doc(method)
                    if doc:
                        sections += [f"{name}.{method_name}{_signature(method)}", doc]
        elif inspect.isroutine(obj):
            sections += [f"{module.__name__}.{name}{_signature(obj)}", _doc(obj)]
    body = [section for section in sections[1:] if section]
    return "\n\n".join([sections[0], *body]) if body else ""


def _doc(obj: Any) -> str:
    """The object's own docstring (not one inherited from a base class), dedented."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _signature(obj: Any) -> str:
    """`(a, b=1)`, or "" when there is none or it shows a memory address (which would change per run)."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return "" if " at 0x" in text else text


def _source_path(module: Any) -> str:
    file = getattr(module, "__file__", None)
    stdlib = sysconfig.get_paths()["stdlib"]
    if file and os.path.abspath(file).startswith(stdlib):
        return f"python{sys.version_info.major}.{sys.version_info.minor}/" + os.path.relpath(file, stdlib)
    return f"python{sys.version_info.major}.{sys.version_info.minor}/<built-in {module.__name__}>"


def _row(text: str, url: str, file_path: str) -> dict[str, Any]:
    return {
        "text": text,
        "id": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}>",
        "dump": DUMP,
        "url": url,
        "date": _python_build_date(),
        "file_path": file_path,
        "language": "en",
        "language_score": 1.0,
    }


def _python_build_date() -> str:
    """When this Python (and so its documentation) was built, as FineWeb's ISO date string."""
    try:
        built = datetime.strptime(" ".join(platform.python_build()[1].split()), "%b %d %Y %H:%M:%S")
    except ValueError:
        return "1970-01-01T00:00:00Z"
    return built.strftime("%Y-%m-%dT%H:%M:%SZ")


def _schema(content_hash: str) -> pa.Schema:
    fields = [
        ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
        ("date", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
        ("language_score", pa.float64()),
    ]
    return pa.schema(fields, metadata={METADATA_NOTE_KEY: NOTE.encode(), METADATA_HASH_KEY: content_hash.encode()})


def _stored_hash(path: Path) -> str | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    return metadata.get(METADATA_HASH_KEY, b"").decode() or None
