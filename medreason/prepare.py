"""The prepare stage's logic: MedReason records -> validated, split, decontaminated, formatted and
tokenized files in a folder, plus the stage's headline numbers.

    result = build_prepare(cfg, folder, tokenizer=tok, tokenizer_dir=model_dir, store=store)

writes into ``folder``: train.jsonl, eval.jsonl, train.tokens.safetensors,
eval.tokens.safetensors, rejects.jsonl, stats.json. jobs/prepare.py stages the base model and
commits the folder; bench/prepare_throughput.py times this same function.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from medreason import data, jsonio
from medreason.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    """Headline numbers (the manifest's metrics), timings, stats.json's content and the
    manifest's extras (decontaminated uids, where the data came from)."""

    metrics: dict[str, Any]
    timings_s: dict[str, float]
    stats: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class _Laps:
    """Seconds per step, each from the end of the previous one."""

    def __init__(self) -> None:
        self.timings_s: dict[str, float] = {}
        self._clock = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.timings_s[name] = now - self._clock
        self._clock = now


@dataclass
class _Records:
    """Records through load, validation, letters, subset, split and decontamination."""

    loaded: data.Loaded
    n_loaded: int
    n_valid: int
    rejects: list[dict[str, Any]]
    unknown_letters: Counter[str]
    selected: list[dict[str, Any]]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    benchmarks: dict[str, list[str]]
    dropped: list[dict[str, Any]]


def benchmark_questions(cfg: Any) -> dict[str, list[str]]:
    """Questions to keep out of training: data.decontaminate files and every eval benchmark.

    Each eval benchmark is also loaded the way evaluate loads it (options, gold letter among
    them, up to its limit), so a bad row stops prepare (InputError naming the file and row)
    instead of a later evaluate."""
    from medreason.benchmarks import benchmark_questions as questions_of
    from medreason.benchmarks import load_benchmark, read_rows

    out: dict[str, list[str]] = {}
    for path in cfg.data.decontaminate:
        out[os.path.basename(path.rstrip("/")) or path] = questions_of(path)
    for bench in cfg.eval.benchmarks:
        rows = read_rows(bench.path)
        load_benchmark(bench, rows)
        out[bench.name] = questions_of(bench.path, bench.fields.get("question", "question"), rows)
    return out


def load_records(cfg: Any, store: Any, laps: _Laps) -> _Records:
    """Load data.source, validate, recover letters, take data.limit, split, decontaminate."""
    benchmarks = benchmark_questions(cfg)
    loaded = data.load_source(cfg.data.source, store, cfg.data.hub_file, cfg.data.hub_revision)
    n_loaded = len(loaded.rows) + len(loaded.rejects)
    valid, rejects = data.validate(loaded)
    data.check_rejects(n_loaded, rejects, len(valid), cfg.data.max_reject_fraction, cfg.data.source)
    log.info("loaded %d records from %s: %d valid, %d rejected", n_loaded, cfg.data.source,
             len(valid), len(rejects))
    unknown = data.add_letters(valid)
    if unknown:
        log.info("answer letter unknown for %d records (%s)", sum(unknown.values()),
                 ", ".join(f"{k}: {v}" for k, v in unknown.most_common()))
    laps.lap("load_validate")

    selected = data.take_limit(valid, cfg.data.limit, cfg.data.split_seed)
    train, evals = data.split_records(selected, cfg.data.eval_fraction, cfg.data.split_seed)
    dropped: list[dict[str, Any]] = []
    if benchmarks:
        index = data.build_benchmark_index(benchmarks, cfg.data.decontam_ngram)
        train, dropped = data.decontaminate(train, index, cfg.data.decontam_threshold)
        log.info("decontamination against %s: dropped %d of %d training records",
                 ", ".join(f"{k} ({v} questions)" for k, v in index.sizes.items()), len(dropped),
                 len(train) + len(dropped))
    log.info("split: %d train, %d eval (eval_fraction %.2f, seed %d)", len(train), len(evals),
             cfg.data.eval_fraction, cfg.data.split_seed)
    laps.lap("split_decontaminate")
    return _Records(loaded, n_loaded, len(valid), rejects, unknown, selected, train, evals, benchmarks, dropped)


def tokenize_splits(cfg: Any, recs: _Records, tokenizer: Any, tokenizer_dir: str | None,
                    truncated: list[str]) -> dict[str, tuple[list[dict[str, Any]], Any]]:
    """{split: (formatted rows, TokenizedSplit)}; over-long records go to recs.rejects (or stop
    the stage under data.overlong_policy=error), truncated uids to ``truncated``."""
    from medreason.tokens import TokenizedSplit

    settings = data.TokenizeSettings(cfg.data.template, cfg.data.max_len_tokens, cfg.data.overlong_policy,
                                     cfg.data.train_on_prompt)
    num_proc = data.resolve_num_proc(cfg.data.num_proc)
    splits: dict[str, tuple[list[dict[str, Any]], Any]] = {}
    for name, part in (("train", recs.train), ("eval", recs.evals)):
        encoded = data.tokenize_split(part, settings, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir,
                                      trust_remote_code=cfg.model.trust_remote_code, num_proc=num_proc,
                                      desc=f"tokenize {name}")
        kept_rows, kept_tokens = [], []
        for record, enc in zip(part, encoded, strict=True):
            if enc.status in ("overlong", "overlong_prompt"):
                if cfg.data.overlong_policy == "error":
                    raise InputError(
                        f"record {enc.uid} has {enc.n_tokens_full} tokens > data.max_len_tokens="
                        f"{cfg.data.max_len_tokens} (data.overlong_policy=error); raise the limit or "
                        "set data.overlong_policy=truncate or drop")
                recs.rejects.append({"uid": enc.uid, "split": name, "reason": enc.status,
                                     "detail": f"{enc.n_tokens_full} tokens > max_len_tokens {cfg.data.max_len_tokens}"})
                continue
            if enc.status == "truncated":
                truncated.append(enc.uid)
            kept_rows.append(data.formatted_record(record, enc))
            kept_tokens.append((enc.uid, enc.ids, enc.prompt_len))
        splits[name] = (kept_rows, TokenizedSplit.from_records(kept_tokens))
    n_train, n_eval = len(splits["train"][0]), len(splits["eval"][0])
    if n_train == 0:
        raise InputError("no training records are left after the split, decontamination and "
                         "length checks; use more data or relax data.decontam_threshold / max_len_tokens")
    data.check_rejects(recs.n_loaded, recs.rejects, n_train + n_eval, cfg.data.max_reject_fraction, cfg.data.source)
    return splits


def per_dataset(recs: _Records, splits: dict[str, tuple[list[dict[str, Any]], Any]]) -> dict[str, dict[str, int]]:
    """{dataset_name: {loaded, selected, train, eval}} counts."""
    counts: dict[str, Counter[str]] = {}
    for _where, row in recs.loaded.rows:
        name = str(row.get("dataset_name")) if isinstance(row, dict) else "?"
        counts.setdefault(name, Counter())["loaded"] += 1
    for record in recs.selected:
        counts.setdefault(record["dataset_name"], Counter())["selected"] += 1
    for split, (rows, _) in splits.items():
        for row in rows:
            counts.setdefault(row["dataset_name"], Counter())[split] += 1
    return {k: dict(v) for k, v in sorted(counts.items())}


def build_stats(cfg: Any, recs: _Records, splits: dict[str, tuple[list[dict[str, Any]], Any]],
                truncated: list[str], tokenizer: Any) -> dict[str, Any]:
    """stats.json: counts per step and dataset, rejects by reason, decontamination, token lengths."""
    return {
        "source": cfg.data.source,
        "n_loaded": recs.n_loaded,
        "n_valid": recs.n_valid,
        "n_selected": len(recs.selected),
        "per_dataset": per_dataset(recs, splits),
        "rejects": dict(Counter(r["reason"] for r in recs.rejects).most_common()),
        "letters_unknown": dict(recs.unknown_letters.most_common()),
        "n_letters_unknown": sum(recs.unknown_letters.values()),
        "n_truncated": len(truncated),
        "truncated_uids": truncated,
        "decontamination": {
            "benchmarks": {k: len(v) for k, v in recs.benchmarks.items()},
            "ngram": cfg.data.decontam_ngram,
            "threshold": cfg.data.decontam_threshold,
            "n_dropped": len(recs.dropped),
            "by_benchmark": dict(Counter(d["benchmark"] for d in recs.dropped)),
            "dropped": recs.dropped,
        },
        "tokens": {name: data.length_percentiles(split.lengths) for name, (_, split) in splits.items()},
        "template": cfg.data.template,
        "tokenizer": {"eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
                      "pad_token": tokenizer.pad_token, "vocab_size": len(tokenizer)},
    }


def write_files(folder: str, splits: dict[str, tuple[list[dict[str, Any]], Any]],
                rejects: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    from medreason.tokens import save_split

    for name, (rows, split) in splits.items():
        data.write_jsonl(os.path.join(folder, f"{name}.jsonl"), rows)
        save_split(split, os.path.join(folder, f"{name}.tokens.safetensors"))
    data.write_jsonl(os.path.join(folder, "rejects.jsonl"), rejects)
    with open(os.path.join(folder, "stats.json"), "w", encoding="utf-8") as fh:
        jsonio.dump(stats, fh, sort_keys=False, ensure_ascii=False)


def build_prepare(cfg: Any, folder: str, *, tokenizer: Any, tokenizer_dir: str | None = None,
                  store: Any = None) -> PrepareResult:
    """Build the prepare stage's files into ``folder`` (see the module docstring).

    ``tokenizer`` is the base model's; ``tokenizer_dir`` its folder, which worker processes
    load it from when data.num_proc asks for them; ``store`` resolves a store-relative
    data.source. Bad data is an InputError naming the file, record or setting."""
    laps = _Laps()
    recs = load_records(cfg, store, laps)
    truncated: list[str] = []
    splits = tokenize_splits(cfg, recs, tokenizer, tokenizer_dir, truncated)
    laps.lap("tokenize")
    stats = build_stats(cfg, recs, splits, truncated, tokenizer)
    write_files(folder, splits, recs.rejects, stats)
    laps.lap("write")
    metrics = {
        "n_train": len(splits["train"][0]),
        "n_eval": len(splits["eval"][0]),
        "n_rejected": len(recs.rejects),
        "n_decontaminated": len(recs.dropped),
        "n_truncated": len(truncated),
        "n_letters_unknown": stats["n_letters_unknown"],
    }
    for name, pct in stats["tokens"].items():
        metrics.update({f"{name}_tokens_{k}": v for k, v in pct.items()})
    extra = {"decontaminated_uids": [d["uid"] for d in recs.dropped], "data_source": recs.loaded.provenance}
    return PrepareResult(metrics, laps.timings_s, stats, extra)
