"""The stage runner every job uses: check -> skip or conflict -> build -> manifest -> commit.

    result = run_stage(ctx, Stage("prepare", inputs), build)

``build(folder)`` writes the stage's files into a local scratch folder and returns a ``Built``
(headline metrics, timings, manifest extras). The runner decides first, from the committed
manifest: the same config hash and inputs -> log "already committed" and return without
building (exit 0); a different one without --force -> StageConflict (exit 2) naming --force and
a new run id; otherwise build, write the manifest (config, its hash, inputs, versions, timings,
metrics) and commit once, the manifest last.

One writer per stage: before anything is written under the stage's folder (the failure marker
of an earlier attempt, --force's removal of the old commit, the build, the commit) the writing
process takes the stage's lease (medreason.lease), waiting up to ``--wait-for-lease`` seconds
for another holder, and decides again: a stage committed while it waited is "already
committed". The commit passes the lease, so a job that lost it commits nothing (LeaseLost).
In a distributed stage only the writing process takes the lease; it tells the others (``share``)
whether to build.

A stage may carry a name suffix (``Stage("evaluate", inputs, suffix="medqa")`` lives at
runs/<run>/evaluate/medqa/); its config hash is still its stage's. ``stage_write`` is the one
place a stage's write begins and ends, so a per-stage lease (one writer per stage) can wrap it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("medreason.stage")


@dataclass(frozen=True)
class Stage:
    """Which stage of a run: its name (the config's stage, e.g. "evaluate"), the hashes of the
    manifests it reads (``inputs``) and an optional name under the stage's folder."""

    name: str
    inputs: dict[str, str]
    suffix: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.suffix}" if self.suffix else self.name

    def rel(self, store: Any, run_id: str) -> str:
        from medreason.store import validate_segment

        rel = store.stage_rel(run_id, self.name)
        return f"{rel}/{validate_segment(self.suffix, 'stage name')}" if self.suffix else rel


@dataclass
class Built:
    """What a stage's build returns: the manifest's headline numbers, timings and extras."""

    metrics: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """The stage's committed manifest and where it lives; ``skipped`` when it was already done."""

    manifest: dict[str, Any]
    rel: str
    skipped: bool


def committed(ctx: Any, stage: Stage) -> dict[str, Any] | None:
    """The committed manifest when it matches this config and these inputs (and no --force);
    None when the stage must be built; StageConflict when it differs and --force is not set."""
    from medreason.errors import StageConflict

    rel = stage.rel(ctx.store, ctx.run_id)
    existing = ctx.store.read_manifest(rel)
    if existing is None or ctx.force:
        return None
    if existing.get("config_hash") != ctx.config.stage_hash(stage.name):
        from medreason.config import config_changes, describe_changes

        what = "config" + describe_changes(config_changes(existing.get("config"), ctx.config, stage.name))
    elif existing.get("inputs", {}) != dict(sorted(stage.inputs.items())):
        what = "inputs"
    else:
        return existing
    raise StageConflict(
        f"{stage.label} of run {ctx.run_id!r} is already committed at {ctx.store.display(rel)} with a "
        f"different {what}; pass --force to redo it, or use a new --run id"
    )


# The stage lease's ttl (seconds; renewed every quarter of it): how long a killed job's stage
# stays locked. The default suits the store's latency; a test or a small local store may lower it.
LEASE_TTL_ENV = "MEDREASON_LEASE_TTL_S"


def lease_ttl_s() -> float:
    from medreason.errors import InputError
    from medreason.lease import DEFAULT_TTL_S

    raw = os.environ.get(LEASE_TTL_ENV, "")
    try:
        ttl_s = float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        ttl_s = -1.0
    if not (ttl_s > 0 and ttl_s < float("inf")):
        raise InputError(f"{LEASE_TTL_ENV}={raw!r}: expected a number of seconds > 0")
    return ttl_s


