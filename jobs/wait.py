"""medreason wait: block until a stage of a run is committed in the store.

A scheduler without dependencies between jobs (Kubernetes Jobs under Kueue) submits a whole
pipeline at once; each downstream job first runs `medreason wait` for its input stage.

A permanent failure is recorded as ``runs/<run>/<stage>/FAILED.json`` ({"reason", "failed_at"}),
written by a stage job that exits 2 (the exit_codes wrapper calls note_failure) and removed
when that stage starts again (note_start). A commit wins over a marker. A waiter that finds the
marker exits 2 at once; with ``--for-stage`` it also writes the marker for the stage it guards,
so a failure travels down the whole chain (train fails -> evaluate and merge stop waiting).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import click

from jobs.common import exit_codes
from jobs.markers import STAGES, stage_rel

log = logging.getLogger("medreason.wait")

LOG_EVERY_S = 60.0


def _committed(store: Any, rel: str, run_id: str, stage: str, name: str | None) -> str | None:
    """None when ``rel`` holds a valid commit of the stage, else why not (for the log)."""
    from medreason.errors import InputError
    from medreason.store import MANIFEST

    try:
        manifest = store.read_manifest(rel)
    except ValueError as exc:  # a manifest that does not parse is no commit
        return f"{MANIFEST} does not parse ({exc})"
    if manifest is None:
        return "not committed yet"
    if not isinstance(manifest, dict) or manifest.get("stage") != stage:
        got = manifest.get("stage") if isinstance(manifest, dict) else type(manifest).__name__
        return f"{MANIFEST} is for stage {got!r}, not {stage!r}"
    if manifest.get("run_id") not in (None, run_id):
        return f"{MANIFEST} is for run {manifest.get('run_id')!r}, not {run_id!r}"
    if name and manifest.get("name") not in (None, name):
        return f"{MANIFEST} is for evaluation {manifest.get('name')!r}, not {name!r}"
    try:
        store.verify(rel, manifest, hashes=False)  # sizes only: cheap on S3 too
    except InputError as exc:
        return str(exc)
    return None


def wait_for_stage(store: Any, run_id: str, stage: str, name: str | None, timeout_s: float,
                   poll_s: float, for_stage: str | None = None) -> dict[str, Any]:
    """Return the stage's manifest once committed; raise InputError on timeout or a recorded
    permanent failure (recording it for ``for_stage`` too)."""
    from medreason.errors import InputError
    from medreason.store import read_failure, record_failure

    rel = stage_rel(store, run_id, stage, name)
    where = store.display(rel)
    started = time.monotonic()
    last_log = started
    while True:
        why = _committed(store, rel, run_id, stage, name)
        if why is None:
            log.info("%s of run %r is committed at %s (waited %.0f s)", stage, run_id, where,
                     time.monotonic() - started)
            return store.read_manifest(rel)
        failure = read_failure(store, rel)
        problem = None
        if failure is not None:
            problem = (f"{stage} of run {run_id!r} failed for good at {failure.get('failed_at')}: "
                       f"{failure.get('reason')} ({where}/FAILED.json; it is removed when the "
                       f"stage runs again)")
        elapsed = time.monotonic() - started
        if problem is None and timeout_s > 0 and elapsed >= timeout_s:
            problem = (f"{stage} of run {run_id!r} was not committed at {where} within "
                       f"{timeout_s:g} s ({why}); raise --timeout-s or check that stage's job")
        if problem is not None:
            if for_stage:
                record_failure(store, stage_rel(store, run_id, for_stage),
                               f"input stage {stage} unavailable: {problem}")
            raise InputError(problem)
        now = time.monotonic()
        if now - last_log >= LOG_EVERY_S:
            log.info("still waiting for %s of run %r at %s: %s (%.0f s so far)", stage, run_id,
                     where, why, now - started)
            last_log = now
        sleep_s = poll_s if timeout_s <= 0 else min(poll_s, max(timeout_s - elapsed, 0.05))
        time.sleep(sleep_s)


@click.command(help="""Wait until a stage of a run is committed in the store.

\b
Exit 0 once runs/<run>/<stage>/MANIFEST.json is there, parses, is that stage's and its files
have the listed sizes; exit 2 when --timeout-s passes first, or at once when the stage
recorded a permanent failure (FAILED.json, written by a stage job that exits 2).
--name waits for a named evaluation (runs/<run>/evaluate/<name>/).
--for-stage S also records the failure for stage S, so the chain behind it stops too.
""")
@click.option("--run", "run_id", metavar="RUN_ID", envvar="MEDREASON_RUN", default=None,
              help="Run id [env MEDREASON_RUN]. Required.")
@click.option("--stage", required=True, type=click.Choice(STAGES), help="The stage to wait for.")
@click.option("--name", default=None, metavar="NAME", help="A named evaluation (with --stage evaluate).")
@click.option("--timeout-s", type=click.FloatRange(min=0), default=86400.0, show_default=True,
              help="Give up (exit 2) after this many seconds; 0 waits without limit.")
@click.option("--poll-s", type=click.FloatRange(min=0.01), default=30.0, show_default=True,
              help="Seconds between looks at the store.")
@click.option("--for-stage", type=click.Choice(STAGES), default=None,
              help="The stage this wait guards: a failure is recorded for it too.")
@click.option("--store", metavar="URI", envvar="MEDREASON_STORE", default="./artifacts",
              show_default=True, help="Artifact store: a folder or s3://bucket/prefix [env MEDREASON_STORE].")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
@exit_codes
def wait(run_id, stage, name, timeout_s, poll_s, for_stage, store, verbose) -> None:
    from medreason.store import ArtifactStore, validate_segment

    if run_id is None:
        raise click.UsageError("--run is required (or set MEDREASON_RUN)")
    run_id = validate_segment(run_id, "--run")
    st = ArtifactStore(store)
    log.info("waiting for %s of run %r at %s (timeout %s, poll %g s)", stage, run_id,
             st.display(stage_rel(st, run_id, stage, name)),
             f"{timeout_s:g} s" if timeout_s > 0 else "none", poll_s)
    wait_for_stage(st, run_id, stage, name, timeout_s, poll_s, for_stage)


if __name__ == "__main__":
    wait()
