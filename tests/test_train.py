"""`medreason train` on a tiny random Phi: training, commits, resume, preemption, bad input.

Most tests build the prepare stage directly (tests/_fixtures_train.py: short synthetic records
so a step takes milliseconds); one goes through the real `medreason prepare`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _fixtures_train import (
    REPO_ROOT,
    commit_prepare,
    start_train,
    subprocess_env,
    train_config,
    wait_for,
)

from medreason.store import ArtifactStore
from medreason.training import FAST_PATH_ENV, METRIC_KEYS, STEP_DELAY_ENV, committed_checkpoints

CKPTS = "runs/{run}/train/checkpoints"


def _metrics(store: ArtifactStore, run: str) -> list[dict]:
    return [json.loads(line) for line in store.read_text(f"runs/{run}/train/metrics.jsonl").splitlines()]


def _adapter(store: ArtifactStore, rel: str) -> dict:
    from safetensors.torch import load_file

    return load_file(store.full(f"{rel}/adapter_model.safetensors"))


def _assert_same_adapter(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tiny_phi_trains_commits_and_is_idempotent(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_uri = str(tmp_path / "store")
    # 48 records / 4 per step = 12 steps per epoch: 16 steps run into the second epoch.
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=16, report_to=["tensorboard"])
    commit_prepare(store_uri, "r1", cfg, tiny_phi_dir)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "r1", "--config", cfg)
    assert rc == 0, err
    store = ArtifactStore(store_uri)
    manifest = store.read_manifest("runs/r1/train")
    m = manifest["metrics"]
    assert m["steps"] == 16 and m["epochs"] == pytest.approx(16 / 12, abs=1e-3)
    rows = _metrics(store, "r1")
    assert [r["step"] for r in rows] == list(range(0, 17))
    assert all(set(r) == set(METRIC_KEYS) for r in rows)
    assert rows[0]["loss"] is None and rows[0]["eval_loss"] > 0  # the base model's held-out loss
    rows = rows[1:]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None and r["peak_mem_gib"] is None for r in rows)
    evals = [r["eval_loss"] for r in rows if r["eval_loss"] is not None]
    assert len(evals) == 4  # steps 4, 8, 12, 16
    assert evals[-1] < evals[0] - 0.05, evals  # the held-out loss falls
    assert m["best_eval_loss"] == min(evals) and m["best_step"] == 4 * (evals.index(min(evals)) + 1)
    # Retention: the last 2 checkpoints plus the best one.
    kept = committed_checkpoints(store, CKPTS.format(run="r1"))
    expected = {"step-12", "step-16", f"step-{m['best_step']}"}
    assert set(kept) == expected
    assert m["best_checkpoint"] == f"checkpoints/step-{m['best_step']}"
    # The final adapter is the step-16 checkpoint's and loads with PEFT.
    _assert_same_adapter(_adapter(store, "runs/r1/train/adapter"),
                         _adapter(store, "runs/r1/train/checkpoints/step-16"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir))
    PeftModel.from_pretrained(base, store.full("runs/r1/train/adapter"))
    assert any(f.startswith("tensorboard/events") for f in manifest["files"])
    ck = store.read_manifest("runs/r1/train/checkpoints/step-16")
    assert ck["config_hash"] == manifest["config_hash"] and ck["step"] == 16
    assert {"optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"} <= set(ck["files"])

    # Same config again: nothing to do, nothing written.
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "r1", "--config", cfg)
    assert rc == 0 and "already committed" in err
    assert store.read_manifest("runs/r1/train") == manifest
    # Another config on the committed stage: refused without --force.
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "r1", "--config", cfg,
                               "--set", "train.learning_rate=0.01")
    assert rc == 2 and "--force" in err


def test_real_prepare_then_packed_training(tmp_path: Path, tiny_phi_dir: Path, cli_inproc, monkeypatch) -> None:
    store = str(tmp_path / "store")
    # The profiler window over steps 1..2 (0-based) of the three, as a benchmark would ask.
    monkeypatch.setenv("MEDREASON_PROFILE", f"1:2:{tmp_path / 'prof'}")
    common = ["--store", store, "--run", "p", "--set", f"model.name_or_path={tiny_phi_dir}",
              "--set", "model.dtype=float32", "--set", "data.source=sample",
              "--set", "data.max_len_tokens=1024"]
    rc, _out, err = cli_inproc("prepare", *common)
    assert rc == 0, err
    rc, _out, err = cli_inproc(
        "train", *common, "--set", "train.padding=packed", "--set", "train.pack_len_tokens=2048",
        "--set", "train.micro_batch_size=1", "--set", "train.max_steps=3", "--set", "train.eval_every_steps=3",
        "--set", "train.eval_max_batches=1", "--set", "train.save_every_steps=3",
        "--set", "train.learning_rate=0.001")
    assert rc == 0, err
    m = ArtifactStore(store).read_manifest("runs/p/train")["metrics"]
    # Three packed rows of <= 2048 tokens from ~900-token records: at least 2 records per row.
    assert m["steps"] == 3 and m["tokens_seen"] > 3 * 1024 and m["final_eval_loss"] is not None
    report = (tmp_path / "prof" / "profile.txt").read_text()
    families = dict(re.findall(r"^\| ([a-z/ ()]+) \| ([0-9.]+) \|", report, flags=re.MULTILINE))
    assert float(families["matmul"]) > 0, report  # the projections' matrix products were recorded
    assert "| kernel | calls | ms | share |" in report


def test_bad_input_exits_2(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_uri = str(tmp_path / "store")
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=4, save_every_steps=2, eval_every_steps=2)
    base = ["train", "--store", store_uri, "--config", cfg]

    rc, _out, err = cli_inproc(*base, "--run", "nothing")
    assert rc == 2
    assert "no committed prepare stage for run nothing" in err
    assert "run `medreason prepare --run nothing` first" in err

    commit_prepare(store_uri, "b", cfg, tiny_phi_dir)
    rc, _out, err = cli_inproc(*base, "--run", "b", "--set", "lora.target_modules=[q_proj,Wqkv]")
    assert rc == 2 and "'Wqkv'" in err and "fc1" in err and "'q_proj'" not in err
    assert "Traceback" not in err

    rc, _out, err = cli_inproc(*base, "--run", "b", "--set", "model.quantization=nf4",
                               "--set", "model.dtype=bfloat16")
    assert rc == 2 and "needs a CUDA GPU" in err

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDREASON_PROFILE", "12:3")  # no folder
        rc, _out, err = cli_inproc(*base, "--run", "b")
    assert rc == 2 and "expected START:STEPS:DIR" in err and "Traceback" not in err
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDREASON_RESIDUAL_DROPOUT", "maybe")  # refused before the model loads
        rc, _out, err = cli_inproc(*base, "--run", "b")
    assert rc == 2 and "MEDREASON_RESIDUAL_DROPOUT='maybe'" in err and "model:" not in err
    assert not ArtifactStore(store_uri).is_committed("runs/b/train")

    # Checkpoints of one config, then a run with another: refused, unless --force.
    rc, _out, err = cli_inproc(*base, "--run", "b")
    assert rc == 0, err
    store = ArtifactStore(store_uri)
    old_hash = store.read_manifest("runs/b/train")["config_hash"]
    store.fs.rm(store.full("runs/b/train/MANIFEST.json"))  # as if killed before the final commit
    rc, _out, err = cli_inproc(*base, "--run", "b", "--set", "train.learning_rate=0.01")
    assert rc == 2 and "different config (train.learning_rate: " in err and " -> 0.01)" in err and "--force" in err
    rc, _out, err = cli_inproc(*base, "--run", "b", "--set", "train.learning_rate=0.01", "--force")
    assert rc == 0, err
    assert "starting fresh" in err and "resuming" not in err
    new_hash = store.read_manifest("runs/b/train")["config_hash"]
    assert new_hash != old_hash
    for name in committed_checkpoints(store, CKPTS.format(run="b")):
        assert store.read_manifest(f"runs/b/train/checkpoints/{name}")["config_hash"] == new_hash


def _newest(store: ArtifactStore, run: str) -> str | None:
    names = committed_checkpoints(store, CKPTS.format(run=run))
    return names[-1] if names else None


def _has(store: ArtifactStore, run: str, step: int) -> bool:
    return store.is_committed(f"{CKPTS.format(run=run)}/step-{step}")


def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    """Killed mid-epoch 1 and again mid-epoch 2, resumed twice: same losses, same adapter."""
    store_uri = str(tmp_path / "store")
    store = ArtifactStore(store_uri)
    # 24 records / 4 per step = 6 steps per epoch; 14 steps = 2 1/3 epochs. Dropout 0.1 on.
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=14, save_every_steps=2, eval_every_steps=2,
                       keep_last_checkpoints=3)
    for run in ("straight", "killed"):
        commit_prepare(store_uri, run, cfg, tiny_phi_dir, n_train=24, n_eval=8)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "straight", "--config", cfg)
    assert rc == 0, err

    log_path = tmp_path / "killed.log"
    # A killed job's stage lease lives on for its ttl: a short one, and the reruns wait for it.
    slow = {STEP_DELAY_ENV: "0.4", "MEDREASON_LEASE_TTL_S": "4"}
    wait = ("--wait-for-lease", "60")
    # step 4: epoch 0, 4 steps in; step 10: epoch 1, 4 steps in.
    for stop_after in (4, 10):
        proc = start_train(store_uri, "killed", cfg, log_path, slow, *wait)
        try:
            wait_for(lambda s=stop_after: _has(store, "killed", s), 120, proc, f"step-{stop_after}", log_path)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not store.is_committed("runs/killed/train")
    assert log_path.read_text().count("resuming from") == 1
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "killed", "--config", cfg, *wait)
    assert rc == 0, err
    assert "resuming from" in err

    straight, resumed = _metrics(store, "straight"), _metrics(store, "killed")
    assert [r["step"] for r in resumed] == list(range(0, 15))
    for a, b in zip(straight, resumed, strict=True):
        assert (a["step"], a["loss"], a["eval_loss"], a["lr"], a["grad_norm"]) == \
               (b["step"], b["loss"], b["eval_loss"], b["lr"], b["grad_norm"])
    _assert_same_adapter(_adapter(store, "runs/straight/train/adapter"), _adapter(store, "runs/killed/train/adapter"))


def test_sigterm_commits_checkpoint_and_exits_75(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    import time

    store_uri = str(tmp_path / "store")
    store = ArtifactStore(store_uri)
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=10, save_every_steps=3, eval_every_steps=5)
    commit_prepare(store_uri, "t", cfg, tiny_phi_dir)
    log_path = tmp_path / "t.log"
    proc = start_train(store_uri, "t", cfg, log_path, {STEP_DELAY_ENV: "0.5"})
    try:
        wait_for(lambda: _has(store, "t", 3), 120, proc, "step-3", log_path)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # a second signal must not hurt
        rc = proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert rc == 75, text[-3000:]
    assert took < 30
    newest = _newest(store, "t")
    step = int(newest.split("-")[1])
    assert 3 <= step < 10 and f"preempted at step {step}" in text
    state = json.loads(store.read_text(f"runs/t/train/checkpoints/{newest}/trainer_state.json"))
    assert state["step"] == step
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "t", "--config", cfg)
    assert rc == 0, err
    assert f"resuming from {store.display(f'runs/t/train/checkpoints/{newest}')}" in err
    assert store.read_manifest("runs/t/train")["metrics"]["steps"] == 10
    assert [r["step"] for r in _metrics(store, "t")] == list(range(0, 11))


def test_sigkill_during_s3_checkpoint_upload_keeps_previous(tmp_path: Path, tiny_phi_dir: Path, s3_bucket: str,
                                                             cli_inproc) -> None:
    store = ArtifactStore(s3_bucket)
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=6, save_every_steps=2, eval_every_steps=2)
    commit_prepare(s3_bucket, "s", cfg, tiny_phi_dir)
    log_path = tmp_path / "s.log"
    ckpts = CKPTS.format(run="s")

    def step4_half_uploaded() -> bool:
        names = store.listdir(f"{ckpts}/step-4")
        return bool(names) and "MANIFEST.json" not in names

    # The store's test hook sleeps 0.5 s after each uploaded file: a checkpoint of ~8 files
    # takes ~4 s to commit, a window the kill cannot miss.
    proc = start_train(s3_bucket, "s", cfg, log_path, {"MEDREASON_TEST_SLOW_COMMIT_S": "0.5",
                                                       "MEDREASON_LEASE_TTL_S": "4"})
    try:
        wait_for(lambda: _has(store, "s", 2), 180, proc, "step-2 committed", log_path)
        wait_for(step4_half_uploaded, 120, proc, "step-4 upload in progress", log_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _newest(store, "s") == "step-2"
    assert not store.is_committed(f"{ckpts}/step-4")
    rc, _out, err = cli_inproc("train", "--store", s3_bucket, "--run", "s", "--config", cfg,
                               "--wait-for-lease", "60")
    assert rc == 0, err
    assert "taking over the expired lease" in err  # the killed job never released it
    assert f"resuming from {store.display(f'{ckpts}/step-2')}" in err
    assert store.read_manifest("runs/s/train")["metrics"]["steps"] == 6
    assert store.is_committed(f"{ckpts}/step-4")


SITECUSTOMIZE = '''
import os, sys
_root = os.environ.get("AUDIT_STORE_ROOT")
_out = os.environ.get("AUDIT_OUT_DIR")
if _root and _out:
    _rank = os.environ.get("RANK", "launcher")
    _log = open(os.path.join(_out, f"writes-rank{_rank}.log"), "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        path = None
        if event == "open" and args:
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & _WRITE):
                path = args[0]
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree",
                       "shutil.copyfile", "os.unlink"):
            path = args[1] if event in ("os.rename", "shutil.copyfile") else args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.fsdecode(path)
            # makedirs(exist_ok=True) on an existing folder raises the event but writes nothing
            if event == "os.mkdir" and os.path.isdir(path):
                return
            if os.path.abspath(path).startswith(_root):
                _log.write(f"{event} {path}\\n")

    sys.addaudithook(_hook)
'''


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_and_only_rank0_writes(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    """2 CPU processes (gloo), micro-batch 2 each == 1 process, micro-batch 2 x 2 accumulation."""
    store_uri = str(tmp_path / "store")
    store = ArtifactStore(store_uri)
    dist_cfg = train_config(tmp_path / "dist.yaml", max_steps=6, micro_batch_size=2, grad_accum_steps=1,
                            save_every_steps=3, eval_every_steps=3)
    one_cfg = train_config(tmp_path / "one.yaml", max_steps=6, micro_batch_size=2, grad_accum_steps=2,
                           save_every_steps=3, eval_every_steps=3)
    commit_prepare(store_uri, "dist", dist_cfg, tiny_phi_dir)
    commit_prepare(store_uri, "one", one_cfg, tiny_phi_dir)
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = subprocess_env({"AUDIT_STORE_ROOT": store.root, "AUDIT_OUT_DIR": str(audit)})
    env["PYTHONPATH"] = f"{audit}:{env['PYTHONPATH']}"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO_ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", str(_free_port()),
         "-m", "jobs.train", "--store", store_uri, "--run", "dist", "--config", str(dist_cfg)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 processes per step" in proc.stderr
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "one", "--config", one_cfg)
    assert rc == 0, err
    dist, one = _metrics(store, "dist"), _metrics(store, "one")
    assert len(dist) == len(one) == 7  # the step-0 eval and 6 steps
    # Same rows, same dropout masks, token-weighted loss: only the order of the gradient sums
    # differs (gloo all-reduce vs. accumulation). Observed equal to the last bit; allow 1e-6.
    assert dist[0]["eval_loss"] == pytest.approx(one[0]["eval_loss"], rel=1e-6)
    for a, b in zip(dist[1:], one[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        if a["eval_loss"] is not None:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
    rank0 = (audit / "writes-rank0.log").read_text()
    assert "runs/dist/train/checkpoints/step-3" in rank0 and "runs/dist/train/MANIFEST.json" in rank0
    rank1 = audit / "writes-rank1.log"
    assert rank1.exists()  # the hook ran in rank 1 ...
    assert rank1.read_text() == ""  # ... and saw no write under the store


@pytest.mark.slow
def test_demo_smollm2_heldout_loss_falls(tmp_path: Path, smollm2_gguf: Path, cli_inproc) -> None:
    """The offline demo: real prepare (GGUF staged) and a short SmolLM2-135M LoRA run on CPU."""
    store = str(tmp_path / "store")
    rc, _out, err = cli_inproc("prepare", "--preset", "demo", "--store", store, "--run", "demo")
    assert rc == 0, err
    # Shorter than the preset's 40 steps of 4 rows: 12 steps of 1 row (~400 tokens) at the
    # preset's learning rate; held-out loss on 4 fixed records before training, at step 6 and
    # at step 12. A step costs ~6 x 135M x 400 = 0.3 TFLOP: ~3 s on 2 idle cores, 5-10x that
    # on a machine busy with other work (2 torch threads then fight for the cores).
    rc, _out, err = cli_inproc(
        "train", "--preset", "demo", "--store", store, "--run", "demo",
        "--set", "train.max_steps=12", "--set", "train.micro_batch_size=1",
        "--set", "train.eval_every_steps=6", "--set", "train.eval_max_batches=4",
        "--set", "train.save_every_steps=12", "--set", "train.warmup_steps=2")
    assert rc == 0, err
    rows = _metrics(ArtifactStore(store), "demo")
    evals = [r["eval_loss"] for r in rows if r["eval_loss"] is not None]
    assert len(evals) == 3 and evals[2] < evals[0], evals  # step 0 (base model) vs. step 12


def test_corrupt_newest_checkpoint_is_skipped_on_resume(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    """A newest checkpoint whose file no longer matches its MANIFEST: resume from the one before."""
    store_uri = str(tmp_path / "store")
    store = ArtifactStore(store_uri)
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=12, save_every_steps=4, eval_every_steps=4,
                       keep_last_checkpoints=3)
    commit_prepare(store_uri, "c", cfg, tiny_phi_dir, n_train=24, n_eval=8)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "c", "--config", cfg)
    assert rc == 0, err
    straight = _metrics(store, "c")
    adapter = _adapter(store, "runs/c/train/adapter")
    store.fs.rm(store.full("runs/c/train/MANIFEST.json"))  # as if killed before the final commit
    ckpts = CKPTS.format(run="c")
    assert _newest(store, "c") == "step-12"
    with open(store.full(f"{ckpts}/step-12/optimizer.pt"), "ab") as fh:
        fh.write(b"\0garbage")
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "c", "--config", cfg)
    assert rc == 0, err
    assert f"skipping checkpoint {store.display(f'{ckpts}/step-12')}" in err and "optimizer.pt" in err
    assert f"resuming from {store.display(f'{ckpts}/step-8')}" in err
    assert store.read_manifest("runs/c/train")["metrics"]["steps"] == 12
    store.verify(f"{ckpts}/step-12")  # rewritten by the resumed run
    resumed = _metrics(store, "c")
    assert [(r["step"], r["loss"], r["eval_loss"]) for r in resumed] == \
           [(r["step"], r["loss"], r["eval_loss"]) for r in straight]
    _assert_same_adapter(adapter, _adapter(store, "runs/c/train/adapter"))


def test_diverging_run_stops_with_exit_2_before_checkpointing(tmp_path: Path, tiny_phi_dir: Path,
                                                              cli_inproc) -> None:
    """A finite but absurd learning rate blows the weights up at run time: exit 2, nothing committed."""
    store_uri = str(tmp_path / "store")
    store = ArtifactStore(store_uri)
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=8, save_every_steps=1, eval_every_steps=8,
                       warmup_steps=0, learning_rate=1e30, lr_scheduler="constant")
    commit_prepare(store_uri, "d", cfg, tiny_phi_dir, n_train=24, n_eval=8)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "d", "--config", cfg)
    assert rc == 2, err
    match = re.search(r"non-finite loss or gradient norm at step (\d+)", err)
    assert match, err[-3000:]
    bad = int(match.group(1))
    assert 1 < bad < 8
    ckpts = CKPTS.format(run="d")
    # Every step before the bad one was checkpointed (save_every_steps=1); the bad one was not.
    assert _newest(store, "d") == f"step-{bad - 1}"
    assert f"last good checkpoint is {store.display(f'{ckpts}/step-{bad - 1}')}" in err
    assert not store.exists(f"{ckpts}/step-{bad}")
    assert not store.exists("runs/d/train/MANIFEST.json")
    assert "Traceback" not in err
    for name in committed_checkpoints(store, ckpts):
        manifest = store.read_text(f"{ckpts}/{name}/MANIFEST.json")
        assert "NaN" not in manifest and "Infinity" not in manifest

    # Diverging before the first checkpoint: the message says there is none.
    cfg2 = train_config(tmp_path / "cfg2.yaml", max_steps=8, save_every_steps=8, eval_every_steps=8,
                        warmup_steps=0, learning_rate=1e30, lr_scheduler="constant")
    commit_prepare(store_uri, "d2", cfg2, tiny_phi_dir, n_train=24, n_eval=8)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "d2", "--config", cfg2)
    assert rc == 2 and "there is no checkpoint of this run" in err, err[-3000:]
    assert _newest(store, "d2") is None and not store.exists("runs/d2/train/MANIFEST.json")


def test_start_line_names_paths_and_packed_fallback_warns_once(tmp_path: Path, tiny_phi_dir: Path,
                                                               cli_inproc) -> None:
    """Packed rows on a CPU: one warning saying what the run falls back to and why; ETA per step."""
    store_uri = str(tmp_path / "store")
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=3, save_every_steps=3, eval_every_steps=3,
                       padding="packed", pack_len_tokens=256, micro_batch_size=1, compile=True)
    commit_prepare(store_uri, "k", cfg, tiny_phi_dir, n_train=24, n_eval=4)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "k", "--config", cfg)
    assert rc == 0, err
    paths = [line for line in err.splitlines() if "training paths:" in line]
    assert len(paths) == 1, err[-3000:]
    assert "attention sdpa with a block-causal mask over packed rows" in paths[0]
    assert "loss full logits + cross-entropy" in paths[0]
    assert "compile off (train.compile is ignored without CUDA)" in paths[0]
    warnings = [line for line in err.splitlines() if "falling back to" in line]
    assert len(warnings) == 1, err[-3000:]
    assert "train.padding=packed" in warnings[0] and "there is no CUDA device" in warnings[0]
    steps = [line for line in err.splitlines() if re.search(r"step [123]/3 ", line)]
    assert len(steps) == 3 and all(re.search(r"elapsed=\d+:\d\d:\d\d eta=\d+:\d\d:\d\d", s) for s in steps), steps

    # Forcing the fast path on a CPU: the varlen path, but its per-record reference, said once.
    commit_prepare(store_uri, "k2", cfg, tiny_phi_dir, n_train=24, n_eval=4)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "k2", "--config", cfg,
                               env={FAST_PATH_ENV: "1"})
    assert rc == 0, err
    assert "attention varlen reference (causal sdpa one record at a time)" in err
    assert "loss target-only LM head + cross-entropy" in err
    warnings = [line for line in err.splitlines() if "falling back to" in line]
    assert len(warnings) == 1 and f"{FAST_PATH_ENV}=1 forces the fast path without CUDA" in warnings[0]


def test_two_processes_stop_together_on_divergence(tmp_path: Path, tiny_phi_dir: Path) -> None:
    """2 CPU processes (gloo) diverging: both stop at the same step, nothing more is committed."""
    store_uri = str(tmp_path / "store")
    store = ArtifactStore(store_uri)
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=6, micro_batch_size=2, save_every_steps=1,
                       eval_every_steps=6, warmup_steps=0, learning_rate=1e30, lr_scheduler="constant")
    commit_prepare(store_uri, "dd", cfg, tiny_phi_dir, n_train=24, n_eval=4)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO_ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", str(_free_port()),
         "-m", "jobs.train", "--store", store_uri, "--run", "dd", "--config", str(cfg)],
        env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    steps = re.findall(r"non-finite loss or gradient norm at step (\d+)", proc.stderr)
    assert len(steps) == 2 and steps[0] == steps[1], proc.stderr[-4000:]  # one message per rank
    bad = int(steps[0])
    assert _newest(store, "dd") == f"step-{bad - 1}"
    assert not store.exists("runs/dd/train/MANIFEST.json")
