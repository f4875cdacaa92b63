"""The data pipeline: validation, answer letters, templates, splits, decontamination, tokenization."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from _fixtures_prepare import HUB_SHA, make_records, offline_hub_dataset

from medreason import data, records
from medreason.benchmarks import benchmark_questions, load_benchmark
from medreason.config import BenchmarkConfig
from medreason.errors import InputError
from medreason.sources import HubRef, parse_hub

OPTIONS = "Answer Choices:\nA. Deep transverse Perineus\nB. Perinial membrane\nC. Colle's fascia\nD. Sphincter Urethrae"


def _record(**overrides):
    base = {
        "dataset_name": "medmcqa",
        "id_in_dataset": 7131,
        "question": "Urogenital Diaphragm is made up of the following, except:",
        "options": OPTIONS,
        "reasoning": "Finding reasoning paths:\n1. a -> b\n\nConclusion:\nColle's fascia.",
        "answer": "Colle's fascia. Explanation: Colle's fascia does not contribute.",
    }
    base.update(overrides)
    return base


# -- answer letters --------------------------------------------------------------------------------
LETTER_TABLE = [
    # medmcqa: "<option text>. Explanation: ..." -> the option the answer starts with
    ("medmcqa", OPTIONS, "Colle's fascia. Explanation: Colle's fascia does not contribute.", "C"),
    ("medmcqa longest wins", "Answer Choices:\nA. Vitamin B\nB. Vitamin B12\nC. Folate",
     "Vitamin B12. Explanation: cobalamin.", "B"),
    ("medmcqa word boundary", "Answer Choices:\nA. After 5 years\nB. After 2 years\nC. After 10 years",
     "After 10 years. Explanation: screening.", "C"),
    # medqa: the answer is the option text (normalized)
    ("medqa", "Answer Choices:\nA. Intravenous normal saline bolus\nB. Sublingual nitroglycerin",
     "Intravenous normal saline bolus", "A"),
    ("medqa case+punct", "Answer Choices:\nA. Intravenous normal saline bolus\nB. Sublingual nitroglycerin",
     "sublingual  nitroglycerin.", "B"),
    # pubmedqa: the decision word names the option
    ("pubmedqa", "Answer Choices:\nA. yes\nB. no\nC. maybe", "The final decision is: no. The trial showed", "B"),
    ("pubmedqa maybe", "Answer Choices:\nA. yes\nB. no\nC. maybe", "The final decision is: maybe", "C"),
    # MedXpertQA: "(B) text"
    ("medxpertqa", "Answer Choices:\nA. Aspirin\nB. Heparin\nC. Warfarin", "(B) Heparin", "B"),
    ("medxpertqa bare", "Answer Choices:\nA. Aspirin\nB. Heparin\nC. Warfarin", "(C)", "C"),
    # letter answers
    ("letter dot", "Answer Choices:\nA. Aspirin\nB. Heparin\nC. Warfarin", "B. Heparin", "B"),
    ("letter paren", "Answer Choices:\nA. Aspirin\nB. Heparin\nC. Warfarin", "C) Warfarin", "C"),
    ("letter paraphrase", "Answer Choices:\nA. Aspirin\nB. Heparin\nC. Warfarin", "A. acetylsalicylic acid", "A"),
    ("bare letter", "Answer Choices:\nA. Aspirin\nB. Heparin", "B", "B"),
    # an option text that looks like a letter answer: the text match wins
    ("C. difficile", "Answer Choices:\nA. C. difficile colitis\nB. Crohn disease\nC. Ulcerative colitis",
     "C. difficile colitis", "A"),
    # unknown
    ("no match", "Answer Choices:\nA. Aspirin\nB. Heparin", "Clopidogrel", ""),
    ("no options", "", "Aspirin", ""),
    ("letter not an option", "Answer Choices:\nA. Aspirin\nB. Heparin", "(E) something", ""),
]


@pytest.mark.parametrize("case,options,answer,expected", LETTER_TABLE, ids=[c[0] for c in LETTER_TABLE])
def test_recover_letter(case, options, answer, expected):
    assert records.recover_letter(answer, records.parse_options(options)) == expected


def test_parse_options_joins_continuation_lines_and_keeps_letter_order():
    parsed = records.parse_options("Answer Choices:\nA. first line\n  continued\nB. C. difficile toxin\nC. third")
    assert parsed == {"A": "first line continued", "B": "C. difficile toxin", "C": "third"}


def test_options_run_to_z_and_training_and_benchmark_labels_agree(tmp_path: Path):
    # 22 options (K..V did not parse before): the same row through prepare and the benchmark
    # loader gets the same options and the same gold letter.
    texts = [f"Drug number {i}" for i in range(22)]
    options = "Answer Choices:\n" + "\n".join(f"{chr(65 + i)}. {t}" for i, t in enumerate(texts))
    row = _record(options=options, answer="Drug number 20. Explanation: the twenty-first")
    parsed = records.parse_options(options)
    assert list(parsed) == list("ABCDEFGHIJKLMNOPQRSTUV") and parsed["V"] == "Drug number 21"
    data.add_letters([row])
    assert row["answer_letter"] == "U"
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({k: row[k] for k in data.FIELDS}) + "\n")
    bench = load_benchmark(BenchmarkConfig(name="b", path=str(path), format="medreason"))[0]
    assert bench["options_map"] == row["options_map"] and bench["answer_letter"] == row["answer_letter"]
    assert records.parse_options(records.options_string(parsed)) == parsed


def test_option_letter_rule_is_shared():
    # A colon separator and "(A)" labels open options; an out-of-order letter continues the text.
    assert records.parse_options("(A) x\nB: y\nD. z") == {"A": "x", "B": "y D. z"}
    assert records.coerce_options([f"t{i}" for i in range(26)])["Z"] == "t25"
    with pytest.raises(InputError, match="27 options; between 2 and 26"):
        records.check_options(records.coerce_options([f"t{i}" for i in range(27)]), "row 1")


def test_add_letters_counts_unknown_per_dataset():
    recs = [_record(), _record(id_in_dataset=2, answer="Nothing like the options", dataset_name="medqa")]
    unknown = data.add_letters(recs)
    assert [r["answer_letter"] for r in recs] == ["C", ""]
    assert unknown == {"medqa": 1}
    assert recs[0]["options_map"]["C"] == "Colle's fascia"


def test_real_records_load_as_ten_valid_first_letter_c(shared_data: Path):
    loaded = data.load_source(str(shared_data / "medreason_real_10.json"))
    valid, rejects = data.validate(loaded)
    assert len(valid) == 10 and rejects == []
    data.add_letters(valid)
    assert valid[0]["answer_letter"] == "C"
    assert all(r["answer_letter"] for r in valid)


# -- templates ---------------------------------------------------------------------------------------
def test_seed_template_exact():
    rec = _record(answer_letter="C")
    assert data.format_prompt(rec, "seed") == (
        "### question:\nUrogenital Diaphragm is made up of the following, except:\n\n"
        f"### option:\n{OPTIONS}\n\n### answer with reasoning:\n"
    )
    assert data.format_response(rec, "seed") == (
        "Finding reasoning paths:\n1. a -> b\n\nConclusion:\nColle's fascia.\n\n"
        "Colle's fascia. Explanation: Colle's fascia does not contribute.\nThe answer is C."
    )


def test_medreason_template_exact():
    rec = _record(answer_letter="C")
    assert data.format_prompt(rec, "medreason") == f"Urogenital Diaphragm is made up of the following, except:\n{OPTIONS}"
    assert data.format_response(rec, "medreason") == (
        "## Thinking\n\nFinding reasoning paths:\n1. a -> b\n\nConclusion:\nColle's fascia.\n\n"
        "## Final Answer\n\nColle's fascia. Explanation: Colle's fascia does not contribute.\nThe answer is C."
    )


def test_response_without_known_letter_has_no_answer_line():
    rec = _record(answer_letter="")
    assert not data.format_response(rec, "medreason").endswith("The answer is C.")
    assert "The answer is" not in data.format_response(rec, "seed")
    # without an answer_letter key it is recovered from the answer text
    assert data.format_response(_record(), "medreason").endswith("\nThe answer is C.")


def test_chat_template_uses_the_tokenizer_template():
    from helpers import make_tokenizer

    tok = make_tokenizer(chat_template=True)
    rec = _record(answer_letter="C")
    assert data.format_prompt(rec, "chat", tok) == (
        f"<|user|>\nUrogenital Diaphragm is made up of the following, except:\n{OPTIONS}\n<|assistant|>\n"
    )
    assert data.format_response(rec, "chat") == data.format_response(rec, "medreason")
    with pytest.raises(InputError, match="chat template"):
        data.format_prompt(rec, "chat", make_tokenizer())


# -- validation ---------------------------------------------------------------------------------------
def test_validation_rejects_each_problem_with_its_line():
    good = _record()
    lines = [
        json.dumps(good).encode(),
        json.dumps({k: v for k, v in _record(id_in_dataset=2).items() if k != "question"}).encode(),
        json.dumps(_record(id_in_dataset="7133")).encode(),
        json.dumps(_record(id_in_dataset=True)).encode(),
        json.dumps(_record(id_in_dataset=4, question="  ")).encode(),
        json.dumps(_record(id_in_dataset=5, answer="")).encode(),
        b'{"dataset_name": "medmcqa", "question": "caf\xe9"}',  # latin-1 byte: not UTF-8
        b"{not json",
        json.dumps(_record(id_in_dataset=6, question="bad \ud800 surrogate")).encode(),
        json.dumps(good).encode(),  # same uid
        json.dumps(_record(id_in_dataset=7, question="UROGENITAL diaphragm is made up of the following except")).encode(),
        json.dumps(_record(id_in_dataset=8, options="Answer Choices:\nA. x\nB. y")).encode(),  # same stem, other options
        b"",
        json.dumps([1, 2]).encode(),
    ]
    loaded = data.parse_bytes(b"\n".join(lines), "data.jsonl")
    valid, rejects = data.validate(loaded)
    assert [r["uid"] for r in valid] == ["medmcqa:7131", "medmcqa:8"]
    by_line = {r["line"]: r["reason"] for r in rejects}
    assert by_line == {
        2: "missing_question", 3: "wrong_type_id_in_dataset", 4: "wrong_type_id_in_dataset",
        5: "blank_question", 6: "blank_answer", 7: "invalid_utf8", 8: "invalid_json", 9: "invalid_utf8",
        10: "duplicate_id", 11: "duplicate_question", 14: "not_an_object",
    }


def test_non_utf8_json_file_is_an_input_error_naming_the_file():
    with pytest.raises(InputError, match=r"bad\.json: not UTF-8"):
        data.parse_bytes(b'[{"question": "caf\xe9"}]', "bad.json")


@pytest.mark.parametrize(("uri", "expected"), [
    ("hub:UCSC-VLAA/MedReason", HubRef("UCSC-VLAA/MedReason")),
    ("hub:owner/bench/test.jsonl", HubRef("owner/bench", "test.jsonl")),
    ("hub:owner/bench/data/test.jsonl@v1.0", HubRef("owner/bench", "data/test.jsonl", "v1.0")),
    ("hub:owner/repo@abc123", HubRef("owner/repo", None, "abc123")),
])
def test_one_hub_syntax(uri, expected):
    assert parse_hub(uri) == expected


@pytest.mark.parametrize("uri", ["hub:", "hub:owner/repo@", "hub:owner/../x.jsonl"])
def test_bad_hub_uri(uri):
    with pytest.raises(InputError, match=r"hub:<owner>/<repo>\[/<file>\]\[@<revision>\]"):
        parse_hub(uri)


def test_hub_source_records_the_commit_read(tmp_path: Path, monkeypatch, caplog):
    rows = make_records(3)
    raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    offline_hub_dataset(monkeypatch, tmp_path / "hf", "own/medreason", {"ours.jsonl": raw, "sub/b.jsonl": raw})
    loaded = data.load_source("hub:own/medreason", hub_file="ours.jsonl")  # today's data.source spelling
    assert len(loaded.rows) == 3
    assert loaded.provenance == {"kind": "hub", "uri": "hub:own/medreason", "repo_id": "own/medreason",
                                 "file": "ours.jsonl", "revision_requested": "main", "revision": HUB_SHA}
    assert "'main', which moves" in caplog.text
    caplog.clear()
    pinned = data.load_source(f"hub:own/medreason/sub/b.jsonl@{HUB_SHA}")
    assert pinned.provenance["revision"] == HUB_SHA and pinned.provenance["file"] == "sub/b.jsonl"
    assert "which moves" not in caplog.text
    with pytest.raises(InputError, match="differs from data.hub_revision"):
        data.load_source(f"hub:own/medreason@{HUB_SHA}", hub_file="ours.jsonl", hub_revision="v2")
    with pytest.raises(InputError, match="could not download nope.jsonl from hub dataset own/medreason"):
        data.load_source("hub:own/medreason/nope.jsonl")


def test_json_list_and_parquet_load(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_records(3)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        valid, rejects = data.validate(data.load_source(str(tmp_path / name)))
        assert [r["uid"] for r in valid] == ["medqa:0", "medqa:1", "medqa:2"] and not rejects


def test_missing_file_and_empty_and_all_rejected(tmp_path: Path):
    with pytest.raises(InputError, match="file not found: .*nope.jsonl"):
        data.load_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="empty dataset"):
        data.check_rejects(0, [], 0, 0.5, "x.jsonl")
    loaded = data.parse_bytes(json.dumps({"dataset_name": "a"}).encode(), "x.jsonl")
    valid, rejects = data.validate(loaded)
    with pytest.raises(InputError, match=r"all 1 records were rejected \(missing_id_in_dataset: 1\)"):
        data.check_rejects(1, rejects, len(valid), 0.5, "x.jsonl")
    with pytest.raises(InputError, match="max_reject_fraction"):
        data.check_rejects(10, rejects * 6, 4, 0.5, "x.jsonl")
    data.check_rejects(10, rejects * 5, 5, 0.5, "x.jsonl")  # exactly at the limit passes


# -- subsets and splits --------------------------------------------------------------------------------
def test_split_is_deterministic_stable_and_near_the_fraction():
    recs = [{"dataset_name": "d", "id_in_dataset": i, "uid": f"d:{i}"} for i in range(5000)]
    train, evals = data.split_records(recs, 0.1, seed=42)
    assert 400 < len(evals) < 600 and len(train) + len(evals) == 5000
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    _, evals2 = data.split_records(shuffled, 0.1, seed=42)
    assert {r["uid"] for r in evals2} == {r["uid"] for r in evals}  # order does not matter
    more = recs + [{"dataset_name": "d", "id_in_dataset": i, "uid": f"d:{i}"} for i in range(5000, 6000)]
    _, evals3 = data.split_records(more, 0.1, seed=42)
    assert {r["uid"] for r in evals3 if r["id_in_dataset"] < 5000} == {r["uid"] for r in evals}
    _, other_seed = data.split_records(recs, 0.1, seed=7)
    assert {r["uid"] for r in other_seed} != {r["uid"] for r in evals}


def test_split_keeps_one_eval_and_one_train_record():
    for n in (2, 3, 5):
        recs = [{"dataset_name": "d", "id_in_dataset": i} for i in range(n)]
        for frac in (0.01, 0.99):
            train, evals = data.split_records(recs, frac, seed=1)
            assert len(evals) >= 1 and len(train) >= 1


def test_limit_is_a_deterministic_subset_independent_of_order_and_split():
    recs = [{"dataset_name": "d", "id_in_dataset": i} for i in range(1000)]
    a = data.take_limit(recs, 200, seed=42)
    b = data.take_limit(list(reversed(recs)), 200, seed=42)
    assert len(a) == 200 and {r["id_in_dataset"] for r in a} == {r["id_in_dataset"] for r in b}
    _, evals = data.split_records(a, 0.1, seed=42)
    assert 5 < len(evals) < 40  # the subset is not biased towards the eval side


# -- decontamination -------------------------------------------------------------------------------------
BENCH_Q = ("A 45-year-old man presents with crushing substernal chest pain radiating to the left arm "
           "for two hours. ECG shows ST elevation in leads II, III and aVF. Which artery is most likely occluded?")


def test_decontamination_catches_exact_and_near_duplicates_keeps_unrelated():
    index = data.build_benchmark_index({"medqa": [BENCH_Q, "Unrelated other question about the kidney?"]}, n=8)
    exact = {"uid": "a:1", "question": BENCH_Q.upper().replace(",", "")}
    near = {"uid": "a:2", "question": BENCH_Q.replace("two hours", "three hours").replace("most likely", "probably")}
    inside = {"uid": "a:3", "question": "ECG shows ST elevation in leads II, III and aVF. Which artery is most likely occluded?"}
    unrelated = {"uid": "a:4", "question": "A 3-year-old girl has a barking cough and inspiratory stridor. "
                                           "What is the most likely diagnosis of this common childhood illness?"}
    kept, dropped = data.decontaminate([exact, near, inside, unrelated], index, threshold=0.5)
    assert [r["uid"] for r in kept] == ["a:4"]
    assert {d["uid"]: d["match"] for d in dropped} == {"a:1": "exact", "a:2": "ngram", "a:3": "ngram"}
    assert all(d["benchmark"] == "medqa" for d in dropped)


def test_decontamination_against_real_benchmark_files(shared_data: Path):
    path = str(shared_data / "eval" / "medqa_test_4opt.jsonl")
    questions = benchmark_questions(path)
    assert len(questions) == 1273
    index = data.build_benchmark_index({"medqa": questions}, n=8)
    copied = {"uid": "x:1", "question": questions[17].lower()}
    kept, dropped = data.decontaminate([copied, {"uid": "x:2", "question": "What is the capital of France?"}],
                                       index, 0.5)
    assert [d["uid"] for d in dropped] == ["x:1"] and [r["uid"] for r in kept] == ["x:2"]


def test_decontamination_is_fast_at_full_dataset_scale():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(20000)]
    bench = [" ".join(rng.choices(vocab, k=rng.randint(60, 250))) for _ in range(5000)]
    train = [{"uid": f"t:{i}", "question": " ".join(rng.choices(vocab, k=rng.randint(60, 250)))} for i in range(32000)]
    train[5]["question"] = bench[9]
    # CPU time, not wall time: CI machines are shared. ~3 s of CPU on one idle core here.
    started = time.process_time()
    index = data.build_benchmark_index({"b": bench}, n=8)
    kept, dropped = data.decontaminate(train, index, 0.5)
    cpu_s = time.process_time() - started
    assert [d["uid"] for d in dropped] == ["t:5"] and len(kept) == 31999
    assert cpu_s < 20, f"decontamination took {cpu_s:.1f} s of CPU"


# -- tokenization -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from helpers import make_tokenizer

    return make_tokenizer()


def _prepared(n: int = 6):
    recs = make_records(n)
    for r in recs:
        r["uid"] = data.uid_of(r)
    data.add_letters(recs)
    return recs


def test_tokenized_record_is_prompt_plus_response_plus_eos(tok):
    recs = _prepared(3)
    settings = data.TokenizeSettings("medreason", 2048, "truncate", False)
    enc = data.encode_records(recs, tok, settings)
    for rec, e in zip(recs, enc, strict=True):
        p_ids = tok(data.format_prompt(rec, "medreason"))["input_ids"]
        r_ids = tok(data.format_response(rec, "medreason"), add_special_tokens=False)["input_ids"]
        assert e.ids.tolist() == p_ids + r_ids + [tok.eos_token_id]
        assert e.prompt_len == len(p_ids) and e.status == "ok"
        assert e.response.endswith(f"\nThe answer is {rec['answer_letter']}.")
    on_prompt = data.encode_records(recs, tok, data.TokenizeSettings("medreason", 2048, "truncate", True))
    assert all(e.prompt_len == 0 for e in on_prompt)


def test_overlong_policies(tok):
    rec = _prepared(1)[0]
    rec["reasoning"] = " ".join(["the findings point to an infection"] * 80)
    full = data.encode_records([rec], tok, data.TokenizeSettings("seed", 4096, "truncate", False))[0]
    skeleton = tok(data.format_response({**rec, "reasoning": "..."}, "seed"), add_special_tokens=False)["input_ids"]
    limit = full.prompt_len + len(skeleton) + 1 + 30  # room for ~30 reasoning tokens
    assert full.ids.size > limit + 100
    cut = data.encode_records([rec], tok, data.TokenizeSettings("seed", limit, "truncate", False))[0]
    assert cut.status == "truncated" and cut.ids.size <= limit
    assert cut.ids[-1] == tok.eos_token_id
    assert cut.ids[: cut.prompt_len].tolist() == full.ids[: full.prompt_len].tolist()  # prompt intact
    assert cut.response.endswith(f"{rec['answer']}\nThe answer is {rec['answer_letter']}.")
    assert data.TRUNCATION_MARK in cut.response
    dropped = data.encode_records([rec], tok, data.TokenizeSettings("seed", limit, "drop", False))[0]
    assert dropped.status == "overlong" and dropped.n_tokens_full == full.ids.size
    tiny = data.encode_records([rec], tok, data.TokenizeSettings("seed", limit - 40, "truncate", False))[0]
    assert tiny.status == "overlong_prompt"


def test_parallel_tokenization_equals_in_process(tmp_path: Path, tok):
    tok.save_pretrained(tmp_path)
    recs = _prepared(200)
    settings = data.TokenizeSettings("medreason", 512, "truncate", False)
    serial = data.tokenize_split(recs, settings, tokenizer=tok, num_proc=1, chunk_size=16)
    parallel = data.tokenize_split(recs, settings, tokenizer_dir=str(tmp_path), num_proc=2, chunk_size=16)
    assert [e.uid for e in parallel] == [r["uid"] for r in recs]
    assert all(np.array_equal(a.ids, b.ids) and a.prompt_len == b.prompt_len
               for a, b in zip(serial, parallel, strict=True))


def test_length_percentiles():
    pct = data.length_percentiles(list(range(1, 101)))
    assert pct["max"] == 100 and pct["p50"] == 50.5 and pct["p99"] == 99.0
    assert data.length_percentiles([])["max"] == 0
