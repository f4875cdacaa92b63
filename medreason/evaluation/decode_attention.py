"""The attention of a decode step as one Triton kernel that reads only each row's real positions.

A decode step has one query per row against a left-padded static cache. PyTorch's SDPA needs a
boolean mask for the padding and the unwritten positions, which rules out its flash kernel; the
memory-efficient kernel it falls back to streams the cache at ~57% of the GPU's bandwidth
(bench/RESULTS.md, "evaluate") and reads the masked positions too. This kernel runs one program
per (row, head): an online softmax over the row's positions ``[start, end)`` in blocks of
``BLOCK_N``, float32 accumulation. Loads outside that range are masked off, so left padding and
positions beyond the last written one cost no memory traffic.

Both bounds are read from device memory (``end`` advances between replays of a CUDA graph), so
the loop is a ``while``: a ``for`` over a bound loaded from memory does not run under Triton's CPU
interpreter (``TRITON_INTERPRET=1``, with numpy >= 2.4), which is what
tests/test_decode_attention.py checks the kernel with on a machine without a GPU.

``eval.decode_attention: sdpa`` keeps the SDPA path (the same tokens up to float rounding: the
kernel sums in another order).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Name under which the decode attention is registered with transformers' AttentionInterface.
DECODE_ATTENTION = "medreason_decode"
# Cache positions per loop iteration; measured on an H200 (bench/decode_attention.py).
BLOCK_N = 64
NUM_WARPS = 4


def interpreted() -> bool:
    """Whether Triton runs kernels on the CPU (its interpreter), as in the tests."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def kernel_usable(device: Any) -> str | None:
    """Why the kernel cannot run on ``device``, or None."""
    if device.type != "cuda" and not interpreted():
        return f"no Triton kernel on {device.type}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel (built on first use: Triton reads TRITON_INTERPRET when it jits)."""
    import triton
    import triton.language as tl

    def decode_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, start_ptr, end_ptr, group,
                                sqb, sqh, skb, skh, skn, svb, svh, svn, sob, soh, scale,
                                HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + row * sqb + head * sqh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
        start = tl.load(start_ptr + row)
        end = tl.load(end_ptr)
        k_row = k_ptr + row * skb + (head // group) * skh  # grouped-query: heads share a KV head
        v_row = v_ptr + row * svb + (head // group) * svh
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)  # running max of the scores
        total = tl.sum(tl.zeros([BLOCK], tl.float32), 0)  # running sum of exp(score - m)
        acc = tl.zeros([BLOCK_D], tl.float32)
        n0 = (start // BLOCK) * BLOCK
        while n0 < end:
            n = n0 + tl.arange(0, BLOCK)
            ok = (n >= start) & (n < end)
            ok_2d = ok[:, None] & d_ok[None, :]
            k = tl.load(k_row + n[:, None] * skn + d[None, :], mask=ok_2d, other=0.0).to(tl.float32)
            s = tl.where(ok, tl.sum(k * q[None, :], 1), float("-inf"))
            # Every block visited holds a position in range (start < end), so m_new is finite.
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(v_row + n[:, None] * svn + d[None, :], mask=ok_2d, other=0.0).to(tl.float32)
            total = total * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
            n0 += BLOCK
        tl.store(o_ptr + row * sob + head * soh + d, (acc / total).to(o_ptr.dtype.element_ty), mask=d_ok)

    del interpret  # part of the cache key only
    return triton.jit(decode_attention_kernel)


def decode_attention(query: Any, key: Any, value: Any, start: Any, end: Any, scale: float,
                     block_n: int = BLOCK_N, num_warps: int = NUM_WARPS) -> Any:
    """Attention of one query per row: ``query`` [B, H, 1, D], ``key``/``value`` [B, H, L, D]
    (last dimension contiguous; H a multiple of the key's heads); row b attends to positions ``start[b] <= j < end`` (``start``
    [B] int32, ``end`` a one-element int32 tensor, both on the device). Returns [B, 1, H, D],
    the layout transformers' attention functions return."""
    import torch
    import triton

    rows, heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError(f"decode attention takes one query per row, got {q_len}")
    if heads % key.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {key.shape[1]} key heads")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("decode attention needs the head dimension contiguous")
    out = torch.empty(rows, 1, heads, dim, dtype=query.dtype, device=query.device)
    kernel = _kernel(interpreted())
    kernel[(rows, heads)](
        query, key, value, out, start, end, heads // key.shape[1],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(2), scale,
        HEAD_DIM=dim, BLOCK=block_n, BLOCK_D=triton.next_power_of_2(dim), num_warps=num_warps,
    )
    return out


def attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: the kernel for a decode step (``decode_rows`` =
    (start, end) passed through the model call), sdpa for anything else (the prefill)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = kwargs.pop("decode_rows", None)
    if rows is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    start, end = rows
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return decode_attention(query, key, value, start, end, scale), None


def register() -> str:
    """Register the decode attention with transformers (idempotent); returns its name. No mask
    function is registered with it: transformers then builds no mask for a decode step."""
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, attention_forward)
    return DECODE_ATTENTION


def row_starts(mask: Any) -> Any:
    """Each left-padded row's first real position ([B] int32), or None when a row's real
    tokens are not one block at its end (the kernel attends to one contiguous range)."""
    import torch

    width = mask.shape[1]
    starts = width - mask.long().sum(-1)
    contiguous = torch.arange(width, device=mask.device)[None, :] >= starts[:, None]
    if not torch.equal(contiguous, mask.bool()):
        return None
    return starts.to(torch.int32)
