"""One writer per stage: a lease in the artifact store, renewed while the job runs.

Where leases live (apart from the stages, so that a stage's ``--force``/clear, which removes the
stage folder, never removes its lease)::

    <root>/leases/runs/<run_id>/<stage>/gen-0000000001.json
    <root>/leases/cache/models/<name>@<revision>/gen-0000000001.json

A lease is a sequence of generation objects; the highest generation is the current lease.
Taking a lease = creating generation n+1 with an atomic create-if-absent
(``ArtifactStore.create_bytes``: hard link locally, ``If-None-Match: *`` on S3), allowed only
when generation n is released or expired. Two takers racing for n+1: exactly one create
succeeds. The holder renews by rewriting its own generation (a new ``expires_at``); a holder
that finds a higher generation, or that could not renew for longer than it trusts its lease,
has lost it and says so (LeaseLost) instead of committing.

Time: ``expires_at`` is the holder's wall clock + ttl, compared by others with their wall
clock, so clocks may differ by at most ``ttl_s / 4`` (the holder stops trusting its lease that
much before it expires; 30 s with the default 120 s ttl, NTP keeps nodes within milliseconds).

Usage (a job)::

    with acquire(store, store.stage_rel(run, "train"), wait_s=wait) as lease:
        ...  # re-check the stage (it may have been committed while we waited), do the work
        store.commit_dir(out, rel, manifest, lease=lease)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from types import TracebackType

from medreason import jsonio
from medreason.errors import InputError
from medreason.store import ArtifactStore

log = logging.getLogger(__name__)

LEASES_ROOT = "leases"
DEFAULT_TTL_S = 120.0
DEFAULT_RENEW_EVERY_S = 30.0
_GEN_RE = re.compile(r"gen-(\d{10})\.json")
# Environment variables that identify the scheduler job holding a lease, shown to the loser.
_JOB_VARS = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
    "KUBERNETES_SERVICE_HOST",
)


class LeaseHeld(InputError):
    """Another live job holds the lease (exit 2); the message names it and when it expires."""

    def __init__(self, message: str, holder: LeaseRecord):
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """This job's lease was taken over or lapsed; it must not commit (exit 1: a retry sees the
    other writer's lease or its commit)."""


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """The content of one generation object."""

    key: str
    generation: int
    owner: str
    host: str
    pid: int
    job: dict[str, str]
    acquired_at: str
    renewed_at: str
    expires_at: str
    expires_unix: float
    ttl_s: float
    released: bool = False

    def to_bytes(self) -> bytes:
        return jsonio.dumps(dataclasses.asdict(self)).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord:
        raw = json.loads(data)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def expired(self, now_unix: float | None = None) -> bool:
        return self.released or (time.time() if now_unix is None else now_unix) >= self.expires_unix

    def describe(self) -> str:
        """'owner 1a2b3c4d on host node7 pid 4242 (SLURM job 77), since ..., expires ...'."""
        where = f"owner {self.owner[:8]} on host {self.host} pid {self.pid}"
        job = self.job
        if job.get("SLURM_ARRAY_JOB_ID"):
            where += f" (SLURM array job {job['SLURM_ARRAY_JOB_ID']}_{job.get('SLURM_ARRAY_TASK_ID', '?')})"
        elif job.get("SLURM_JOB_ID"):
            where += f" (SLURM job {job['SLURM_JOB_ID']})"
        elif job.get("pod"):
            where += f" (pod {job['pod']})"
        state = "released" if self.released else f"expires {self.expires_at}"
        return f"{where}, held since {self.acquired_at}, renewed {self.renewed_at}, {state}"


def _iso(unix: float) -> str:
    return _dt.datetime.fromtimestamp(unix, _dt.timezone.utc).isoformat(timespec="seconds")


def _job_ids() -> dict[str, str]:
    ids = {var: os.environ[var] for var in _JOB_VARS if os.environ.get(var)}
    # In a Kubernetes pod HOSTNAME is the pod's name; the service host variable tells it is one.
    if ids.pop("KUBERNETES_SERVICE_HOST", None) and os.environ.get("HOSTNAME"):
        ids["pod"] = os.environ["HOSTNAME"]
    return ids


