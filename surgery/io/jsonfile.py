"""JSON from files and file metadata, checked where it is read: whatever the text holds (malformed, nested
thousands deep, an object of the wrong shape, a string where a number goes), the user gets one line naming the file
and the key."""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import SurgeryError


def parse(text: str | bytes, where) -> Any:
    """The value of a JSON text; `where` names it (a file, or a file and its metadata key) in the error."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise SurgeryError(f"{where}: JSON nested too deeply to be a config") from None


def parse_object(text: str | bytes, where) -> dict:
    value = parse(text, where)
    if not isinstance(value, dict):
        raise SurgeryError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def read_bytes(path) -> bytes:
    """The bytes of a file, or of a pipe (`<(…)`, read once); a device is refused — /dev/zero would never end."""
    try:
        if not (stat.S_ISREG(mode := os.stat(path).st_mode) or stat.S_ISFIFO(mode)):
            raise SurgeryError(f"{path}: is not a file (a folder or a device)")
        return Path(path).read_bytes()
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror or e})") from None


def read_object(path: Path) -> dict:
    """A JSON file holding one object."""
    return parse_object(read_bytes(path), path)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_regex(v) -> bool:
    try:
        re.compile(v)
        return isinstance(v, str)
    except (re.error, TypeError, RecursionError, OverflowError):
        return False


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive int": (lambda v: _is_int(v) and v > 0, "a positive whole number"),
    "int": (_is_int, "a whole number"),
    "dimension list": (lambda v: isinstance(v, list) and bool(v) and all(_is_number(x) and x >= 0 for x in v),
                       "a non-empty list of finite numbers ≥ 0"),
    "positive int list": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x > 0 for x in v),
                          "a list of positive whole numbers"),
    "number": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str list": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "regex": (_is_regex, "a valid regular expression"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def check(value, kind: str, where, key: str):
    """`value` if it is of `kind` (CHECKS), else one line naming where it was read and its key."""
    ok, want = CHECKS[kind]
    if not ok(value):
        shown = json.dumps(value)[:60] if _is_dumpable(value) else repr(value)[:60]
        raise SurgeryError(f"{where}: {key} must be {want}, got {shown}")
    return value


def _is_dumpable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


def field(config: Mapping, key: str, kind: str, where, default=None):
    """config[key] checked as `kind`; `default` when absent or null."""
    value = config.get(key)
    return default if value is None else check(value, kind, where, key)


def patterns(config: Mapping, key: str, kind: str, where) -> dict:
    """A PEFT rank_pattern / alpha_pattern: {regex: value of `kind`}."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise SurgeryError(f"{where}: {key} must be an object of pattern → value, got {json.dumps(value)[:60]}")
    for p, v in value.items():
        check(p, "regex", where, f"{key} pattern {p!r}")
        check(v, kind, where, f"{key}[{p!r}]")
    return value
