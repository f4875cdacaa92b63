"""medreason compare: exact McNemar p-values, and the command over committed evaluations written
through the store (a local folder and a moto S3 server) in the evaluate stage's own format."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from _fixtures_eval import records

from medreason.compare import flatten, mcnemar_exact, paired_counts
from medreason.evaluation.scoring import wilson_interval


# -- McNemar -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("b", "c", "expected"), [
    # 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024
    (1, 9, 0.021484375),
    (9, 1, 0.021484375),
    # 2 * (1 + 12 + 66) / 2^12 = 158 / 4096
    (2, 10, 0.03857421875),
    # 2 * 1 / 2^6
    (0, 6, 0.03125),
    # 2 * (1 + 5) / 32 = 0.375
    (1, 4, 0.375),
    # balanced: 2 * (half the mass + the middle term) > 1 -> capped at 1
    (5, 5, 1.0),
    (0, 0, 1.0),
])
def test_mcnemar_exact_known_values(b: int, c: int, expected: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_large_counts_stay_finite() -> None:
    # 2^3000 overflows a float; the integer arithmetic still gives a tiny, valid p-value.
    p = mcnemar_exact(1400, 1600)
    assert 0 < p < 1e-3
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_paired_counts_and_flatten() -> None:
    a = {("s", "1"): True, ("s", "2"): True, ("s", "3"): False, ("s", "4"): False, ("s", "5"): True}
    b = {("s", "1"): True, ("s", "2"): False, ("s", "3"): True, ("s", "4"): False}
    assert paired_counts(a, b) == {"n": 4, "both_correct": 1, "a_only": 1, "b_only": 1, "both_wrong": 1}
    assert flatten({"train": {"lr": 1, "mods": ["q"]}, "x": {}}) == {"train.lr": 1, "train.mods": ["q"], "x": {}}


# -- evaluations in the store ------------------------------------------------------------------------------
N = 20
# Which of the N held-out questions each model answers right. r1/finetuned vs r2/finetuned:
# both right on 0-4, only r1 on 5, only r2 on 6-14, both wrong on 15-19 -> b=1, c=9.
RIGHT = {
    ("r1", "base"): set(range(3)),
    ("r1", "finetuned"): set(range(6)),
    ("r2", "base"): set(range(3)),
    ("r2", "finetuned"): set(range(5)) | set(range(6, 15)),
}
UNPARSED = {("r1", "base"): {19}, ("r2", "base"): {18, 19}}


def _predictions(run: str, models: list[str], set_name: str, n: int) -> list[dict[str, Any]]:
    from medreason.evaluation.scoring import score

    recs = records(n)
    rows = []
    for model in models:
        right = RIGHT.get((run, model), set(range(n // 2)))
        for i, rec in enumerate(recs):
            gold = rec["answer_letter"]
            wrong = "ABCD"[("ABCD".index(gold) + 1) % 4]
            text = (f"The answer is {gold}." if i in right else
                    "I cannot tell." if i in UNPARSED.get((run, model), set()) else f"The answer is {wrong}.")
            rows.append(score(rec, text, model, set_name, prompt="..."))
    return rows


def _commit_evaluation(store: Any, run: str, name: str | None, cfg: Any, set_name: str, n: int,
                       tmp: Path) -> None:
    from medreason.compare import evaluation_rel
    from medreason.evaluation.scoring import headline, summarize
    from medreason.report import write_outputs
    from medreason.store import build_manifest

    preds = _predictions(run, ["base", "finetuned"], set_name, n)
    metrics = {"run_id": run, "checkpoint": "final", "models": ["base", "finetuned"], "template": "medreason",
               "max_new_tokens": 8, "sets": summarize(preds),
               "heldout_loss": {"base": {"loss": 2.5, "perplexity": math.exp(2.5), "tokens": 100},
                                "finetuned": {"loss": 2.0 if run == "r1" else 1.8,
                                              "perplexity": 7.0, "tokens": 100}}}
    metrics["headline"] = headline(metrics)
    out = tmp / f"{run}-{name}"
    write_outputs(str(out), preds, metrics, [])
    manifest = build_manifest(stage="evaluate", run_id=run, config=cfg, config_hash=cfg.stage_hash("evaluate"),
                              metrics=metrics["headline"])
    store.commit_dir(str(out), evaluation_rel(store, run, name), manifest)


def _commit_train(store: Any, run: str, cfg: Any, tokens_per_s: list[float], tmp: Path) -> None:
    from medreason.store import build_manifest

    out = tmp / f"{run}-train"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "loss": 2.0, "tokens_per_s": t}) + "\n" for i, t in enumerate(tokens_per_s)))
    store.commit_dir(str(out), store.stage_rel(run, "train"),
                     build_manifest(stage="train", run_id=run, config=cfg, config_hash=cfg.stage_hash("train")))


def _make_runs(uri: str, tmp: Path) -> None:
    from medreason.config import build_config
    from medreason.store import ArtifactStore

    store = ArtifactStore(uri)
    cfg1 = build_config(overrides=["train.learning_rate=2e-4", "lora.r=8"])
    cfg2 = build_config(overrides=["train.learning_rate=1e-4", "lora.r=8"])
    _commit_train(store, "r1", cfg1, [100.0, 1000.0, 1100.0, 1200.0], tmp)  # median 1050
    _commit_train(store, "r2", cfg2, [2000.0, 2100.0, 50.0], tmp)  # median 2000
    _commit_evaluation(store, "r1", None, cfg1, "heldout", N, tmp)
    _commit_evaluation(store, "r2", None, cfg2, "heldout", N, tmp)
    # A named evaluation next to r2's default one, on another set.
    cfg_alt = build_config(overrides=["train.learning_rate=1e-4", "lora.r=8", "eval.max_new_tokens=64"])
    _commit_evaluation(store, "r2", "alt", cfg_alt, "medqa", 8, tmp)


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_compare_runs_and_named_evaluations(store_uri: str, tmp_path: Path, cli_inproc) -> None:
    _make_runs(store_uri, tmp_path)
    out = tmp_path / "cmp"
    code, stdout, stderr = cli_inproc("compare", "r1", "r2", "r2:alt", "--store", store_uri, "--out", str(out))
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["accuracy.png", "comparison.csv", "comparison.md", "paired.csv"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = {(r["entry"], r["set"]): r for r in _read_csv(out / "comparison.csv")}
    assert set(rows) == {("r1/base", "heldout"), ("r1/finetuned", "heldout"), ("r2/base", "heldout"),
                         ("r2/finetuned", "heldout"), ("r2:alt/base", "medqa"), ("r2:alt/finetuned", "medqa")}
    r2ft = rows[("r2/finetuned", "heldout")]
    assert (int(r2ft["n"]), int(r2ft["correct"])) == (N, 14)
    low, high = wilson_interval(14, N)
    assert float(r2ft["ci95_low"]) == pytest.approx(low) and float(r2ft["ci95_high"]) == pytest.approx(high)
    assert int(rows[("r2/base", "heldout")]["parse_failures"]) == 2
    assert float(r2ft["heldout_loss"]) == pytest.approx(1.8)
    assert float(rows[("r1/base", "heldout")]["train_tokens_per_s"]) == pytest.approx(1050.0)
    assert float(r2ft["train_tokens_per_s"]) == pytest.approx(2000.0)

    paired = {(p["a"], p["b"], p["set"]): p for p in _read_csv(out / "paired.csv")}
    across = paired[("r1/finetuned", "r2/finetuned", "heldout")]
    assert (int(across["a_only"]), int(across["b_only"]), int(across["n"])) == (1, 9, N)
    assert float(across["mcnemar_p"]) == pytest.approx(0.021484375)
    assert float(across["difference_b_minus_a"]) == pytest.approx((14 - 6) / N)
    # Base vs fine-tuned inside one evaluation: r1 base right on 0-2, fine-tuned on 0-5.
    inside = paired[("r1/base", "r1/finetuned", "heldout")]
    assert (int(inside["a_only"]), int(inside["b_only"])) == (0, 3)
    assert float(inside["mcnemar_p"]) == pytest.approx(0.25)
    # The named evaluation scored another set: it pairs only with itself.
    assert not [k for k in paired if "r2:alt" in k[0] and "r2:alt" not in k[1]]

    md = (out / "comparison.md").read_text()
    assert md == stdout.strip() + "\n" or md.strip() in stdout
    diff_lines = [line for line in md.splitlines() if line.startswith("| train.") or line.startswith("| eval.")
                  or line.startswith("| lora.")]
    keys = {line.split("|")[1].strip() for line in diff_lines if "`" in line}
    assert keys == {"train.learning_rate", "eval.max_new_tokens"}
    assert "0.02148" in md


def test_compare_missing_or_bad_evaluation_exits_2(tmp_path: Path, cli_inproc) -> None:
    _make_runs(str(tmp_path / "store"), tmp_path)
    code, _, stderr = cli_inproc("compare", "r1", "r1:nosuch", "--store", str(tmp_path / "store"),
                                 "--out", str(tmp_path / "o"))
    assert code == 2 and "r1:nosuch" in stderr and "no committed evaluation" in stderr
    code, _, stderr = cli_inproc("compare", "r1:..", "--store", str(tmp_path / "store"))
    assert code == 2
    code, _, stderr = cli_inproc("compare", "r1", "r1", "--store", str(tmp_path / "store"))
    assert code == 2 and "twice" in stderr
