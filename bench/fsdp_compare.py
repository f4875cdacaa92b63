"""Tokens/s of training runs side by side, from their committed or in-progress metrics.jsonl.

    python3 bench/fsdp_compare.py --store /tmp/fsdp-store --warmup 6 single=fsdp-single fsdp=fsdp-fsdp

Each NAME=RUN reads runs/RUN/train/metrics.jsonl (or, before the stage commits, the newest
checkpoint's copy) and reports the median real tokens/s of the steps after --warmup, as
bench/train_throughput.py does. Exit 1 when a run has no timed steps.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from train_throughput import summarize


def read_rows(store: str, run: str) -> list[dict]:
    base = os.path.join(store, "runs", run, "train")
    candidates = [os.path.join(base, "metrics.jsonl")]
    candidates += sorted(glob.glob(os.path.join(base, "checkpoints", "step-*", "metrics.jsonl")),
                         key=lambda p: int(p.split("step-")[-1].split(os.sep)[0]), reverse=True)
    for path in candidates:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a local store folder")
    ap.add_argument("--warmup", type=int, default=6, help="steps left out of the median")
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN")
    args = ap.parse_args()
    ok, results = True, {}
    print(f"{'run':<10} {'tokens/s':>10} {'steps timed':>12} {'peak GiB':>9}")
    for spec in args.runs:
        name, _, run = spec.partition("=")
        s = summarize(read_rows(args.store, run or name), args.warmup)
        results[name] = s["tokens_per_s"]
        ok = ok and s["tokens_per_s"] is not None
        tps = f"{s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "-"
        print(f"{name:<10} {tps:>10} {s['steps_timed']:>12} {s['peak_mem_gib'] or 0:>9.1f}")
    values = list(results.values())
    if len(values) == 2 and all(values):
        print(f"ratio {list(results)[1]}/{list(results)[0]}: {values[1] / values[0]:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
