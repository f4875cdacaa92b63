"""Evaluations as researchers run them: several named evaluations of one run side by side (on a
local store and on a moto S3 server), compared with the paired McNemar test; likelihood scoring
in the evaluate job; questions with up to 26 options; benchmarks with unusable rows skipped."""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path
from typing import Any

import pytest
from _fixtures_eval import build_run, set_args

LETTERS = string.ascii_uppercase


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def _evaluate(cli_inproc, store_uri: str, overrides: list[str], *extra: str, run: str = "r1") -> tuple[int, str]:
    code, _, err = cli_inproc("evaluate", "--store", store_uri, "--run", run, *set_args(overrides), *extra)
    return code, err


def _predictions(store: Any, rel: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.read_text(f"{rel}/predictions.jsonl").splitlines() if line.strip()]


def _paired(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {(r["a"], r["b"], r["set"]): r for r in csv.DictReader(fh)}


def _check_mcnemar(row: dict[str, str], a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """The paired row's counts and p-value, recomputed from the two prediction files."""
    from medreason.compare import mcnemar_exact

    right_a = {r["id"]: r["correct"] for r in a}
    right_b = {r["id"]: r["correct"] for r in b}
    a_only = sum(1 for k in right_a if right_a[k] and not right_b[k])
    b_only = sum(1 for k in right_a if right_b[k] and not right_a[k])
    assert (int(row["n"]), int(row["a_only"]), int(row["b_only"])) == (len(right_a), a_only, b_only)
    assert float(row["mcnemar_p"]) == pytest.approx(mcnemar_exact(a_only, b_only))


def test_named_evaluations_coexist_and_compare(store_uri: str, tmp_path: Path, tiny_phi_dir: Path,
                                               cli_inproc) -> None:
    store, _, overrides = build_run(store_uri, tiny_phi_dir)
    loglik = overrides + ["eval.scoring=loglikelihood"]
    assert _evaluate(cli_inproc, store_uri, overrides)[0] == 0  # the default evaluation
    code, err = _evaluate(cli_inproc, store_uri, loglik + ["eval.checkpoint=step-10"], "--name", "step10")
    assert code == 0, err
    code, err = _evaluate(cli_inproc, store_uri, loglik, "--name", "final")
    assert code == 0, err

    root = store.stage_rel("r1", "evaluate")
    default, step10, final = (store.read_manifest(rel) for rel in (root, f"{root}/step10", f"{root}/final"))
    assert "name" not in default and (step10["name"], final["name"]) == ("step10", "final")
    assert len({default["config_hash"], step10["config_hash"], final["config_hash"]}) == 3
    assert step10["config"]["eval"]["checkpoint"] == "step-10"
    for rel, source in ((f"{root}/step10", "adapter (step-10)"), (f"{root}/final", "adapter (final)")):
        metrics = json.loads(store.read_text(f"{rel}/metrics.json"))
        assert metrics["model_info"]["finetuned"]["source"] == source
        assert metrics["scoring"] == "loglikelihood" and "# Evaluation `" in store.read_text(f"{rel}/report.md")
    # The default evaluation's files hold no named one's, and the other way round.
    assert set(default["files"]) == {"predictions.jsonl", "metrics.json", "report.md", "loss_curves.png",
                                     "accuracy.png"}

    # The same config again: a no-op; another config under a taken name: --force or a new name.
    code, err = _evaluate(cli_inproc, store_uri, loglik, "--name", "final")
    assert code == 0 and "evaluate/final of run r1 is already committed" in err
    code, err = _evaluate(cli_inproc, store_uri, overrides, "--name", "final")
    assert code == 2 and "--force" in err and "evaluate/final" in err
    code, err = _evaluate(cli_inproc, store_uri, overrides, "--name", "../x")
    assert code == 2 and "evaluation name" in err
    # Redoing the default evaluation keeps the named ones inside its folder.
    assert _evaluate(cli_inproc, store_uri, overrides + ["eval.heldout_limit=4"], "--force")[0] == 0
    for rel in (f"{root}/step10", f"{root}/final"):
        store.verify(rel, store.read_manifest(rel), hashes=False)
    assert store.read_manifest(root)["metrics"]["heldout_n"] == 4

    # A second run, then one table over two evaluations of r1 and over the two runs.
    build_run(store_uri, tiny_phi_dir, run="r2")
    assert _evaluate(cli_inproc, store_uri, loglik, run="r2")[0] == 0
    out = tmp_path / "cmp"
    code, stdout, err = cli_inproc("compare", "r1:step10", "r1:final", "r2", "--store", store_uri, "--out", str(out))
    assert code == 0, err
    assert "r1:step10/finetuned" in stdout and "r2/finetuned" in stdout and "exact McNemar test" in stdout
    paired = _paired(out / "paired.csv")
    ft = {ref: [r for r in _predictions(store, rel) if r["model"] == "finetuned"]
          for ref, rel in (("r1:step10", f"{root}/step10"), ("r1:final", f"{root}/final"),
                           ("r2", store.stage_rel("r2", "evaluate")))}
    _check_mcnemar(paired[("r1:step10/finetuned", "r1:final/finetuned", "heldout")], ft["r1:step10"], ft["r1:final"])
    _check_mcnemar(paired[("r1:final/finetuned", "r2/finetuned", "heldout")], ft["r1:final"], ft["r2"])
    # Both adapters differ (seeds 1 and 0): the step-10 evaluation is not a copy of the final one.
    assert [r["logliks"] for r in ft["r1:step10"]] != [r["logliks"] for r in ft["r1:final"]]


def _mcq_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _alphabet_rows(n: int) -> list[dict[str, Any]]:
    """n questions with 26 options each, golds spread over the whole alphabet (Z included)."""
    return [{"id": f"q{i}", "question": f"Which organism, of the 26 listed, causes disease {i}?",
             "options": {letter: f"organism {letter.lower()}{i}" for letter in LETTERS},
             "answer_idx": LETTERS[(7 * i + 25) % 26]} for i in range(n)]


def test_loglikelihood_job_26_options_and_skipped_rows(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    """eval.scoring=loglikelihood: acc and acc_norm for base and fine-tuned, the same picks as
    medreason.loglik on the same weights, held-out loss still there; a 26-option benchmark;
    a benchmark whose bad rows are skipped and counted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medreason.loglik import medqa_prompt, score_choices

    store_dir = tmp_path / "store"
    store, _, overrides = build_run(store_dir, tiny_phi_dir)
    alpha = _mcq_file(tmp_path / "alpha.jsonl", _alphabet_rows(4))
    good = {"question": "Which drug treats anaphylaxis first?", "options": ["Epinephrine", "Loratadine"],
            "answer_idx": 0}
    mixed = _mcq_file(tmp_path / "mixed.jsonl", [
        good, {"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"},
        {"question": "Q?", "options": ["only one"], "answer_idx": 0},
        {"question": "", "options": ["x", "y"], "answer_idx": 1}, dict(good, answer_idx=1)])
    benches = (f"eval.benchmarks=[{{name: alpha, path: '{alpha}'}}, "
               f"{{name: mixed, path: '{mixed}', bad_rows: skip}}]")
    # bad_rows: fail (the default) stops at the first bad row.
    failing = benches.replace(", bad_rows: skip", "")
    code, err = _evaluate(cli_inproc, str(store_dir), overrides + [failing, "eval.scoring=loglikelihood"])
    assert code == 2 and "'mixed'" in err and "row 2" in err and "'E' is not one of the option letters A, B" in err

    code, err = _evaluate(cli_inproc, str(store_dir), overrides + [benches, "eval.scoring=loglikelihood"])
    assert code == 0, err
    rel = store.stage_rel("r1", "evaluate")
    manifest = store.read_manifest(rel)
    m = manifest["metrics"]
    assert (m["heldout_n"], m["alpha_n"], m["mixed_n"], m["mixed_bad_rows_skipped"]) == (6, 4, 2, 3)
    assert {"heldout_accuracy_norm_base", "heldout_accuracy_norm_finetuned", "heldout_loss_base",
            "heldout_loss_finetuned"} <= set(m)
    metrics = json.loads(store.read_text(f"{rel}/metrics.json"))
    assert metrics["bad_rows"]["mixed"]["by_reason"] == {
        "answer not among the options": 1, "fewer than 2 or more than 26 options": 1, "empty question": 1}
    assert [r["row"] for r in metrics["bad_rows"]["mixed"]["rows"]] == [2, 3, 4]
    report = store.read_text(f"{rel}/report.md")
    assert "base acc_norm" in report and "finetuned acc_norm" in report and "Held-out loss" in report
    assert "| mixed | 1 | answer not among the options | 2 |" in report

    preds = _predictions(store, rel)
    assert {p["model"] for p in preds} == {"base", "finetuned"} and len(preds) == 2 * (6 + 4 + 2)
    alpha_rows = [p for p in preds if p["set"] == "alpha" and p["model"] == "base"]
    assert all(list(p["logliks"]) == list(LETTERS) for p in alpha_rows)
    assert [p["gold"] for p in alpha_rows] == ["Z", "G", "N", "U"]
    # The job's base picks are medreason.loglik's picks on the base weights, option texts as
    # continuations of lm-eval's medqa prompt.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_phi_dir))
    recs = _alphabet_rows(4)
    direct = score_choices(model, tokenizer, [
        (medqa_prompt(r["question"], r["options"]), list(r["options"].values())) for r in recs])
    assert [p["extracted"] for p in alpha_rows] == [LETTERS[d.pred] for d in direct]
    assert [p["extracted_norm"] for p in alpha_rows] == [LETTERS[d.pred_norm] for d in direct]
    for p, d in zip(alpha_rows, direct, strict=True):
        assert list(p["logliks"].values()) == pytest.approx(d.logliks, abs=1e-4)
    summary = metrics["sets"]["alpha"]["base"]
    assert summary["correct"] == sum(p["correct"] for p in alpha_rows)
    assert summary["correct_norm"] == sum(p["correct_norm"] for p in alpha_rows)


def test_generate_job_scores_a_26_option_benchmark(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    store, _, overrides = build_run(store_dir, tiny_phi_dir, train=False)
    alpha = _mcq_file(tmp_path / "alpha.jsonl", _alphabet_rows(3))
    code, err = _evaluate(cli_inproc, str(store_dir), overrides + [
        "eval.checkpoint=none", "eval.heldout=false", f"eval.benchmarks=[{{name: alpha, path: '{alpha}'}}]"])
    assert code == 0, err
    rel = store.stage_rel("r1", "evaluate")
    preds = _predictions(store, rel)
    assert [p["gold"] for p in preds] == ["Z", "G", "N"]
    assert all("Y. organism y" in p["prompt"] and "Z. organism z" in p["prompt"] for p in preds)
    assert all(p["extracted"] is None or p["extracted"] in LETTERS for p in preds)
    assert "parse failures" in store.read_text(f"{rel}/report.md")


def test_loglikelihood_on_the_shipped_sample(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    """prepare on the shipped sample, then the base model scored by likelihood on its held-out split."""
    from _fixtures_eval import model_overrides

    store_dir = tmp_path / "store"
    sets = set_args(model_overrides(tiny_phi_dir) + ["data.source=sample", "data.eval_fraction=0.2",
                                                       "eval.checkpoint=none", "eval.scoring=loglikelihood"])
    code, _, err = cli_inproc("prepare", "--store", str(store_dir), "--run", "s", *sets)
    assert code == 0, err
    code, _, err = cli_inproc("evaluate", "--store", str(store_dir), "--run", "s", *sets)
    assert code == 0, err
    out = store_dir / "runs" / "s" / "evaluate"
    heldout = [json.loads(line) for line in (store_dir / "runs" / "s" / "prepare" / "eval.jsonl").read_text().splitlines()]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    scorable = [r for r in heldout if r.get("options_map") and r.get("answer_letter")]
    assert len(preds) == len(scorable) >= 10
    assert all(set(p["logliks"]) == set(r["options_map"]) for p, r in zip(preds, scorable, strict=True))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"] == ["base"] and "accuracy_norm" in metrics["sets"]["heldout"]["base"]
    assert metrics["heldout_loss"]["base"]["tokens"] > 0
