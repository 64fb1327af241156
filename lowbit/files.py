"""Opening user-supplied files safely: regular files only, JSON of the expected shape, one-line errors."""
from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

MAX_JSON_BYTES = 64 << 20   # config/index/quantization JSON files are KBs; a GB "config" is not one


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a regular file (following links), else a one-line error: a FIFO or device named
    `*.safetensors` would block or stream forever when read."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LowbitError(f"{path}: {what} not found") from None
    except OSError as e:
        raise LowbitError(f"{path}: cannot open the {what} ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise LowbitError(f"{path}: {what} is {kind}")
    return path


def only_regular_files(folder: str | Path, what: str = "directory") -> None:
    """A one-line error if an entry of `folder` is a FIFO, socket or device: libraries open a model
    directory's files by name (tokenizer configs, shards), and reading one of those blocks or never ends."""
    for entry in sorted(Path(folder).iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:    # a dangling link: an error only where something needs the file
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise LowbitError(f"{entry}: not a regular file (a FIFO, socket or device in a {what} is refused: "
                              f"reading it could block for ever)")


def read_json(path: str | Path, what: str = "JSON file", expect: type = dict) -> Any:
    """The JSON value of a file, checked to be an `expect` (dict by default), with one-line errors for a
    missing or special file, bad UTF-8, invalid JSON and a value of the wrong shape."""
    path = regular_file(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise LowbitError(f"{path}: {what} is {path.stat().st_size:,} bytes, too large to be one")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise LowbitError(f"{path}: cannot read the {what} ({e.strerror or type(e).__name__})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LowbitError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise LowbitError(f"{path}: JSON nested too deeply") from None
    if not isinstance(value, expect):
        name = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise LowbitError(f"{path}: expected {name} at the top level, got {_json_type(value)}")
    return value


def field(d: dict, key: str, types: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """d[key] checked to be of `types` (bool is not an int here), or a one-line error naming the field."""
    if key not in d:
        if default is ...:
            raise LowbitError(f"{where}: missing field {key!r}")
        return default
    v = d[key]
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise LowbitError(f"{where}: field {key!r} must be {want}, got {_json_type(v)}")
    return v


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", dict: "an object", list: "a list", str: "a string", int: "an integer",
            float: "a number"}.get(type(v), type(v).__name__)
