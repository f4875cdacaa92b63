"""The stage files beside the manifests are strict JSON too: a NaN metric (a diverged loss, an
empty benchmark's accuracy) written through each writer parses with a strict parser, as null."""

from __future__ import annotations

import json
import math
from pathlib import Path

from medreason import data, jsonio, prepare
from medreason.checkpointing import CheckpointClient, TrainState
from medreason.report import write_outputs
from medreason.train_metrics import MetricsLog


def _strict_lines(path: Path) -> list[object]:
    return [jsonio.loads_strict(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_metrics_jsonl_and_trainer_state_with_nan(tmp_path: Path) -> None:
    metrics = MetricsLog(total_steps=2)  # no tracker: metrics.jsonl only
    metrics.rows = [{"step": 1, "loss": math.nan, "grad_norm": math.inf}, {"step": 2, "loss": 1.5}]
    state = TrainState(step=2, last_loss=math.nan, best_eval_loss=-math.inf)
    # The writer checkpoints and the final train stage share (it uses no client state).
    CheckpointClient._write_common(None, str(tmp_path), state, metrics)  # type: ignore[arg-type]
    assert _strict_lines(tmp_path / "metrics.jsonl") == [
        {"grad_norm": None, "loss": None, "step": 1}, {"loss": 1.5, "step": 2}]
    written = jsonio.loads_strict((tmp_path / "trainer_state.json").read_text())
    assert written["last_loss"] is None and written["best_eval_loss"] is None and written["step"] == 2
    restored = TrainState.load(str(tmp_path / "trainer_state.json"))
    assert restored.last_loss is None and restored.step == 2


def test_predictions_and_metrics_json_with_nan(tmp_path: Path) -> None:
    predictions = [{"id": "q1", "model": "base", "logprob": -math.inf, "correct": False, "text": "é"}]
    metrics = {"heldout_accuracy_base": math.nan, "n": 1}
    write_outputs(str(tmp_path), predictions, metrics, train_rows=[])
    (row,) = _strict_lines(tmp_path / "predictions.jsonl")
    assert row == {"id": "q1", "model": "base", "logprob": None, "correct": False, "text": "é"}
    written = jsonio.loads_strict((tmp_path / "metrics.json").read_text())
    assert written["heldout_accuracy_base"] is None and written["n"] == 1


def test_data_jsonl_and_prepare_stats_with_nan(tmp_path: Path) -> None:
    rows = [{"uid": "a", "score": math.nan, "question": "fièvre?"}]
    assert data.write_jsonl(str(tmp_path / "train.jsonl"), rows) == 1
    assert _strict_lines(tmp_path / "train.jsonl") == [{"uid": "a", "score": None, "question": "fièvre?"}]
    stats = {"n_train": 1, "tokens": {"train": {"mean": math.nan}}, "template": "medreason"}
    prepare.write_files(str(tmp_path), {}, rejects=[], stats=stats)
    text = (tmp_path / "stats.json").read_text(encoding="utf-8")
    assert jsonio.loads_strict(text) == {"n_train": 1, "tokens": {"train": {"mean": None}}, "template": "medreason"}
    assert list(json.loads(text)) == ["n_train", "tokens", "template"]  # the writer's order stays
