"""Evaluation: statistics, batched generation, held-out loss, report/plots, and the job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _fixtures_eval import build_run, set_args

from medreason.evaluation.generation import generate_texts, length_sorted_batches, plan_generation_batches
from medreason.evaluation.loss import finish_loss, heldout_loss
from medreason.evaluation.scoring import summarize, wilson_interval
from medreason.report import write_outputs


# -- statistics ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998), Stat Med 17:857, Table II, method 3 (Wilson score, no correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        # Symmetric and boundary cases worked by hand with z = 1.96.
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_interval_known_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 0.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def _pred(model: str, set_name: str, i: int, correct: bool, extracted: str | None, source: str) -> dict:
    return {"model": model, "set": set_name, "id": f"{source}:{i}", "source": source, "prompt": "p",
            "generated": "g", "extracted": extracted, "gold": "A", "correct": correct,
            "parse_method": "answer_is" if extracted else "unparsed"}


def _synthetic_predictions() -> list[dict]:
    rows = []
    for i in range(20):
        src = "medqa" if i % 2 else "medmcqa"
        rows.append(_pred("base", "heldout", i, i < 6, "A" if i < 6 else (None if i >= 17 else "B"), src))
        rows.append(_pred("finetuned", "heldout", i, i < 14, "A" if i < 14 else "C", src))
    for i in range(10):
        rows.append(_pred("base", "pubmedqa", i, i < 3, "A" if i < 3 else "B", "pubmedqa"))
        rows.append(_pred("finetuned", "pubmedqa", i, i < 5, "A" if i < 5 else None, "pubmedqa"))
    for i in range(4):  # 0% and 100%: error bars at the ends of [0, 1]
        rows.append(_pred("base", "edge", i, False, "B", "edge"))
        rows.append(_pred("finetuned", "edge", i, True, "A", "edge"))
    return rows


def test_summarize_per_set_and_source() -> None:
    s = summarize(_synthetic_predictions())
    base, ft = s["heldout"]["base"], s["heldout"]["finetuned"]
    assert (base["n"], base["correct"], base["parse_failures"]) == (20, 6, 3)
    assert ft["accuracy"] == pytest.approx(0.7) and ft["parse_failure_rate"] == 0.0
    assert (ft["ci95_low"], ft["ci95_high"]) == pytest.approx(wilson_interval(14, 20))
    # even ids are medmcqa: 0,2,4 of the first 6 are correct for base
    assert base["by_source"]["medmcqa"]["correct"] == 3 and base["by_source"]["medmcqa"]["n"] == 10
    assert s["pubmedqa"]["finetuned"]["parse_failures"] == 5


def test_report_and_plots_from_synthetic_metrics(tmp_path: Path) -> None:
    preds = _synthetic_predictions()
    metrics = {"run_id": "r", "checkpoint": "final", "models": ["base", "finetuned"], "template": "medreason",
               "max_new_tokens": 64, "sets": summarize(preds), "eval_seconds": 1.0,
               "heldout_loss": {"base": finish_loss([{"loss_sum": 300.0, "tokens": 100}]),
                                "finetuned": finish_loss([{"loss_sum": 150.0, "tokens": 100}])}}
    train_rows = [{"step": s, "loss": 3 - 0.1 * s, "eval_loss": (3.2 - 0.1 * s) if s % 5 == 0 else None}
                  for s in range(1, 21)]
    files = write_outputs(str(tmp_path), preds, metrics, train_rows)
    assert set(files) == {"predictions.jsonl", "metrics.json", "report.md", "loss_curves.png", "accuracy.png"}
    report = (tmp_path / "report.md").read_text()
    assert "| heldout | 20 | 30.0% [" in report and "(6/20)" in report and "70.0% [" in report
    assert "finetuned − base = +40.0 points" in report
    assert "| heldout | medqa | 10 |" in report and "| pubmedqa | pubmedqa | 10 |" in report
    assert "3 (15.0%)" in report  # base parse failures on heldout
    assert "| finetuned | 1.5000 | 4.48 | 100 |" in report  # exp(1.5) = 4.48
    for png in ("loss_curves.png", "accuracy.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["plots"] == ["loss_curves.png", "accuracy.png"]
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == len(preds)
    # No train metrics: no loss plot, the report still renders.
    files = write_outputs(str(tmp_path / "b"), preds, metrics, [])
    assert "loss_curves.png" not in files


# -- generation and loss on a tiny random Phi ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_phi_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medreason.tokenizer import prepare_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_phi_dir, dtype=torch.float32).eval()
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_phi_dir))


def test_length_sorted_batches() -> None:
    assert length_sorted_batches([3, 9, 1, 7, 5], 2) == [[1, 3], [4, 0], [2]]


def test_batched_left_padded_generation_matches_one_by_one(tiny) -> None:
    model, tok = tiny
    texts = ["A 45-year-old man presents with chest pain", "Fever", "A pregnant woman presents with "
             "jaundice and dark urine. Laboratory tests show raised bilirubin. What is the diagnosis?"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batched = generate_texts(model, tok, ids, max_new_tokens=6, batch_size=3)
    single = [generate_texts(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in ids]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_long_batch_logs_progress_inside_the_batch(tiny, caplog) -> None:
    """Inside one generate call, progress lines (tokens so far, rows finished, elapsed) come at
    the interval, besides the line at the end of the batch."""
    model, tok = tiny
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Fever and cough", "Chest pain")]
    with caplog.at_level("INFO", logger="medreason.evaluation.generation"):
        generate_texts(model, tok, ids, max_new_tokens=6, batch_size=2, desc="gen", progress_interval_s=0.0)
    inside = [r.getMessage() for r in caplog.records if "so far," in r.getMessage() and "rows finished" in r.getMessage()]
    assert len(inside) >= 5, caplog.text  # one per decoding step at interval 0
    assert inside[0].startswith("gen: batch 1/1: 1 new tokens per row so far, ") and "/2 rows finished" in inside[0]
    assert inside[-1].startswith("gen: batch 1/1: 6 new tokens per row so far")
    assert any("batch 1/1 (2 questions" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO", logger="medreason.evaluation.generation"):
        generate_texts(model, tok, ids, max_new_tokens=6, batch_size=2, desc="gen")
    assert not any("rows finished" in r.getMessage() for r in caplog.records)  # default: every 30 s


def test_plan_generation_batches_sizes_each_cache_to_its_batch() -> None:
    lengths = [900, 100, 480, 130, 2040, 470, 120, 110]
    plan = plan_generation_batches(lengths, max_new_tokens=512, batch_size=4, cache_bucket_tokens=256)
    assert plan == [([4, 0, 2, 5], 2560), ([3, 6, 7, 1], 768)]
    # 0: one cache length (the longest batch's need) for every batch.
    one = plan_generation_batches(lengths, max_new_tokens=512, batch_size=4, cache_bucket_tokens=0)
    assert [n for _, n in one] == [2552, 2552]
    # A token cap: long batches get fewer rows, short ones more, never over batch_size.
    capped = plan_generation_batches(lengths, 512, batch_size=8, max_batch_tokens=4 * 768, cache_bucket_tokens=256)
    assert capped == [([4], 2560), ([0, 2], 1536), ([5, 3, 6], 1024), ([7, 1], 768)]
    for plan_ in (plan, one, capped):
        assert sorted(i for batch, _ in plan_ for i in batch) == list(range(len(lengths)))
        assert all(n >= lengths[i] + 512 for batch, n in plan_ for i in batch)
    assert all(len(b) == 1 or len(b) * n <= 4 * 768 for b, n in capped)
    assert plan_generation_batches([], 16, 4) == []


@pytest.mark.parametrize("peft_wrapped", [False, True])
def test_static_cache_per_batch_lengths_match_dynamic_generation(tiny, tiny_phi_dir, monkeypatch,
                                                                  peft_wrapped: bool) -> None:
    """The per-batch static cache (forced on, on CPU) gives the same greedy text as the dynamic
    cache, and each generate call really gets the cache length it was planned for, also through
    a PeftModel (the fine-tuned model under evaluation)."""
    model, tok = tiny
    hf_model = model
    if peft_wrapped:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(tiny_phi_dir, dtype=torch.float32).eval()
        model = get_peft_model(hf_model, LoraConfig(r=4, target_modules=["q_proj", "fc1"])).eval()
    texts = ["A 45-year-old man presents with crushing chest pain radiating to the left arm and "
             "sweating for an hour. " * 3, "Fever", "A child with a barking cough", "Jaundice",
             "A pregnant woman presents with jaundice and dark urine. What is the diagnosis?"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    monkeypatch.setenv("MEDREASON_STATIC_CACHE", "0")
    dynamic = generate_texts(model, tok, ids, max_new_tokens=5, batch_size=2)
    monkeypatch.setenv("MEDREASON_STATIC_CACHE", "1")
    seen: list[int] = []

    def record(_module, _args, kwargs):  # noqa: ANN001, ANN202
        for value in kwargs.values():
            if type(value).__name__ == "StaticCache":
                # transformers renamed the accessor between releases
                size = getattr(value, "get_max_length", None) or value.get_max_cache_shape
                seen.append(int(size()))
                break

    handle = hf_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        static = generate_texts(model, tok, ids, max_new_tokens=5, batch_size=2, cache_bucket_tokens=16)
    finally:
        handle.remove()
    assert static == dynamic
    planned = [n for _, n in plan_generation_batches([len(i) for i in ids], 5, 2, cache_bucket_tokens=16)]
    assert len(set(planned)) > 1, planned  # the case under test: several cache lengths
    calls = [n for i, n in enumerate(seen) if i == 0 or n != seen[i - 1]]
    assert calls == planned


def test_compile_modes_map_to_generate_keywords() -> None:
    from transformers.generation import CompileConfig

    from medreason.evaluation.generation import _compile_generation

    two_shapes = [([0, 1], 1024), ([2, 3], 768)]
    assert _compile_generation("none", two_shapes, 2, None) == {"disable_compile": True}
    # Several cache shapes: one compilation for symbolic shapes instead of one per shape.
    assert _compile_generation("full", two_shapes, 2, None) == {"compile_config": CompileConfig(dynamic=True)}
    # One shape (the last batch is padded to batch_size rows): transformers' static compile.
    assert _compile_generation("full", [([0, 1], 768), ([2], 768)], 2, None) == {}
    # With a token cap rows are not padded, so a smaller last batch is a shape of its own.
    assert "compile_config" in _compile_generation("full", [([0, 1], 768), ([2], 768)], 2, 2048)


def test_heldout_loss_matches_model_loss(tiny) -> None:
    import torch

    from medreason.tokens import TokenizedSplit

    model, tok = tiny
    recs = []
    for i, (p, r) in enumerate([("Question: gout?", " Answer: allopurinol."), ("Fever and cough", " pneumonia")]):
        pi, ri = tok(p)["input_ids"], tok(r)["input_ids"]
        recs.append((f"x:{i}", pi + ri + [tok.eos_token_id], len(pi)))
    split = TokenizedSplit.from_records(recs)
    got = finish_loss([heldout_loss(model, split, batch_size=2)])
    # Reference: HF's own loss per record (mean over response tokens), token-weighted.
    total, count = 0.0, 0
    for i in range(len(split)):
        ids = torch.tensor([split.ids(i).astype("int64")])
        labels = torch.tensor([split.labels(i)])
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


# -- the job -----------------------------------------------------------------------------------------
def _eval_args(store_dir: Path, overrides: list[str], *extra: str) -> list[str]:
    return ["evaluate", "--store", str(store_dir), "--run", "r1", *set_args(overrides), *extra]


def test_evaluate_job_base_vs_finetuned(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir)
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"question": f"Q{i}?", "options": {"A": "yes", "B": "no", "C": "maybe"},
                                           "answer_idx": "ABC"[i % 3]}) for i in range(5)) + "\n")
    overrides.append(f"eval.benchmarks=[{{name: mini, path: '{bench}', format: mcq}}]")
    code, _, err = cli_inproc(*_eval_args(store_dir, overrides))
    assert code == 0, err
    out = store_dir / "runs" / "r1" / "evaluate"
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest["inputs"]) == {"prepare", "train"}
    m = manifest["metrics"]
    assert m["heldout_n"] == 6 and m["mini_n"] == 5
    assert {"heldout_accuracy_base", "heldout_accuracy_finetuned", "heldout_loss_base",
            "heldout_loss_finetuned"} <= set(m)
    # The adapter changes the model: the held-out loss differs between base and fine-tuned.
    assert m["heldout_loss_base"] != m["heldout_loss_finetuned"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 * (6 + 5)
    assert {p["model"] for p in preds} == {"base", "finetuned"}
    row = preds[0]
    assert set(row) >= {"model", "set", "id", "prompt", "generated", "extracted", "gold", "correct", "parse_method"}
    assert row["prompt"].startswith("A ") and "Answer Choices:" in row["prompt"]
    report = (out / "report.md").read_text()
    assert "| heldout | 6 |" in report and "| mini | 5 |" in report and "Held-out loss" in report
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "accuracy.png").stat().st_size > 1000

    code, _, err = cli_inproc(*_eval_args(store_dir, overrides))
    assert code == 0 and "already committed" in err
    # Another checkpoint is another config: refused without --force, redone with it.
    code, _, err = cli_inproc(*_eval_args(store_dir, overrides + ["eval.checkpoint=best"]))
    assert code == 2 and "--force" in err
    code, _, err = cli_inproc(*_eval_args(store_dir, overrides + ["eval.checkpoint=best"], "--force"))
    assert code == 0, err
    info = json.loads((out / "metrics.json").read_text())["model_info"]
    assert info["finetuned"]["source"] == "adapter (step-10)"


def test_evaluate_base_only_and_merged(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir)
    code, _, err = cli_inproc(*_eval_args(store_dir, overrides + ["eval.checkpoint=none"]))
    assert code == 0, err
    out = store_dir / "runs" / "r1" / "evaluate"
    assert json.loads((out / "metrics.json").read_text())["models"] == ["base"]
    base_loss = json.loads((out / "MANIFEST.json").read_text())["metrics"]["heldout_loss_base"]

    code, _, err = cli_inproc("merge", "--store", str(store_dir), "--run", "r1", *set_args(overrides))
    assert code == 0, err
    code, _, err = cli_inproc(*_eval_args(store_dir, overrides + ["eval.checkpoint=merged"], "--force"))
    assert code == 0, err
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert set(manifest["inputs"]) == {"prepare", "train", "merge"}
    assert manifest["metrics"]["heldout_loss_base"] == pytest.approx(base_loss, abs=1e-4)


def test_evaluate_bad_input(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir, train=False)
    # No committed adapter.
    code, _, err = cli_inproc(*_eval_args(store_dir, overrides))
    assert code == 2 and "no committed train stage" in err and "eval.checkpoint=none" in err
    # A benchmark file without options.
    no_opts = tmp_path / "noopts.jsonl"
    no_opts.write_text(json.dumps({"question": "Q?", "answer_idx": "A"}) + "\n")
    base_only = overrides + ["eval.checkpoint=none"]
    code, _, err = cli_inproc(*_eval_args(store_dir, base_only + [f"eval.benchmarks=[{{name: x, path: '{no_opts}'}}]"]))
    assert code == 2 and "no options" in err and "row 1" in err
    # An unknown option letter as gold.
    bad_gold = tmp_path / "badgold.jsonl"
    bad_gold.write_text(json.dumps({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "F"}) + "\n")
    code, _, err = cli_inproc(*_eval_args(store_dir, base_only + [f"eval.benchmarks=[{{name: x, path: '{bad_gold}'}}]"]))
    assert code == 2 and "'F' is not one of the option letters A, B" in err
    # A checkpoint that was never committed, and no prepare at all.
    _, _, overrides2 = build_run(tmp_path / "s2", tiny_phi_dir)
    code, _, err = cli_inproc(*_eval_args(tmp_path / "s2", overrides2 + ["eval.checkpoint=step-7"]))
    assert code == 2 and "step-7 is not committed" in err and "step-10" in err
    code, _, err = cli_inproc("evaluate", "--store", str(tmp_path / "empty"), "--run", "r1", *set_args(overrides))
    assert code == 2 and "no committed prepare stage" in err


def test_load_for_inference_folds_the_adapter_only_while_it_runs(tmp_path: Path, tiny_phi_dir: Path) -> None:
    """The one adapter rule: base + adapter on an unquantized base runs folded (same logits as
    the unmerged adapter), unfolded afterwards; the compared base is the same weights, adapter off."""
    import torch

    from medreason.loading import load_for_inference

    store, cfg, _ = build_run(tmp_path / "store", tiny_phi_dir)
    base, ft = load_for_inference(store, "r1", "final", cfg, "cpu", compare_base=True)
    assert (base.label, ft.label) == ("base", "finetuned") and base.model is ft.model
    assert ft.info == {"source": "adapter (final)"}
    layer = next(m for m in ft.model.modules() if hasattr(m, "lora_A") and hasattr(m, "merged"))
    x = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        unmerged = ft.model(input_ids=x).logits
        with ft.context():
            assert layer.merged
            folded = ft.model(input_ids=x).logits
        assert not layer.merged
        with base.context():
            assert not layer.merged
            plain = ft.model(input_ids=x).logits
    assert torch.allclose(folded, unmerged, atol=1e-4)
    assert (plain - unmerged).abs().max() > 1e-3
    (alone,) = load_for_inference(store, "r1", "base", cfg, "cpu")
    assert alone.label == "base" and type(alone.model).__name__ == "PhiForCausalLM"
