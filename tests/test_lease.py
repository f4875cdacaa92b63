"""One writer per stage: the lease races run for real, between processes, on a local store and
on the moto S3 server."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medreason.errors import InputError
from medreason.lease import LeaseHeld, LeaseLost, LeaseRecord, acquire, lease_folder, read_holder
from medreason.store import MANIFEST, ArtifactStore

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("lease_worker.py")
REL = "runs/r1/train"


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket")
    return str(tmp_path / "store")


class Worker:
    """A lease_worker.py process; ``event()`` returns its next JSON line."""

    def __init__(self, store_uri: str, opts: dict, env: dict[str, str] | None = None):
        full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), store_uri, REL, json.dumps(opts)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
        )

    def event(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"worker exited ({self.proc.wait()}): {self.proc.stderr.read()[-3000:]}"
        return json.loads(line)

    def finish(self, timeout_s: float = 60) -> tuple[int, list[dict], str]:
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, [json.loads(x) for x in out.splitlines() if x.strip()], err


def _start(store_uri: str, n: int, opts: dict, tmp_path: Path) -> list[Worker]:
    """n workers that all reach the acquire at once (they spin on a start file)."""
    start = tmp_path / "start"
    workers = [Worker(store_uri, dict(opts, start_file=str(start))) for _ in range(n)]
    for worker in workers:
        assert worker.event()["event"] == "ready"
    start.touch()
    return workers


def test_exactly_one_of_three_racing_writers_wins_and_the_losers_name_it(store_uri, tmp_path):
    release = tmp_path / "release"
    workers = _start(store_uri, 3, {"mode": "hold", "release_file": str(release)}, tmp_path)
    first = [w.event() for w in workers]
    winners = [e for e in first if e["event"] == "acquired"]
    assert len(winners) == 1, first
    winner = winners[0]
    release.touch()
    for worker, event in zip(workers, first, strict=True):
        rc, _events, _err = worker.finish()
        if event is winner:
            assert rc == 0
            continue
        assert rc == 2 and event["event"] == "refused"
        # The refusal names the holder: its owner id, pid, host and expiry.
        assert event["holder_pid"] == winner["pid"]
        assert winner["owner"][:8] in event["message"] and f"pid {winner['pid']}" in event["message"]
        assert "expires" in event["message"] and "--wait-for-lease" in event["message"]


def test_two_committing_writers_leave_one_consistent_commit(store_uri, tmp_path):
    """The reported failure: two writers of one stage interleaved their files under one
    manifest. With the lease, one commits, the other is refused before writing anything."""
    go = tmp_path / "go"
    opts = {"mode": "commit", "go_file": str(go)}
    workers = [
        Worker(store_uri, dict(opts, start_file=str(tmp_path / "start"),
                               files={f"part-{i}.txt": str(n) * (10 + 5 * n + i) for i in range(4)}))
        for n in (1, 2)
    ]
    for worker in workers:
        assert worker.event()["event"] == "ready"
    (tmp_path / "start").touch()
    go.touch()
    results = [w.finish() for w in workers]
    codes = sorted(rc for rc, _e, _err in results)
    assert codes == [0, 2], results
    winner_pid = next(e["pid"] for rc, events, _ in results if rc == 0 for e in events if e["event"] == "committed")
    store = ArtifactStore(store_uri)
    manifest = store.verify(REL)  # every listed file has its listed size
    assert manifest["writer"] == winner_pid
    assert sorted(manifest["files"]) == [f"part-{i}.txt" for i in range(4)]


def test_an_expired_lease_is_taken_over_with_a_warning(store_uri, tmp_path, caplog):
    # ttl 5 s: long enough that a loaded 2-core machine still sees the lease alive right after
    # the kill, short enough to wait out.
    holder = Worker(store_uri, {"mode": "hold", "ttl_s": 5.0, "renew_every_s": 0.5,
                                "release_file": str(tmp_path / "never")})
    assert holder.event()["event"] == "ready"
    held = holder.event()
    assert held["event"] == "acquired"
    holder.proc.send_signal(signal.SIGKILL)  # the holder dies without releasing
    holder.finish()
    store = ArtifactStore(store_uri)
    with pytest.raises(LeaseHeld, match=f"pid {held['pid']}"):
        acquire(store, REL, ttl_s=5, renew_every_s=1)  # still within its ttl
    dead_expires_unix = read_holder(store, REL).expires_unix
    caplog.set_level(logging.WARNING, logger="medreason.lease")
    with acquire(store, REL, ttl_s=5, renew_every_s=1, wait_s=20, poll_s=0.1) as lease:
        assert lease.generation == held["generation"] + 1
        assert time.time() >= dead_expires_unix  # taken only once the dead holder's lease expired
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("expired lease" in w and f"pid {held['pid']}" in w for w in warnings), warnings


def test_renewal_keeps_a_lease_past_its_ttl_and_wait_mode_gets_it_after_release(store_uri, tmp_path, caplog):
    release = tmp_path / "release"
    holder = Worker(store_uri, {"mode": "hold", "ttl_s": 1.2, "renew_every_s": 0.25, "release_file": str(release)})
    assert holder.event()["event"] == "ready"
    held = holder.event()
    store = ArtifactStore(store_uri)
    # 3 s is 2.5 ttls: only the renewing thread keeps the lease alive that long.
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        with pytest.raises(LeaseHeld):
            acquire(store, REL, ttl_s=5, renew_every_s=1)
        time.sleep(0.3)
    threading.Timer(0.5, release.touch).start()
    caplog.set_level(logging.WARNING, logger="medreason.lease")
    with acquire(store, REL, ttl_s=5, renew_every_s=1, wait_s=30, poll_s=0.1) as lease:
        got_at = time.time()
        assert lease.generation == held["generation"] + 1
    rc, events, err = holder.finish()
    assert rc == 0, err
    released_at = next(e["at"] for e in events if e["event"] == "released")
    assert got_at >= released_at - 0.05
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a release is no takeover


def test_wait_mode_gives_up_naming_the_holder(store_uri):
    store = ArtifactStore(store_uri)
    with acquire(store, REL, ttl_s=60, renew_every_s=10, renew=False) as held:
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match="after waiting 1 s") as info:
            acquire(store, REL, wait_s=1.0, poll_s=0.2)
        assert time.monotonic() - started >= 1.0
        assert info.value.holder.owner == held.owner
        assert isinstance(info.value, InputError)  # exit 2


def test_a_stalled_holder_loses_its_lease_and_cannot_commit(store_uri, tmp_path):
    """A holder frozen (SIGSTOP: a GC pause, a hung mount) past its ttl is taken over; when it
    wakes it must not commit over the new holder's stage."""
    go = tmp_path / "go"
    stalled = Worker(store_uri, {"mode": "commit", "ttl_s": 1.2, "renew_every_s": 0.25, "go_file": str(go),
                                 "files": {"a.txt": "stale"}})
    assert stalled.event()["event"] == "ready"
    assert stalled.event()["event"] == "acquired"
    stalled.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.6)
        store = ArtifactStore(store_uri)
        lease = acquire(store, REL, ttl_s=30, renew_every_s=5)
    finally:
        go.touch()
        stalled.proc.send_signal(signal.SIGCONT)
    rc, events, err = stalled.finish()
    assert rc == 1, err
    lost = next(e for e in events if e["event"] == "lost")
    assert "lost the lease" in lost["message"]
    assert not store.exists(f"{REL}/{MANIFEST}") and not store.exists(f"{REL}/a.txt")
    lease.check()  # the new holder still holds it
    lease.release()