@contextlib.contextmanager
def stage_write(ctx: Any, stage: Stage, *, writer: bool = True,
                share: Callable[[Any], Any] | None = None
                ) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(scratch folder, committed manifest or None) from the start of a stage's write to its
    commit, under the stage's lease (writer only; ``ctx.lease`` while held). The manifest is
    the re-check made after the lease was taken: not None means another job committed the
    stage meanwhile and nothing must be written. LeaseHeld when another job holds the lease."""
    from medreason.lease import acquire
    from medreason.store import clear_failure

    rel = stage.rel(ctx.store, ctx.run_id)
    lease = None
    try:
        outcome: Any = {"done": None}  # a non-writer without share: build
        if writer:
            ttl_s = lease_ttl_s()
            lease = acquire(ctx.store, rel, wait_s=ctx.wait_for_lease, ttl_s=ttl_s, renew_every_s=ttl_s / 4)
            outcome = {"done": committed(ctx, stage)}
    except Exception as exc:
        if lease is not None:
            lease.release()
        outcome = {"failed": f"{type(exc).__name__}: {exc}"}
        if share is not None:
            share(outcome)  # the other processes stop too instead of waiting for a build
        raise
    if share is not None:
        outcome = share(outcome)
    if "failed" in outcome:
        from medreason.errors import InputError

        raise InputError(f"{stage.label} of run {ctx.run_id}: the writing process stopped: {outcome['failed']}")
    ctx.lease = lease
    with lease if lease is not None else contextlib.nullcontext():
        try:
            if lease is not None and outcome["done"] is None:
                clear_failure(ctx.store, rel)
            with ctx.store.staged_folder() as folder:
                yield folder, outcome["done"]
        finally:
            ctx.lease = None


def run_stage(ctx: Any, stage: Stage, build: Callable[[str], Built], *,
              describe: Callable[[dict[str, Any]], str] | None = None,
              progress: bool = False, writer: bool = True, clear: bool = True,
              share: Callable[[Any], Any] | None = None) -> StageResult:
    """Check, then build and commit ``stage`` of ``ctx.run_id`` once (see the module docstring).
    ``describe(manifest)`` adds a short summary to the "already committed" line. ``writer``
    False: a non-main process of a distributed stage, which builds its share and commits
    nothing (its result's manifest is empty); the main process commits. ``clear`` False keeps
    files already under the stage's folder that the build did not write (train's checkpoints/).
    ``share(value)`` (distributed stages) returns the writing process's ``value`` on every
    process; the build may read the held lease as ``ctx.lease``."""
    from medreason.store import build_manifest

    st, rel = ctx.store, stage.rel(ctx.store, ctx.run_id)
    done = committed(ctx, stage)
    if done is not None:
        _log_done(ctx, stage, rel, done, describe)
        return StageResult(done, rel, skipped=True)
    with stage_write(ctx, stage, writer=writer, share=share) as (folder, done):
        if done is not None:
            _log_done(ctx, stage, rel, done, describe)
            return StageResult(done, rel, skipped=True)
        built = build(folder)
        if not writer:
            return StageResult({}, rel, skipped=False)
        manifest = build_manifest(
            stage=stage.name, run_id=ctx.run_id, config=ctx.config,
            config_hash=ctx.config.stage_hash(stage.name), inputs=stage.inputs,
            timings_s=built.timings_s, metrics=built.metrics, extra=built.extra,
        )
        committed_manifest = st.commit_dir(folder, rel, manifest, progress=progress, clear=clear,
                                           lease=ctx.lease)
    return StageResult(committed_manifest, rel, skipped=False)


def _log_done(ctx: Any, stage: Stage, rel: str, done: dict[str, Any],
              describe: Callable[[dict[str, Any]], str] | None) -> None:
    detail = f" ({describe(done)})" if describe else ""
    log.info("%s of run %s is already committed at %s%s; nothing to do (--force redoes it)",
             stage.label, ctx.run_id, ctx.store.display(rel), detail)


# -- stages that read a trained adapter: their model/data/lora/train come from train's manifest ---
def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def adopt_train_config(ctx: Any, train_manifest: dict[str, Any], stage_name: str) -> None:
    """Replace ``ctx.config``'s train sections (model, data, lora, train) by the ones the
    committed train stage was made with, so a merge or evaluation reports what the adapter
    really is. A value the user gave (--preset/--config/--set/MEDREASON_*: anything that differs
    from the schema default) that contradicts the trained one is a mistake: InputError naming
    both values."""
    from medreason.config import STAGE_SECTIONS, Config
    from medreason.errors import InputError

    sections = STAGE_SECTIONS["train"]
    trained = {s: (train_manifest.get("config") or {}).get(s) for s in sections}
    if any(not isinstance(v, dict) for v in trained.values()):
        raise InputError(f"the train manifest of run {ctx.run_id} records no full config "
                         f"(sections {', '.join(sections)}); retrain it with this version")
    given = ctx.config.model_dump(mode="json")
    defaults = _leaves({s: v for s, v in Config().model_dump(mode="json").items() if s in sections})
    mine = _leaves({s: given[s] for s in sections})
    theirs = _leaves(trained)
    clashes = [f"{key}={mine[key]!r} (the adapter was trained with {key}={theirs.get(key)!r})"
               for key in sorted(mine)
               if mine[key] != defaults.get(key) and mine[key] != theirs.get(key)]
    if clashes:
        raise InputError(
            f"{stage_name} of run {ctx.run_id}: the config contradicts the committed train stage: "
            + "; ".join(clashes) + f". {stage_name} takes model, data, lora and train from the train "
            "manifest: drop these settings, or train a new run with them")
    ctx.config = Config.model_validate({**given, **trained})


def dist_share(dist: Any) -> Callable[[Any], Any] | None:
    """``share`` for run_stage under `accelerate launch` (None with one process; ``dist`` is an
    evaluation's Dist or an Accelerator): the main
    process's value, broadcast to every process."""
    if getattr(dist, "count", getattr(dist, "num_processes", 1)) <= 1:
        return None

    def share(value: Any) -> Any:
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    return share
