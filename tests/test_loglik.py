"""Likelihood scoring (medreason.loglik) against lm-evaluation-harness itself.

The parity test writes a local task in the style of lm-eval's ``medqa_4options`` (same prompt,
choices A-D, acc and acc_norm), runs the real ``lm-eval`` command offline with --log_samples on
a small model folder, and checks that medreason picks the same option for every question and
computes the same log-likelihoods.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medreason.loglik import MEDQA_CHOICES, encode_pair, medqa_prompt, pick, score_choices

QUESTIONS = [
    ("A 54-year-old man has crushing chest pain radiating to the left arm. Most likely diagnosis?",
     {"A": "Myocardial infarction", "B": "Gout", "C": "Pneumonia", "D": "Migraine"}, "A"),
    ("A child has a barking cough and inspiratory stridor. Which virus is the usual cause?",
     {"A": "Parainfluenza virus", "B": "HIV", "C": "Rabies virus", "D": "Hepatitis B virus"}, "A"),
    ("Which vitamin deficiency causes scurvy?",
     {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}, "C"),
    ("A woman has heat intolerance, weight loss and exophthalmos. Which antibody is typical?",
     {"A": "Anti-TSH receptor antibody", "B": "Anti-dsDNA", "C": "ANCA", "D": "Anti-CCP"}, "A"),
    ("What is the first-line drug for anaphylaxis?",
     {"A": "Diphenhydramine", "B": "Epinephrine", "C": "Prednisone", "D": "Salbutamol"}, "B"),
    ("Which electrolyte disturbance gives peaked T waves?",
     {"A": "Hyponatremia", "B": "Hypocalcemia", "C": "Hyperkalemia", "D": "Hypermagnesemia"}, "C"),
]

TASK_YAML = """\
task: medqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nA. {{{{options.A}}}}\\nB. {{{{options.B}}}}\\nC. {{{{options.C}}}}\\nD. {{{{options.D}}}}\\nAnswer:"
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer_idx)}}}}"
doc_to_choice: ['A', 'B', 'C', 'D']
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def _run_lm_eval(model_dir: Path, tmp: Path) -> list[dict]:
    """lm-eval's own samples for the local MedQA-format task, run offline in a subprocess."""
    if shutil.which("lm-eval") is None and not _has_module("lm_eval"):
        pytest.skip("lm-evaluation-harness is not installed: pip install -e '.[lmeval]'")
    task_dir = tmp / "tasks"
    task_dir.mkdir()
    data = tmp / "medqa_local.jsonl"
    data.write_text("".join(json.dumps({"question": q, "options": o, "answer_idx": a}) + "\n"
                            for q, o, a in QUESTIONS))
    (task_dir / "medqa_local.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp / "lm_eval_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={model_dir},dtype=float32",
         "--tasks", "medqa_local", "--include_path", str(task_dir), "--device", "cpu",
         "--batch_size", "4", "--log_samples", "--output_path", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = glob.glob(str(out / "**" / "samples_medqa_local_*.jsonl"), recursive=True)
    assert found, f"lm-eval wrote no samples file under {out}: {proc.stderr[-2000:]}"
    samples = [json.loads(line) for line in Path(found[0]).read_text().splitlines() if line.strip()]
    return sorted(samples, key=lambda s: s["doc_id"])


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _check_parity(model_dir: Path, tmp: Path) -> None:
    samples = _run_lm_eval(model_dir, tmp)
    assert len(samples) == len(QUESTIONS)
    model, tokenizer = _load(model_dir)
    questions = [(medqa_prompt(q, o), list(MEDQA_CHOICES)) for q, o, _ in QUESTIONS]
    ours = score_choices(model, tokenizer, questions, batch_size=3)
    for sample, (context, _), mine in zip(samples, questions, ours, strict=True):
        # Same prompt text as the task renders, and the " " delimiter before each choice.
        args = [sample["arguments"][k] for k in sorted(sample["arguments"], key=lambda k: int(k.split("_")[-1]))]
        assert [a["arg_0"] for a in args] == [context] * 4
        assert [a["arg_1"] for a in args] == [" A", " B", " C", " D"]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert mine.logliks == pytest.approx(theirs, abs=2e-4)
        their_pred = max(range(4), key=lambda i: (theirs[i], -i))
        assert mine.pred == their_pred, (mine.logliks, theirs)
        assert float(sample["acc"]) == float(mine.pred == int(sample["target"]))
        assert float(sample["acc_norm"]) == float(mine.pred_norm == int(sample["target"]))


def test_same_choice_as_lm_eval_tiny_phi(tiny_phi_dir: Path, tmp_path: Path) -> None:
    _check_parity(tiny_phi_dir, tmp_path)


@pytest.mark.slow
def test_same_choice_as_lm_eval_smollm2(smollm2_gguf: Path, tmp_path: Path) -> None:
    """A real pretrained model, whose option log-likelihoods differ by whole nats. The GGUF is
    de-quantized into a transformers folder by the project's own staging."""
    from medreason.config import build_config
    from medreason.staging import local_model_dir, stage_model
    from medreason.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    cfg = build_config(overrides=[f"model.name_or_path={smollm2_gguf}", "model.dtype=float32"])
    stage_model(store, cfg.model)
    folder = Path(local_model_dir(store, cfg.model))
    _check_parity(folder, tmp_path)


def test_left_and_right_padding_agree_with_one_row_at_a_time(tiny_phi_dir: Path) -> None:
    from medreason.loglik import loglikelihoods

    model, tokenizer = _load(tiny_phi_dir)
    requests = [(medqa_prompt(q, o), f" {c}") for q, o, _ in QUESTIONS[:3] for c in MEDQA_CHOICES]
    requests.append(("Short context:", " a much longer continuation of several words"))
    alone = loglikelihoods(model, tokenizer, requests, batch_size=1)
    right = loglikelihoods(model, tokenizer, requests, batch_size=5, padding_side="right")
    left = loglikelihoods(model, tokenizer, requests, batch_size=5, padding_side="left")
    for (a, _), (r, _), (lf, _) in zip(alone, right, left, strict=True):
        assert r == pytest.approx(a, abs=1e-4)
        assert lf == pytest.approx(a, abs=1e-4)
    # Summed log-probabilities of real continuations are negative, longer ones more so.
    assert all(ll < 0 for ll, _ in alone)
    with pytest.raises(ValueError, match="padding_side"):
        loglikelihoods(model, tokenizer, requests, padding_side="middle")  # type: ignore[arg-type]


def test_encode_pair_splits_the_joint_encoding(tiny_phi_dir: Path) -> None:
    _, tokenizer = _load(tiny_phi_dir)
    ctx, cont = encode_pair(tokenizer, "Answer:", " B")
    assert ctx + cont == tokenizer.encode("Answer: B")
    assert ctx == tokenizer.encode("Answer:")
    # A trailing space of the context moves into the continuation (lm-eval's rule).
    assert encode_pair(tokenizer, "Answer: ", "B") == encode_pair(tokenizer, "Answer:", " B")


def test_pick_acc_and_acc_norm() -> None:
    # acc takes the highest sum; acc_norm divides by characters: -6/11 = -0.55 beats -2/1.
    assert pick([-2.0, -6.0], ["A", "long option"]) == (0, 1, 1)
    # Ties go to the first option, like np.argmax.
    assert pick([-1.0, -1.0, -3.0], ["x", "y", "z"])[0] == 0
    # Bytes differ from characters for non-ASCII text: "é" is 1 character and 2 bytes, so per
    # character -1/1 loses to -1.5/2, per byte -1/2 beats -1.5/2.
    assert pick([-1.0, -1.5], ["é", "ab"]) == (0, 1, 0)


def test_prediction_rows_in_the_evaluate_format(tiny_phi_dir: Path) -> None:
    from _fixtures_eval import records

    from medreason.evaluation.scoring import summarize_rows
    from medreason.loglik import prediction_rows

    model, tokenizer = _load(tiny_phi_dir)
    recs = records(5)
    rows = prediction_rows(model, tokenizer, recs, "base", "heldout", batch_size=4)
    direct = score_choices(model, tokenizer, [(medqa_prompt(r["question"], r["options_map"]), list("ABCD"))
                                              for r in recs], batch_size=4)
    assert [r["extracted"] for r in rows] == ["ABCD"[d.pred] for d in direct]
    assert [r["correct"] for r in rows] == [r["extracted"] == rec["answer_letter"] for r, rec in zip(rows, recs, strict=True)]
    for row, d in zip(rows, direct, strict=True):
        assert list(row["logliks"].values()) == pytest.approx(d.logliks, abs=1e-5)
    summary = summarize_rows(rows)
    assert summary["n"] == 5 and summary["parse_failures"] == 0


def test_batched_encoding_equals_one_pair_at_a_time(tiny_phi_dir: Path) -> None:
    """Requests are encoded in batches with each distinct context once: the ids must be
    encode_pair's, also for BOS-prefixed, whitespace-ended, blank and empty contexts."""
    from transformers import AutoTokenizer

    from medreason.loglik import _encode_pairs

    tok = AutoTokenizer.from_pretrained(tiny_phi_dir)
    bos = tok.bos_token or "<|endoftext|>"
    q = medqa_prompt("A 30-year-old woman has fever. Which drug?", {"A": "aspirin", "B": "ibuprofen"})
    requests = [(q, " A"), (q, " B"), (q + " ", "aspirin"), (bos + q, " A"), ("", "fever"), ("  ", "x"),
                ("Dose: 5", "0 mg"), (q, " ibuprofen 400 mg")]
    assert _encode_pairs(tok, requests) == [encode_pair(tok, c, x) for c, x in requests]
    with pytest.raises(ValueError, match="encodes to no tokens"):
        _encode_pairs(tok, [(q, "")])
