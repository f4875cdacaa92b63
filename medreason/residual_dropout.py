"""The end of Phi's decoder layer, ``dropout(attn) + dropout(mlp) + residual``, as one kernel that
draws four dropout decisions per random number generation (training).

Phi runs attention and MLP in parallel and drops out both outputs before the residual sum
(``resid_pdrop``, 0.1 for Phi-2). Compiled, that sum is one Triton kernel, but inductor draws
each dropout decision with its own Philox evaluation (ten rounds for one 32-bit number of the
four one evaluation makes): a kernel profile of two phi2-bf16 steps on an H200 puts that kernel
at 18.8 ms of 768 ms of kernel time, about 0.29 ms a layer for 16,384 tokens, where reading the
three inputs and writing the sum and two masks would take about a third of that at 4.3 TB/s.
``RESIDUAL_DROPOUT_OP`` is one custom op: one Triton program evaluates Philox once per pair of
positions and takes four uniforms (``tl.rand4x``), the attention's and the MLP's decision at
each of the two; no mask is written, the backward kernel draws the same numbers again from the
op's seed (one int64 on the device, drawn from torch's generator at each call, so activation
checkpointing's replay draws it again). Measured (bench/RESULTS.md, sixth round): 8.0 ms forward
and 7.4 ms backward where inductor's kernels took 18.2 and 5.1 ms, 2.5 GiB less peak memory and
+1.4% phi2-bf16 tokens/s in the same call.

The dropout is statistically PEFT's/torch's (each position kept with probability 1 - p, scaled
by 1 / (1 - p), the two branches independent), not bit-identical: another random stream.
``MEDREASON_RESIDUAL_DROPOUT=0`` keeps transformers' layer. Without a GPU (and outside Triton's
interpreter) the op runs a torch reference with masks from a CPU generator seeded the same way.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from medreason.evaluation.decode_attention import interpreted

RESIDUAL_DROPOUT_OP = "medreason::residual_dropout"
ENV = "MEDREASON_RESIDUAL_DROPOUT"
BLOCK = 1024  # pairs of positions a Triton program covers under the interpreter


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """(forward, backward) Triton kernels, jitted on first use."""
    import triton
    import triton.language as tl

    # Program ``pid`` covers positions [2 BLOCK pid, 2 BLOCK (pid + 1)) as BLOCK pairs; Philox
    # counter ``i`` gives pair i's four uniforms: the attention's and the MLP's decision at
    # each of its two positions.
    def forward(a_ptr, b_ptr, r_ptr, out_ptr, seed_ptr, n, p, scale, BLOCK: tl.constexpr):
        pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), pair)
        keep_a, keep_b = tl.join(u0, u2) >= p, tl.join(u1, u3) >= p  # [BLOCK, 2]
        at = 2 * pair[:, None] + tl.arange(0, 2)[None, :]
        ok = at < n
        a = tl.load(a_ptr + at, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + at, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + at, mask=ok, other=0.0).to(tl.float32)
        y = tl.where(keep_a, a * scale, 0.0) + tl.where(keep_b, b * scale, 0.0) + r
        tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=ok)

    def backward(g_ptr, ga_ptr, gb_ptr, seed_ptr, n, p, scale, BLOCK: tl.constexpr):
        pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), pair)
        keep_a, keep_b = tl.join(u0, u2) >= p, tl.join(u1, u3) >= p
        at = 2 * pair[:, None] + tl.arange(0, 2)[None, :]
        ok = at < n
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32) * scale
        tl.store(ga_ptr + at, tl.where(keep_a, g, 0.0).to(ga_ptr.dtype.element_ty), mask=ok)
        tl.store(gb_ptr + at, tl.where(keep_b, g, 0.0).to(gb_ptr.dtype.element_ty), mask=ok)

    if interpret:  # the interpreter runs one launch shape (BLOCK)
        return triton.jit(forward), triton.jit(backward)
    # On a GPU each kernel times a few launch shapes on its first call for a size and keeps the
    # fastest; the random numbers depend on the pair index only, so forward and backward may
    # take different shapes and still draw the same masks.
    configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block in (256, 512, 1024, 2048)
               for warps in (4, 8)]
    return (triton.autotune(configs, key=["n"])(triton.jit(forward)),
            triton.autotune(configs, key=["n"])(triton.jit(backward)))


def _use_kernel(t: torch.Tensor) -> bool:
    if not (t.is_cuda or interpreted()):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - the image and the test environment have Triton
        return False
    return True


def _launch(kernel: Any, n: int, *args: Any) -> None:
    """Launch ``kernel`` over n positions: the fixed BLOCK interpreted, the tuned one on a GPU."""
    if interpreted():
        kernel[((n + 2 * BLOCK - 1) // (2 * BLOCK),)](*args, BLOCK=BLOCK)
    else:
        kernel[lambda meta: ((n + 2 * meta["BLOCK"] - 1) // (2 * meta["BLOCK"]),)](*args)


def _reference_masks(shape: torch.Size, seed: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(seed.item()))
    return torch.rand(shape, generator=gen) >= p, torch.rand(shape, generator=gen) >= p


def _forward(a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=a.device)
    scale = 1.0 / (1.0 - p)
    a, b, residual = a.contiguous(), b.contiguous(), residual.contiguous()
    if _use_kernel(a):
        out = torch.empty_like(a)
        n = a.numel()
        _launch(_kernels(interpreted())[0], n, a, b, residual, out, seed, n, p, scale)
        return out, seed
    keep_a, keep_b = _reference_masks(a.shape, seed, p)
    work = torch.promote_types(a.dtype, torch.float32)
    out = (a.to(work) * keep_a.to(a.device) * scale + b.to(work) * keep_b.to(a.device) * scale
           + residual.to(work))
    return out.to(a.dtype), seed


def _backward(grad: torch.Tensor, seed: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    scale = 1.0 / (1.0 - p)
    grad = grad.contiguous()
    if _use_kernel(grad):
        grad_a, grad_b = torch.empty_like(grad), torch.empty_like(grad)
        n = grad.numel()
        _launch(_kernels(interpreted())[1], n, grad, grad_a, grad_b, seed, n, p, scale)
        return grad_a, grad_b
    keep_a, keep_b = _reference_masks(grad.shape, seed, p)
    work = grad.to(torch.promote_types(grad.dtype, torch.float32)) * scale
    return (work * keep_a.to(grad.device)).to(grad.dtype), (work * keep_b.to(grad.device)).to(grad.dtype)


_OPS: list[Any] = []


def residual_dropout_op() -> Any:
    """RESIDUAL_DROPOUT_OP: ``(a, b, residual, p) -> (out, seed)``, defined on first use."""
    if _OPS:
        return _OPS[0]
    op = torch.library.custom_op(RESIDUAL_DROPOUT_OP, mutates_args=(),
                                 schema="(Tensor a, Tensor b, Tensor residual, float p) -> (Tensor, Tensor)")(_forward)
    backward = torch.library.custom_op(RESIDUAL_DROPOUT_OP + "_backward", mutates_args=(),
                                       schema="(Tensor grad, Tensor seed, float p) -> (Tensor, Tensor)")(_backward)

    @op.register_fake
    def _(a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(a, memory_format=torch.contiguous_format), a.new_empty((1,), dtype=torch.int64)

    @backward.register_fake
    def _(grad: torch.Tensor, seed: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        like = torch.empty_like(grad, memory_format=torch.contiguous_format)
        return like, torch.empty_like(like)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(output[1])
        ctx.p = inputs[3]
        ctx.mark_non_differentiable(output[1])

    def grads(ctx: Any, grad: torch.Tensor, _seed_grad: Any) -> tuple[Any, ...]:
        (seed,) = ctx.saved_tensors
        grad_a, grad_b = backward(grad, seed, ctx.p)
        return grad_a, grad_b, grad, None

    op.register_autograd(grads, setup_context=setup_context)
    _OPS.append(op)
    return op


def residual_dropout(a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(a, p) + dropout(b, p) + residual`` with independent masks (training)."""
    return residual_dropout_op()(a, b, residual, p)[0]


