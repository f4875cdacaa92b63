"""`medreason wait` against a real store: a local folder and the moto S3 server.

The stage is committed by a thread while the command waits, through the store's own
commit_dir (manifest last), as a job would; a permanent failure is recorded by a real stage
job that exits 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.markers import note_start
from jobs.wait import wait
from medreason.store import FAILED, ArtifactStore, build_manifest, read_failure, record_failure

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def _commit(store_uri: str, run: str, stage: str, tmp: Path, name: str | None = None,
            manifest_stage: str | None = None) -> None:
    store = ArtifactStore(store_uri)
    folder = tmp / f"out-{stage}-{name}-{time.monotonic_ns()}"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"accuracy": 0.5}')
    rel = store.stage_rel(run, stage) + (f"/{name}" if name else "")
    manifest = build_manifest(stage=manifest_stage or stage, run_id=run, config={}, config_hash="x")
    store.commit_dir(str(folder), rel, manifest)


def _commit_later(delay_s: float, *args, **kwargs) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        _commit(*args, **kwargs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait(*args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = CliRunner().invoke(wait, list(args), catch_exceptions=False)
    return result.exit_code, result.output, time.monotonic() - started


def test_waits_then_succeeds_when_the_commit_appears(store_uri: str, tmp_path: Path) -> None:
    thread = _commit_later(1.5, store_uri, "r1", "train", tmp_path)
    code, out, elapsed = _wait("--run", "r1", "--stage", "train", "--store", store_uri,
                               "--timeout-s", "60", "--poll-s", "0.2")
    thread.join()
    assert code == 0, out
    assert elapsed >= 1.5  # it did wait for the commit, not pass on an empty folder


def test_named_evaluation_is_waited_for_in_its_own_folder(store_uri: str, tmp_path: Path) -> None:
    _commit(store_uri, "r1", "evaluate", tmp_path)  # the default evaluation does not count
    thread = _commit_later(1.0, store_uri, "r1", "evaluate", tmp_path, name="medqa")
    code, out, elapsed = _wait("--run", "r1", "--stage", "evaluate", "--name", "medqa",
                               "--store", store_uri, "--timeout-s", "60", "--poll-s", "0.2")
    thread.join()
    assert code == 0 and elapsed >= 1.0, out


def test_times_out_with_exit_2(store_uri: str) -> None:
    code, out, elapsed = _wait("--run", "r1", "--stage", "train", "--store", store_uri,
                               "--timeout-s", "1.5", "--poll-s", "0.2")
    assert code == 2, out
    assert "not committed" in out and "within 1.5 s" in out
    assert 1.5 <= elapsed < 30


def test_a_manifest_of_another_stage_is_not_a_commit(store_uri: str, tmp_path: Path) -> None:
    _commit(store_uri, "r1", "train", tmp_path, manifest_stage="prepare")
    code, out, _ = _wait("--run", "r1", "--stage", "train", "--store", store_uri,
                         "--timeout-s", "1", "--poll-s", "0.2")
    assert code == 2 and "is for stage 'prepare'" in out, out


def test_a_failed_job_stops_the_waiter_at_once(store_uri: str) -> None:
    # A real stage job exiting 2 (an unknown config key) records its failure in the store.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    job = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--run", "r1", "--store",
                          store_uri, "--set", "nope.key=1"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert job.returncode == 2, job.stderr
    store = ArtifactStore(store_uri)
    failure = read_failure(store, "runs/r1/prepare")
    assert failure and "nope" in failure["reason"] and failure["failed_at"]

    code, out, elapsed = _wait("--run", "r1", "--stage", "prepare", "--for-stage", "train",
                               "--store", store_uri, "--timeout-s", "600", "--poll-s", "0.2")
    assert code == 2 and elapsed < 30, out
    assert "failed for good" in out and "nope" in out
    # ...and passes it on: whatever waits for train stops at once too.
    assert "input stage prepare" in read_failure(store, "runs/r1/train")["reason"]
    code, out, elapsed = _wait("--run", "r1", "--stage", "train", "--store", store_uri,
                               "--timeout-s", "600", "--poll-s", "0.2")
    assert code == 2 and elapsed < 30, out

    # Starting the stage again removes the marker; then the waiter waits again.
    note_start("prepare", {"run_id": "r1", "store": store_uri})
    assert read_failure(store, "runs/r1/prepare") is None
    code, out, _ = _wait("--run", "r1", "--stage", "prepare", "--store", store_uri,
                         "--timeout-s", "0.5", "--poll-s", "0.1")
    assert code == 2 and "within" in out, out


def test_a_commit_wins_over_a_failure_marker(store_uri: str, tmp_path: Path) -> None:
    _commit(store_uri, "r1", "train", tmp_path)
    store = ArtifactStore(store_uri)
    # commit_dir clears the folder; a marker written after it (e.g. a rerun hitting a
    # conflict) must not hide the commit.
    record_failure(store, "runs/r1/train", "conflict on rerun")
    assert store.exists(f"runs/r1/train/{FAILED}")
    code, out, _ = _wait("--run", "r1", "--stage", "train", "--store", store_uri,
                         "--timeout-s", "5", "--poll-s", "0.1")
    assert code == 0, out


@pytest.mark.parametrize("args, message", [
    (["--stage", "train"], "--run is required"),
    (["--run", "../x", "--stage", "train"], "--run"),
    (["--run", "r1", "--stage", "train", "--name", "x"], "--name applies to --stage evaluate"),
    (["--run", "r1", "--stage", "nope"], "nope"),
])
def test_bad_usage_exits_2(args: list[str], message: str, tmp_path: Path) -> None:
    code, out, _ = _wait(*args, "--store", str(tmp_path), "--timeout-s", "1")
    assert code == 2 and message in out, out


def test_wait_is_a_medreason_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "wait" in proc.stdout
