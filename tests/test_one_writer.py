"""One writer per stage, raced for real: two `python -m jobs.cli` processes on one stage, their
commit windows stretched by MEDREASON_TEST_SLOW_COMMIT_S (or the step delay of training).

Each race asserts one winner (exit 0, its config committed), a loser that exits 2 naming the
holder, and a store whose committed folders verify; on the local store and on the moto S3 server.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _fixtures_prepare import make_records, write_jsonl
from _fixtures_train import commit_prepare, start_train, train_config, wait_for

from medreason.lease import LeaseRecord, lease_folder, read_holder
from medreason.store import ArtifactStore, manifest_hash

REPO_ROOT = Path(__file__).resolve().parents[1]


def _spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    fh = open(log_path, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=full, cwd=str(log_path.parent),
                                stdout=fh, stderr=subprocess.STDOUT)
    finally:
        fh.close()


def _finish(proc: subprocess.Popen, log_path: Path, timeout_s: float = 300) -> tuple[int, str]:
    proc.wait(timeout=timeout_s)
    return proc.returncode, log_path.read_text(errors="replace")


@contextlib.contextmanager
def _holder(args: list[str], log_path: Path, env: dict[str, str],
            taken: Callable[[], bool]) -> Iterator[subprocess.Popen]:
    """The first writer, started and past the point ``taken`` says (it holds a lease)."""
    proc = _spawn(args, log_path, env)
    try:
        wait_for(taken, 240, proc, "the first job's lease", log_path)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _lease_taken(store: ArtifactStore, rel: str) -> bool:
    holder = read_holder(store, rel)
    return holder is not None and not holder.expired()


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket")
    return str(tmp_path / "store")


def _prepare_args(store_uri: str, run: str, model_dir: Path, data: Path, limit: int) -> list[str]:
    return ["prepare", "--store", store_uri, "--run", run, "--set", f"model.name_or_path={model_dir}",
            "--set", "model.dtype=float32", "--set", f"data.source={data}",
            "--set", "data.eval_fraction=0.25", "--set", f"data.limit={limit}"]


def test_two_prepares_of_one_run_one_wins_the_other_names_the_holder(
        store_uri: str, tiny_phi_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "records.jsonl", make_records(24))
    store = ArtifactStore(store_uri)
    slow = {"MEDREASON_TEST_SLOW_COMMIT_S": "1.0"}
    with _holder(_prepare_args(store_uri, "r1", tiny_phi_dir, data, 20), tmp_path / "first.log", slow,
                 lambda: _lease_taken(store, "runs/r1/prepare")) as first:
        second = _spawn(_prepare_args(store_uri, "r1", tiny_phi_dir, data, 12), tmp_path / "second.log")
        rc2, out2 = _finish(second, tmp_path / "second.log")
        # The waiting twin of the first: same config, waits for the lease, then finds it committed.
        twin = _spawn(_prepare_args(store_uri, "r1", tiny_phi_dir, data, 20) + ["--wait-for-lease", "300"],
                      tmp_path / "twin.log")
        rc1, out1 = _finish(first, tmp_path / "first.log")
        rc3, out3 = _finish(twin, tmp_path / "twin.log")
    assert rc1 == 0, out1
    assert rc2 == 2, out2
    assert "runs/r1/prepare is being written by another job: lease held by owner" in out2
    assert f"pid {first.pid}" in out2 and "--wait-for-lease" in out2 and "Traceback" not in out2
    assert rc3 == 0 and "already committed" in out3, out3
    manifest = store.verify("runs/r1/prepare", hashes=store.is_local)
    assert manifest["config"]["data"]["limit"] == 20
    assert manifest["metrics"]["n_train"] + manifest["metrics"]["n_eval"] <= 20
    # A refused job records no failure: the stage is not failed, its holder commits it.
    assert not store.exists("runs/r1/prepare/FAILED.json")
    assert read_holder(store, "runs/r1/prepare").released


def test_a_waiting_prepare_with_another_config_conflicts_after_the_wait(tiny_phi_dir: Path, tmp_path: Path) -> None:
    store_uri = str(tmp_path / "store")
    data = write_jsonl(tmp_path / "records.jsonl", make_records(24))
    store = ArtifactStore(store_uri)
    with _holder(_prepare_args(store_uri, "r1", tiny_phi_dir, data, 20), tmp_path / "first.log",
                 {"MEDREASON_TEST_SLOW_COMMIT_S": "0.5"}, lambda: _lease_taken(store, "runs/r1/prepare")) as first:
        second = _spawn(_prepare_args(store_uri, "r1", tiny_phi_dir, data, 12) + ["--wait-for-lease", "300"],
                        tmp_path / "second.log")
        rc1, out1 = _finish(first, tmp_path / "first.log")
        rc2, out2 = _finish(second, tmp_path / "second.log")
    assert rc1 == 0, out1
    # Decided again once the lease was its own: the stage is committed with another config.
    assert rc2 == 2 and "different config" in out2 and "--force" in out2, out2
    assert store.verify("runs/r1/prepare")["config"]["data"]["limit"] == 20


def test_two_first_time_model_stagings_share_one_staged_model(
        store_uri: str, tiny_phi_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "records.jsonl", make_records(24))
    store = ArtifactStore(store_uri)
    slow = {"MEDREASON_TEST_SLOW_COMMIT_S": "0.7"}

    def staging() -> bool:
        leases = store.listdir(lease_folder("cache/models"))
        return any(_lease_taken(store, f"cache/models/{name}") for name in leases)

    with _holder(_prepare_args(store_uri, "r1", tiny_phi_dir, data, 20), tmp_path / "first.log", slow,
                 staging) as first:
        second = _spawn(_prepare_args(store_uri, "r2", tiny_phi_dir, data, 20), tmp_path / "second.log", slow)
        rc2, out2 = _finish(second, tmp_path / "second.log")
        rc1, out1 = _finish(first, tmp_path / "first.log")
    assert rc1 == 0, out1
    assert rc2 == 0, out2
    assert "already staged" in out2  # the second waited and used the first one's result
    (model_name,) = store.listdir("cache/models")
    model_manifest = store.verify(f"cache/models/{model_name}", hashes=store.is_local)
    for run in ("r1", "r2"):
        prep = store.verify(f"runs/{run}/prepare", hashes=store.is_local)
        assert prep["inputs"] == {"model": manifest_hash(model_manifest)}


def test_two_trains_of_one_run_one_wins(store_uri: str, tiny_phi_dir: Path, tmp_path: Path) -> None:
    cfg_a = train_config(tmp_path / "a.yaml", max_steps=8, learning_rate=3e-3)
    cfg_b = train_config(tmp_path / "b.yaml", max_steps=8, learning_rate=1e-3)
    commit_prepare(store_uri, "r1", cfg_a, tiny_phi_dir)
    store = ArtifactStore(store_uri)
    first = start_train(store_uri, "r1", cfg_a, tmp_path / "a.log", {"MEDREASON_TEST_STEP_DELAY_S": "0.5"})
    try:
        wait_for(lambda: _lease_taken(store, "runs/r1/train"), 240, first, "the first train's lease",
                 tmp_path / "a.log")
        second = start_train(store_uri, "r1", cfg_b, tmp_path / "b.log")
        second.wait(timeout=300)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    out_a, out_b = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert first.returncode == 0, out_a
    assert second.returncode == 2, out_b
    assert "runs/r1/train is being written by another job: lease held by owner" in out_b
    assert f"pid {first.pid}" in out_b and "Traceback" not in out_b
    manifest = store.verify("runs/r1/train", hashes=store.is_local)
    assert manifest["config"]["train"]["learning_rate"] == 3e-3 and manifest["metrics"]["steps"] == 8
    for name in manifest["checkpoints"]:
        store.verify(f"runs/r1/train/checkpoints/{name}", hashes=store.is_local)


def test_a_train_whose_lease_is_taken_over_exits_1_and_commits_nothing(tiny_phi_dir: Path, tmp_path: Path) -> None:
    store_uri = str(tmp_path / "store")
    cfg = train_config(tmp_path / "a.yaml", max_steps=12, save_every_steps=4)
    commit_prepare(store_uri, "r1", cfg, tiny_phi_dir)
    store = ArtifactStore(store_uri)
    proc = start_train(store_uri, "r1", cfg, tmp_path / "a.log", {"MEDREASON_TEST_STEP_DELAY_S": "0.4"})
    try:
        wait_for(lambda: store.is_committed("runs/r1/train/checkpoints/step-4"), 240, proc,
                 "the first checkpoint", tmp_path / "a.log")
        # What a job finds after this one stopped renewing (a long pause, a partition): its
        # lease expired and another job took the next generation.
        holder = read_holder(store, "runs/r1/train")
        now = time.time()
        taker = LeaseRecord(key="runs/r1/train", generation=holder.generation + 1, owner="f" * 32,
                            host="other-host", pid=4242, job={}, acquired_at="now", renewed_at="now",
                            expires_at="later", expires_unix=now + 600, ttl_s=600)
        gen = f"{lease_folder('runs/r1/train')}/gen-{holder.generation + 1:010d}.json"
        assert store.create_bytes(gen, taker.to_bytes())
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "a.log").read_text()
    assert proc.returncode == 1, out
    assert "lost the lease on" in out and "taken over by owner ffffffff on host other-host pid 4242" in out
    assert "Traceback" not in out
    assert not store.is_committed("runs/r1/train")
    assert not store.is_committed("runs/r1/train/checkpoints/step-8")
    assert json.loads(store.read_bytes(gen))["owner"] == "f" * 32  # the taker's lease is untouched
