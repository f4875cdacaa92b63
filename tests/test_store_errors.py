"""Store failures by kind, with real failures: permanent ones exit 2 in one line before any model
is loaded, transient ones are retried within MEDREASON_STORE_RETRY_S and then exit 1 in one line,
and a store URI holding credentials exits 2 with the secret masked and nothing written.

Each job runs in a subprocess (`python -m jobs.cli prepare ...`), as a scheduler would run it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_job(store: str, env: dict[str, str] | None = None, unprivileged: bool = False,
            cwd: Path | None = None) -> tuple[int, str, str, float]:
    """`medreason prepare --run r1 --store STORE` in a subprocess; (exit code, stdout, stderr, seconds)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    command = [sys.executable, "-m", "jobs.cli", "prepare", "--run", "r1", "--store", store]
    if unprivileged and os.geteuid() == 0:
        # root writes through any mode bits; without CAP_DAC_OVERRIDE (as a pod's non-root
        # user is) it obeys them. setpriv drops the capabilities for the job's process only.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to run the job without CAP_DAC_OVERRIDE")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    started = time.monotonic()
    proc = subprocess.run(command, env=full_env, cwd=str(cwd or REPO_ROOT), capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def assert_one_line(rc: int, expected_rc: int, stderr: str, *needles: str) -> str:
    assert rc == expected_rc, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- local paths ----------------------------------------------------------------------------------
def test_read_only_folder_exits_2_before_loading_anything(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        rc, _out, err, _s = run_job(str(store), unprivileged=True)
    finally:
        store.chmod(0o755)
    line = assert_one_line(rc, 2, err, str(store), "Permission denied")
    assert "cannot be written" in line
    assert list(store.iterdir()) == []


def test_path_under_a_regular_file_exits_2(tmp_path: Path) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("not a folder")
    rc, _out, err, _s = run_job(str(regular / "store"))
    assert_one_line(rc, 2, err, str(regular / "store"), "Not a directory")
    assert regular.read_text() == "not a folder"


def test_store_that_is_a_regular_file_exits_2(tmp_path: Path) -> None:
    regular = tmp_path / "a-file"
    regular.write_text("not a folder")
    rc, _out, err, _s = run_job(str(regular))
    assert_one_line(rc, 2, err, str(regular))


def test_proc_path_exits_2() -> None:
    rc, _out, err, _s = run_job("/proc/medreason-store")
    assert_one_line(rc, 2, err, "/proc/medreason-store", "cannot create the folder")


def test_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    from medreason.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    store.probe()
    assert list((tmp_path / "store").iterdir()) == []


# -- S3 (moto) ------------------------------------------------------------------------------------
def _start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    from conftest import _free_port, _wait_http

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=dict(os.environ, **(extra_env or {})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(endpoint + "/", proc)
    return proc, endpoint


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()  # no state to keep: a hard stop, and its port is closed once wait() returns
    proc.wait(timeout=30)


def _s3_env(endpoint: str, key: str = "testing", secret: str = "testing") -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1"}


def test_missing_bucket_exits_2(s3_server: str) -> None:
    rc, _out, err, _s = run_job("s3://no-such-bucket-medreason/store", env=_s3_env(s3_server))
    assert_one_line(rc, 2, err, "s3://no-such-bucket-medreason/store", "NoSuchBucket")


def test_invalid_credentials_exit_2() -> None:
    pytest.importorskip("moto")
    # This server checks every request's signature (INITIAL_NO_AUTH_ACTION_COUNT=0), as S3 does.
    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        rc, _out, err, _s = run_job("s3://some-bucket/store",
                                    env=_s3_env(endpoint, "AKIANOTAREALKEY00000", "wrong-secret"))
    finally:
        _stop(proc)
    line = assert_one_line(rc, 2, err, "s3://some-bucket/store")
    assert "InvalidAccessKeyId" in line or "AccessDenied" in line or "SignatureDoesNotMatch" in line, line
    assert "wrong-secret" not in err


def test_refused_connection_is_retried_then_exits_1_in_one_line() -> None:
    pytest.importorskip("moto")
    proc, endpoint = _start_moto()
    _stop(proc)  # a stopped server: its port now refuses connections
    rc, _out, err, seconds = run_job("s3://some-bucket/store",
                                     env={**_s3_env(endpoint), "MEDREASON_STORE_RETRY_S": "2"})
    line = assert_one_line(rc, 1, err, "s3://some-bucket/store", "unreachable after")
    assert "retrying in" in err  # the backoff ran: more than one attempt
    assert int(line.split("unreachable after ", 1)[1].split()[0]) >= 2, line
    assert seconds < 30, f"took {seconds:.0f} s with a 2 s retry budget"


def test_probe_on_a_good_bucket_leaves_nothing_behind(s3_bucket: str) -> None:
    import s3fs

    from medreason.store import ArtifactStore

    ArtifactStore(s3_bucket).probe()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
                           skip_instance_cache=True)
    assert fs.find(s3_bucket.split("://", 1)[1].split("/", 1)[0]) == []


# -- credentials in the URI -----------------------------------------------------------------------
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzz"


def _bucket_objects(s3_bucket: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
                           skip_instance_cache=True)
    return fs.find(s3_bucket.split("://", 1)[1].split("/", 1)[0])


@pytest.mark.parametrize("form", ["userinfo", "userinfo-plain", "query"])
def test_credentials_in_an_s3_uri_exit_2_masked_and_write_nothing(form: str, s3_bucket: str) -> None:
    bucket, _, prefix = s3_bucket.split("://", 1)[1].partition("/")
    secret = SECRET if form != "userinfo-plain" else "plainsecretvalue123"
    uri = {
        "userinfo": f"s3://AKIAEXAMPLEKEY:{secret}@{bucket}/{prefix}",
        "userinfo-plain": f"s3://AKIAEXAMPLEKEY:{secret}@{bucket}/{prefix}",
        "query": f"s3://{bucket}/{prefix}?secret_key={secret}",
    }[form]
    rc, out, err, _s = run_job(uri)
    assert_one_line(rc, 2, err, bucket)
    for fragment in (secret, secret.split("/")[0], secret.split("/")[-1]):
        assert fragment not in out + err
    assert _bucket_objects(s3_bucket) == []


def test_credentials_in_a_local_uri_exit_2_and_create_nothing(tmp_path: Path) -> None:
    rc, out, err, _s = run_job(f"file://{tmp_path}/store?token={SECRET}")
    assert_one_line(rc, 2, err, "credentials")
    assert SECRET not in out + err
    assert not (tmp_path / "store").exists() and list(tmp_path.iterdir()) == []


def test_scrub_masks_the_uri_and_its_secret_parts() -> None:
    from medreason.store import scrub

    uri = f"s3://AKIAEXAMPLEKEY:{SECRET}@bucket/p?token=abcd1234&x=1"
    text = f"failed on {uri}; key AKIAEXAMPLEKEY secret {SECRET} token abcd1234"
    cleaned = scrub(text, uri)
    for secret in (SECRET, "abcd1234", "AKIAEXAMPLEKEY"):
        assert secret not in cleaned
    assert "bucket/p" in cleaned
    assert scrub("plain /data/store text", "/data/store") == "plain /data/store text"


# -- classification of S3 answers that moto cannot be made to give (throttling, 5xx) ----------------
@pytest.mark.parametrize(("code", "status", "kind"), [
    ("SlowDown", 503, "transient"),
    ("InternalError", 500, "transient"),
    ("", 502, "transient"),
    ("AccessDenied", 403, "permanent"),
    ("InvalidAccessKeyId", 403, "permanent"),
    ("NoSuchBucket", 404, "permanent"),
])
def test_s3_error_codes_are_classified(code: str, status: int, kind: str) -> None:
    from botocore.exceptions import ClientError

    from medreason.store import classify_store_error

    error = ClientError({"Error": {"Code": code, "Message": "m"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    assert classify_store_error(error) == kind
    try:  # the same error as s3fs re-raises it, wrapped in an OSError
        raise OSError("wrapped") from error
    except OSError as wrapped:
        assert classify_store_error(wrapped) == kind
    assert classify_store_error(RuntimeError("a bug")) is None
