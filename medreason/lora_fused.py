"""LoRA's forward in fewer, larger kernels (``train.lora_fused``, on by default).

PEFT's vanilla LoRA forward is ``base(x) + B(A(dropout(x))) * scaling``: the B product is written
to memory as a whole [tokens, out] tensor, scaled and added by another kernel, and every adapted
projection runs its own A product over its input. A kernel profile of the phi2-bf16 preset on an
H200 puts the adapters' small products at about a tenth of the kernel time (84 of 799 ms over two
steps in the profile of the fifth round's first call, at a8ec393). Two changes, for layers whose products run in the activations' dtype
(``train.lora_compute_dtype: base``) on a plain ``nn.Linear`` base, without LoRA dropout:

1. The B product is accumulated by the matrix product itself, ``addmm(base(x), h, (scaling *
   B)^T)``: cuBLAS reads base(x) as its C operand, so the [tokens, out] product is never written
   and read back, and the scaling goes onto the [out, r] weight instead of the product.
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


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of a fused LoRA layer (the class ``make_fused_class`` builds)."""
    name = self.fused_adapter
    if args or kwargs or self.disable_adapters or self.merged or x.dtype == torch.float16 \
            or list(self.active_adapters) != [name]:
        return super(type(self), self).forward(x, *args, **kwargs)
    base = self.base_layer(x)
    shared = getattr(self, "shared", None)
    h = shared.take(self, x) if shared is not None else own_a_product(self, x)
    b = (self.lora_B[name].weight * self.scaling[name]).to(x.dtype)
    out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
    return out.view(base.shape)


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
    fused = 0
    for module in model.modules():
        if eligible(module):
            module.fused_adapter = next(iter(module.lora_A))
            module.__class__ = make_fused_class(type(module))
            fused += 1
    return fused, _share_phi_inputs(model) if fused else 0
