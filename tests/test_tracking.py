"""Experiment trackers (train.report_to) with real components: a local MLflow tracking server,
W&B in offline mode (its run file read back from disk), TensorBoard events read from the store.

A tiny Phi trains a few steps on a prepare stage with held-out multiple-choice records
(tests/_fixtures_eval.py), then `medreason evaluate` logs its headline numbers to the same
tracker run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _fixtures_eval import build_run, set_args
from _fixtures_train import wait_for
from conftest import _free_port, _wait_http

TRAIN = ["train.max_steps=4", "train.micro_batch_size=2", "train.eval_every_steps=2",
         "train.save_every_steps=2", "train.learning_rate=0.003", "train.log_every_steps=1",
         "eval.compare_base=false"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a sqlite backend; yields its URI."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log_fh = open(root / "server.log", "wb")  # closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log_fh, stderr=subprocess.STDOUT, cwd=str(root),
    )
    try:
        try:
            _wait_http(uri + "/health", proc, timeout_s=120)
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n{(root / 'server.log').read_text(errors='replace')[-2000:]}")
        yield uri
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        if proc.poll() is None:  # gunicorn workers that ignore SIGTERM
            proc.kill()
            proc.wait()
        log_fh.close()


def _train(cli_inproc, store_dir: Path, overrides: list[str], *extra: str) -> tuple[int, str]:
    rc, _out, err = cli_inproc("train", "--store", str(store_dir), "--run", "r1", *set_args(overrides), *extra)
    return rc, err


def _evaluate(cli_inproc, store_dir: Path, overrides: list[str]) -> tuple[int, str]:
    rc, _out, err = cli_inproc("evaluate", "--store", str(store_dir), "--run", "r1", *set_args(overrides))
    return rc, err


def _tb_scalars(folder: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_mlflow_and_tensorboard_train_resume_then_evaluate(tmp_path: Path, tiny_phi_dir: Path, cli_inproc,
                                                         mlflow_server: str, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    store_dir = tmp_path / "store"
    store, _cfg, overrides = build_run(store_dir, tiny_phi_dir, train=False)
    overrides += TRAIN + ["train.report_to=[mlflow,tensorboard]"]
    rc, err = _train(cli_inproc, store_dir, overrides)
    assert rc == 0, err
    record = json.loads(store.read_text("runs/r1/train/trackers.json"))
    run_id = record["mlflow"]["run_id"]
    assert record["mlflow"]["tracking_uri"] == mlflow_server and record["tensorboard"]
    manifest = store.read_manifest("runs/r1/train")
    assert "trackers.json" in manifest["files"]

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.run_name == "r1" and run.data.tags["medreason.run_id"] == "r1"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["lora.r"] == "4"
    rows = [json.loads(line) for line in store.read_text("runs/r1/train/metrics.jsonl").splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["loss"] is not None}
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert history == pytest.approx(losses) and sorted(history) == [1, 2, 3, 4]
    evals = {m.step for m in client.get_metric_history(run_id, "train/eval_loss")}
    assert evals == {0, 2, 4}  # the base model's held-out loss at step 0, then every 2 steps
    assert {m.step for m in client.get_metric_history(run_id, "train/tokens_per_s")} == {1, 2, 3, 4}

    # TensorBoard: the events are in the store as a training run, the same numbers.
    tb_rel = "runs/r1/train/tensorboard"
    assert dict(_tb_scalars(store.full(tb_rel), "train/loss")) == pytest.approx(losses)

    # A job that died after the step-2 checkpoint: the rerun resumes there and continues the
    # same MLflow run (steps 3 and 4 are logged a second time), and TensorBoard shows each step once.
    store.uncommit("runs/r1/train/checkpoints/step-4")
    for name in ("MANIFEST.json", "metrics.jsonl", "adapter"):
        store.remove(f"runs/r1/train/{name}")
    rc, err = _train(cli_inproc, store_dir, overrides)
    assert rc == 0, err
    assert "resuming from" in err and "continuing the recorded runs of mlflow" in err
    assert json.loads(store.read_text("runs/r1/train/trackers.json"))["mlflow"]["run_id"] == run_id
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 3, 4, 4]
    assert [s for s, _v in _tb_scalars(store.full(tb_rel), "train/loss")] == [1, 2, 3, 4]

    # evaluate logs its headline numbers to the same run, at the trained step.
    rc, err = _evaluate(cli_inproc, store_dir, overrides)
    assert rc == 0, err
    headline = store.read_manifest("runs/r1/evaluate")["metrics"]
    metrics = client.get_run(run_id).data.metrics
    for key in ("heldout_accuracy_finetuned", "heldout_loss_finetuned"):
        assert metrics[f"evaluate/{key}"] == pytest.approx(headline[key])
    assert [m.step for m in client.get_metric_history(run_id, "evaluate/heldout_loss_finetuned")] == [4]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def _wandb_records(path: Path) -> list:
    """The records of a W&B run file (a LevelDB-style log of wandb's protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []  # 7-byte file header; 32 KiB blocks
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def _has_exit(path: Path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path))
    except Exception:  # a record cut short by a write in progress
        return False


