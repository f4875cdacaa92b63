"""LoRA's forward in fewer, larger kernels (``train.lora_fused``, on by default).

PEFT's vanilla LoRA forward is ``base(x) + B(A(dropout(x))) * scaling``: the B product is written
to memory as a whole [tokens, out] tensor, scaled and added by another kernel, and every adapted
projection runs its own A product over its input. A kernel profile of the phi2-bf16 preset on an
H200 puts the adapters' small products at about a tenth of the kernel time (84 of 799 ms over two
steps in the profile of the fifth round's first call, at a8ec393). Two changes, for layers whose products run in the activations' dtype
(``train.lora_compute_dtype: base``) on a plain ``nn.Linear`` base, without LoRA dropout:

1. The B product is accumulated by the matrix product itself, ``base(x).addmm_(h, (scaling *
   B)^T)``: cuBLAS reads base(x) as its C operand and writes the sum over it, so the [tokens, out]
   product is never written and read back, and the scaling goes onto the [out, r] weight instead
   of the product. In place, because an out-of-place ``addmm`` first copies its C operand into
   the result (a device-to-device copy of every adapted projection's output: 22.3 ms of 787 ms of
   kernel time in a profile of two phi2-bf16 steps on an H200, at d5e6115). The in-place
   product runs inside one custom op (``LORA_LINEAR_OP``, the base projection and the
   accumulation, with its backward written out), which torch.compile keeps as one node: a traced
   in-place op on an intermediate would be functionalized back into the copying form
   (+3.4% phi2-bf16 tokens/s against the copying form, same call; bench/RESULTS.md, sixth round).
   ``MEDREASON_LORA_INPLACE=0`` runs the out-of-place ``addmm`` instead. Inside the op the order
   is adapter first: ``addmm(bias, h, b^T)`` writes the output and the base product accumulates
   into it, so the pass that reads and rewrites the output is the large product's epilogue, not
   a K = r product of its own (242.7 -> 233.5 ms of those products' kernel time over two steps,
   +1.6% tokens/s, same call). ``MEDREASON_LORA_ADAPTER_FIRST=0`` writes the base product first.
2. Phi's decoder layer feeds one LayerNorm output to q/k/v and fc1 (attention and MLP run in
   parallel): their four A matrices run as one product of r x 4 columns, computed once in the
   LayerNorm's forward (``SharedA``). The input is read once, and autograd's backward of that one
   product gives one input gradient instead of four to sum.

Parameters, their names and dtypes do not change (the classes of the LoRA and LayerNorm modules
do, as lora_compute does), so checkpoints, resume, saved adapters and merging see what they saw.
The numbers are PEFT's up to float rounding (the scaling is applied before the product, and the
sum rounds once): tests/test_lora_fused.py compares losses and gradients with the unfused path.
Any call the fused forward does not cover (adapters disabled or merged, several adapters,
float16 activations, extra arguments) runs PEFT's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class SharedA:
    """The A products of the LoRA layers that read one tensor, as one product.

    The LayerNorm whose output they read calls ``compute``; each layer then takes its columns
    (``take``). A layer handed another tensor (called outside its decoder layer) computes its
    own product."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.source: torch.Tensor | None = None
        self.product: torch.Tensor | None = None

    def compute(self, x: torch.Tensor) -> None:
        weights = [layer.lora_A[layer.fused_adapter].weight for layer in self.layers]
        self.source, self.product = x, F.linear(x, torch.cat(weights).to(x.dtype))

    def take(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x is not self.source or self.product is None:
            return own_a_product(layer, x)
        r = layer.lora_A[layer.fused_adapter].weight.shape[0]
        index = layer.shared_index
        part = self.product[..., index * r : (index + 1) * r]
        if index == len(self.layers) - 1:  # the last reader: let the tensors go with the step
            self.source = self.product = None
        return part


def own_a_product(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.lora_A[layer.fused_adapter].weight.to(x.dtype))


def _lora_linear_class() -> type:
    from peft.tuners.lora import Linear

    return Linear


class SharedInputLayerNorm(nn.LayerNorm):
    """A LayerNorm that also runs the A products of the LoRA layers reading its output."""

    shared: SharedA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self.shared.compute(out)
        return out


# x W^T + bias + h b^T over 2-D x and h, the last product accumulated in place into the first's
# output (see the module docstring).
LORA_LINEAR_OP = "medreason::lora_linear"
INPLACE_ENV = "MEDREASON_LORA_INPLACE"  # =0: the out-of-place addmm (copies the base output)
ADAPTER_FIRST_ENV = "MEDREASON_LORA_ADAPTER_FIRST"  # =0: the base product first, then h b^T added


def _lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                 b: torch.Tensor, adapter_first: bool) -> torch.Tensor:
    if adapter_first:
        # The rank-r product (with the bias) writes the output, then the base product adds
        # itself to it: cuBLAS reads that C operand in the large product's epilogue, so no
        # separate pass reads and rewrites the [tokens, out] output.
        out = torch.addmm(bias, h, b.t()) if bias is not None else h @ b.t()
        return out.addmm_(x, weight.t())
    return F.linear(x, weight, bias).addmm_(h, b.t())


