"""The pipeline (all four stages on the offline demo) and the generate command."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _fixtures_eval import build_run, set_args
from _fixtures_prepare import copy_model_cache

# Cut the demo to fit a test: 6 optimizer steps, 32 new tokens, 6 held-out questions.
DEMO_FAST = [
    "train.max_steps=6", "train.eval_every_steps=3", "train.save_every_steps=3",
    "eval.max_new_tokens=32", "eval.heldout_limit=6", "merge.parity_prompts=2",
]


@pytest.mark.slow
def test_demo_pipeline_end_to_end_and_rerun(tmp_path: Path, demo_store, cli) -> None:
    store = tmp_path / "store"
    # The session's SmolLM2 conversion (~40-80 s) is reused; prepare finds it staged.
    copy_model_cache(demo_store, store)
    args = ["pipeline", "--preset", "demo", "--run", "demo", "--store", str(store),
            *[a for o in DEMO_FAST for a in ("--set", o)]]
    started = time.monotonic()
    code, out, err = cli(*args, timeout_s=1200)
    elapsed = time.monotonic() - started
    assert code == 0, err[-3000:]
    run = store / "runs" / "demo"
    for stage in ("prepare", "train", "evaluate", "merge"):
        assert (run / stage / "MANIFEST.json").exists(), stage
    report = run / "evaluate" / "report.md"
    assert f"Report: {report}" in out
    text = report.read_text()
    assert "| heldout | 6 |" in text and "%" in text and "Held-out loss" in text
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert set(metrics["sets"]["heldout"]) == {"base", "finetuned"}
    for png in ("loss_curves.png", "accuracy.png"):
        assert (run / "evaluate" / png).stat().st_size > 5000
    loss = metrics["heldout_loss"]
    # Six steps at lr 3e-4 on this data must lower the held-out loss below the base's.
    assert loss["finetuned"]["loss"] < loss["base"]["loss"]
    merge = json.loads((run / "merge" / "MANIFEST.json").read_text())["metrics"]
    assert merge["parity_top1_agreement"] >= 0.99
    print(f"demo pipeline (cut) took {elapsed:.0f} s")

    manifests = {s: (run / s / "MANIFEST.json").read_text() for s in ("prepare", "train", "evaluate", "merge")}
    code, out, err = cli(*args, timeout_s=600)
    assert code == 0, err[-3000:]
    assert err.count("already committed") >= 4
    assert {s: (run / s / "MANIFEST.json").read_text() for s in manifests} == manifests

    # generate answers with the merged model by default.
    code, out, err = cli("generate", "--preset", "demo", "--run", "demo", "--store", str(store),
                         "--question", "Drug of choice for childhood absence seizures is:",
                         "--options", "A. Ethosuximide\\nB. Carbamazepine\\nC. Phenytoin\\nD. Vigabatrin",
                         "--max-new-tokens", "24", "--json")
    assert code == 0, err[-2000:]
    row = json.loads(out.strip().splitlines()[-1])
    assert row["model"] == "merged" and row["generated"] and row["options"]["A"] == "Ethosuximide"


def test_pipeline_stops_on_first_failure(tmp_path: Path, cli_inproc) -> None:
    # No such model: prepare fails with exit 2 and nothing after it runs.
    code, _, err = cli_inproc("pipeline", "--run", "r", "--store", str(tmp_path / "s"),
                              "--set", f"model.name_or_path={tmp_path}/missing.gguf", "--set", "data.source=sample")
    assert code == 2
    assert "pipeline stopped: prepare exited with 2" in err
    assert not (tmp_path / "s" / "runs" / "r" / "train").exists()


def test_pipeline_propagates_preemption(tmp_path: Path, tiny_phi_dir: Path, cli_inproc, monkeypatch) -> None:
    """A train that exits 75 stops the pipeline with 75 (evaluate and merge do not run)."""
    import click

    import jobs.train
    from jobs.common import common_options, exit_codes
    from medreason.errors import Preempted

    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir, train=False)

    # Stands in for a train that got SIGTERM and committed a checkpoint: same options, same
    # exit-code mapping, so the pipeline sees what the real job would give it.
    @click.command()
    @common_options
    @exit_codes
    def preempted_train(**_kwargs):
        raise Preempted(3, "runs/r1/train/checkpoints/step-3")

    monkeypatch.setattr(jobs.train, "train", preempted_train)
    code, _, err = cli_inproc("pipeline", "--store", str(store_dir), "--run", "r1", *set_args(overrides))
    assert code == 75, err
    assert "already committed" in err  # prepare was skipped
    assert "pipeline stopped: train exited with 75" in err
    assert not (store_dir / "runs" / "r1" / "evaluate").exists()


def test_generate_with_adapter_and_bad_input(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir)
    base = ["generate", "--store", str(store_dir), "--run", "r1", *set_args(overrides), "--max-new-tokens", "5"]
    code, out, err = cli_inproc(*base, "--question", "Chest pain?", "--options", "A. gout\nB. pneumonia")
    assert code == 0, err
    assert "Answer: " in out and "adapter model" in err
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Q1?", "options": {"A": "x", "B": "y"}}) + "\n"
                         + json.dumps({"question": "Q2?", "options": "A. x\nB. y\nC. z"}) + "\n")
    code, out, err = cli_inproc(*base, "--input", str(questions), "--json", "--model", "base")
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["model"] for r in rows] == ["base", "base"] and rows[1]["options"] == {"A": "x", "B": "y", "C": "z"}
    code, _, err = cli_inproc(*base)
    assert code == 2 and "--question" in err
    code, _, err = cli_inproc(*base, "--question", "Q?", "--model", "merged")
    assert code == 2 and "no committed merge stage" in err