def _wandb_run(folder: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of one offline run folder."""
    (path,) = folder.glob("run-*.wandb")
    # wandb's service process writes the file; finish() returns before it has flushed the
    # last blocks (a job's exit waits for it), so wait for the run's exit record.
    wait_for(lambda: _has_exit(path), 60, what=f"the exit record in {path}")
    run_id, config, history = "", {}, []
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return run_id, config, history


def test_wandb_offline_train_then_evaluate(tmp_path: Path, tiny_phi_dir: Path, cli_inproc, monkeypatch) -> None:
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_PROJECT", "wb-test")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    store_dir = tmp_path / "store"
    store, _cfg, overrides = build_run(store_dir, tiny_phi_dir, train=False)
    overrides += TRAIN + ["train.report_to=[wandb]", "train.tracker_run_name=tiny"]
    rc, err = _train(cli_inproc, store_dir, overrides)
    assert rc == 0, err
    record = json.loads(store.read_text("runs/r1/train/trackers.json"))["wandb"]
    assert record["project"] == "wb-test" and record["offline"] is True
    (train_run,) = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    run_id, config, history = _wandb_run(train_run)
    assert run_id == record["id"]
    assert config["train.max_steps"] == 4 and config["model.dtype"] == "float32"
    rows = [json.loads(line) for line in store.read_text("runs/r1/train/metrics.jsonl").splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["loss"] is not None}
    logged = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert logged == pytest.approx(losses)

    rc, err = _evaluate(cli_inproc, store_dir, overrides)
    assert rc == 0, err
    headline = store.read_manifest("runs/r1/evaluate")["metrics"]
    # Offline, every job writes its own folder under the same W&B run id (`wandb sync` joins them).
    eval_run = [f for f in (wandb_dir / "wandb").glob("offline-run-*") if f != train_run]
    assert len(eval_run) == 1
    eval_id, _config, eval_history = _wandb_run(eval_run[0])
    assert eval_id == run_id
    values = {k: v for row in eval_history for k, v in row.items()}
    assert values["evaluate/heldout_accuracy_finetuned"] == pytest.approx(headline["heldout_accuracy_finetuned"])
    assert values["evaluate/heldout_loss_finetuned"] == pytest.approx(headline["heldout_loss_finetuned"])


def test_missing_package_exits_2_and_dead_server_is_skipped(tmp_path: Path, tiny_phi_dir: Path, cli_inproc,
                                                           monkeypatch) -> None:
    store_dir = tmp_path / "store"
    store, _cfg, overrides = build_run(store_dir, tiny_phi_dir, train=False)
    overrides += TRAIN
    # A package that is not installed: exit 2 before any model is loaded, naming the fix.
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails: "not installed"
    rc, err = _train(cli_inproc, store_dir, overrides + ["train.report_to=[wandb,tensorboard]"])
    assert rc == 2 and "train.report_to: wandb requested but not installed; pip install wandb" in err
    assert store.listdir("runs/r1/train") == ["FAILED.json"]  # nothing trained, nothing committed
    monkeypatch.delitem(sys.modules, "wandb")

    # An MLflow server that does not answer: one warning, the run trains and commits without it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    rc, err = _train(cli_inproc, store_dir, overrides + ["train.report_to=[mlflow,tensorboard]"])
    assert rc == 0, err
    assert "mlflow is not used for this job: MLflow tracking server http://127.0.0.1:" in err
    assert "does not answer" in err and "continuing without it" in err
    record = json.loads(store.read_text("runs/r1/train/trackers.json"))
    assert "mlflow" not in record and "tensorboard" in record
    assert store.is_committed("runs/r1/train")
    # evaluate with the server still down: committed, the tracker skipped with a warning.
    rc, err = _evaluate(cli_inproc, store_dir, overrides + ["train.report_to=[mlflow,tensorboard]"])
    assert rc == 0, err
    assert "mlflow is not used for this job" in err
    assert store.is_committed("runs/r1/evaluate")


def test_tracker_settings_are_not_part_of_the_stage_hash() -> None:
    from medreason.config import build_config

    base = build_config()
    tracked = build_config(overrides=["train.report_to=[wandb,mlflow]", "train.tracker_project=p",
                                      "train.tracker_run_name=n"])
    assert tracked.stage_hash("train") == base.stage_hash("train")
    assert tracked.stage_hash("evaluate") == base.stage_hash("evaluate")
    assert build_config(overrides=["train.seed=1"]).stage_hash("train") != base.stage_hash("train")
    with pytest.raises(Exception, match="report_to"):
        build_config(overrides=["train.report_to=[comet]"])


def test_a_tracker_that_fails_mid_run_is_dropped(mlflow_server: str, monkeypatch, caplog) -> None:
    import mlflow
    from accelerate import PartialState
    from mlflow.tracking import MlflowClient

    from medreason.config import build_config
    from medreason.tracking import log_to, make_tracker, start_tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after backoff
    PartialState()
    tracker = make_tracker("mlflow", build_config(overrides=["train.report_to=[mlflow]"]), "mid", {}, None)
    assert start_tracker(tracker, None)
    run_id = tracker.tracker.info.run_id
    assert log_to([tracker], {"train/loss": 1.0}, 1) == [tracker]
    # The server goes away (here: the client now points at a port nobody listens on).
    mlflow.set_tracking_uri(f"http://127.0.0.1:{_free_port()}")
    try:
        assert log_to([tracker], {"train/loss": 0.5}, 2) == []
    finally:
        mlflow.set_tracking_uri(mlflow_server)
        mlflow.end_run()
    assert "mlflow failed to log step 2" in caplog.text
    assert "not reporting to it for the rest of this job" in caplog.text
    assert [m.step for m in MlflowClient(mlflow_server).get_metric_history(run_id, "train/loss")] == [1]