def _lora_linear_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, bias, h, b, _ = inputs
    # The frozen base weight needs no x for its gradient: x is kept only when it has one.
    ctx.save_for_backward(x if weight.requires_grad else None, weight, h, b)
    ctx.bias = bias is not None


def _lora_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, h, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad @ weight if need[0] else None
    grad_weight = grad.t() @ x if need[1] else None
    grad_bias = grad.sum(0) if ctx.bias and need[2] else None
    grad_h = grad @ b if need[3] else None
    grad_b = grad.t() @ h if need[4] else None
    return grad_x, grad_weight, grad_bias, grad_h, grad_b, None


_OPS: list[Any] = []


def lora_linear_op() -> Any:
    """LORA_LINEAR_OP, defined on first use (once per process)."""
    if not _OPS:
        op = torch.library.custom_op(
            LORA_LINEAR_OP, mutates_args=(),
            schema="(Tensor x, Tensor weight, Tensor? bias, Tensor h, Tensor b, bool adapter_first) -> Tensor",
        )(_lora_linear)

        @op.register_fake
        def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
              b: torch.Tensor, adapter_first: bool) -> torch.Tensor:
            return x.new_empty(x.shape[0], weight.shape[0])

        op.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup)
        _OPS.append(op)
    return _OPS[0]


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of a fused LoRA layer (the class ``make_fused_class`` builds)."""
    name = self.fused_adapter
    if args or kwargs or self.disable_adapters or self.merged or x.dtype == torch.float16 \
            or list(self.active_adapters) != [name]:
        return super(type(self), self).forward(x, *args, **kwargs)
    shared = getattr(self, "shared", None)
    h = shared.take(self, x) if shared is not None else own_a_product(self, x)
    h = h.reshape(-1, h.shape[-1])
    b = (self.lora_B[name].weight * self.scaling[name]).to(x.dtype)
    layer = self.base_layer
    if self.fused_inplace:
        out = lora_linear_op()(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias, h, b, self.adapter_first)
        return out.view(*x.shape[:-1], out.shape[-1])
    base = layer(x)
    return torch.addmm(base.reshape(-1, base.shape[-1]), h, b.t()).view(base.shape)


_FUSED_CLASS: dict[type, type] = {}


def make_fused_class(cls: type) -> type:
    """PEFT's LoRA ``Linear`` with ``fused_forward`` (one subclass per PEFT class)."""
    if cls not in _FUSED_CLASS:
        _FUSED_CLASS[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": fused_forward})
    return _FUSED_CLASS[cls]


def eligible(module: nn.Module) -> bool:
    """A vanilla single-adapter LoRA Linear on an nn.Linear base, products in the activations'
    dtype (lora_compute's ActivationDtypeLinear), no dropout."""
    from medreason.lora_compute import ActivationDtypeLinear

    if type(module) is not _lora_linear_class() or not isinstance(module.base_layer, nn.Linear):
        return False
    if len(module.lora_A) != 1 or getattr(module, "lora_variant", None):
        return False
    name = next(iter(module.lora_A))
    return (isinstance(module.lora_dropout[name], nn.Identity)
            and isinstance(module.lora_A[name], ActivationDtypeLinear)
            and isinstance(module.lora_B[name], ActivationDtypeLinear))


def _share_phi_inputs(model: nn.Module) -> int:
    """SharedA for each Phi decoder layer whose q/k/v/fc1 are fused LoRA layers of one rank."""
    try:
        from transformers.models.phi.modeling_phi import PhiDecoderLayer
    except ImportError:  # pragma: no cover - transformers without Phi
        return 0
    count = 0
    for block in model.modules():
        if not isinstance(block, PhiDecoderLayer) or type(block.input_layernorm) is not nn.LayerNorm:
            continue
        readers = [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.mlp.fc1]
        readers = [m for m in readers if hasattr(m, "fused_adapter")]
        ranks = {m.lora_A[m.fused_adapter].weight.shape[0] for m in readers}
        if len(readers) < 2 or len(ranks) != 1:
            continue
        shared = SharedA(readers)
        for index, layer in enumerate(readers):
            layer.shared, layer.shared_index = shared, index
        block.input_layernorm.__class__ = SharedInputLayerNorm
        block.input_layernorm.shared = shared
        count += 1
    return count


def fuse_lora(model: nn.Module) -> tuple[int, int]:
    """Swap every eligible LoRA layer of ``model`` to the fused forward and share the A products
    of Phi's parallel projections; returns (layers fused, decoder layers sharing). Call it after
    lora_compute.apply_lora_compute_dtype and before any wrapping (FSDP, torch.compile)."""
    from medreason.errors import env_switch

    fused, inplace, adapter_first = 0, env_switch(INPLACE_ENV), env_switch(ADAPTER_FIRST_ENV)
    for module in model.modules():
        if eligible(module):
            module.fused_adapter, module.fused_inplace = next(iter(module.lora_A)), inplace
            module.adapter_first = adapter_first
            module.__class__ = make_fused_class(type(module))
            fused += 1
    return fused, _share_phi_inputs(model) if fused else 0
