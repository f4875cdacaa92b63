"""`medreason prepare` end to end: the offline demo, idempotence, S3, killed writers, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _fixtures_prepare import (  # noqa: F401
    REPO_ROOT,
    demo_store,
    file_mtimes,
    make_records,
    offline_hub_dataset,
    run_cli,
    write_jsonl,
)

from medreason.store import MANIFEST, ArtifactStore, manifest_hash
from medreason.tokens import load_split

OUTPUTS = {"train.jsonl", "eval.jsonl", "train.tokens.safetensors", "eval.tokens.safetensors",
           "rejects.jsonl", "stats.json", MANIFEST}
RECORD_KEYS = {"uid", "dataset_name", "id_in_dataset", "question", "options", "options_map", "reasoning",
               "answer", "answer_letter", "prompt", "response"}


# -- the offline demo (SmolLM2 GGUF + the shipped sample) -------------------------------------------
@pytest.mark.slow
def test_demo_prepare_works_offline(demo_store):  # noqa: F811
    assert demo_store.returncode == 0, demo_store.stderr
    stage = demo_store.stage_dir
    assert {p.name for p in stage.iterdir()} == OUTPUTS
    store = ArtifactStore(str(demo_store.store))
    manifest = store.verify("runs/r1/prepare", hashes=True)  # sizes and sha256 of every file
    for name, info in manifest["files"].items():
        assert hashlib.sha256((stage / name).read_bytes()).hexdigest() == info["sha256"]
    model_manifest = json.loads((demo_store.staged_model_dir() / MANIFEST).read_text())
    assert manifest["inputs"] == {"model": manifest_hash(model_manifest)}
    metrics = manifest["metrics"]
    train_rows = [json.loads(line) for line in (stage / "train.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(line) for line in (stage / "eval.jsonl").read_text().splitlines()]
    assert metrics["n_train"] == len(train_rows) and metrics["n_eval"] == len(eval_rows) >= 1
    assert len(train_rows) + len(eval_rows) + metrics["n_rejected"] == 60
    assert set(train_rows[0]) == RECORD_KEYS
    # The tokens are the formatted texts, tokenized prompt | response | EOS, with the boundary.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_store.staged_model_dir())
    split = load_split(str(stage / "train.tokens.safetensors"))
    assert split.uids == [r["uid"] for r in train_rows]
    for i in (0, len(split) - 1):
        row = train_rows[i]
        expected = tok(row["prompt"])["input_ids"] + tok(row["response"], add_special_tokens=False)["input_ids"]
        assert split.ids(i).tolist() == expected + [tok.eos_token_id]
        assert split.prompt_lens[i] == len(tok(row["prompt"])["input_ids"])
        labels = split.labels(i)
        assert (labels[: split.prompt_lens[i]] == -100).all() and labels[-1] == tok.eos_token_id
    stats = json.loads((stage / "stats.json").read_text())
    assert set(stats["tokens"]["train"]) >= {"p50", "p90", "p99", "max"}
    assert stats["tokens"]["train"]["max"] == int(split.lengths.max()) == metrics["train_tokens_max"]
    assert metrics["train_tokens_max"] <= 512  # the demo's max_len_tokens


@pytest.mark.slow
def test_demo_second_run_is_a_noop(demo_store):  # noqa: F811
    assert demo_store.returncode == 0, demo_store.stderr
    before = file_mtimes(demo_store.store)
    assert before == demo_store.mtimes
    proc = run_cli("prepare", "--preset", "demo", "--store", demo_store.store, "--run", "r1")
    assert proc.returncode == 0, proc.stderr
    assert f"prepare of run r1 is already committed at {demo_store.stage_dir}" in proc.stderr
    assert "already staged" in proc.stderr
    assert file_mtimes(demo_store.store) == before  # nothing written, model cache included


# -- a tiny local model: fast enough for many runs -----------------------------------------------------
@pytest.fixture
def tiny_args(tiny_phi_dir: Path, tmp_path: Path) -> list[str]:
    data = write_jsonl(tmp_path / "records.jsonl", make_records(24))
    return ["--set", f"model.name_or_path={tiny_phi_dir}", "--set", "model.dtype=float32",
            "--set", f"data.source={data}", "--set", "data.eval_fraction=0.25"]


def test_changed_config_needs_force(cli_inproc, tiny_args, tmp_path: Path):
    store = tmp_path / "store"
    rc, _, err = cli_inproc("prepare", "--store", store, "--run", "r1", *tiny_args)
    assert rc == 0, err
    manifest = json.loads((store / "runs/r1/prepare" / MANIFEST).read_text())
    rc, _, err = cli_inproc("prepare", "--store", store, "--run", "r1", *tiny_args, "--set", "data.eval_fraction=0.5")
    assert rc == 2 and "--force" in err and "different config" in err
    assert json.loads((store / "runs/r1/prepare" / MANIFEST).read_text()) == manifest
    rc, _, err = cli_inproc("prepare", "--store", store, "--run", "r1", *tiny_args, "--set", "data.eval_fraction=0.5",
                            "--force")
    assert rc == 0, err
    redone = json.loads((store / "runs/r1/prepare" / MANIFEST).read_text())
    assert redone["metrics"]["n_eval"] > manifest["metrics"]["n_eval"]


def test_decontamination_limit_and_rejects_in_the_stage(cli_inproc, tiny_args, tmp_path: Path):
    rows = make_records(30)
    rows[3] = dict(rows[3], question="")  # rejected: blank question
    bench = write_jsonl(tmp_path / "bench.jsonl", [
        {"question": rows[i]["question"], "options": {"A": "x", "B": "y"}, "answer_idx": "A"} for i in range(10)
    ])
    data = write_jsonl(tmp_path / "records.jsonl", rows)
    store = tmp_path / "store"
    rc, _, err = cli_inproc("prepare", "--store", store, "--run", "r1", *tiny_args, "--set", f"data.source={data}",
                            "--set", f"data.decontaminate=[{bench}]", "--set", "data.limit=25")
    assert rc == 0, err
    stage = store / "runs/r1/prepare"
    manifest = json.loads((stage / MANIFEST).read_text())
    stats = json.loads((stage / "stats.json").read_text())
    train_uids = {json.loads(x)["uid"] for x in (stage / "train.jsonl").read_text().splitlines()}
    eval_uids = {json.loads(x)["uid"] for x in (stage / "eval.jsonl").read_text().splitlines()}
    contaminated = {f"medqa:{i}" for i in range(10) if i != 3}
    assert not train_uids & contaminated
    dropped = set(manifest["decontaminated_uids"])
    assert dropped and dropped <= contaminated and not dropped & eval_uids  # eval is not decontaminated
    assert manifest["metrics"]["n_decontaminated"] == len(dropped)
    assert stats["decontamination"]["n_dropped"] == manifest["metrics"]["n_decontaminated"]
    assert len(train_uids) + len(eval_uids) + manifest["metrics"]["n_decontaminated"] == 25
    rejects = [json.loads(x) for x in (stage / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": str(data), "line": 4, "uid": "medqa:3", "reason": "blank_question",
                        "detail": "question is blank"}]
    assert stats["rejects"] == {"blank_question": 1}


def test_hub_source_revision_in_the_manifest(cli_inproc, tiny_args, tmp_path: Path, monkeypatch):
    raw = "".join(json.dumps(r) + "\n" for r in make_records(24)).encode()
    sha = offline_hub_dataset(monkeypatch, tmp_path / "hf", "own/medreason", {"ours.jsonl": raw})
    store = tmp_path / "store"
    rc, _, err = cli_inproc("prepare", "--store", store, "--run", "r1", *tiny_args,
                            "--set", "data.source=hub:own/medreason", "--set", "data.hub_file=ours.jsonl")
    assert rc == 0, err
    assert "'main', which moves" in err
    manifest = json.loads((store / "runs/r1/prepare" / MANIFEST).read_text())
    assert manifest["data_source"]["revision"] == sha
    assert manifest["data_source"]["revision_requested"] == "main"
    assert manifest["metrics"]["n_train"] + manifest["metrics"]["n_eval"] == 24


# -- S3 through a real moto server ------------------------------------------------------------------------
def test_prepare_on_s3(cli_inproc, tiny_args, s3_bucket: str):
    rc, _, err = cli_inproc("prepare", "--store", s3_bucket, "--run", "r1", *tiny_args)
    assert rc == 0, err
    store = ArtifactStore(s3_bucket)
    manifest = store.read_manifest("runs/r1/prepare")
    assert manifest is not None and set(manifest["files"]) | {MANIFEST} == OUTPUTS
    for name, info in manifest["files"].items():
        blob = store.read_bytes(f"runs/r1/prepare/{name}")
        assert len(blob) == info["size"] and hashlib.sha256(blob).hexdigest() == info["sha256"]
    cache = store.list_committed("cache/models")
    assert len(cache) == 1 and cache[0].endswith("@local")
    rc, _, err = cli_inproc("prepare", "--store", s3_bucket, "--run", "r1", *tiny_args)
    assert rc == 0 and "prepare of run r1 is already committed at s3://" in err
    assert store.read_manifest("runs/r1/prepare") == manifest


# -- a writer killed mid-commit ---------------------------------------------------------------------------
def _readable(path: Path) -> bool:
    """A file a reader could pick up is whole: it parses completely."""
    if path.name.endswith(".jsonl"):
        text = path.read_text(encoding="utf-8")
        return text == "" or (text.endswith("\n") and all(json.loads(x) for x in text.splitlines()))
    if path.name.endswith(".json"):
        return json.loads(path.read_text(encoding="utf-8")) is not None
    if path.name.endswith(".tokens.safetensors"):
        return len(load_split(str(path))) >= 0
    return True


def _spawn_prepare(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    full = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", **env)
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "prepare", *args], env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_commit_leaves_no_commit_and_the_next_run_completes(tiny_args, tmp_path: Path):
    store = tmp_path / "store"
    args = ["--store", str(store), "--run", "r1", *tiny_args]
    stage = store / "runs/r1/prepare"
    # The test hook sleeps 2 s after each uploaded file: kill while the first files are in.
    # A short stage lease: the killed job's lease outlives it until its ttl, the next run waits.
    proc = _spawn_prepare(args, {"MEDREASON_TEST_SLOW_COMMIT_S": "2", "MEDREASON_LEASE_TTL_S": "4"})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            visible = [p for p in stage.glob("*") if ".tmp-" not in p.name] if stage.exists() else []
            if visible:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"prepare ended before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (stage / MANIFEST).exists()
    visible = [p for p in stage.iterdir() if ".tmp-" not in p.name]
    assert visible and len(visible) < len(OUTPUTS) - 1  # killed in the middle of the upload
    assert all(_readable(p) for p in visible)
    st = ArtifactStore(str(store))
    assert not st.is_committed("runs/r1/prepare")
    assert st.read_manifest("runs/r1/prepare") is None  # a reader sees nothing
    # The next run (no hook) completes and its commit verifies.
    done = run_cli("prepare", *args, "--wait-for-lease", "60")
    assert done.returncode == 0, done.stderr
    manifest = st.verify("runs/r1/prepare", hashes=True)
    assert set(manifest["files"]) | {MANIFEST} == OUTPUTS


# -- bad input: exit 2, a message naming the problem, nothing committed ----------------------------------
def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    no_question = write_jsonl(tmp_path / "noq.jsonl", [
        {k: v for k, v in r.items() if k != "question"} for r in make_records(3)])
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps(make_records(2)).encode().replace(b"fever", b"f\xe9ver"))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    bad_bench = write_jsonl(tmp_path / "bad_bench.jsonl", [
        {"question": "Q1?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"},
        {"question": "Q2?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}])
    benchmarks = json.dumps([{"name": "b", "path": str(bad_bench), "format": "mcq"}])
    return {
        "unknown key": (["--set", "data.bogus=1"], "data.bogus: unknown key"),
        "wrong type": (["--set", "data.eval_fraction=lots"], "data.eval_fraction"),
        "missing file": (["--set", f"data.source={tmp_path / 'missing.jsonl'}"], "file not found"),
        "no question": (["--set", f"data.source={no_question}"], "missing_question"),
        "not utf-8": (["--set", f"data.source={latin1}"], "not UTF-8"),
        "empty dataset": (["--set", f"data.source={empty}"], "empty dataset"),
        "run id": (["--run", "../x"], "not allowed"),
        "lora rank 0": (["--set", "lora.r=0"], "lora.r"),
        "overlong error": (["--set", "data.max_len_tokens=16", "--set", "data.overlong_policy=error"],
                           "data.overlong_policy=error"),
        # Evaluate would stop on this row; prepare checks the benchmark files the same way.
        "benchmark gold letter": (["--set", f"eval.benchmarks={benchmarks}"],
                                  f"({bad_bench}) row 2: gold answer 'E' is not one of the option letters A, B"),
    }


BAD_CASES = ["unknown key", "wrong type", "missing file", "no question", "not utf-8", "empty dataset",
             "run id", "lora rank 0", "overlong error", "benchmark gold letter"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_and_commits_nothing(case, cli_inproc, tiny_args, tmp_path: Path):
    extra, message = _bad_inputs(tmp_path)[case]
    store = tmp_path / "store"
    run = [] if "--run" in extra else ["--run", "r1"]
    rc, out, err = cli_inproc("prepare", "--store", store, *run, *tiny_args, *extra)
    assert rc == 2, (out, err)
    assert message in err
    assert "Traceback" not in err
    assert not list(store.glob("runs/*/prepare/MANIFEST.json"))
