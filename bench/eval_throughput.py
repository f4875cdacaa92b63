"""Generation throughput: the evaluate job's decode paths side by side, and naive generate.

Same model (a staged Phi-2-shaped checkpoint, bf16), same MedQA prompts (formatted with the run's
template exactly as `medreason evaluate` formats them), greedy, one process:

    python3 bench/eval_throughput.py --store /tmp/store --bench .carry/medqa_test_4opt.jsonl \
        --paths none graphs

Each path in ``--paths`` is an ``eval.compile`` value run twice (the first call pays for
captures or compilation); the tokens of every path are compared with the first path's. The
bandwidth limit of the whole file (weights + KV cache bytes per decode step, at the read
bandwidth measured here) is printed for the job's batching, for the positions in use and for
the positions each step reads.

Random weights never emit EOS, so every row generates max_new_tokens: the worst case, and the
count of generated tokens is exact. The evaluate job itself on the whole file is timed by
running its entrypoint (see bench/RESULTS.md for the command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store")
    ap.add_argument("--bench", required=True, help="MedQA-style jsonl")
    ap.add_argument("--prompts", type=int, default=256, help="prompts for the batched path")
    ap.add_argument("--naive-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="eval.max_batch_tokens for the job path")
    ap.add_argument("--cache-bucket-tokens", type=int, default=None,
                    help="eval.cache_bucket_tokens for the job path (default: the config's)")
    ap.add_argument("--paths", nargs="+", default=["none", "graphs"],
                    help="eval.compile values to run on the job path, the first being the baseline; "
                    "graphs:sdpa / graphs:triton picks eval.decode_attention; graphs:sdpa@K1,K2 runs it "
                    "with MEDREASON_DECODE_SDPA=K1,K2 (SDPA's kernels)")
    ap.add_argument("--file-new-tokens", type=int, default=512, help="new tokens for the bandwidth limit")
    ap.add_argument("--file-batch-size", type=int, default=320, help="eval.batch_size for the bandwidth limit")
    ap.add_argument("--file-max-batch-tokens", type=int, default=327680,
                    help="eval.max_batch_tokens for the bandwidth limit (bench/eval_medqa.yaml's)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--traffic-only", action="store_true",
                    help="print the file's bandwidth limit at --read-tbps and stop (no GPU, no store)")
    ap.add_argument("--tokenizer", help="with --traffic-only: the tokenizer folder")
    ap.add_argument("--read-tbps", type=float, default=4.3, help="with --traffic-only: read bandwidth, TB/s")
    args = ap.parse_args()
    if args.traffic_only:
        if not args.tokenizer:
            ap.error("--traffic-only needs --tokenizer")
        return traffic_only(args)
    if not args.store:
        ap.error("--store is required (unless --traffic-only)")
    for path in args.paths:
        mode, _, attention = path.partition("@")[0].partition(":")
        if mode not in ("none", "graphs", "full") or attention not in ("", "triton", "sdpa"):
            ap.error(f"--paths {path!r}: MODE[:ATTENTION][@KERNELS], MODE none|graphs|full, ATTENTION triton|sdpa")

    import torch

    from medreason.benchmarks import load_benchmark
    from medreason.config import BenchmarkConfig, build_config
    from medreason.evaluation.generation import build_prompt, encode_prompt, generate_texts
    from medreason.loading import load_causal_lm, load_tokenizer
    from medreason.staging import local_model_dir
    from medreason.store import ArtifactStore

    cfg = build_config(preset="phi2-bf16")
    store = ArtifactStore(args.store)
    model_dir = local_model_dir(store, cfg.model)
    tok = load_tokenizer(model_dir, for_generation=True)
    model = load_causal_lm(model_dir, cfg.model, torch.device("cuda"))
    records = load_benchmark(BenchmarkConfig(name="medqa", path=args.bench))
    prompts = [encode_prompt(tok, build_prompt(r, cfg.data.template, tok), cfg.data.template) for r in records]
    lens = sorted(len(p) for p in prompts)
    stats = {"prompts": len(prompts), "prompt_tokens_p50": lens[len(lens) // 2], "prompt_tokens_max": lens[-1]}
    print(json.dumps(stats), flush=True)
    results = {"prompt_stats": stats}

    def timed(fn):  # noqa: ANN001, ANN202
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    n = args.naive_prompts
    new = args.max_new_tokens
    if n:
        # Naive: one prompt per generate call, dynamic cache, eager (what a loop over questions does).
        os.environ["MEDREASON_STATIC_CACHE"] = "0"
        _, naive_s = timed(lambda: generate_texts(model, tok, prompts[:n], new, 1))
        results["naive"] = {"prompts": n, "seconds": naive_s, "tokens_per_s": n * new / naive_s}
        print(json.dumps(results["naive"]), flush=True)
        os.environ.pop("MEDREASON_STATIC_CACHE")
    m = args.prompts
    bucket = cfg.eval.cache_bucket_tokens if args.cache_bucket_tokens is None else args.cache_bucket_tokens
    job = {"max_batch_tokens": args.max_batch_tokens, "cache_bucket_tokens": bucket}
    results["job_settings"] = {"batch_size": args.batch_size, **job}
    rows = []
    for path in args.paths:
        spec, _, kernels = path.partition("@")
        mode, _, attention = spec.partition(":")
        os.environ.pop("MEDREASON_DECODE_SDPA", None)
        if kernels:
            os.environ["MEDREASON_DECODE_SDPA"] = kernels
        run = lambda mode=mode, att=attention or cfg.eval.decode_attention: generate_texts(  # noqa: E731
            model, tok, prompts[:m], new, args.batch_size, compile_mode=mode, decode_attention=att, **job)
        texts, first_s = timed(run)
        again, path_s = timed(run)
        same = sum(a == b for a, b in zip(texts, rows[0]["texts"] if rows else texts, strict=True))
        rows.append({"path": path, "texts": texts, "seconds_first_call": first_s, "seconds": path_s,
                     "tokens_per_s": m * new / path_s, "same_text_as_first_path": same,
                     "repeat_identical": texts == again})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "texts"}), flush=True)
    results["paths"] = [{k: v for k, v in r.items() if k != "texts"} for r in rows]
    results["bandwidth"] = bandwidth_limit([len(p) for p in prompts], args, bucket, measured_read_bps(torch))
    print(json.dumps(results["bandwidth"]), flush=True)
    results["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    with open(os.path.join(args.out, "eval_results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print("| path | prompts | new tokens each | seconds (first call) | generated tokens/s | same text as first |")
    print("|---|---|---|---|---|---|")
    if n:
        print(f"| naive (batch 1, dynamic cache) | {n} | {new} | {naive_s:.1f} | {n * new / naive_s:,.0f} | |")
    for r in rows:
        print(f"| eval.compile={r['path']}, batches of {args.batch_size}, cache per batch ({bucket}) | {m} | {new} | "
              f"{r['seconds']:.1f} ({r['seconds_first_call']:.1f}) | {r['tokens_per_s']:,.0f} | "
              f"{r['same_text_as_first_path']}/{m} |")
    return 0


def measured_read_bps(torch) -> float:  # noqa: ANN001
    """Bytes/s of reading an 8 GiB bf16 tensor (a sum), the bound of a step that streams the KV cache."""
    big = torch.empty(2**32, dtype=torch.bfloat16, device="cuda")
    big.sum()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        big.sum()
    torch.cuda.synchronize()
    return 10 * big.numel() * 2 / (time.perf_counter() - t0)


def bandwidth_limit(lengths: list[int], args, bucket: int, read_bps: float) -> dict:  # noqa: ANN001
    """Seconds the whole file's decode needs at ``read_bps``: every step of a batch reads the
    weights once, and each row's KV cache: the positions in use (the limit of any decoder), or
    the positions the default decode reads (its prefix views of the batch's left-padded cache)."""
    from medreason.evaluation.decoding import DEFAULT_BUCKET_TOKENS, bucket_length
    from medreason.evaluation.generation import plan_generation_batches

    new = args.file_new_tokens
    hidden, layers = 2560, 32  # Phi-2: K+V of one position = 2 x layers x hidden x 2 bytes
    per_pos, weights = 2 * layers * hidden * 2, 2.78e9 * 2
    plan = plan_generation_batches(lengths, new, args.file_batch_size, args.file_max_batch_tokens, bucket)
    steps = used = read = 0
    for batch, cache_len in plan:
        width = max(lengths[i] for i in batch)
        steps += new
        used += sum(new * lengths[i] + new * (new - 1) // 2 for i in batch)
        read += sum(len(batch) * bucket_length(width + t, DEFAULT_BUCKET_TOKENS, cache_len) for t in range(new))
    tokens = len(lengths) * new
    in_use_s = (steps * weights + used * per_pos) / read_bps
    as_read_s = (steps * weights + read * per_pos) / read_bps
    return {"read_TBps": read_bps / 1e12, "batches": len(plan), "decode_steps": steps, "tokens": tokens,
            "weights_TB": steps * weights / 1e12, "kv_in_use_TB": used * per_pos / 1e12,
            "kv_as_read_TB": read * per_pos / 1e12, "limit_in_use_s": in_use_s, "limit_as_read_s": as_read_s,
            "limit_in_use_tokens_per_s": tokens / in_use_s, "limit_as_read_tokens_per_s": tokens / as_read_s}


def traffic_only(args) -> int:  # noqa: ANN001
    """The bandwidth limit alone, on any machine: the file tokenized with --tokenizer."""
    from transformers import AutoTokenizer

    from medreason.benchmarks import load_benchmark
    from medreason.config import BenchmarkConfig, build_config
    from medreason.evaluation.generation import build_prompt, encode_prompt

    cfg = build_config(preset="phi2-bf16")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    records = load_benchmark(BenchmarkConfig(name="medqa", path=args.bench))
    lengths = [len(encode_prompt(tok, build_prompt(r, cfg.data.template, tok), cfg.data.template)) for r in records]
    bucket = cfg.eval.cache_bucket_tokens if args.cache_bucket_tokens is None else args.cache_bucket_tokens
    print(json.dumps(bandwidth_limit(lengths, args, bucket, args.read_tbps * 1e12), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
