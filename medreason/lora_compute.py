"""The dtype LoRA's adapter products run in: the activations' (bf16 on a bf16 base) or float32.

PEFT keeps the adapter weights in float32 and, in every LoRA ``Linear`` forward (plain and
bitsandbytes 4/8-bit), casts the bf16 activations up to them (``_cast_input_dtype``), so the
two adapter GEMMs and their outputs (Phi-2's fc1 adapter writes tokens x 10,240 values per
micro-batch) run and are stored in float32. ``lora_compute_dtype="base"`` (``use_base_dtype``)
turns that cast off and casts the weights down instead, inside autograd: the products run in
the activations' dtype (bf16 or float32; float16 activations are still cast up, see
ActivationDtypeLinear) while the trainable weights, their gradients (the cast's backward casts
them back to float32) and the optimizer state stay float32. The weights' names and dtypes do not
change, so saved adapters, checkpoints, resume and merging see exactly what they saw before.
On a float32 base (CPU training) the casts are no-ops and every number stays bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_COMPUTE_DTYPES = ("base", "float32")


class ActivationDtypeLinear(nn.Linear):
    """An ``nn.Linear`` (a LoRA A or B matrix) computing in its input's dtype.

    Only the class changes, not the parameters, so state-dict keys, FSDP2 sharding and
    torch.compile see the same module; the weight cast is part of the traced graph.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            # float16's 5 exponent bits: without loss scaling (this project has none) the
            # adapter's weight gradients, sums over every token of a micro-batch, can leave its
            # range; float16 activations keep PEFT's float32 products.
            x = x.to(self.weight.dtype)
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)


def _adapter_linears(layer: Any) -> list[nn.Module]:
    """The A and B matrices of a vanilla LoRA layer (empty for DoRA and other variants, whose
    forward reads the weights itself and would see mixed dtypes)."""
    if getattr(layer, "lora_variant", None):
        return []
    out: list[nn.Module] = []
    for holder in (getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)):
        if isinstance(holder, nn.ModuleDict):
            out += [m for m in holder.values() if type(m) in (nn.Linear, ActivationDtypeLinear)]
    return out


def use_base_dtype(model: Any) -> int:
    """Make every vanilla LoRA layer of ``model`` run its adapter products in the activations'
    dtype; returns how many layers changed. Call it after LoRA is applied and before any
    wrapping (FSDP, torch.compile): it swaps module classes, which wrappers capture."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        linears = _adapter_linears(module)
        if not linears:
            continue
        # peft's _cast_input_dtype reads this flag: the input stays in the activations' dtype.
        module.cast_input_dtype_enabled = False
        for linear in linears:
            linear.__class__ = ActivationDtypeLinear
        count += 1
    return count


def apply_lora_compute_dtype(model: Any, mode: str) -> int:
    """``mode`` 'base': see use_base_dtype; 'float32': PEFT's own float32 products (0 changed)."""
    if mode not in LORA_COMPUTE_DTYPES:
        raise ValueError(f"lora_compute_dtype must be one of {LORA_COMPUTE_DTYPES}, not {mode!r}")
    return use_base_dtype(model) if mode == "base" else 0


def describe(model: Any, dtype: Any) -> str:
    """The 'training paths' words for the adapter products of ``model`` (trained in ``dtype``)."""
    if not any(isinstance(m, ActivationDtypeLinear) for m in model.modules()):
        return "float32 (PEFT casts the activations to the float32 weights)"
    name = str(dtype).replace("torch.", "")
    if name == "float32":
        return "float32 (the activations' dtype)"
    if name == "float16":
        return "float32 (float16 activations are cast up, as PEFT does)"
    return f"{name} (the activations' dtype; weights, gradients and optimizer state float32)"