def _phi_layer_class() -> type | None:
    try:
        from transformers.models.phi.modeling_phi import PhiDecoderLayer
    except ImportError:  # pragma: no cover - transformers without Phi
        return None
    return PhiDecoderLayer


def _fused_forward(self: Any, hidden_states: torch.Tensor, attention_mask: Any = None, position_ids: Any = None,
                   past_key_values: Any = None, use_cache: bool | None = False, position_embeddings: Any = None,
                   **kwargs: Any) -> torch.Tensor:
    """PhiDecoderLayer.forward (transformers 5) with the residual sum through residual_dropout."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn_outputs, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                     position_ids=position_ids, past_key_values=past_key_values,
                                     use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    mlp_outputs = self.mlp(hidden_states)
    p = self.resid_dropout.p
    if (self.training and p > 0 and attn_outputs.dtype == mlp_outputs.dtype == residual.dtype
            and attn_outputs.shape == mlp_outputs.shape == residual.shape):
        return residual_dropout(attn_outputs, mlp_outputs, residual, p)
    return self.resid_dropout(attn_outputs) + self.resid_dropout(mlp_outputs) + residual


_FUSED_CLASS: dict[type, type] = {}


def fuse_residual_dropout(model: nn.Module) -> int:
    """Swap each Phi decoder layer with residual dropout (p > 0) to the one-kernel residual sum;
    returns how many. Before any wrapping (FSDP, torch.compile); ``MEDREASON_RESIDUAL_DROPOUT=0``
    swaps none."""
    from medreason.errors import env_switch

    phi = _phi_layer_class()
    if phi is None or not env_switch(ENV):
        return 0
    count = 0
    for module in model.modules():
        if type(module) is phi and isinstance(module.resid_dropout, nn.Dropout) and module.resid_dropout.p > 0:
            if phi not in _FUSED_CLASS:
                # The subclass keeps the layer's name: accelerate's FSDP wrap policy finds the
                # blocks to shard by the class names in the model's _no_split_modules.
                _FUSED_CLASS[phi] = type(phi.__name__, (phi,), {"forward": _fused_forward,
                                                                "__qualname__": phi.__qualname__,
                                                                "__module__": __name__})
            module.__class__ = _FUSED_CLASS[phi]
            count += 1
    if count:
        residual_dropout_op()
    return count
