"""Read a data file from wherever it lives: one reader for ``data.source``, ``data.decontaminate``
and ``eval.benchmarks[].path``.

Where a file can be:

- a local path (``/data/x.jsonl``, ``./x.jsonl``, ``file:///data/x.jsonl``);
- a store URI (``s3://bucket/key.jsonl``; any fsspec URI the store reads);
- a path relative to the artifact store's root (``data/x.jsonl``), when a store is given;
- a hub dataset: ``hub:<owner>/<repo>[/<file in repo>][@<revision>]``, e.g.
  ``hub:UCSC-VLAA/MedReason`` (the file is then ``data.hub_file``),
  ``hub:UCSC-VLAA/MedReason/ours_quality_33000.jsonl@<commit sha>``. A revision in the URI wins
  over ``data.hub_revision``; without either the hub's moving ``main`` is read, with a warning.
  The commit actually read is reported (prepare records it in its manifest).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from medreason.errors import InputError

log = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
HUB_SYNTAX = "hub:<owner>/<repo>[/<file>][@<revision>]"


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hub:`` URI: dataset repo, file in it (None: the caller's default), revision."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None


@dataclass
class SourceFile:
    """The bytes of one data file; ``name`` picks the parser (by extension); ``provenance`` says
    where the bytes came from (for a hub file: repo, file, requested and resolved revision)."""

    name: str
    raw: bytes
    provenance: dict[str, Any] = field(default_factory=dict)


def parse_hub(uri: str) -> HubRef:
    """'hub:owner/repo/dir/file.jsonl@abc123' -> HubRef('owner/repo', 'dir/file.jsonl', 'abc123')."""
    spec = uri[len(HUB_PREFIX):].strip().strip("/")
    spec, at, revision = spec.rpartition("@") if "@" in spec else (spec, "", "")
    parts = [p for p in spec.split("/") if p]
    if not parts or (at and not revision.strip()) or any(p in (".", "..") for p in parts):
        raise InputError(f"{uri!r}: expected {HUB_SYNTAX}")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or None
    return HubRef(repo_id, filename, revision.strip() or None)


def snapshot_revision(path: str) -> str | None:
    """The commit a file from the HF cache belongs to: its path is
    <cache>/datasets--owner--repo/snapshots/<commit sha>/<file>."""
    parts = os.path.normpath(path).split(os.sep)
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def _read_hub(uri: str, default_file: str | None, default_revision: str | None, what: str) -> SourceFile:
    ref = parse_hub(uri)
    filename = ref.filename or default_file
    if not filename:
        raise InputError(f"{what} {uri!r}: name the file in the repo: {HUB_SYNTAX}")
    if ref.revision and default_revision and ref.revision != default_revision:
        raise InputError(f"{what} {uri!r}: revision @{ref.revision} differs from data.hub_revision="
                         f"{default_revision!r}; set only one")
    revision = ref.revision or default_revision
    if not revision or revision == "main":
        log.warning("%s %s: no revision pinned, reading the hub's 'main', which moves; append "
                    "@<commit sha> (or set data.hub_revision) for a reproducible run", what, uri)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=ref.repo_id, filename=filename, repo_type="dataset", revision=revision)
    except Exception as exc:  # offline, missing repo/file/revision, gated: all the user's to fix
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(
            f"{what} {uri!r}: could not download {filename} from hub dataset {ref.repo_id} "
            f"and it is not in the local HF cache ({type(exc).__name__}: {first}); on a machine "
            "without internet copy the file into the store or a local folder and use that path"
        ) from None
    with open(path, "rb") as fh:
        raw = fh.read()
    provenance = {"kind": "hub", "uri": uri, "repo_id": ref.repo_id, "file": filename,
                  "revision_requested": revision or "main", "revision": snapshot_revision(path)}
    return SourceFile(filename, raw, provenance)


def read_source(source: str, *, store: Any = None, hub_file: str | None = None,
                hub_revision: str | None = None, what: str = "data file") -> SourceFile:
    """The bytes of ``source`` (see the module docstring for the forms); ``what`` names the
    setting in error messages. A missing file is an InputError naming the path."""
    if source.startswith(HUB_PREFIX):
        return _read_hub(source, hub_file, hub_revision, what)
    if "://" in source and not source.startswith("file://"):
        from medreason.store import read_uri_bytes

        try:
            return SourceFile(source, read_uri_bytes(source), {"kind": "uri", "uri": source})
        except FileNotFoundError:
            raise InputError(f"{what}: file not found: {source}") from None
    local = source[len("file://"):] if source.startswith("file://") else source
    if os.path.isfile(local):
        with open(local, "rb") as fh:
            return SourceFile(source, fh.read(), {"kind": "local", "path": os.path.abspath(local)})
    rel = local.strip("/")
    in_store = store is not None and not os.path.isabs(local)
    if in_store and store.exists(rel):
        return SourceFile(source, store.read_bytes(rel), {"kind": "store", "uri": store.display(rel)})
    where = f" (nor at {store.display(rel)} in the store)" if in_store else ""
    raise InputError(f"{what}: file not found: {source}{where}; pass a .jsonl/.json/.parquet "
                     f"path, a store URI (s3://...) or {HUB_SYNTAX}")