def test_a_holder_whose_generation_was_superseded_cannot_renew_or_commit(store_uri, tmp_path):
    """A holder whose clock ran behind: its record looked expired to a second writer, who took
    generation n+1. The first finds the newer generation and refuses to commit."""
    store = ArtifactStore(store_uri)
    first = acquire(store, REL, ttl_s=60, renew_every_s=10, renew=False)
    stale = LeaseRecord(**{**first.record.__dict__, "expires_unix": time.time() - 1})
    store.write_bytes(first.object_rel, stale.to_bytes())
    second = acquire(store, REL, ttl_s=60, renew_every_s=10, renew=False)
    assert second.generation == first.generation + 1
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("first")
    with pytest.raises(LeaseLost, match=f"taken over by owner {second.owner[:8]}"):
        first.renew()
    with pytest.raises(LeaseLost):
        store.commit_dir(str(out), REL, {"writer": "first"}, lease=first)
    assert not store.exists(f"{REL}/{MANIFEST}")
    first.release()  # a no-op on a lost lease: it must not mark the new holder's lease released
    assert not read_holder(store, REL).released
    store.commit_dir(str(out), REL, {"writer": "second"}, lease=second)
    assert store.read_manifest(REL)["writer"] == "second"
    second.release()
    assert read_holder(store, REL).released


def test_a_requeued_slurm_job_takes_over_its_previous_incarnation(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    holder = Worker(uri, {"mode": "hold", "ttl_s": 60, "renew_every_s": 10, "release_file": str(tmp_path / "never")},
                    env={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"})
    assert holder.event()["event"] == "ready"
    assert holder.event()["event"] == "acquired"
    holder.proc.send_signal(signal.SIGKILL)
    holder.finish()
    store = ArtifactStore(uri)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    # Another task of the same job (same restart count) is a second writer, not a successor.
    with pytest.raises(LeaseHeld, match="SLURM job 4242"):
        acquire(store, REL)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with acquire(store, REL) as lease:
        assert lease.record.job["SLURM_RESTART_COUNT"] == "1"


def test_create_bytes_is_exclusive(store_uri):
    store = ArtifactStore(store_uri)
    assert store.create_bytes("leases/x/one.json", b"first")
    assert not store.create_bytes("leases/x/one.json", b"second")
    assert store.read_bytes("leases/x/one.json") == b"first"
    assert store.listdir("leases/x") == ["one.json"]  # no temp file left behind


def test_old_generations_are_cleaned_up(store_uri):
    store = ArtifactStore(store_uri)
    generations = []
    for _ in range(4):
        with acquire(store, REL, renew=False) as lease:
            generations.append(lease.generation)
    assert generations == [1, 2, 3, 4]
    assert store.listdir(lease_folder(REL)) == ["gen-0000000003.json", "gen-0000000004.json"]
    assert not store.exists(f"{REL}/.lease")  # nothing inside the stage folder


def test_renewal_period_must_be_well_inside_the_ttl(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(InputError, match="renew_every_s"):
        acquire(store, REL, ttl_s=10, renew_every_s=8)
    assert store.listdir(lease_folder(REL)) == []
