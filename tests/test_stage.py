"""The stage runner: build once and commit, skip when committed, conflict without --force,
a named stage under its stage's folder, non-writers build but commit nothing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from jobs.common import JobContext
from jobs.stage import Built, Stage, run_stage
from medreason.config import build_config
from medreason.errors import StageConflict
from medreason.store import MANIFEST, ArtifactStore


def _ctx(tmp_path: Path, *overrides: str, force: bool = False) -> JobContext:
    return JobContext(config=build_config(overrides=list(overrides)), store=ArtifactStore(str(tmp_path / "store")),
                      run_id="r1", force=force, preset=None)


def _builder(calls: list[str], text: str = "hello"):
    def build(folder: str) -> Built:
        calls.append(folder)
        with open(os.path.join(folder, "out.txt"), "w", encoding="utf-8") as fh:
            fh.write(text)
        return Built({"n": len(text)}, {"build": 0.5}, {"note": "x"})
    return build


def test_builds_once_then_skips_then_conflicts(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="medreason.stage")
    calls: list[str] = []
    stage = Stage("prepare", {"model": "abc"})
    first = run_stage(_ctx(tmp_path), stage, _builder(calls))
    assert not first.skipped and len(calls) == 1 and not os.path.exists(calls[0])  # scratch is gone
    folder = tmp_path / "store/runs/r1/prepare"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert (folder / "out.txt").read_text() == "hello"
    assert manifest["metrics"] == {"n": 5} and manifest["note"] == "x" and manifest["inputs"] == {"model": "abc"}
    assert manifest["files"]["out.txt"]["size"] == 5 and manifest == first.manifest

    again = run_stage(_ctx(tmp_path), stage, _builder(calls), describe=lambda m: f"n={m['metrics']['n']}")
    assert again.skipped and len(calls) == 1
    assert "prepare of run r1 is already committed at" in caplog.text and "(n=5)" in caplog.text

    # The refusal names what changed, as the hash saw it.
    with pytest.raises(StageConflict, match=r"different config \(data.limit: null -> 5\); pass --force to redo "
                       "it, or use a new --run id"):
        run_stage(_ctx(tmp_path, "data.limit=5"), stage, _builder(calls))
    with pytest.raises(StageConflict, match="different inputs"):
        run_stage(_ctx(tmp_path), Stage("prepare", {"model": "other"}), _builder(calls))
    assert len(calls) == 1 and json.loads((folder / MANIFEST).read_text()) == manifest

    redone = run_stage(_ctx(tmp_path, "data.limit=5", force=True), stage, _builder(calls, "bye"))
    assert not redone.skipped and (folder / "out.txt").read_text() == "bye"


def test_named_stage_lives_under_its_stage(tmp_path: Path) -> None:
    calls: list[str] = []
    done = run_stage(_ctx(tmp_path), Stage("evaluate", {}, suffix="medqa"), _builder(calls))
    assert done.rel == "runs/r1/evaluate/medqa"
    manifest = json.loads((tmp_path / "store/runs/r1/evaluate/medqa" / MANIFEST).read_text())
    assert manifest["stage"] == "evaluate" and manifest["config_hash"] == _ctx(tmp_path).config.stage_hash("evaluate")
    with pytest.raises(ValueError):
        Stage("evaluate", {}, suffix="../x").rel(_ctx(tmp_path).store, "r1")


def test_a_non_writer_builds_and_commits_nothing(tmp_path: Path) -> None:
    calls: list[str] = []
    done = run_stage(_ctx(tmp_path), Stage("evaluate", {}), _builder(calls), writer=False)
    assert len(calls) == 1 and done.manifest == {} and not done.skipped
    assert not (tmp_path / "store/runs/r1/evaluate" / MANIFEST).exists()


def test_clear_false_keeps_what_the_build_did_not_write(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    ctx.store.write_bytes("runs/r1/train/checkpoints/step-1/x.bin", b"ckpt")
    run_stage(ctx, Stage("train", {}), _builder([]), clear=False)
    assert (tmp_path / "store/runs/r1/train/checkpoints/step-1/x.bin").read_bytes() == b"ckpt"
    run_stage(_ctx(tmp_path, force=True), Stage("train", {}), _builder([]))
    assert not (tmp_path / "store/runs/r1/train/checkpoints").exists()
    assert (tmp_path / "store/runs/r1/train/out.txt").exists()
