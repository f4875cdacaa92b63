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
import errno
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
from typing import Any, Protocol

import fsspec

from medreason import jsonio, testhooks
from medreason.errors import InputError, StoreError, StoreUnavailable

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
    # Canonical strict JSON: a manifest holding NaN in memory hashes like its written form
    # (null), so the hash a stage records for its input matches what a reader computes.
    return hashlib.sha256(jsonio.canonical_bytes(manifest)).hexdigest()


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


def _write_durable(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    """Write ``data`` to ``path`` and fsync it (FileExistsError with O_EXCL in ``flags``)."""
    with os.fdopen(os.open(path, flags, 0o644), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _local_temp(target: str, data: bytes) -> Iterator[str]:
    """A durable hidden temp copy of ``data`` beside ``target`` (listings skip it), removed on exit."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(target)}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        _write_durable(tmp, data)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _create_local(target: str, data: bytes) -> bool:
    """Local half of ArtifactStore.create_bytes: a hard link of a complete temp file never
    exists half-written; O_EXCL is the fallback where links are not supported."""
    with _local_temp(target, data) as tmp:
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        try:
            _write_durable(target, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        return True


class LeaseCheck(Protocol):
    """What commit_dir needs of a lease (medreason.lease.Lease)."""

    def check(self, remote: bool = True) -> None: ...


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


# -- store URIs and store errors ---------------------------------------------------------------------
def _refuse_credentials(uri: str) -> None:
    """Refuse a store URI that carries credentials (user:secret@ or a secret query parameter):
    they would end up in logs, manifests and even object keys. Exit 2, the secret masked."""
    protocol, sep, rest = uri.partition("://")
    shown = redact(uri)
    has_secret = shown != uri
    if sep and protocol not in ("file", "local"):
        path = rest.split("?", 1)[0].split("#", 1)[0]
        authority = path.split("/", 1)[0]
        # A bucket name never holds ':' or '@'. Checked on the raw text, not urlsplit's netloc:
        # a secret key may hold '/', which moves the '@' into what urlsplit calls the path.
        if ":" in authority or "@" in authority:
            has_secret = True
            shown = f"{protocol}://***@{path.split('@', 1)[1]}" if "@" in path else f"{protocol}://***"
        if "?" in rest or "#" in rest:
            # The query would become part of every object key; options go in the environment.
            raise StoreError(
                f"--store {_mask_query(shown)}: a store URI takes no '?' query or '#' fragment; "
                "pass credentials and options through the environment (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL ...)"
            )
    if has_secret:
        raise StoreError(
            f"--store {_mask_query(shown)}: the URI holds credentials; remove them and pass them "
            "through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead"
        )


def _mask_query(uri: str) -> str:
    """Every query value masked: in a message about a refused URI, any of them may be a secret."""
    base, sep, query = uri.partition("?")
    if not sep:
        return uri
    keys = [part.split("=", 1)[0] for part in query.split("&")]
    return base + "?" + "&".join(f"{k}=***" for k in keys)


def scrub(text: str, uri: str | None) -> str:
    """``text`` with the store URI and each secret part of it (password, query values) masked:
    for messages that may quote the URI (exception texts, tracebacks)."""
    if not uri:
        return text
    text = text.replace(uri, _mask_query(redact(uri)))
    _protocol, sep, rest = uri.partition("://")
    if sep:
        userinfo = rest.split("?", 1)[0].rpartition("@")[0]
        if userinfo:
            text = text.replace(userinfo, "***")
        for part in userinfo.split(":"):
            if len(part) >= 4:
                text = text.replace(part, "***")
    for _key, value in urllib.parse.parse_qsl(uri.partition("?")[2], keep_blank_values=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
            text = text.replace(urllib.parse.quote(value, safe=""), "***")
    return text


def _one_line(exc: BaseException) -> str:
    """An exception as one short line: its kind and message, whitespace collapsed."""
    code = _client_error_code(exc)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if code and code not in message:
        message = f"{code}: {message}"
    return f"{type(exc).__name__}: {message}"[:500]


def _retry_budget_s() -> float:
    raw = os.environ.get("MEDREASON_STORE_RETRY_S", "60")
    try:
        value = float(raw)
    except ValueError:
        raise StoreError(f"MEDREASON_STORE_RETRY_S={raw!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise StoreError(f"MEDREASON_STORE_RETRY_S={raw!r} must lie between 0 and 86400 seconds")
    return value


# S3 error codes (and HTTP statuses) that no retry can fix: the job must exit 2.
_PERMANENT_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "InvalidToken", "ExpiredToken", "InvalidBucketName", "NoSuchBucket", "AuthorizationHeaderMalformed",
    "PermanentRedirect", "InvalidSecurity", "NotSignedUp", "400", "401", "403", "404",
})
# Ones that go away with time: retried, then exit 1.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestTimeout", "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError", "OperationAborted",
    "429", "500", "502", "503", "504",
})
_PERMANENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT, errno.EEXIST, errno.EISDIR,
    errno.ENAMETOOLONG, errno.EINVAL, errno.ENOSPC, errno.EDQUOT, errno.ELOOP,
})
_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.EAGAIN, errno.EIO, errno.ESTALE,
})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _client_error_code(exc: BaseException) -> str | None:
    """The S3 error code (or HTTP status) of a botocore ClientError anywhere in the chain."""
    for err in _chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code") or "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code or (str(status) if status else None)
    return None


def classify_store_error(exc: BaseException) -> str | None:
    """'permanent' (exit 2), 'transient' (retry, then exit 1) or None (not a store error)."""
    code = _client_error_code(exc)
    if code in _PERMANENT_CODES:
        return "permanent"
    if code in _TRANSIENT_CODES or (code and code.isdigit() and int(code) >= 500):
        return "transient"
    for err in _chain(exc):
        kind = _classify_one(err)
        if kind is not None:
            return kind
    return None


def _is_network_error(err: BaseException) -> bool:
    module, name = type(err).__module__, type(err).__name__
    return module.startswith(("botocore", "aiohttp", "urllib3")) and (
        "Connect" in name or "Timeout" in name or "ConnectionClosed" in name
        or name in ("HTTPClientError", "ServerDisconnectedError", "ProxyConnectionError")
    )


def _classify_one(err: BaseException) -> str | None:
    """One exception of a chain, without its causes: network and transient OS errors first."""
    if _is_network_error(err) or isinstance(err, (ConnectionError, TimeoutError)):
        return "transient"
    if not isinstance(err, OSError):
        return None
    if err.errno in _TRANSIENT_ERRNOS:
        return "transient"
    if err.errno in _PERMANENT_ERRNOS or isinstance(
            err, (PermissionError, FileNotFoundError, NotADirectoryError, FileExistsError)):
        return "permanent"
    return None


# -- the store -----------------------------------------------------------------------------------
def local_cache_root() -> str:
    """Where remote store folders are downloaded: $MEDREASON_LOCAL_CACHE or ~/.cache/medreason."""
    return os.environ.get("MEDREASON_LOCAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medreason")


class ArtifactStore:
    """A root folder on any fsspec filesystem (local path, file://, s3://)."""

    def __init__(self, uri: str):
        if not uri or not str(uri).strip():
            raise StoreError("--store is empty; pass a folder or s3://bucket/prefix")
        self.uri = str(uri).rstrip("/") or "/"
        _refuse_credentials(self.uri)
        protocol, _, rest = self.uri.partition("://")
        if not rest:
            protocol, rest = "file", os.path.abspath(self.uri)
        self.protocol = protocol
        self.is_local = protocol in ("file", "local")
        options = _fs_options(protocol)
        try:
            self.fs = fsspec.filesystem(protocol, **options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"--store {redact(self.uri)}: unsupported storage: {exc}") from None
        self.root = rest.rstrip("/") if protocol != "file" else rest
        if self.is_local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"--store {self.display()}: cannot create the folder: {_one_line(exc)}") from None

    def probe(self, retry_s: float | None = None) -> None:
        """Check early, before any model is loaded, that the store can be written: write and
        delete a small object under the root (listings skip it: it carries the temp mark).

        A permanent problem (cannot create or write, no such bucket, access denied, invalid
        credentials) raises StoreError (exit 2). A transient one (connection refused, timeout,
        throttling, 5xx) is retried with exponential backoff (0.5 s doubling, at most 30 s a
        wait) for ``retry_s`` seconds in all (MEDREASON_STORE_RETRY_S, default 60), then raises
        StoreUnavailable (exit 1: a scheduler may retry the job).
        """
        budget = _retry_budget_s() if retry_s is None else retry_s
        deadline = time.monotonic() + budget
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            try:
                self._probe_once()
                return
            except Exception as exc:  # classified below; anything unknown propagates as is
                kind = classify_store_error(exc)
                if kind is None:
                    raise
                cause = _one_line(exc)
                if kind == "permanent":
                    raise StoreError(f"--store {self.display()}: cannot be written: {cause}") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(
                        f"--store {self.display()}: unreachable after {attempt} attempt(s) over "
                        f"{budget:g} s (MEDREASON_STORE_RETRY_S): {cause}"
                    ) from None
                log.warning("store %s: %s; retrying in %.1f s", self.display(), cause, min(delay, left))
                time.sleep(min(delay, left))
                delay = min(delay * 2, 30.0)

    def _probe_once(self) -> None:
        name = f".store-probe{_TMP_MARK}{uuid.uuid4().hex[:8]}"
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
            path = os.path.join(self.root, name)
            with open(path, "wb") as fh:
                fh.write(b"probe")
            os.unlink(path)
            return
        # A separate filesystem object without the client's own retries (botocore's and
        # s3fs's, ~13 s against a closed port), so the backoff above is the only bound.
        options = dict(_fs_options(self.protocol))
        if self.protocol == "s3":
            options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 5,
                                        "read_timeout": 15}
        fs = fsspec.filesystem(self.protocol, **options)
        if hasattr(fs, "retries"):
            fs.retries = 1
        path = self.full(name)
        fs.pipe_file(path, b"probe")
        fs.rm_file(path)

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
            with _local_temp(target, data) as tmp:
                os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, rel: str, obj: Any) -> None:
        """Strict JSON (see medreason.jsonio): non-finite floats are written as null."""
        self.write_bytes(rel, jsonio.dumps(obj).encode("utf-8"))

    def create_bytes(self, rel: str, data: bytes) -> bool:
        """Write one file only if nothing is there yet, atomically; False when it already exists.

        Two writers racing for the same name: exactly one gets True. Locally the complete content
        is written under a temp name and hard-linked to the target (``link`` fails with EEXIST
        when the name is taken, atomically, also on NFS); a filesystem without hard links falls
        back to ``O_CREAT|O_EXCL`` (equally exclusive, but a reader may briefly see the file
        before its content). On S3 it is a PUT with ``If-None-Match: *`` (AWS S3 conditional
        writes, MinIO, Ceph RGW; the moto test server honours it too), which the server refuses
        with 412 when the key exists. Other filesystems are refused with InputError.
        """
        target = self.full(rel)
        if self.is_local:
            return _create_local(target, data)
        if self.protocol not in ("s3", "s3a"):
            raise InputError(
                f"--store {self.display()}: exclusive create (stage leases) is supported on local "
                "folders and S3 only"
            )
        self.check_conditional_create()
        return self._create_remote(target, data)

    def _create_remote(self, target: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            return False
        return True

    def check_conditional_create(self) -> None:
        """Refuse (InputError) an S3 endpoint that ignores ``If-None-Match: *`` on PutObject.

        Such a server (an old MinIO, some gateways) would let two writers both "create" the same
        lease object, so one probe per store object: create a key twice; the second must fail.
        """
        if self.is_local or getattr(self, "_conditional_create_ok", False):
            return
        probe = self.full(f"leases/.probe-{uuid.uuid4().hex}")
        try:
            first = self._create_remote(probe, b"probe")
            second = self._create_remote(probe, b"probe")
        finally:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm(probe)
        if not first or second:
            raise InputError(
                f"--store {self.display()}: this S3 endpoint ignores conditional writes "
                "(PutObject with If-None-Match: *), so two jobs could both take a stage's lease; "
                "use AWS S3 or a MinIO / Ceph RGW release with conditional writes (2024 or later)"
            )
        self._conditional_create_ok = True

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
        lease: LeaseCheck | None = None,
    ) -> dict[str, Any]:
        """Upload every file of ``local_dir`` under ``rel``, then write MANIFEST.json last.

        The manifest gets a ``files`` table (size and sha256 of each file). With ``clear`` whatever
        was under ``rel`` before is removed first (its manifest before its files); without it only
        the old manifest is removed and other files (e.g. train's checkpoints/) stay.

        With ``lease`` (a medreason.lease.Lease) the caller must still hold it: checked against
        the store before the old commit is touched and again just before MANIFEST.json is
        written, and from its local state before each upload. A lost lease raises LeaseLost and
        nothing is committed. The manifest is written as strict JSON and returned as written
        (non-finite floats as None).
        """
        files = _list_local_files(local_dir)
        table = {}
        for name in files:
            path = os.path.join(local_dir, name)
            table[name] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
        if lease is not None:
            lease.check()
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
            if lease is not None:
                lease.check(remote=False)
            self.put_file(os.path.join(local_dir, name), f"{rel}/{name}")
            testhooks.between_uploads()
        manifest = jsonio.sanitize(dict(manifest))
        manifest["files"] = table
        manifest.setdefault("committed_at", now_iso())
        if lease is not None:
            # The last moment: the files under rel are this holder's only if nobody took the
            # lease over while they were uploaded.
            lease.check()
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
    # What commit_dir will write (NaN/inf metrics as None), so hashes and comparisons made on
    # this dict match the committed file.
    return jsonio.sanitize(manifest)


# -- permanent failures ------------------------------------------------------------------------
FAILED = "FAILED.json"


def record_failure(store: ArtifactStore, rel: str, reason: str) -> None:
    """Mark a stage folder as failed for good (a job exited 2), so a stage waiting on it
    (`medreason wait`) stops at once instead of at its timeout. A commit wins over the marker;
    the next start of the stage removes it (clear_failure)."""
    store.write_json(f"{rel}/{FAILED}", {"reason": reason, "failed_at": now_iso()})


def read_failure(store: ArtifactStore, rel: str) -> dict[str, Any] | None:
    """The recorded permanent failure of a stage folder, or None."""
    try:
        return json.loads(store.read_bytes(f"{rel}/{FAILED}"))
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable marker: still a failure, reason unknown
        return {"reason": f"unreadable {FAILED}", "failed_at": None}


def clear_failure(store: ArtifactStore, rel: str) -> None:
    """Remove a stage's failure marker (the stage is being started again)."""
    if store.exists(f"{rel}/{FAILED}"):
        store.fs.rm(store.full(f"{rel}/{FAILED}"))
