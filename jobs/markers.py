"""Stage failure markers: ``runs/<run>/<stage>/FAILED.json`` ({"reason", "failed_at"}).

A stage job that exits 2 records why (note_failure, called by jobs.common.exit_codes), so the
jobs waiting on that stage (`medreason wait`) stop at once instead of at their timeout; the
marker is removed when the stage starts again (note_start). A commit wins over a marker.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click

log = logging.getLogger("medreason.wait")


def process_rank() -> int:
    """This process's global rank under torchrun/accelerate (RANK) or srun (SLURM_PROCID); 0 alone."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


# The stage jobs: each writes runs/<run>/<stage>/, and its exit 2 is recorded there.
STAGES = ("prepare", "train", "evaluate", "merge")


def stage_rel(store: Any, run_id: str, stage: str, name: str | None = None) -> str:
    """runs/<run>/<stage>/, or runs/<run>/evaluate/<name>/ for a named evaluation."""
    from medreason.store import validate_segment

    rel = store.stage_rel(run_id, stage)
    if name:
        if stage != "evaluate":
            raise click.BadParameter("--name applies to --stage evaluate only", param_hint="--name")
        rel = f"{rel}/{validate_segment(name, '--name')}"
    return rel


def _stage_folder(command: str, kwargs: dict[str, Any]) -> tuple[Any, str] | None:
    """(store, rel) of the stage a job command writes, or None when it is not a stage job or
    its options are unusable (the job itself reports those)."""
    if command not in STAGES or process_rank() != 0 or not kwargs.get("run_id"):
        return None
    try:
        from medreason.store import ArtifactStore

        store = ArtifactStore(kwargs["store"])
        return store, stage_rel(store, kwargs["run_id"], command, kwargs.get("name"))
    except Exception:  # noqa: BLE001 - bookkeeping must never replace the job's own error
        return None


def note_start(command: str, kwargs: dict[str, Any]) -> None:
    """A stage job starts: a failure recorded by an earlier attempt no longer holds."""
    from medreason.store import clear_failure

    found = _stage_folder(command, kwargs)
    if found is None:
        return
    try:
        clear_failure(*found)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not clear the failure marker of %s: %s", found[0].display(found[1]), exc)


def note_failure(command: str, kwargs: dict[str, Any], reason: str) -> None:
    """A stage job exits 2: record it so the stages waiting on it stop at once."""
    from medreason.store import record_failure

    found = _stage_folder(command, kwargs)
    if found is None:
        return
    try:
        record_failure(found[0], found[1], reason)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record the failure of %s: %s", found[0].display(found[1]), exc)
