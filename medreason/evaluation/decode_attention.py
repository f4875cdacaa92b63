"""The attention of a decode step as one Triton kernel that reads only each row's real positions.

A decode step has one query per row against a left-padded static cache. PyTorch's SDPA needs a
boolean mask for the padding and the unwritten positions, which rules out its flash kernel; the
kernels it can use (memory-efficient, cuDNN) read the masked positions too. Here each (row,
head) is split over ``splits`` programs, each an online softmax over its slice of the row's
positions ``[start, end)`` in blocks of ``block`` (float32 accumulation); a second kernel merges
the slices (flash-decoding). Nothing outside the range is loaded, so left padding and positions
beyond the last written one cost no memory traffic.

Both bounds are read from device memory (``end`` advances between replays of a CUDA graph), so
the loop's bounds are loaded values. The head dimension is loaded as two power-of-two parts
where it can be (``head_split``: Phi-2's 80 as 64 + 16) rather than padded to the next power
of two with masked lanes. tests/test_decode_attention.py checks the kernel under Triton's CPU
interpreter (``TRITON_INTERPRET=1``).

It is the default decode attention (``eval.decode_attention: triton``; ``sdpa`` the switch
back). On an H200 (bench/RESULTS.md, fourth round), one Phi-2 layer of a 192-row batch: 0.37 ms
at best (~3.5 TB/s of in-range keys and values) against 0.47 ms for SDPA as PyTorch picks it
(cuDNN, which also reads the masked positions); the first version of this kernel (one ``while``
loop, the head padded to 128 lanes, 2 warps) took 0.67 ms. One warp per program made the
difference (the fastest 2-warp launch: 0.43-0.51 ms); why (fewer registers per program, more
programs per SM) is a guess, not profiled.
It gives the tokens of the SDPA path up to float rounding (it sums in another order).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Name under which the decode attention is registered with transformers' AttentionInterface.
DECODE_ATTENTION = "medreason_decode"
# The kernel's launch parameters for measuring other ones (bench/decode_attention.py).
KERNEL_ENV = "MEDREASON_DECODE_KERNEL"


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


@dataclass(frozen=True)
class LaunchParams:
    """How the kernel is launched: cache positions per loop iteration, warps per program, and
    how many programs share one (row, head) (each takes a slice of its range; a second kernel
    merges their partial softmaxes), and Triton's ``num_stages`` (how far ahead of the loop's
    compute its loads are issued)."""

    block: int = 64
    warps: int = 1
    splits: int = 2
    stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block", "warps", "splits"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value}: a power of two")
        if not 1 <= self.stages <= 6:
            raise ValueError(f"stages={self.stages}: 1 to 6 (loads in flight ahead of the loop)")


def launch_params() -> LaunchParams:
    """The defaults (the fastest of bench/decode_attention.py's grid on an H200), or
    ``MEDREASON_DECODE_KERNEL`` ("block=64,warps=2,splits=4"; for measuring)."""
    value = os.environ.get(KERNEL_ENV, "").strip()
    if not value:
        return LaunchParams()
    try:
        fields = dict(item.split("=", 1) for item in value.split(","))
        return LaunchParams(**{k.strip(): int(v) for k, v in fields.items()})
    except (TypeError, ValueError) as exc:
        from medreason.errors import InputError

        raise InputError(f"{KERNEL_ENV}={value!r}: {exc}; e.g. block=64,warps=2,splits=4") from exc


def head_split(dim: int) -> tuple[int, int]:
    """The head dimension as two power-of-two parts ``(d1, d2)`` the kernel loads separately
    (Phi-2's 80 = 64 + 16: no lane of a load is masked off), or ``(next power of two, 0)``
    with the lanes past ``dim`` masked when no such split exists."""
    low = 1 << (dim.bit_length() - 1)
    rest = dim - low
    if rest == 0 or rest & (rest - 1) == 0:
        return low, rest
    return low << 1, 0


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """The jitted (partial, merge) kernels, built on first use: Triton reads TRITON_INTERPRET
    when it jits."""
    import triton
    import triton.language as tl

    def partial_kernel(q_ptr, k_ptr, v_ptr, acc_ptr, ml_ptr, start_ptr, end_ptr, group,
                       sqb, sqh, skb, skh, skn, svb, svh, svn, scale,
                       HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK: tl.constexpr,
                       SPLITS: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        heads = tl.num_programs(1)
        d1 = tl.arange(0, D1)
        d1_ok = d1 < HEAD_DIM  # all true unless the head dimension had no power-of-two split
        q1 = tl.load(q_ptr + row * sqb + head * sqh + d1, mask=d1_ok, other=0.0).to(tl.float32) * scale
        start = tl.load(start_ptr + row)
        end = tl.load(end_ptr)
        # This program's slice of [start, end): whole blocks, the last slice the remainder.
        chunk = tl.cdiv(tl.cdiv(end - start, SPLITS), BLOCK) * BLOCK
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, end)
        k_row = k_ptr + row * skb + (head // group) * skh  # grouped-query: heads share a KV head
        v_row = v_ptr + row * svb + (head // group) * svh
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)  # running max of the scores
        total = tl.sum(tl.zeros([BLOCK], tl.float32), 0)  # running sum of exp(score - m)
        acc1 = tl.zeros([D1], tl.float32)
        if D2 > 0:
            d2 = D1 + tl.arange(0, D2)
            q2 = tl.load(q_ptr + row * sqb + head * sqh + d2).to(tl.float32) * scale
            acc2 = tl.zeros([D2], tl.float32)
        for n0 in tl.range(lo, hi, BLOCK):
            n = n0 + tl.arange(0, BLOCK)
            ok = n < hi
            # Keys and values requested before the scores: on an H200 no faster for the default
            # launch, slower for block 32 (bench/RESULTS.md, fourth round).
            k1 = tl.load(k_row + n[:, None] * skn + d1[None, :], mask=ok[:, None] & d1_ok[None, :], other=0.0)
            v1 = tl.load(v_row + n[:, None] * svn + d1[None, :], mask=ok[:, None] & d1_ok[None, :], other=0.0)
            if D2 > 0:
                k2 = tl.load(k_row + n[:, None] * skn + d2[None, :], mask=ok[:, None], other=0.0)
                v2 = tl.load(v_row + n[:, None] * svn + d2[None, :], mask=ok[:, None], other=0.0)
            s = tl.sum(k1.to(tl.float32) * q1[None, :], 1)
            if D2 > 0:
                s += tl.sum(k2.to(tl.float32) * q2[None, :], 1)
            s = tl.where(ok, s, float("-inf"))
            # Every block visited holds a position in range (n0 < hi), so m_new is finite.
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            total = total * alpha + tl.sum(p, 0)
            acc1 = acc1 * alpha + tl.sum(p[:, None] * v1.to(tl.float32), 0)
            if D2 > 0:
                acc2 = acc2 * alpha + tl.sum(p[:, None] * v2.to(tl.float32), 0)
            m = m_new
        slot = (row * heads + head) * SPLITS + split
        tl.store(acc_ptr + slot * HEAD_DIM + d1, acc1, mask=d1_ok)
        if D2 > 0:
            tl.store(acc_ptr + slot * HEAD_DIM + d2, acc2)
        tl.store(ml_ptr + slot * 2 + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, m, total))

    def merge_kernel(acc_ptr, ml_ptr, o_ptr, sob, soh,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        heads = tl.num_programs(1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        sp = tl.arange(0, SPLITS)
        slots = (row * heads + head) * SPLITS + sp
        m = tl.load(ml_ptr + slots * 2)
        total = tl.load(ml_ptr + slots * 2 + 1)
        acc = tl.load(acc_ptr + slots[:, None] * HEAD_DIM + d[None, :], mask=d_ok[None, :], other=0.0)
        # An empty slice left m = -inf and nothing summed: its weight is exp(-inf) = 0.
        weight = tl.exp(m - tl.max(m, 0))
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
        tl.store(o_ptr + row * sob + head * soh + d, out.to(o_ptr.dtype.element_ty), mask=d_ok)

    del interpret  # part of the cache key only
    return triton.jit(partial_kernel), triton.jit(merge_kernel)


def decode_attention(query: Any, key: Any, value: Any, start: Any, end: Any, scale: float,
                     params: LaunchParams | None = None) -> Any:
    """Attention of one query per row: ``query`` [B, H, 1, D], ``key``/``value`` [B, Hkv, L, D]
    (last dimension contiguous; H a multiple of Hkv); row b attends to positions
    ``start[b] <= j < end`` (``start`` [B] int32, ``end`` a one-element int32 tensor, both on the
    device). Returns [B, 1, H, D], the layout transformers' attention functions return."""
    import torch
    import triton

    params = params or launch_params()
    rows, heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError(f"decode attention takes one query per row, got {q_len}")
    if heads % key.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {key.shape[1]} key heads")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("decode attention needs the head dimension contiguous")
    d1, d2 = head_split(dim)
    acc = torch.empty(rows, heads, params.splits, dim, dtype=torch.float32, device=query.device)
    ml = torch.empty(rows, heads, params.splits, 2, dtype=torch.float32, device=query.device)
    out = torch.empty(rows, 1, heads, dim, dtype=query.dtype, device=query.device)
    partial, merge = _kernels(interpreted())
    partial[(rows, heads, params.splits)](
        query, key, value, acc, ml, start, end, heads // key.shape[1],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), scale,
        HEAD_DIM=dim, D1=d1, D2=d2, BLOCK=params.block, SPLITS=params.splits, num_warps=params.warps,
        num_stages=params.stages,
    )
    merge[(rows, heads)](acc, ml, out, out.stride(0), out.stride(2), HEAD_DIM=dim,
                         BLOCK_D=triton.next_power_of_2(dim), SPLITS=params.splits, num_warps=1)
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
