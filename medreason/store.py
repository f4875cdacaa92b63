"""The artifact store: the only module that imports fsspec.

Layout (see README, "The artifact store")::

    <root>/runs/<run_id>/<stage>/...             one folder per stage of a run
    <root>/runs/<run_id>/<stage>/MANIFEST.json   written LAST: the stage's commit
    <root>/runs/<run_id>/train/checkpoints/step-<N>/MANIFEST.json   each checkpoint's commit
    <root>/cache/models/<name>@<revision>/       a staged base model

Writers never leave a half-written file where a reader looks: a local file is written under a
hidden temp name in the same folder and renamed into place (``os.replace`` is atomic within a
filesystem); an S3 object appears only when its single PUT or multipart upload completes. The
manifest goes last, so a folder without MANIFEST.json is, by definition, not there.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import fsspec

from medreason.errors import InputError, StageConflict

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_TMP_MARK = ".tmp-"
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}")
_VERSIONED_PACKAGES = (
    "medreason", "torch", "transformers", "peft", "accelerate", "bitsandbytes",
    "datasets", "tokenizers", "safetensors", "fsspec", "s3fs", "pydantic", "gguf",
)


# -- names -------------------------------------------------------------------------------------
def validate_segment(value: str | None, what: str = "run id") -> str:
    """Accept one safe path segment; reject '..', separators, URL tricks, absolute paths, empty."""
    if value is None or not str(value).strip():
        raise InputError(f"{what} is empty; pass --run NAME (or set MEDREASON_RUN)")
    value = str(value)
    decoded = urllib.parse.unquote(value)
    if (
        decoded != value
        or value in (".", "..")
        or ".." in value
        # fullmatch, not match: '$' also matches before a trailing newline, so match() let
        # 'run-1\n' through and a newline would end up inside a path and in log lines.
        or not _SEGMENT_RE.fullmatch(value)
    ):
        raise InputError(
            f"{what} {value!r} is not allowed: use letters, digits and . _ - @ + = "
            "(no '..', no '/', no '%' escapes, at most 128 characters)"
        )
    return value


def model_cache_name(name_or_path: str, revision: str | None) -> str:
    """'microsoft/phi-2', 'abc123' -> 'microsoft--phi-2@abc123' (a safe single segment)."""
    base = name_or_path.rstrip("/").split("://")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "--", base)
    # '..' anywhere is refused by validate_segment, so 'org/my..model' must not keep it.
    base = re.sub(r"\.{2,}", ".", base).strip("-.") or "model"
    # A segment holds at most 128 characters: 87 of name + '@' + 40 of revision (a full
    # commit sha) = 128. The tail of the name is kept: it is the part that differs.
    name = f"{base[-87:]}@{(revision or 'main')[:40]}"
    name = re.sub(r"[^A-Za-z0-9._@+=-]", "-", name)
    name = re.sub(r"\.{2,}", ".", name).lstrip(".-")
    return validate_segment(name, "model cache name")


# Query parameters that carry credentials: pre-signed URLs (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token), tokens and passwords some S3-compatible gateways accept in the URL.
_SECRET_QUERY_KEY = re.compile(r"signature|credential|token|secret|password|passwd|key", re.IGNORECASE)


def redact(uri: str) -> str:
    """Drop any user:password@ part and credential-bearing query values of a URI before it
    reaches a log or a manifest."""
    parsed = urllib.parse.urlsplit(uri)
    changed = False
    if parsed.username or parsed.password:
        host = parsed.hostname or ""
        if parsed.port:
            host += f":{parsed.port}"
        parsed = parsed._replace(netloc=f"***@{host}")
        changed = True
    if parsed.query:
        pairs = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
        if any(_SECRET_QUERY_KEY.search(k) for k, _v in pairs):
            query = "&".join(
                f"{urllib.parse.quote(k, safe='')}="
                + ("***" if _SECRET_QUERY_KEY.search(k) else urllib.parse.quote(v, safe=""))
                for k, v in pairs
            )
            parsed = parsed._replace(query=query)
            changed = True
    # Untouched URIs come back byte for byte (urlunsplit would lower-case 'C:' and the like).
    return urllib.parse.urlunsplit(parsed) if changed else uri


# -- hashing -------------------------------------------------------------------------------------
def sha256_file(path: str, chunk_bytes: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_hash(manifest: dict[str, Any]) -> str:
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    version = package_versions().get("medreason", "unknown")
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{version}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return version


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def local_scratch(prefix: str = "medreason-") -> str:
    """A fresh local folder under $TMPDIR for work that is uploaded afterwards."""
    return tempfile.mkdtemp(prefix=prefix)


def _list_local_files(local_dir: str) -> list[str]:
    rels = []
    for dirpath, _dirs, files in os.walk(local_dir):
        for fname in files:
            if _TMP_MARK in fname:
                continue
            full = os.path.join(dirpath, fname)
            rels.append(os.path.relpath(full, local_dir).replace(os.sep, "/"))
    return sorted(r for r in rels if r != MANIFEST)


def _fs_options(protocol: str) -> dict[str, Any]:
    """fsspec options: S3 endpoint from AWS_ENDPOINT_URL(_S3) (MinIO, Ceph), no cached listings."""
    options: dict[str, Any] = {}
    if protocol == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        # Several processes (ranks, resumed jobs) look at the same keys: never trust a
        # cached listing when deciding whether something is committed.
        options["use_listings_cache"] = False
        options["skip_instance_cache"] = True
    return options


# -- the store -----------------------------------------------------------------------------------
def local_cache_root() -> str:
    """Where remote store folders are downloaded: $MEDREASON_LOCAL_CACHE or ~/.cache/medreason."""
    return os.environ.get("MEDREASON_LOCAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medreason")


class ArtifactStore:
    """A root folder on any fsspec filesystem (local path, file://, s3://)."""

    def __init__(self, uri: str):
        if not uri or not str(uri).strip():
            raise InputError("--store is empty; pass a folder or s3://bucket/prefix")
        self.uri = str(uri).rstrip("/") or "/"
        protocol, _, rest = self.uri.partition("://")
        if not rest:
            protocol, rest = "file", os.path.abspath(self.uri)
        self.protocol = protocol
        self.is_local = protocol in ("file", "local")
        options = _fs_options(protocol)
        try:
            self.fs = fsspec.filesystem(protocol, **options)
        except (ImportError, ValueError) as exc:
            raise InputError(f"--store {redact(self.uri)}: unsupported storage: {exc}") from None
        self.root = rest.rstrip("/") if protocol != "file" else rest
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({redact(self.uri)!r})"

    # paths ------------------------------------------------------------------------------------
    def full(self, rel: str = "") -> str:
        """Filesystem path (no protocol) of a path relative to the store root."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str = "") -> str:
        """A URI to show users (credentials redacted)."""
        if self.is_local:
            return self.full(rel)
        return redact(f"{self.protocol}://{self.full(rel)}")

    @staticmethod
    def stage_rel(run_id: str, stage: str) -> str:
        return f"runs/{validate_segment(run_id)}/{validate_segment(stage, 'stage')}"

    # plain reads/writes -----------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.full(rel))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.full(rel), "rb") as fh:
            return fh.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one file atomically (temp + rename locally; a single PUT on object stores)."""
        target = self.full(rel)
        if self.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(target)}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))

    def put_file(self, local_path: str, rel: str) -> None:
        target = self.full(rel)
        if self.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(target)}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
            try:
                shutil.copyfile(local_path, tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            # s3fs uploads large files as a multipart upload that becomes visible only when
            # completed; a killed upload leaves no object under the key.
            self.fs.put_file(local_path, target)

    def remove(self, rel: str) -> None:
        path = self.full(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def listdir(self, rel: str) -> list[str]:
        """Names directly under a folder (empty when missing), without a killed writer's temp files."""
        path = self.full(rel)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = (os.path.basename(e.rstrip("/")) for e in entries)
        return sorted(n for n in names if _TMP_MARK not in n)

    # commits ------------------------------------------------------------------------------------
    def read_manifest(self, rel: str) -> dict[str, Any] | None:
        """The manifest of a committed folder, or None when it is not committed."""
        try:
            return json.loads(self.read_bytes(f"{rel}/{MANIFEST}"))
        except FileNotFoundError:
            return None

    def is_committed(self, rel: str) -> bool:
        return self.exists(f"{rel}/{MANIFEST}")

    def uncommit(self, rel: str) -> None:
        """Remove a folder's commit first, then its files: a reader never sees a half-replaced stage."""
        marker = f"{rel}/{MANIFEST}"
        if self.exists(marker):
            self.fs.rm(self.full(marker))
        self.remove(rel)

    def commit_dir(
        self,
        local_dir: str,
        rel: str,
        manifest: dict[str, Any],
        progress: bool = False,
        clear: bool = True,
    ) -> dict[str, Any]:
        """Upload every file of ``local_dir`` under ``rel``, then write MANIFEST.json last.

        The manifest gets a ``files`` table (size and sha256 of each file). With ``clear`` whatever
        was under ``rel`` before is removed first (its manifest before its files); without it only
        the old manifest is removed and other files (e.g. train's checkpoints/) stay.
        """
        files = _list_local_files(local_dir)
        table = {}
        for name in files:
            path = os.path.join(local_dir, name)
            table[name] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
        if clear:
            self.uncommit(rel)
        elif self.exists(f"{rel}/{MANIFEST}"):
            self.fs.rm(self.full(f"{rel}/{MANIFEST}"))
        started = time.monotonic()
        iterator: Any = files
        if progress and len(files) > 1:
            from tqdm.auto import tqdm

            iterator = tqdm(files, desc=f"upload {rel}", unit="file", disable=None)
        for name in iterator:
            self.put_file(os.path.join(local_dir, name), f"{rel}/{name}")
            _test_pause_between_uploads()
        manifest = dict(manifest)
        manifest["files"] = table
        manifest.setdefault("committed_at", now_iso())
        self.write_json(f"{rel}/{MANIFEST}", manifest)
        log.debug("committed %s (%d files, upload %.1fs)", self.display(rel), len(files),
                  time.monotonic() - started)
        return manifest

    def verify(self, rel: str, manifest: dict[str, Any] | None = None, hashes: bool = True) -> dict[str, Any]:
        """Check a committed folder's files against its manifest; InputError names the first bad one.

        Sizes are checked everywhere; sha256 (``hashes``) only on local stores, where reading
        is cheap. Remote files are hashed when they are downloaded by ``materialize``.
        """
        manifest = manifest or self.read_manifest(rel)
        if manifest is None:
            raise InputError(f"{self.display(rel)} is not committed (no {MANIFEST})")
        for name, info in manifest.get("files", {}).items():
            path = self.full(f"{rel}/{name}")
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                raise InputError(f"{self.display(rel)}: {name} is listed in {MANIFEST} but missing") from None
            if size != info["size"]:
                raise InputError(
                    f"{self.display(rel)}: {name} has {size} bytes, {MANIFEST} says {info['size']}; "
                    "the folder was modified after its commit"
                )
            if hashes and self.is_local and sha256_file(path) != info["sha256"]:
                raise InputError(
                    f"{self.display(rel)}: {name} does not match its sha256 in {MANIFEST}; "
                    "the file was modified or corrupted after its commit"
                )
        return manifest

    def materialize(self, rel: str, hashes: bool = True) -> str:
        """A local folder holding a committed folder's files, verified against its manifest.

        Local stores return the folder itself; remote ones download into a local cache keyed by
        the manifest's hash, so a second call costs nothing.
        """
        manifest = self.read_manifest(rel)
        if manifest is None:
            raise InputError(f"{self.display(rel)} is not committed (no {MANIFEST})")
        if self.is_local:
            self.verify(rel, manifest, hashes=hashes)
            return self.full(rel)
        target = os.path.join(local_cache_root(), "store", manifest_hash(manifest)[:32])
        return self._download_verified(rel, manifest.get("files", {}), target, MANIFEST, json.dumps(manifest))

    def materialize_subfolder(self, rel: str, manifest: dict[str, Any], prefix: str) -> str:
        """A verified local copy of the files a committed folder's manifest lists under ``prefix/``.

        A sub-folder with its own MANIFEST.json is materialized as is; otherwise every file is
        checked against the size and sha256 the parent's manifest recorded, so a file changed after
        the commit is caught before it is used (InputError naming it).
        """
        sub = f"{rel}/{prefix}"
        if self.is_committed(sub):
            return self.materialize(sub)
        files = {
            name[len(prefix) + 1:]: info
            for name, info in manifest.get("files", {}).items()
            if name.startswith(prefix + "/")
        }
        if not files:
            raise InputError(f"{self.display(sub)}: the commit of {self.display(rel)} lists no files there")
        if not self.is_local:
            key = f"{manifest_hash(manifest)[:32]}-{prefix.replace('/', '_')}"
            return self._download_verified(sub, files, os.path.join(local_cache_root(), "store", key),
                                           ".verified", "ok\n")
        target = self.full(sub)
        for name, info in files.items():
            path = os.path.join(target, *name.split("/"))
            if not os.path.exists(path):
                raise InputError(f"{self.display(sub)}: {name} is listed in {MANIFEST} but missing")
            if os.path.getsize(path) != info["size"] or sha256_file(path) != info["sha256"]:
                raise InputError(
                    f"{self.display(sub)}: {name} does not match its sha256 in {self.display(rel)}/{MANIFEST}; "
                    "the file was modified or corrupted after its commit"
                )
        return target

    def _download_verified(self, rel: str, files: dict[str, Any], target: str, marker: str, marker_text: str) -> str:
        """Download ``files`` (name -> size/sha256) under ``rel`` into the local folder ``target``.

        The folder is filled under a temp name, each file checked against its sha256, the
        ``marker`` file written last, then renamed into place: a reader never sees a partial copy.
        """
        done = os.path.join(target, marker)
        if os.path.exists(done):
            return target
        tmp = f"{target}{_TMP_MARK}{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp, exist_ok=True)
        try:
            for name, info in files.items():
                local = os.path.join(tmp, *name.split("/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                self.fs.get_file(self.full(f"{rel}/{name}"), local)
                if sha256_file(local) != info["sha256"]:
                    raise InputError(f"{self.display(rel)}: {name} does not match its sha256 in {MANIFEST}")
            with open(os.path.join(tmp, marker), "w", encoding="utf-8") as fh:
                fh.write(marker_text)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.isdir(target) and not os.path.exists(done):
            # Only complete folders are renamed into place, so this one is debris (e.g. edited
            # by hand); nobody can be reading it as a cache entry.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another reader (a second rank on this node) finished the same download first.
            # Its folder is complete and may be in use: keep it, drop ours.
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(done):
                raise
        return target

    def list_committed(self, rel: str, prefix: str = "") -> list[str]:
        """Names of committed sub-folders of ``rel`` (those holding a manifest)."""
        return [n for n in self.listdir(rel) if n.startswith(prefix) and self.is_committed(f"{rel}/{n}")]

    @contextlib.contextmanager
    def staged_folder(self) -> Iterator[str]:
        """A local scratch folder that is deleted afterwards."""
        folder = local_scratch()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _test_pause_between_uploads() -> None:
    """Test hook: MEDREASON_TEST_SLOW_COMMIT_S=<seconds> sleeps after each uploaded file, so a
    test can SIGKILL a writer in the middle of a commit. Unset (always, outside tests): no-op."""
    pause_s = os.environ.get("MEDREASON_TEST_SLOW_COMMIT_S")
    if pause_s:
        time.sleep(float(pause_s))


def read_uri_bytes(uri: str) -> bytes:
    """The bytes of one file named by a local path or an absolute URI (s3://..., file://...).

    S3 honours AWS_ENDPOINT_URL(_S3) like the store does. FileNotFoundError when it is missing.
    """
    if "://" not in uri or uri.startswith("file://"):
        with open(uri[len("file://"):] if uri.startswith("file://") else uri, "rb") as fh:
            return fh.read()
    with fsspec.open(uri, "rb", **_fs_options(uri.split("://", 1)[0])) as fh:
        return fh.read()


# -- stages ------------------------------------------------------------------------------------
def build_manifest(
    *,
    stage: str,
    run_id: str,
    config: Any,
    config_hash: str,
    inputs: dict[str, str] | None = None,
    timings_s: dict[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The common part of a stage or checkpoint manifest (``files`` is added at commit)."""
    manifest: dict[str, Any] = {
        "stage": stage,
        "run_id": run_id,
        "config": config.model_dump(mode="json") if hasattr(config, "model_dump") else config,
        "config_hash": config_hash,
        "inputs": dict(sorted((inputs or {}).items())),
        "versions": package_versions(),
        "code_version": code_version(),
        "timings_s": {k: round(v, 3) for k, v in (timings_s or {}).items()},
        "metrics": metrics or {},
        "created_at": now_iso(),
    }
    if extra:
        manifest.update(extra)
    return manifest


def check_stage(
    store: ArtifactStore,
    run_id: str,
    stage: str,
    config_hash: str,
    inputs: dict[str, str],
    force: bool,
) -> dict[str, Any] | None:
    """Decide whether a stage must run.

    Returns the existing manifest when the stage is committed with the same config and inputs
    (the caller reports "already done" and exits 0), None when it must run, and raises
    StageConflict when a committed stage differs and ``force`` is not set.
    """
    rel = store.stage_rel(run_id, stage)
    existing = store.read_manifest(rel)
    if existing is None:
        return None
    same = existing.get("config_hash") == config_hash and existing.get("inputs", {}) == dict(
        sorted(inputs.items())
    )
    if same and not force:
        return existing
    if force:
        return None
    what = "config" if existing.get("config_hash") != config_hash else "inputs"
    raise StageConflict(
        f"{stage} of run {run_id!r} is already committed at {store.display(rel)} with a different "
        f"{what}; pass --force to redo it, or use a new --run id"
    )