def lease_folder(rel: str) -> str:
    """Where the generations of the lease on ``rel`` (a stage or a staged model) live."""
    return f"{LEASES_ROOT}/{rel.strip('/')}"


def _gen_rel(rel: str, generation: int) -> str:
    return f"{lease_folder(rel)}/gen-{generation:010d}.json"


def _generations(store: ArtifactStore, rel: str) -> list[int]:
    found = (_GEN_RE.fullmatch(name) for name in store.listdir(lease_folder(rel)))
    return sorted(int(m.group(1)) for m in found if m)


def _read(store: ArtifactStore, rel: str, generation: int) -> LeaseRecord | None:
    """One generation's record; None when it vanished (cleaned up); a placeholder that counts as
    expired when it stays unreadable (hand-edited or a torn write on a filesystem without links)."""
    for attempt in range(3):
        try:
            return LeaseRecord.from_bytes(store.read_bytes(_gen_rel(rel, generation)))
        except FileNotFoundError:
            return None
        except OSError:
            # s3fs reads with If-Match on the ETag it saw first; a renewal replacing the object
            # in between makes that read fail (FileExpired). The new content is one read away.
            if attempt == 2:
                raise
            time.sleep(0.05)
        except (ValueError, TypeError):
            time.sleep(0.1 * (attempt + 1))
    log.warning("lease object %s is unreadable; treating it as expired",
                store.display(_gen_rel(rel, generation)))
    return LeaseRecord(key=rel, generation=generation, owner="unreadable", host="?", pid=0, job={},
                       acquired_at="?", renewed_at="?", expires_at="?", expires_unix=0.0, ttl_s=0.0)


def read_holder(store: ArtifactStore, rel: str) -> LeaseRecord | None:
    """The current (highest-generation) lease record on ``rel``, or None when there never was one."""
    while True:
        gens = _generations(store, rel)
        if not gens:
            return None
        record = _read(store, rel, gens[-1])
        if record is not None:
            return record
        # The highest generation vanished between listing and reading: list again.


def _validate_times(ttl_s: float, renew_every_s: float) -> float:
    """The safety margin: how long before expiry the holder stops trusting its lease."""
    margin_s = ttl_s / 4
    if not (ttl_s > 0 and 0 < renew_every_s < ttl_s - margin_s):
        raise InputError(
            f"lease: renew_every_s={renew_every_s} must be > 0 and < 3/4 of ttl_s={ttl_s} "
            "(the holder stops trusting a lease a quarter of its ttl before it expires)"
        )
    return margin_s


