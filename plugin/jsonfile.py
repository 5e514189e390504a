"""Reading the JSON files of a task dir (configs, meta.json, annotations) with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from plugin.errors import TaskError

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
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise TaskError(f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}", where=path) from None
    except ValueError as e:
        raise TaskError(f"not valid JSON: {e}", where=path) from None
    if not isinstance(value, dict):
        raise TaskError(f"expected a JSON object at the top level, found {_JSON_TYPE_NAMES[type(value)]}", where=path)
    return value


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN and Infinity, which then slip through every numeric bound of the schema.
    raise ValueError(f"{name} is not allowed in JSON")


def write_json(path: Path, doc: dict) -> None:
    """Write doc as the SDK does (indent 4), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=4, ensure_ascii=False), encoding="utf-8")
