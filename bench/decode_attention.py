"""The attention of one decode step alone: the Triton kernel against PyTorch's SDPA, on a GPU.

Phi-2's shape (32 heads of 80) and the evaluate job's batch (192 rows, a 1,024-position static
cache, left-padded prompts of ~300-500 tokens, mid-way through 512 new tokens), in bf16:

    python3 bench/decode_attention.py --rows 192 --cache 1024

Rows: SDPA with the boolean mask over the decode loop's prefix view (the ``sdpa`` path, under
PyTorch's kernel choice and each kernel forced), then the Triton kernel for each block size, warp
count and split count; the fastest one's launch parameters are printed and written to the json
(bench/device_run.sh hands them to the evaluate runs that follow, as MEDREASON_DECODE_KERNEL). Each is timed over ``--iters`` calls with CUDA events after a warm-up; "GB/s" is the
bytes of keys and values in each row's range (what any kernel must read) over the time. The
output is checked against SDPA's (max |diff|).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _timed(fn, iters: int) -> float:  # noqa: ANN001
    """Median milliseconds of ``fn()`` over ``iters`` calls."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _grid():  # noqa: ANN202
    """The launch parameters tried: positions per iteration, warps, splits, pipeline stages."""
    from medreason.evaluation.decode_attention import LaunchParams

    return [LaunchParams(block=b, warps=w, splits=s, stages=st)
            for b in (16, 32, 64) for w in (1, 2, 4) for s in (1, 2) for st in (1, 3)]


def _spec(params) -> str:  # noqa: ANN001
    """MEDREASON_DECODE_KERNEL's form of ``params``."""
    return f"block={params.block},warps={params.warps},splits={params.splits},stages={params.stages}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--cache", type=int, default=1024, help="static cache positions per row")
    ap.add_argument("--end", type=int, default=768, help="positions written so far (the step attends to them)")
    ap.add_argument("--max-pad", type=int, default=200, help="left padding per row: uniform in [0, max_pad]")
    ap.add_argument("--bucket", type=int, default=128, help="the prefix view's bucket (sdpa reads up to it)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not 0 < args.end <= args.cache or args.max_pad >= args.end:
        ap.error("need 0 <= max_pad < end <= cache")
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from medreason.evaluation.decode_attention import decode_attention

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    rows, heads, dim = args.rows, args.heads, args.head_dim
    q = torch.randn(rows, 1, heads, dim, device=dev, dtype=dt).transpose(1, 2)  # as transformers hands it
    k = torch.randn(rows, heads, args.cache, dim, device=dev, dtype=dt)
    v = torch.randn(rows, heads, args.cache, dim, device=dev, dtype=dt)
    starts = torch.randint(0, args.max_pad + 1, (rows,), device=dev, dtype=torch.int32)
    end = torch.tensor([args.end], device=dev, dtype=torch.int32)
    view = min(args.cache, -(-args.end // args.bucket) * args.bucket)
    index = torch.arange(view, device=dev)
    mask = ((index[None, :] >= starts[:, None]) & (index[None, :] < args.end))[:, None, None, :]
    in_range = int((args.end - starts).sum()) * heads * dim * 2 * 2  # keys + values, bf16
    scale = dim ** -0.5

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k[:, :, :view], v[:, :, :view], attn_mask=mask,
                                              scale=scale).transpose(1, 2)

    ref = sdpa().float()
    results = []

    def record(name: str, fn, **extra) -> None:  # noqa: ANN001, ANN003
        try:
            diff = float((fn().float() - ref).abs().max())
            ms = _timed(fn, args.iters)
        except RuntimeError as exc:
            print(f"{name:<28} failed: {str(exc).splitlines()[0][:100]}")
            return
        row = {"name": name, "ms": round(ms, 4), "gb_s": round(in_range / ms / 1e6, 1), "max_diff": diff, **extra}
        results.append(row)
        print(f"{name:<28} {ms:8.3f} ms  {row['gb_s']:8.1f} GB/s  max|diff| {diff:.2e}")

    print(f"{rows} rows x {heads} heads x {dim}, cache {args.cache}, end {args.end}, view {view}, "
          f"{in_range / 1e9:.3f} GB in range")
    record("sdpa (default choice)", sdpa)
    for backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        def forced(b: str = backend) -> torch.Tensor:
            with sdpa_kernel([getattr(SDPBackend, b)]):
                return sdpa()
        record(f"sdpa {backend.split('_')[0].lower()}", forced)
    for params in _grid():
        record(f"triton {params.block}/{params.warps}w/{params.splits}s/{params.stages}st",
               lambda p=params: decode_attention(q, k, v, starts, end, scale, p), launch=_spec(params))
    kernels = [r for r in results if "launch" in r]
    best = min(kernels, key=lambda r: r["ms"]) if kernels else None
    if best:
        print(f"fastest kernel: {best['launch']} ({best['ms']:.3f} ms, {best['gb_s']:.0f} GB/s)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_attention.json"), "w") as f:
        json.dump({"args": vars(args), "in_range_bytes": in_range, "results": results,
                   "fastest_kernel": best and best["launch"]},
                  f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
