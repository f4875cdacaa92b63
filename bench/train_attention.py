"""The packed training attention alone: FlashAttention-2's varlen kernel against cuDNN's, on a GPU.

Phi-2's shape (32 heads of 80) and the phi2-bf16 preset's micro-batch (8 rows of 2,048 tokens,
each row holding whole records end to end), in bf16, causal inside each record:

    python3 bench/train_attention.py --rows 8 --row-len 2048 --out /tmp/res

PyTorch ships both kernels: ``aten._flash_attention_forward/_backward`` (FlashAttention-2, which
runs head dim 80 in its 96 kernel) and ``aten._cudnn_attention_forward/_backward`` with cumulative
sequence lengths (cuDNN's ragged SDPA). For each kernel: the forward and the backward timed alone
(median of ``--iters`` calls, CUDA events), their outputs and gradients against a float32
reference on the first records, and for cuDNN the cost of its first call at a new number of
records (it builds an execution plan per shape) and whether zero-length records give the same
result (padding the record count to a fixed bound would make one plan serve every batch).
A kernel that fails is recorded with its error (cuDNN's backward did, with torch 2.11:
bench/RESULTS.md, sixth round).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from decode_attention import _timed  # bench/ is the script directory: on sys.path


def packed_bounds(rows: int, row_len: int, lo: int, hi: int, seed: int) -> list[int]:
    """Cumulative record starts of ``rows`` rows filled with records of lo..hi tokens (the last
    record of a row cut to fit)."""
    import random

    rng = random.Random(seed)
    bounds = [0]
    for row in range(rows):
        end = (row + 1) * row_len
        while bounds[-1] < end:
            bounds.append(min(end, bounds[-1] + rng.randint(lo, hi)))
    return bounds


def flash(q, k, v, cu, max_len):  # noqa: ANN001, ANN201
    import torch

    def forward():  # noqa: ANN202
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, True, False)

    out, lse, seed, offset, _ = forward()

    def backward(grad):  # noqa: ANN001, ANN202
        return torch.ops.aten._flash_attention_backward(grad, q, k, v, out, lse, cu, cu, max_len, max_len, 0.0,
                                                        True, seed, offset)

    return forward, backward, out


def cudnn(q, k, v, cu, max_len):  # noqa: ANN001, ANN201
    import torch

    def forward():  # noqa: ANN202
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True,
                                                       False)

    result = forward()
    out, lse, seed, offset = result[0], result[1], result[6], result[7]

    def backward(grad):  # noqa: ANN001, ANN202
        # attn_bias is a non-optional Tensor in the schema; None passes as an undefined one.
        return torch.ops.aten._cudnn_attention_backward(grad, q, k, v, out, lse, seed, offset, None, cu, cu,
                                                        max_len, max_len, 0.0, True)

    return forward, backward, out


def reference(q, k, v, grad, bounds: list[int], records: int):  # noqa: ANN001, ANN201
    """float32 outputs and gradients of the first ``records`` records (SDPA's math, autograd)."""
    import torch
    import torch.nn.functional as F

    end = bounds[records]
    qs, ks, vs = (t[:end].float().detach().requires_grad_() for t in (q, k, v))
    outs = []
    for start, stop in zip(bounds[:records], bounds[1:records + 1], strict=True):
        o = F.scaled_dot_product_attention(*(t[start:stop].transpose(0, 1) for t in (qs, ks, vs)), is_causal=True)
        outs.append(o.transpose(0, 1))
    out = torch.cat(outs)
    out.backward(grad[:end].float())
    return end, out.detach(), qs.grad, ks.grad, vs.grad


def _errors(end: int, want: tuple, out, grads) -> dict[str, float]:  # noqa: ANN001
    names = ("out", "dq", "dk", "dv")
    return {n: float((g[:end].float() - w).abs().max()) for n, g, w in zip(names, (out, *grads), want, strict=True)}


def measure(name: str, make, q, k, v, grad, cu, max_len: int, want: tuple, iters: int) -> dict:  # noqa: ANN001
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    forward, backward, out = make(q, k, v, cu, max_len)
    grads = backward(grad)
    torch.cuda.synchronize()
    lse = forward()[1]
    row = {"kernel": name, "first_call_s": round(time.perf_counter() - started, 3),
           "lse": [list(lse.shape), str(lse.dtype)],
           "max_abs_err_vs_fp32": _errors(want[0], want[1:], out, grads)}
    row["forward_ms"] = round(_timed(forward, iters), 3)
    row["backward_ms"] = round(_timed(lambda: backward(grad), iters), 3)
    return row


def cudnn_shapes(q, k, v, grad, bounds: list[int], max_len: int) -> dict:  # noqa: ANN001
    """cuDNN's first-call cost at new record counts, and zero-length records padding the count."""
    import torch

    dev = q.device
    cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
    out = cudnn(q, k, v, cu, max_len)[2]
    costs = []
    for extra in (1, 2, 3):  # split the last record: a new record count each time
        cut = bounds[:-1] + [bounds[-1] - 10 * i for i in range(extra, 0, -1)] + [bounds[-1]]
        torch.cuda.synchronize()
        started = time.perf_counter()
        cudnn(q, k, v, torch.tensor(cut, dtype=torch.int32, device=dev), max_len)
        torch.cuda.synchronize()
        costs.append(round(time.perf_counter() - started, 3))
    padded = torch.tensor(bounds + [bounds[-1]] * 8, dtype=torch.int32, device=dev)
    try:
        same = float((cudnn(q, k, v, padded, max_len)[2] - out).abs().max())
    except RuntimeError as exc:  # noqa: BLE001 - recorded, not raised
        same = f"error: {exc}"[:300]
    return {"first_call_s_at_new_record_counts": costs, "zero_length_records_max_abs_diff": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--row-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--min-record", type=int, default=150)
    ap.add_argument("--max-record", type=int, default=1200)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--check-records", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    import torch

    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = args.rows * args.row_len
    q, k, v, grad = (torch.randn(tokens, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    bounds = packed_bounds(args.rows, args.row_len, args.min_record, args.max_record, seed=0)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    want = reference(q, k, v, grad, bounds, args.check_records)
    pairs = sum((b - a) ** 2 for a, b in zip(bounds[:-1], bounds[1:], strict=True)) / 2
    result = {"rows": args.rows, "row_len": args.row_len, "records": len(bounds) - 1,
              "causal_pairs": pairs, "kernels": []}
    for name, make in (("flash", flash), ("cudnn", cudnn)):
        try:
            row = measure(name, make, q, k, v, grad, cu, args.row_len, want, args.iters)
        except (RuntimeError, IndexError) as exc:  # noqa: BLE001 - a kernel that does not run is a result
            # (torch 2.11's cuDNN backward with packed [tokens, heads, dim] inputs raised IndexError)
            row = {"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        result["kernels"].append(row)
        print(json.dumps(row))
    if "error" not in result["kernels"][1]:
        result["cudnn_shapes"] = cudnn_shapes(q, k, v, grad, bounds, args.row_len)
        print(json.dumps(result["cudnn_shapes"]))
        flash_ms = sum(result["kernels"][0][key] for key in ("forward_ms", "backward_ms"))
        cudnn_ms = sum(result["kernels"][1][key] for key in ("forward_ms", "backward_ms"))
        print(f"forward + backward: flash {flash_ms:.3f} ms, cudnn {cudnn_ms:.3f} ms, "
              f"cudnn/flash {cudnn_ms / flash_ms:.3f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_attention.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
