"""Where a decode step's time goes: per-step cost of each batch the evaluate job plans for the
MedQA file, and a kernel profile of one batch's steps.

Same model (a staged Phi-2-shaped checkpoint, bf16, the job's fused activation), same prompts
and batch plan as `medreason evaluate --config bench/eval_medqa.yaml`, the default decode
(CUDA graphs, ``--attention``). For every planned batch the decode loop runs twice, with
``--short`` and ``--long`` new tokens, after a warm-up: the difference over the extra steps is
the time of one decode step, the prefill and captures cancelling out. Then ``--profile-steps``
steps of batch ``--profile-batch`` run under torch.profiler and medreason/profiling.py writes
the kernel table to ``--out``/profile-decode/profile.txt.

    python3 bench/decode_profile.py --store /tmp/bench-store --bench .carry/medqa_test_4opt.jsonl
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
    ap.add_argument("--config", default="bench/eval_medqa.yaml", help="the eval settings (batching)")
    ap.add_argument("--attention", default=None, help="eval.decode_attention (default: the config's)")
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=80)
    ap.add_argument("--profile-batch", type=int, default=4, help="1-based index in the plan")
    ap.add_argument("--profile-steps", type=int, default=24)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    # Each measured call allocates its own KV cache (up to 100 GiB): without expandable segments
    # the freed caches fragment the allocator and the next prefill runs out of memory.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import gc

    import torch

    from medreason.benchmarks import load_benchmark
    from medreason.config import BenchmarkConfig, build_config
    from medreason.evaluation.decoding import greedy_static
    from medreason.evaluation.generation import (
        _eos_ids,
        _left_padded,
        build_prompt,
        encode_prompt,
        plan_generation_batches,
    )
    from medreason.loading import fuse_activations, load_causal_lm, load_tokenizer
    from medreason.profiling import write_profile
    from medreason.staging import local_model_dir
    from medreason.store import ArtifactStore

    cfg = build_config(preset="phi2-bf16", config_file=args.config)
    ecfg = cfg.eval
    attention = args.attention or ecfg.decode_attention
    store = ArtifactStore(args.store)
    model_dir = local_model_dir(store, cfg.model)
    tok = load_tokenizer(model_dir, for_generation=True)
    model = load_causal_lm(model_dir, cfg.model, torch.device("cuda"))
    if ecfg.fused_activation:
        fuse_activations(model)
    records = load_benchmark(BenchmarkConfig(name="medqa", path=args.bench))
    prompts = [encode_prompt(tok, build_prompt(r, cfg.data.template, tok), cfg.data.template) for r in records]
    plan = plan_generation_batches([len(p) for p in prompts], ecfg.max_new_tokens, ecfg.batch_size,
                                   ecfg.max_batch_tokens, ecfg.cache_bucket_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = _eos_ids(model, tok)

    def decode(ids, mask, cache_len, steps):  # noqa: ANN001, ANN202
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        greedy_static(model, ids, mask, steps, cache_len, pad, eos, attention=attention)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    rows = []
    for k, (batch, cache_len) in enumerate(plan, start=1):
        ids, mask = _left_padded(prompts, batch, pad)
        first_s = decode(ids, mask, cache_len, args.short)  # warm-up: kernels, allocator
        prefill_s = decode(ids, mask, cache_len, 1)  # the prefill alone (no decode step)
        short_s, long_s = decode(ids, mask, cache_len, args.short), decode(ids, mask, cache_len, args.long)
        step_ms = 1e3 * (long_s - short_s) / (args.long - args.short)
        in_use = int(mask.sum()) + len(batch) * (args.short + args.long) // 2
        rows.append({"batch": k, "rows": len(batch), "width": ids.shape[1], "cache_len": cache_len,
                     "step_ms": round(step_ms, 3), "prefill_s": round(prefill_s, 3),
                     "first_call_s": round(first_s, 3), "prefill_and_short_s": round(short_s, 3),
                     "kv_GBps_in_use": round(in_use * 327680 / (step_ms / 1e3) / 1e9)})
        print(json.dumps(rows[-1]), flush=True)
    total = sum(r["step_ms"] for r in rows) * ecfg.max_new_tokens / 1e3
    prefills = sum(r["prefill_s"] for r in rows)
    print(json.dumps({"decode_steps_s_for_the_file": round(total, 1), "prefills_s": round(prefills, 2)}), flush=True)

    batch, cache_len = plan[args.profile_batch - 1]
    ids, mask = _left_padded(prompts, batch, pad)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode(ids, mask, cache_len, args.profile_steps)
    path = write_profile(prof, os.path.join(args.out, "profile-decode"))
    with open(os.path.join(args.out, "decode_profile.json"), "w") as fh:
        json.dump({"attention": attention, "batches": rows, "decode_steps_s": total, "prefills_s": prefills}, fh, indent=1)
    print(open(path).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
