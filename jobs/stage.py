"""The stage runner every job uses: check -> skip or conflict -> build -> manifest -> commit.

    result = run_stage(ctx, Stage("prepare", inputs), build)

``build(folder)`` writes the stage's files into a local scratch folder and returns a ``Built``
(headline metrics, timings, manifest extras). The runner decides first, from the committed
manifest: the same config hash and inputs -> log "already committed" and return without
building (exit 0); a different one without --force -> StageConflict (exit 2) naming --force and
a new run id; otherwise build, write the manifest (config, its hash, inputs, versions, timings,
metrics) and commit once, the manifest last.

A stage may carry a name suffix (``Stage("evaluate", inputs, suffix="medqa")`` lives at
runs/<run>/evaluate/medqa/); its config hash is still its stage's. ``stage_write`` is the one
place a stage's write begins and ends, so a per-stage lease (one writer per stage) can wrap it.
"""

from __future__ import annotations

import contextlib
import logging
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
        what = "config"
    elif existing.get("inputs", {}) != dict(sorted(stage.inputs.items())):
        what = "inputs"
    else:
        return existing
    raise StageConflict(
        f"{stage.label} of run {ctx.run_id!r} is already committed at {ctx.store.display(rel)} with a "
        f"different {what}; pass --force to redo it, or use a new --run id"
    )


@contextlib.contextmanager
def stage_write(ctx: Any, stage: Stage) -> Iterator[str]:
    """The scratch folder a stage is built in, from the start of its write to its commit. The
    one place a stage's write begins and ends: a per-stage lease will be taken and released here."""
    with ctx.store.staged_folder() as folder:
        yield folder


def run_stage(ctx: Any, stage: Stage, build: Callable[[str], Built], *,
              describe: Callable[[dict[str, Any]], str] | None = None,
              progress: bool = False, writer: bool = True, clear: bool = True) -> StageResult:
    """Check, then build and commit ``stage`` of ``ctx.run_id`` once (see the module docstring).
    ``describe(manifest)`` adds a short summary to the "already committed" line. ``writer``
    False: a non-main process of a distributed stage, which builds its share and commits
    nothing (its result's manifest is empty); the main process commits. ``clear`` False keeps
    files already under the stage's folder that the build did not write (train's checkpoints/)."""
    from medreason.store import build_manifest

    st, rel = ctx.store, stage.rel(ctx.store, ctx.run_id)
    done = committed(ctx, stage)
    if done is not None:
        detail = f" ({describe(done)})" if describe else ""
        log.info("%s of run %s is already committed at %s%s; nothing to do (--force redoes it)",
                 stage.label, ctx.run_id, st.display(rel), detail)
        return StageResult(done, rel, skipped=True)
    with stage_write(ctx, stage) as folder:
        built = build(folder)
        if not writer:
            return StageResult({}, rel, skipped=False)
        manifest = build_manifest(
            stage=stage.name, run_id=ctx.run_id, config=ctx.config,
            config_hash=ctx.config.stage_hash(stage.name), inputs=stage.inputs,
            timings_s=built.timings_s, metrics=built.metrics, extra=built.extra,
        )
        committed_manifest = st.commit_dir(folder, rel, manifest, progress=progress, clear=clear)
    return StageResult(committed_manifest, rel, skipped=False)
