"""Strict JSON for every manifest and metrics file the project writes.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` by default; those are not JSON
(RFC 8259) and strict parsers (Go, Rust serde, JavaScript's JSON.parse, jq) reject the whole
file. A diverged loss or an empty benchmark's accuracy easily produces one, so:

- non-finite floats are written as ``null`` (the documented spelling of "no number": readers
  must treat a null metric as "not available"), and
- every dump passes ``allow_nan=False``, so anything that slipped past the clean-up raises
  instead of producing an unparsable file.

numpy and torch scalars (``.item()``) are written as the Python numbers they hold.
"""

from __future__ import annotations

import json
import math
from typing import IO, Any


def sanitize(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by None (tuples become lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: sanitize(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(value) for value in obj]
    return obj


def _default(obj: Any) -> Any:
    # numpy/torch scalars are not float subclasses (np.float32, 0-d tensors): unwrap them and
    # clean the result, or json would raise TypeError on the first such metric.
    item = getattr(obj, "item", None)
    if callable(item):
        return sanitize(item())
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: Any, *, indent: int | None = 2, sort_keys: bool = True, ensure_ascii: bool = True) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as null). ``indent=None``: one line."""
    return json.dumps(
        sanitize(obj), indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
        allow_nan=False, default=_default,
    )


def dump(obj: Any, fh: IO[str], *, indent: int | None = 2, sort_keys: bool = True,
         ensure_ascii: bool = True) -> None:
    """Write ``dumps(obj)`` to an open text file."""
    fh.write(dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii))


def dumps_line(obj: Any, *, sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    """One strict JSON-lines record (compact, no trailing newline)."""
    return dumps(obj, indent=None, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def canonical_bytes(obj: Any) -> bytes:
    """Compact, key-sorted strict JSON: the input of content hashes.

    Sanitizing first makes a manifest hash the same before it is written (NaN in memory) and
    after it is read back (null in the file).
    """
    return json.dumps(
        sanitize(obj), sort_keys=True, separators=(",", ":"), allow_nan=False, default=_default,
    ).encode("utf-8")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name} is not a JSON value")


def loads_strict(text: str | bytes) -> Any:
    """Parse JSON and refuse NaN/Infinity/-Infinity, as strict parsers in other languages do."""
    return json.loads(text, parse_constant=_refuse_constant)
