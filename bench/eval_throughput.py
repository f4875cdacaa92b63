"""Generation throughput: the evaluate job's batched path vs naive one-prompt-at-a-time generate.

Same model (a staged Phi-2-shaped checkpoint, bf16), same MedQA prompts (formatted with the run's
template exactly as `medreason evaluate` formats them), greedy, one process:

    python3 bench/eval_throughput.py --store /tmp/store --bench .carry/medqa_test_4opt.jsonl

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
    ap.add_argument("--store", required=True)
    ap.add_argument("--bench", required=True, help="MedQA-style jsonl")
    ap.add_argument("--prompts", type=int, default=256, help="prompts for the batched path")
    ap.add_argument("--naive-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="eval.max_batch_tokens for the job path")
    ap.add_argument("--cache-bucket-tokens", type=int, default=None,
                    help="eval.cache_bucket_tokens for the job path (default: the config's)")
    ap.add_argument("--compile", choices=["none", "full"], default=None,
                    help="eval.compile for the job path (default: the config's)")
    ap.add_argument("--skip-dynamic", action="store_true", help="leave out the batched dynamic-cache run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

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
    # Naive: one prompt per generate call, dynamic cache, eager (what a loop over questions does).
    os.environ["MEDREASON_STATIC_CACHE"] = "0"
    _, naive_s = timed(lambda: generate_texts(model, tok, prompts[:n], new, 1))
    results["naive"] = {"prompts": n, "seconds": naive_s, "tokens_per_s": n * new / naive_s}
    print(json.dumps(results["naive"]), flush=True)
    m = args.prompts
    dyn_s = None
    if not args.skip_dynamic:
        # The job's path with the dynamic cache (eager), for the breakdown.
        _, dyn_s = timed(lambda: generate_texts(model, tok, prompts[:m], new, args.batch_size))
        results["batched_dynamic"] = {"prompts": m, "seconds": dyn_s, "tokens_per_s": m * new / dyn_s}
        print(json.dumps(results["batched_dynamic"]), flush=True)
    # The job's path as the evaluate job runs it on CUDA (static cache sized per batch, decoding
    # as eval.compile says), with the given batching.
    os.environ.pop("MEDREASON_STATIC_CACHE")
    bucket = cfg.eval.cache_bucket_tokens if args.cache_bucket_tokens is None else args.cache_bucket_tokens
    compile_mode = args.compile or cfg.eval.compile
    job = {"max_batch_tokens": args.max_batch_tokens, "cache_bucket_tokens": bucket, "compile_mode": compile_mode}
    results["job_settings"] = {"batch_size": args.batch_size, **job}
    _, first_s = timed(lambda: generate_texts(model, tok, prompts[:m], new, args.batch_size, **job))
    _, static_s = timed(lambda: generate_texts(model, tok, prompts[:m], new, args.batch_size, **job))
    results["batched_static"] = {"prompts": m, "seconds_first_call": first_s, "seconds": static_s,
                                 "tokens_per_s": m * new / static_s}
    print(json.dumps(results["batched_static"]), flush=True)
    results["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    with open(os.path.join(args.out, "eval_results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print("| path | prompts | new tokens each | seconds | generated tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| naive (batch 1, dynamic cache) | {n} | {new} | {naive_s:.1f} | {n * new / naive_s:,.0f} |")
    if dyn_s:
        print(f"| batched {args.batch_size}, dynamic cache | {m} | {new} | {dyn_s:.1f} | {m * new / dyn_s:,.0f} |")
    decode = "compiled" if compile_mode == "full" else "eager"
    print(f"| job path: batched {args.batch_size}, static cache per batch ({bucket}), {decode} | {m} | {new} | "
          f"{static_s:.1f} (first call {first_s:.1f}) | {m * new / static_s:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
