"""A Phi decode step's attention block with its small operations in one Triton kernel.

transformers' Phi attention spends, per layer and decode step, about fourteen kernels between
the q/k/v projections and the attention: slices, ``rotate_half``'s negation and concatenation,
four products, two sums and two concatenations for the partial rotary embedding, then two
``index_copy_`` writes into the static cache. Each works on a few hundred KiB, so each costs a
launch's worth of time, 32 layers x ~14 launches a step (a kernel profile of 320-row MedQA
decode steps on an H200, bench/RESULTS.md, fifth round).
``rotary_cache_write`` does all of it in one kernel per layer: one program per row rotates the
query's and key's first ``rotary`` dimensions (neox-style, as ``apply_rotary_pos_emb``), writes
the key and value into the cache at the step's position, and returns the rotated query.

The arithmetic is the reference's, rounding for rounding: each product is rounded to the
activations' dtype before the sum, as transformers' bf16 ops do, and on a GPU the products and
the sum are libdevice's ``mul_rn`` / ``add_rn``, which the compiler may not fuse into an FMA (a
first version, with plain ``*`` and ``+``, was one bf16 unit off in places on an H200). So the
query and the cached key are bit-identical to the unfused path's: tests/test_decode_attention.py
checks float32 under Triton's CPU interpreter and float32 and bf16 on a GPU. ``phi_decode_forward`` is the attention module's forward for decode steps with the
decode attention kernel (``decode_rows`` passed through the model call); any other call (the
prefill) runs the module's own forward. ``MEDREASON_DECODE_FUSED=0`` switches back to the
unfused path.

The cache layer's own write counter (``cumulative_length``) is not advanced: every decode step
after the prefill writes through this forward, at the position the step's range ends on.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

FUSED_ENV = "MEDREASON_DECODE_FUSED"


def fused_enabled() -> bool:
    """False when ``MEDREASON_DECODE_FUSED`` is 0/false/no/off (for measuring the unfused path);
    another value is an InputError."""
    from medreason.errors import env_switch

    return env_switch(FUSED_ENV)


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel, built on first use (Triton reads TRITON_INTERPRET when it jits)."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    def rotary_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, end_ptr,
                            s_q, s_k, s_v, s_c, s_kcb, s_kch, s_kcn, s_vcb, s_vch, s_vcn,
                            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                            ROT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                            EXACT: tl.constexpr):
        row = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        rot = d < ROT
        half = ROT // 2
        partner = tl.where(d < half, d + half, d - half)
        sign = tl.where(d < half, -1.0, 1.0)[None, :]
        cos = tl.load(cos_ptr + row * s_c + d, mask=rot, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + row * s_c + d, mask=rot, other=0.0).to(tl.float32)
        dtype = qo_ptr.dtype.element_ty
        pos = tl.load(end_ptr) - 1  # the position this step writes: its range ends on it
        # (x * cos) + (rotate_half(x) * sin) for the query, then the key; each product rounded
        # to the activations' dtype as the reference's ops round it.
        q_ok = (h[:, None] < HEADS) & (d[None, :] < HEAD_DIM)
        base = q_ptr + row * s_q + h[:, None] * HEAD_DIM
        x = tl.load(base + d[None, :], mask=q_ok, other=0.0)
        xp = tl.load(base + partner[None, :], mask=q_ok & rot[None, :], other=0.0)
        if EXACT:  # each product and the sum rounded on its own, never fused into an FMA
            a = libdevice.mul_rn(x.to(tl.float32), cos[None, :]).to(dtype)
            b = libdevice.mul_rn(sign * xp.to(tl.float32), sin[None, :]).to(dtype)
            x = tl.where(rot[None, :], libdevice.add_rn(a.to(tl.float32), b.to(tl.float32)).to(dtype), x)
        else:  # the interpreter (numpy) rounds every operation anyway and has no libdevice
            a = (x.to(tl.float32) * cos[None, :]).to(dtype)
            b = ((sign * xp.to(tl.float32)) * sin[None, :]).to(dtype)
            x = tl.where(rot[None, :], (a.to(tl.float32) + b.to(tl.float32)).to(dtype), x)
        tl.store(qo_ptr + row * HEADS * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :], x, mask=q_ok)
        kv_ok = (h[:, None] < KV_HEADS) & (d[None, :] < HEAD_DIM)
        base = k_ptr + row * s_k + h[:, None] * HEAD_DIM
        x = tl.load(base + d[None, :], mask=kv_ok, other=0.0)
        xp = tl.load(base + partner[None, :], mask=kv_ok & rot[None, :], other=0.0)
        if EXACT:  # each product and the sum rounded on its own, never fused into an FMA
            a = libdevice.mul_rn(x.to(tl.float32), cos[None, :]).to(dtype)
            b = libdevice.mul_rn(sign * xp.to(tl.float32), sin[None, :]).to(dtype)
            x = tl.where(rot[None, :], libdevice.add_rn(a.to(tl.float32), b.to(tl.float32)).to(dtype), x)
        else:  # the interpreter (numpy) rounds every operation anyway and has no libdevice
            a = (x.to(tl.float32) * cos[None, :]).to(dtype)
            b = ((sign * xp.to(tl.float32)) * sin[None, :]).to(dtype)
            x = tl.where(rot[None, :], (a.to(tl.float32) + b.to(tl.float32)).to(dtype), x)
        tl.store(kc_ptr + row * s_kcb + h[:, None] * s_kch + pos * s_kcn + d[None, :], x, mask=kv_ok)
        v = tl.load(v_ptr + row * s_v + h[:, None] * HEAD_DIM + d[None, :], mask=kv_ok, other=0.0)
        tl.store(vc_ptr + row * s_vcb + h[:, None] * s_vch + pos * s_vcn + d[None, :], v, mask=kv_ok)

    del interpret  # part of the cache key only
    return triton.jit(rotary_cache_kernel)


def rotary_cache_write(q: Any, k: Any, v: Any, cos: Any, sin: Any, key_cache: Any, value_cache: Any, end: Any,
                       heads: int, kv_heads: int, head_dim: int, rotary: int) -> Any:
    """The rotated query ``[B, heads, 1, head_dim]``; the rotated key and the value are written
    into ``key_cache`` / ``value_cache`` ``[B, kv_heads, L, head_dim]`` at position
    ``end - 1`` (``end``: a one-element int32 device tensor).

    ``q`` / ``k`` / ``v``: the projections' outputs ``[B, 1, heads * head_dim]`` (and
    ``kv_heads * head_dim``), each row contiguous; ``cos`` / ``sin``: ``[B, 1, rotary]``, the
    rotary embedding's output for the step.
    """
    import torch
    import triton

    from medreason.evaluation.decode_attention import interpreted

    rows = q.shape[0]
    for name, t, width in (("q", q, heads), ("k", k, kv_heads), ("v", v, kv_heads)):
        if t.shape[1] != 1 or t.shape[-1] != width * head_dim or t.stride(-1) != 1:
            raise ValueError(f"{name}: expected [rows, 1, {width * head_dim}] with the last dimension contiguous, "
                             f"got {tuple(t.shape)}")
    if cos.shape[-1] != rotary or cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError(f"cos/sin: expected [rows, 1, {rotary}] alike, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    out = torch.empty(rows, heads, 1, head_dim, dtype=q.dtype, device=q.device)
    kernel = _kernel(interpreted())
    kernel[(rows,)](
        q, k, v, cos, sin, out, key_cache, value_cache, end,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, ROT=rotary,
        BLOCK_H=triton.next_power_of_2(max(heads, kv_heads)), BLOCK_D=triton.next_power_of_2(head_dim),
        EXACT=not interpreted(), num_warps=4,
    )
    return out


def supported(module: Any) -> bool:
    """Whether ``module`` is a Phi attention this forward computes exactly (no q/k LayerNorm)."""
    try:
        from transformers.models.phi.modeling_phi import PhiAttention
    except ImportError:  # pragma: no cover - transformers without Phi
        return False
    return isinstance(module, PhiAttention) and not module.qk_layernorm


def phi_decode_forward(module: Any, fallback: Callable[..., Any], hidden_states: Any, position_embeddings: Any,
                       attention_mask: Any, past_key_values: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """PhiAttention.forward for a decode step with the decode attention kernel (``decode_rows``
    in ``kwargs``); ``fallback`` (the module's own forward) for anything else."""
    from medreason.evaluation.decode_attention import decode_attention

    rows = kwargs.get("decode_rows")
    if rows is None or hidden_states.shape[1] != 1 or past_key_values is None:
        return fallback(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    start, end = rows
    config = module.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    layer = past_key_values.layers[module.layer_idx]
    query = rotary_cache_write(module.q_proj(hidden_states), module.k_proj(hidden_states),
                               module.v_proj(hidden_states), *position_embeddings, layer.keys, layer.values, end,
                               heads, kv_heads, module.head_dim, module.rotary_ndims)
    out = decode_attention(query, layer.keys, layer.values, start, end, module.scaling)
    return module.dense(out.reshape(hidden_states.shape[0], 1, -1)), None


@contextlib.contextmanager
def fused_phi_decode(model: Any) -> Iterator[int]:
    """Every supported attention module of ``model`` runs ``phi_decode_forward`` inside the
    block (yields how many; 0 when switched off by ``MEDREASON_DECODE_FUSED``)."""
    modules = [m for m in model.modules() if supported(m)] if fused_enabled() else []
    for module in modules:
        module.forward = functools.partial(phi_decode_forward, module, module.forward)
    try:
        yield len(modules)
    finally:
        for module in modules:
            del module.forward
