"""A task's files: its JSON (configs, meta.json, annotations) read with errors that name the file,
and writing any output file without following a symbolic link.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import BinaryIO

from plugin.errors import TaskError

# Configs, meta.json and annotations nest a few levels (objects[i].points.exterior[j][k] is 6); deeper
# documents would overflow the recursion of json, copy.deepcopy and jsonschema further on.
MAX_JSON_DEPTH = 100
_TOO_DEEP = f"the JSON nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
_SYMLINK_REFUSED = (
    "the output path is a symbolic link, and nothing is written through one; remove it or choose another path"
)

_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "a boolean", type(None): "null"}


def read_json(path: Path) -> dict:
    """The JSON object in `path`; TaskError naming the file when it is missing, not JSON, or not an object."""
    path = Path(path)
    try:
        # utf-8-sig: editors on Windows save a BOM that json would otherwise reject.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TaskError("file not found", where=path) from None
    except IsADirectoryError:
        raise TaskError("expected a JSON file, found a directory", where=path) from None
    except UnicodeDecodeError as e:
        raise TaskError(f"not UTF-8 text (byte {e.start})", where=path) from None
    return parse_json(text, path)


def parse_json(text: str | bytes, where: str | os.PathLike) -> dict:
    """The JSON object in `text` (a file's or a request's), with read_json's errors naming `where`."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise TaskError(f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}", where=where) from None
    except ValueError as e:  # also bytes that are not UTF-8 (UnicodeDecodeError)
        raise TaskError(f"not valid JSON: {e}", where=where) from None
    except RecursionError:
        raise TaskError(_TOO_DEEP, where=where) from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise TaskError(_TOO_DEEP, where=where)
    if not isinstance(value, dict):
        raise TaskError(f"expected a JSON object at the top level, found {_JSON_TYPE_NAMES[type(value)]}", where=where)
    return value


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN and Infinity, which then slip through every numeric bound of the schema.
    raise ValueError(f"{name} is not allowed in JSON")


def _deeper_than(value: object, limit: int) -> bool:
    # Level by level, not recursively: the point is not to recurse as deep as the document goes.
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


def write_json(path: Path, doc: dict) -> None:
    """Write doc as the SDK does (indent 4), creating the folder; see write_file."""
    write_file(path, json.dumps(doc, indent=4, ensure_ascii=False).encode("utf-8"))


def write_file(path: Path, data: bytes) -> None:
    """Write data to path, creating the folder; see open_for_writing."""
    with open_for_writing(path) as file:
        file.write(data)


def open_for_writing(path: Path) -> BinaryIO:
    """`path` opened to be written from scratch (binary), its folder created; TaskError if path is a
    symbolic link, which is never written through (O_NOFOLLOW: no window between a check and the write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TaskError(_SYMLINK_REFUSED, where=path) from None
        raise
    return os.fdopen(fd, "wb")


def refuse_symlink(path: Path) -> None:
    """TaskError if path (an output file or folder about to be written or replaced) is a symbolic link."""
    if Path(path).is_symlink():
        raise TaskError(_SYMLINK_REFUSED, where=path)
