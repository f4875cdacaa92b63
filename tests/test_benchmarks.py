"""Benchmark loading: real public files (when ../shared is there), formats, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medreason.benchmarks import load_benchmark
from medreason.config import BenchmarkConfig
from medreason.errors import InputError
from medreason.records import parse_options, recover_letter


def _bench(path: Path | str, fmt: str = "mcq", **kw) -> BenchmarkConfig:
    return BenchmarkConfig(name=kw.pop("name", "b"), path=str(path), format=fmt, **kw)


@pytest.mark.parametrize(
    ("fname", "fmt", "count", "known"),
    [
        # known: (row index, id, gold letter), read off the files' answer_idx
        ("medqa_test_4opt.jsonl", "mcq", 1273, [(0, "0", "B"), (1, "1", "D"), (2, "2", "B"), (1272, None, "C")]),
        ("medmcqa_dev.jsonl", "mcq", 2816,
         [(0, "b64a9cd7-d076-4c55-8be1-f9c44fece6cc", "C"), (1, "17360c6c-2c98-4fe2-aa85-487dcf4678df", "A")]),
        ("pubmedqa_test.jsonl", "pubmedqa", 500, [(0, "12377809", "A"), (2, None, "A"), (499, None, "C")]),
    ],
)
def test_shared_eval_files(shared_data: Path, fname: str, fmt: str, count: int, known: list) -> None:
    path = shared_data / "eval" / fname
    records = load_benchmark(_bench(path, fmt, name=fname.split("_")[0]))
    assert len(records) == count
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    for idx, rid, letter in known:
        assert records[idx]["answer_letter"] == letter == raw[idx]["answer_idx"]
        if rid is not None:
            assert records[idx]["id_in_dataset"] == rid
    # Every record: gold among its options, the options string parses back to the same map.
    for rec, row in zip(records, raw, strict=True):
        assert rec["answer_letter"] == row["answer_idx"]
        assert parse_options(rec["options"]) == rec["options_map"]
    if fmt == "pubmedqa":
        assert records[0]["options_map"] == {"A": "yes", "B": "no", "C": "maybe"}


def test_medreason_rows(shared_data: Path) -> None:
    records = load_benchmark(_bench(shared_data / "medreason_real_10.json", "medreason"))
    assert [r["answer_letter"] for r in records] == ["C", "A", "B", "D", "A", "B", "A", "C", "A", "D"]
    assert records[0]["uid"] == "medmcqa:7131" and records[0]["dataset_name"] == "medmcqa"


def test_fields_mapping_ten_options_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "custom.jsonl"
    rows = [{"qid": f"q{i}", "stem": f"Question {i}?", "choices": [f"choice {j}" for j in range(10)],
             "label": "ABCDEFGHIJ"[i]} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_benchmark(_bench(path, fields={"question": "stem", "options": "choices",
                                                  "answer_idx": "label", "id": "qid"}, limit=7))
    assert len(records) == 7
    assert [r["answer_letter"] for r in records] == list("ABCDEFG")
    assert records[3]["uid"] == "b:q3" and len(records[3]["options_map"]) == 10
    assert records[0]["options"].startswith("Answer Choices:\nA. choice 0\nB. choice 1")


def test_parquet_and_json_and_integer_index(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "Q?", "options": json.dumps({"A": "x", "B": "y"}), "answer_idx": 1}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    assert load_benchmark(_bench(tmp_path / "b.parquet"))[0]["answer_letter"] == "B"
    (tmp_path / "p.json").write_text(json.dumps({"123": {"QUESTION": "Is it?", "CONTEXTS": ["ctx"],
                                                         "final_decision": "maybe"}}))
    rec = load_benchmark(_bench(tmp_path / "p.json", "pubmedqa"))[0]
    assert rec["answer_letter"] == "C" and rec["id_in_dataset"] == "123" and rec["question"].startswith("ctx\n")


def test_s3_benchmark(tmp_path: Path, s3_bucket: str) -> None:
    from medreason.store import ArtifactStore

    store = ArtifactStore(s3_bucket)
    store.write_bytes("bench/q.jsonl", json.dumps(
        {"question": "Q?", "options": {"A": "x", "B": "y", "C": "z"}, "answer_idx": "C"}).encode() + b"\n")
    records = load_benchmark(_bench(f"{s3_bucket}/bench/q.jsonl"))
    assert records[0]["answer_letter"] == "C"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "Q?", "answer_idx": "A"}, "no options"),
        ({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}, "'E' is not one of the option letters A, B"),
        ({"question": "Q?", "options": {"A": "x"}, "answer_idx": "A"}, "1 options"),
        ({"question": "Q?", "options": {"A": "x", "C": "y"}, "answer_idx": "A"}, "must be A.. in order"),
        ({"options": {"A": "x", "B": "y"}, "answer_idx": "A"}, "no question text"),
    ],
)
def test_bad_rows(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok", "options": {"A": "x", "B": "y"}, "answer_idx": "A"})
                    + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match="row 2") as info:
        load_benchmark(_bench(path))
    assert message in str(info.value)


BAD_ROWS = [
    # (row, the reason it is counted under with bad_rows: skip)
    ({"question": "Q?", "answer_idx": "A"}, "no options"),
    ({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}, "answer not among the options"),
    ({"question": "Q?", "options": ["x", "y"], "answer_idx": 5}, "answer not among the options"),
    ({"question": "Q?", "options": {"A": "x"}, "answer_idx": "A"}, "fewer than 2 or more than 26 options"),
    ({"question": "Q?", "options": {"A": "x", "C": "y"}, "answer_idx": "A"}, "option letters not A.. in order"),
    ({"question": "  ", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}, "empty question"),
    ({"question": "Q?", "options": {"A": "x", "B": "y"}}, "no gold answer"),
]


def test_bad_rows_fail_or_skip(tmp_path: Path) -> None:
    """bad_rows: fail stops at the first bad row; skip scores the good rows and counts each bad
    one with its reason."""
    from medreason.benchmarks import read_benchmark

    good = {"question": "ok", "options": {"A": "x", "B": "y", "C": "z"}, "answer_idx": "C"}
    lines = [dict(good, id="g1")] + [dict(row, id=f"bad{i}") for i, (row, _) in enumerate(BAD_ROWS)]
    lines.append(dict(good, id="g2", answer_idx="B"))
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(InputError, match="row 2: no options"):
        load_benchmark(_bench(path))
    loaded = read_benchmark(_bench(path, bad_rows="skip"))
    assert [(r["id_in_dataset"], r["answer_letter"]) for r in loaded.records] == [("g1", "C"), ("g2", "B")]
    assert [(s["row"], s["id"], s["reason"]) for s in loaded.skipped] == [
        (i + 2, f"bad{i}", reason) for i, (_, reason) in enumerate(BAD_ROWS)]
    summary = loaded.skipped_summary()
    assert summary["skipped"] == len(BAD_ROWS)
    assert summary["by_reason"]["answer not among the options"] == 2
    assert "'E' is not one of the option letters A, B" in loaded.skipped[1]["detail"]
    # Nothing usable left: still an error, saying why.
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text(json.dumps(BAD_ROWS[0][0]) + "\n")
    with pytest.raises(InputError, match="no usable rows"):
        read_benchmark(_bench(only_bad, bad_rows="skip"))


def test_missing_file_and_offline_hub(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_benchmark(_bench(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="could not download"):
        load_benchmark(_bench("hub:someone/some-bench/test.jsonl"))


def test_recover_letter() -> None:
    opts = {"A": "Radial nerve", "B": "Axillary nerve", "C": "yes"}
    assert recover_letter("(B) Axillary nerve", opts) == "B"
    assert recover_letter("Axillary nerve. Explanation: winds around", opts) == "B"
    assert recover_letter("The final decision is: yes. Because", opts) == "C"
    assert recover_letter("Something else", opts) == ""
