"""The one reader of the JSON records this project writes (``results.json``, ``protocol.json``,
``ranking.json``, ...): every caller reads fields of them, so anything but a JSON object - a missing
file, bytes that are not UTF-8 or not JSON, a list, nesting deep enough to overflow the parser - is
"no record", never an ``AttributeError`` further on. Stdlib only."""
from __future__ import annotations

import json
from pathlib import Path


def load_object(path: str | Path) -> dict:
    """The JSON object in ``path``; ``ValueError`` saying why when there is none (``OSError`` when
    the file cannot be read)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError as e:
        raise ValueError("nested too deeply to parse") from e
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object (a {type(data).__name__})")
    return data


def read_object(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        return load_object(path)
    except (OSError, ValueError):       # ValueError: JSONDecodeError, UnicodeDecodeError, not an object
        return None