def _same_job_restarted(holder: LeaseRecord) -> bool:
    """A requeued SLURM job keeps its job id and counts up SLURM_RESTART_COUNT; SLURM starts the
    new incarnation only after the old one ended, so the old incarnation's lease is dead."""
    mine = _job_ids()
    if not mine.get("SLURM_JOB_ID") or mine["SLURM_JOB_ID"] != holder.job.get("SLURM_JOB_ID"):
        return False
    try:
        return int(mine.get("SLURM_RESTART_COUNT", "0")) > int(holder.job.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return False


def acquire(
    store: ArtifactStore,
    rel: str,
    *,
    ttl_s: float = DEFAULT_TTL_S,
    renew_every_s: float = DEFAULT_RENEW_EVERY_S,
    wait_s: float = 0.0,
    poll_s: float | None = None,
    renew: bool = True,
) -> Lease:
    """Take the lease on ``rel`` (e.g. ``store.stage_rel(run, "train")`` or
    ``f"cache/models/{name}"``) before writing anything there.

    A live lease held by another job raises LeaseHeld (exit 2) naming the holder, at once with
    ``wait_s=0`` or after waiting up to ``wait_s`` seconds for it to be released or to expire
    (polling every ``poll_s``, default min(5 s, ttl/4)). An expired lease (its holder died) is
    taken over with a warning. With ``renew`` a daemon thread renews every ``renew_every_s``.
    Use the result as a context manager, or call ``release()``.
    """
    margin_s = _validate_times(ttl_s, renew_every_s)
    poll_s = poll_s if poll_s is not None else min(5.0, ttl_s / 4)
    deadline = time.monotonic() + max(0.0, wait_s)
    owner = uuid.uuid4().hex
    while True:
        gens = _generations(store, rel)
        current = _read(store, rel, gens[-1]) if gens else None
        if gens and current is None:
            continue  # cleaned up between listing and reading
        if current is not None and not _may_take(store, rel, current, deadline, wait_s):
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            continue
        generation = (gens[-1] if gens else 0) + 1
        lease = _try_create(store, rel, generation, owner, ttl_s, renew_every_s, margin_s)
        if lease is None:
            continue  # another taker won this generation, or ours was stale: look again
        log.info("lease taken on %s (generation %d, ttl %.0f s)", store.display(rel), generation, ttl_s)
        if renew:
            lease.start_renewing()
        return lease


def _may_take(store: ArtifactStore, rel: str, current: LeaseRecord, deadline: float,
              wait_s: float) -> bool:
    """Whether the next generation may be created over ``current``: yes when it expired or was
    released (a takeover warns), or when it is this requeued SLURM job's own; no while a live
    holder has it and there is time left to wait; LeaseHeld once the wait is over."""
    if current.expired():
        if not current.released:
            log.warning("taking over the expired lease on %s (its holder stopped renewing; "
                        "presumably dead): %s", store.display(rel), current.describe())
        return True
    if _same_job_restarted(current):
        log.warning("taking over the lease on %s from the previous run of this requeued "
                    "SLURM job: %s", store.display(rel), current.describe())
        return True
    if deadline - time.monotonic() > 0:
        return False
    waited = f" after waiting {wait_s:.0f} s" if wait_s > 0 else ""
    raise LeaseHeld(
        f"{store.display(rel)} is being written by another job{waited}: lease held by "
        f"{current.describe()} (lease object {store.display(_gen_rel(rel, current.generation))}). "
        "Wait for it (--wait-for-lease SECONDS) or use another --run id; a lease whose "
        f"holder died expires by itself {current.ttl_s:.0f} s after its last renewal.",
        current,
    )


def _try_create(store: ArtifactStore, rel: str, generation: int, owner: str, ttl_s: float,
                renew_every_s: float, margin_s: float) -> Lease | None:
    """Create ``generation`` atomically; None when another taker created it first or a higher
    generation exists (a taker working from a stale listing may have re-created a generation
    that was already cleaned up: a higher one means that one is not the lease)."""
    started = time.monotonic()
    now = time.time()
    record = LeaseRecord(
        key=rel, generation=generation, owner=owner, host=socket.gethostname(), pid=os.getpid(),
        job=_job_ids(), acquired_at=_iso(now), renewed_at=_iso(now),
        expires_at=_iso(now + ttl_s), expires_unix=now + ttl_s, ttl_s=ttl_s,
    )
    if not store.create_bytes(_gen_rel(rel, generation), record.to_bytes()):
        return None
    if _generations(store, rel)[-1] != generation:
        store.remove(_gen_rel(rel, generation))
        return None
    _clean_old_generations(store, rel, generation)
    return Lease(store, rel, record, ttl_s, renew_every_s, margin_s, started)


def _clean_old_generations(store: ArtifactStore, rel: str, current: int) -> None:
    """Keep the current and the previous generation (the one a concurrent taker may still be
    reading); older ones are garbage. Best effort: a failure leaves a small object behind."""
    for generation in _generations(store, rel):
        if generation < current - 1:
            try:
                store.remove(_gen_rel(rel, generation))
            except OSError as exc:
                log.debug("could not remove old lease generation %d: %s", generation, exc)


class Lease:
    """A held lease; ``check()`` says whether it still is, ``release()`` gives it back."""

    def __init__(self, store: ArtifactStore, rel: str, record: LeaseRecord, ttl_s: float,
                 renew_every_s: float, margin_s: float, written_mono: float):
        self.store = store
        self.rel = rel
        self.record = record
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s
        self._margin_s = margin_s
        # Local validity runs on the monotonic clock from *before* the write that extended it.
        self._trusted_until = written_mono + ttl_s - margin_s
        self._lost: str | None = None
        self._released = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return self.record.generation

    @property
    def owner(self) -> str:
        return self.record.owner

    @property
    def object_rel(self) -> str:
        """The store path of this lease's generation object."""
        return _gen_rel(self.rel, self.generation)

    def _lose(self, why: str) -> LeaseLost:
        self._lost = self._lost or (
            f"lost the lease on {self.store.display(self.rel)} (generation {self.generation}): {why}; "
            "nothing more is written, and this job's work is not committed"
        )
        return LeaseLost(self._lost)

    def check(self, remote: bool = True) -> None:
        """Raise LeaseLost unless this lease is still held.

        Locally: not released, not lost, renewed recently enough. ``remote`` also asks the store
        that no higher generation exists and that this generation is still ours.
        """
        if self._released:
            raise LeaseLost(f"the lease on {self.store.display(self.rel)} was already released")
        if self._lost:
            raise LeaseLost(self._lost)
        overdue_s = time.monotonic() - self._trusted_until
        if overdue_s > 0:
            raise self._lose(f"not renewed for {self.ttl_s - self._margin_s + overdue_s:.1f} s, more "
                             f"than the {self.ttl_s - self._margin_s:.1f} s it is trusted (ttl {self.ttl_s:.0f} s)")
        if remote:
            newest = _generations(self.store, self.rel)
            if not newest or newest[-1] != self.generation:
                holder = read_holder(self.store, self.rel)
                raise self._lose("taken over by " + (holder.describe() if holder else "nobody (lease objects removed)"))
            current = _read(self.store, self.rel, self.generation)
            if current is None or current.owner != self.owner:
                raise self._lose("its lease object was replaced or removed")

    def renew(self) -> None:
        """Extend the lease by ttl_s from now; LeaseLost when it is no longer ours."""
        with self._lock:
            self.check(remote=True)
            started = time.monotonic()
            now = time.time()
            self.record = dataclasses.replace(
                self.record, renewed_at=_iso(now), expires_at=_iso(now + self.ttl_s),
                expires_unix=now + self.ttl_s,
            )
            self.store.write_bytes(self.object_rel, self.record.to_bytes())
            self._trusted_until = started + self.ttl_s - self._margin_s

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a store hiccup: try again next period
                log.warning("could not renew the lease on %s (retrying in %.0f s): %s",
                            self.store.display(self.rel), self.renew_every_s, exc)

    def start_renewing(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.rel}", daemon=True)
            self._thread.start()

    def release(self) -> None:
        """Stop renewing and mark the lease released, so the next writer needs no wait and gets
        no takeover warning. Safe to call twice, and after the lease was lost."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.renew_every_s))
        with self._lock:
            if self._released:
                return
            try:
                self.check(remote=True)
            except LeaseLost:
                self._released = True
                return  # someone else's now: leave their generation alone
            now = time.time()
            self.record = dataclasses.replace(self.record, released=True, renewed_at=_iso(now),
                                              expires_at=_iso(now), expires_unix=now)
            self.store.write_bytes(self.object_rel, self.record.to_bytes())
            self._released = True
        log.info("lease released on %s", self.store.display(self.rel))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.release()
        except Exception as release_exc:  # noqa: BLE001 - never hide the job's own error
            if exc is None:
                raise
            log.warning("could not release the lease on %s: %s", self.store.display(self.rel), release_exc)

    def __repr__(self) -> str:
        return f"Lease({self.store.display(self.rel)!r}, generation={self.generation}, owner={self.owner[:8]})"

