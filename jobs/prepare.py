"""`medreason prepare`: stage the base model, then turn MedReason records into tokenized splits."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from typing import Any

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, make_context

log = logging.getLogger("medreason.prepare")
STAGE = "prepare"


@click.command(
    "prepare",
    help=f"""Stage the base model and prepare the data of a run.

\b
Steps: stage the base model into <store>/cache/models/ (once, reused by every run)
-> load data.source -> validate (rejects.jsonl) -> recover answer letters -> take
data.limit records -> split train/eval by a stable hash -> drop training questions that
appear in the benchmarks (data.decontaminate + eval.benchmarks) -> format with
data.template -> tokenize -> write runs/<run>/prepare/ and commit it.
\b
Outputs: train.jsonl, eval.jsonl, train.tokens.safetensors, eval.tokens.safetensors,
rejects.jsonl, stats.json, MANIFEST.json. Running it again with the same config does
nothing; a different config needs --force (or a new --run).
{COMMON_HELP}""",
)
@common_options
@exit_codes
def prepare(preset: str | None, config_file: str | None, overrides: tuple[str, ...], store: str,
            run_id: str | None, force: bool, verbose: bool) -> None:
    from medreason import data, staging
    from medreason.errors import InputError
    from medreason.store import build_manifest, check_stage, manifest_hash
    from medreason.tokens import TokenizedSplit, save_split

    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    cfg, store_, run = ctx.config, ctx.store, ctx.run_id
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = now - clock
        clock = now

    # 1. the base model, staged once into the store's cache
    model_manifest = staging.stage_model(store_, cfg.model)
    inputs = {"model": manifest_hash(model_manifest)}
    lap("stage_model")
    rel = store_.stage_rel(run, STAGE)
    done = check_stage(store_, run, STAGE, cfg.stage_hash(STAGE), inputs, force)
    if done is not None:
        log.info("prepare of run %s is already committed at %s (%s train / %s eval records); "
                 "nothing to do (--force redoes it)", run, store_.display(rel),
                 done.get("metrics", {}).get("n_train"), done.get("metrics", {}).get("n_eval"))
        return
    model_dir = staging.local_model_dir(store_, cfg.model)
    tokenizer = staging.load_tokenizer(model_dir, cfg.model)

    # 2. records: load, validate, answer letters
    loaded = data.load_source(cfg.data.source, store_, cfg.data.hub_file, cfg.data.hub_revision)
    n_loaded = len(loaded.rows) + len(loaded.rejects)
    valid, rejects = data.validate(loaded)
    data.check_rejects(n_loaded, rejects, len(valid), cfg.data.max_reject_fraction, cfg.data.source)
    log.info("loaded %d records from %s: %d valid, %d rejected", n_loaded, cfg.data.source,
             len(valid), len(rejects))
    unknown_letters = data.add_letters(valid)
    if unknown_letters:
        log.info("answer letter unknown for %d records (%s)", sum(unknown_letters.values()),
                 ", ".join(f"{k}: {v}" for k, v in unknown_letters.most_common()))
    lap("load_validate")

    # 3. subset, split, decontaminate
    records = data.take_limit(valid, cfg.data.limit, cfg.data.split_seed)
    train, evals = data.split_records(records, cfg.data.eval_fraction, cfg.data.split_seed)
    benchmarks = _benchmark_questions(cfg)
    dropped: list[dict[str, Any]] = []
    if benchmarks:
        index = data.build_benchmark_index(benchmarks, cfg.data.decontam_ngram)
        train, dropped = data.decontaminate(train, index, cfg.data.decontam_threshold)
        log.info("decontamination against %s: dropped %d of %d training records",
                 ", ".join(f"{k} ({v} questions)" for k, v in index.sizes.items()), len(dropped),
                 len(train) + len(dropped))
    log.info("split: %d train, %d eval (eval_fraction %.2f, seed %d)", len(train), len(evals),
             cfg.data.eval_fraction, cfg.data.split_seed)
    lap("split_decontaminate")

    # 4. format + tokenize
    settings = data.TokenizeSettings(cfg.data.template, cfg.data.max_len_tokens, cfg.data.overlong_policy,
                                     cfg.data.train_on_prompt)
    num_proc = data.resolve_num_proc(cfg.data.num_proc)
    splits: dict[str, tuple[list[dict[str, Any]], TokenizedSplit]] = {}
    truncated: list[str] = []
    for name, part in (("train", train), ("eval", evals)):
        encoded = data.tokenize_split(part, settings, tokenizer=tokenizer, tokenizer_dir=model_dir,
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
                rejects.append({"uid": enc.uid, "split": name, "reason": enc.status,
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
    data.check_rejects(n_loaded, rejects, n_train + n_eval, cfg.data.max_reject_fraction, cfg.data.source)
    lap("tokenize")

    # 5. write and commit
    stats = {
        "source": cfg.data.source,
        "n_loaded": n_loaded,
        "n_valid": len(valid),
        "n_selected": len(records),
        "per_dataset": _per_dataset(loaded, records, splits),
        "rejects": dict(Counter(r["reason"] for r in rejects).most_common()),
        "letters_unknown": dict(unknown_letters.most_common()),
        "n_letters_unknown": sum(unknown_letters.values()),
        "n_truncated": len(truncated),
        "truncated_uids": truncated,
        "decontamination": {
            "benchmarks": {k: len(v) for k, v in benchmarks.items()},
            "ngram": cfg.data.decontam_ngram,
            "threshold": cfg.data.decontam_threshold,
            "n_dropped": len(dropped),
            "by_benchmark": dict(Counter(d["benchmark"] for d in dropped)),
            "dropped": dropped,
        },
        "tokens": {name: data.length_percentiles(split.lengths) for name, (_, split) in splits.items()},
        "template": cfg.data.template,
        "tokenizer": {"eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
                      "pad_token": tokenizer.pad_token, "vocab_size": len(tokenizer)},
    }
    with store_.staged_folder() as out:
        for name, (rows, split) in splits.items():
            data.write_jsonl(os.path.join(out, f"{name}.jsonl"), rows)
            save_split(split, os.path.join(out, f"{name}.tokens.safetensors"))
        data.write_jsonl(os.path.join(out, "rejects.jsonl"), rejects)
        with open(os.path.join(out, "stats.json"), "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2, ensure_ascii=False)
        lap("write")
        metrics = {
            "n_train": n_train,
            "n_eval": n_eval,
            "n_rejected": len(rejects),
            "n_decontaminated": len(dropped),
            "n_truncated": len(truncated),
            "n_letters_unknown": stats["n_letters_unknown"],
        }
        for name, pct in stats["tokens"].items():
            metrics.update({f"{name}_tokens_{k}": v for k, v in pct.items()})
        manifest = build_manifest(
            stage=STAGE, run_id=run, config=cfg, config_hash=cfg.stage_hash(STAGE), inputs=inputs,
            timings_s=timings, metrics=metrics,
            extra={"decontaminated_uids": [d["uid"] for d in dropped],
                   "model_staged_at": staging.staged_model_rel(cfg.model, store_)},
        )
        store_.commit_dir(out, rel, manifest)
    log.info("prepare of run %s committed at %s: %d train / %d eval records, %d rejected, "
             "%d decontaminated, train tokens p50 %s max %s", run, store_.display(rel), n_train, n_eval,
             len(rejects), len(dropped), metrics.get("train_tokens_p50"), metrics.get("train_tokens_max"))


def _benchmark_questions(cfg: Any) -> dict[str, list[str]]:
    """Questions to keep out of training: data.decontaminate files and every eval benchmark."""
    from medreason import data

    out: dict[str, list[str]] = {}
    for path in cfg.data.decontaminate:
        out[os.path.basename(path.rstrip("/")) or path] = data.benchmark_questions(path)
    for bench in cfg.eval.benchmarks:
        out[bench.name] = data.benchmark_questions(bench.path, bench.fields.get("question", "question"))
    return out


def _per_dataset(loaded: Any, records: list[dict[str, Any]],
                 splits: dict[str, tuple[list[dict[str, Any]], Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = {}
    for _where, row in loaded.rows:
        name = str(row.get("dataset_name")) if isinstance(row, dict) else "?"
        counts.setdefault(name, Counter())["loaded"] += 1
    for record in records:
        counts.setdefault(record["dataset_name"], Counter())["selected"] += 1
    for split, (rows, _) in splits.items():
        for row in rows:
            counts.setdefault(row["dataset_name"], Counter())[split] += 1
    return {k: dict(v) for k, v in sorted(counts.items())}


if __name__ == "__main__":
    prepare()
