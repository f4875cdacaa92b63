"""Load a staged base model for training: precision, quantization, LoRA targets, LoRA.

The base model always comes from a staged local folder (see medreason.staging): training never
downloads. Quantized bases (int8 / nf4) go through bitsandbytes and need CUDA. The dtype and
quantization rules are medreason.loading's, shared with every inference load.
"""

from __future__ import annotations

import logging
from typing import Any

from medreason.config import PHI_TARGETS, LoraConfig, ModelConfig
from medreason.errors import InputError

log = logging.getLogger(__name__)

# All attention and MLP projections per architecture (config.model_type). LoRA on all of
# them (not just q/v) is what the QLoRA paper found necessary to match full fine-tuning.
AUTO_TARGETS: dict[str, list[str]] = {
    "phi": PHI_TARGETS,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
NEVER_TARGET = ("lm_head",)


def compute_dtype(model_cfg: ModelConfig, device_type: str) -> Any:
    """The dtype weights and activations use (medreason.loading.resolve_dtype: float32 off CUDA)."""
    from medreason.loading import resolve_dtype

    if device_type != "cuda" and model_cfg.dtype != "float32":
        log.info("no CUDA device: training in float32 instead of model.dtype=%s", model_cfg.dtype)
    return resolve_dtype(model_cfg.dtype, device_type)


def check_quantization(model_cfg: ModelConfig, device_type: str) -> None:
    """Fail early (exit 2) when a quantized base cannot work here."""
    if model_cfg.quantization == "none":
        return
    if device_type != "cuda":
        raise InputError(
            f"model.quantization={model_cfg.quantization} needs a CUDA GPU (bitsandbytes kernels); "
            "this machine has none. Use model.quantization=none (e.g. --set model.quantization=none "
            "--set model.dtype=float32) or run on a GPU node."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError(
            f"model.quantization={model_cfg.quantization} needs the bitsandbytes package: "
            "pip install bitsandbytes (it is in the project's image)"
        ) from None


def load_base_model(model_dir: str, model_cfg: ModelConfig, dtype: Any, device_index: int | None,
                    gradient_checkpointing: bool) -> Any:
    """The frozen base model from a staged folder, ready to take LoRA layers."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": model_cfg.trust_remote_code,
        "low_cpu_mem_usage": True,
    }
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    quantized = model_cfg.quantization != "none"
    if quantized:
        from medreason.loading import quantization_config

        kwargs["quantization_config"] = quantization_config(model_cfg, dtype)
        # bitsandbytes quantizes while loading onto the GPU; each rank loads onto its own.
        kwargs["device_map"] = {"": device_index or 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    for param in model.parameters():
        param.requires_grad_(False)
    # Quantized bases: we do what peft's prepare_model_for_kbit_training does (freeze, gradient
    # checkpointing, input grads) minus its cast of every non-quantized weight to float32: in
    # bf16 (fp32's exponent range) norms and logits do not overflow, and the cast would add
    # 2 bytes x 2 x 131M params (Phi-2's embedding and lm_head, 51200 x 2560 each) = ~0.5 GB.
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs; input grads are still enabled
        # so the reentrant variant (if someone switches) sees a tensor that requires grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def linear_layer_names(model: Any) -> list[str]:
    """Short names (last path component) of the linear layers LoRA could wrap."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    names = set()
    for full, module in model.named_modules():
        # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear, so they are included.
        if isinstance(module, (nn.Linear, Conv1D)):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(n for n in names if n not in NEVER_TARGET)


def resolve_target_modules(model: Any, target_modules: list[str] | str) -> list[str]:
    """'auto' -> the architecture's projections; an explicit list must all exist."""
    available = linear_layer_names(model)
    full_names = [n for n, _ in model.named_modules()]
    model_type = getattr(model.config, "model_type", "")
    if target_modules == "auto":
        family = [t for t in AUTO_TARGETS.get(model_type, []) if t in available]
        if family:
            return family
        log.info("lora.target_modules=auto: no projection list for model type %r; using every "
                 "linear layer except %s", model_type, ", ".join(NEVER_TARGET))
        return available
    missing = [
        t for t in target_modules
        if not any(n == t or n.endswith("." + t) for n in full_names)
    ]
    if missing:
        raise InputError(
            f"lora.target_modules: {', '.join(repr(m) for m in missing)} match no module of this "
            f"{type(model).__name__} (model type {model_type!r}); its linear layers are: "
            f"{', '.join(available)}. Fix the list or use lora.target_modules=auto."
        )
    return list(target_modules)


def apply_lora(model: Any, lora_cfg: LoraConfig, targets: list[str]) -> Any:
    """Wrap ``model`` in a PEFT LoRA model; only the adapter (and biases per lora.bias) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        bias=lora_cfg.bias,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts. 4-bit weights are packed two per byte, so their
    stored numel is doubled to count parameters, not bytes."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


# -- fast path for packed training rows ----------------------------------------------------------
# Name under which varlen_attention_forward is registered with transformers' AttentionInterface.
# transformers builds no mask for an attention implementation it has no mask function for, so a
# packed [B, L] batch reaches the attention with attention_mask=None and the record boundaries
# in the ``cu_seq_lens_q`` keyword (cumulative record starts over the flattened B*L tokens).
VARLEN_ATTENTION = "medreason_varlen"


def _varlen_kernel() -> Any:
    """torch's FlashAttention-2 varlen entry point (torch >= 2.9) or None.

    Its causal flag changed name: 2.9-2.11 take ``is_causal=True``, later versions
    ``window_size=(-1, 0)``; we adapt to whichever the installed torch has.
    """
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        def call(q: Any, k: Any, v: Any, cu: Any, max_len: int) -> Any:
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=True)
    elif "window_size" in params:
        def call(q: Any, k: Any, v: Any, cu: Any, max_len: int) -> Any:
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0))
    else:
        return None
    return call


def _segment_attention(q: Any, k: Any, v: Any, cu: Any, scaling: float) -> Any:
    """Reference path (CPU, or a torch without varlen): causal sdpa one record at a time.

    q/k/v are [T, H, D] over the flattened tokens; the result is [T, H, D]."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        seg = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            is_causal=True, scale=scaling)
        out[start:end] = seg.transpose(0, 1)
    return out


_KERNEL: list[Any] = []


def varlen_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """Causal attention inside each record of packed rows, no attention across records.

    transformers calls it with query/key/value as [B, H, L, D] and expects [B, L, H, D] back.
    On CUDA it runs FlashAttention-2's varlen kernel, which only visits the (record x record)
    causal blocks: for 2,048-token rows holding ~4 records of ~550 tokens that is
    sum(len_i^2)/2 ~= 0.6M of the 2.1M query-key pairs a plain causal row computes, and no
    [B, 1, L, L] mask is ever built (a dense mask also rules out the flash kernel in sdpa).
    """
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"attn_implementation={VARLEN_ATTENTION!r} needs cu_seq_lens_q (packed rows); "
                         "it is only for medreason's packed training batches")
    if dropout:
        raise ValueError("varlen attention here has no attention dropout; set attention_dropout=0")
    bsz, heads, length, dim = query.shape
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.transpose(1, 2).reshape(bsz * length, heads, dim)
    k = key.transpose(1, 2).reshape(bsz * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(bsz * length, value.shape[1], dim)
    if not _KERNEL:
        _KERNEL.append(_varlen_kernel())
    kernel = _KERNEL[0]
    if (query.is_cuda and kernel is not None and query.dtype in (torch.bfloat16, torch.float16)
            and abs(scale - dim ** -0.5) < 1e-6 * scale):
        max_len = int(kwargs.get("max_length_q") or length)
        out = kernel(q, k, v, cu, max_len)
    else:
        out = _segment_attention(q, k, v, cu, scale)
    return out.view(bsz, length, heads, dim), None


def register_varlen_attention() -> str:
    """Register the packed-rows attention with transformers (idempotent); returns its name."""
    import torch
    from transformers import AttentionInterface

    # Kept out of torch.compile graphs: the number of records per batch (the length of
    # cu_seq_lens_q) changes every step and would otherwise trigger recompilations.
    AttentionInterface.register(VARLEN_ATTENTION, torch.compiler.disable(varlen_attention_forward))
    return VARLEN_ATTENTION


def use_varlen_attention(model: Any) -> bool:
    """Switch a loaded model to the packed-rows attention. False when the model cannot."""
    register_varlen_attention()
    try:
        model.set_attn_implementation(VARLEN_ATTENTION)
    except (ValueError, AttributeError, NotImplementedError) as exc:
        log.info("packed-rows attention not available for %s (%s); keeping %s", type(model).__name__,
                 exc, getattr(model.config, "_attn_implementation", None))
        return False
    return getattr(model.config, "_attn_implementation", None) == VARLEN_ATTENTION


def compile_decoder_layers(model: Any) -> int:
    """torch.compile each decoder layer (regional compilation); returns how many.

    All 32 Phi-2 layers share one code object, so this compiles once (far less than the whole
    model; bench/RESULTS.md) and still fuses what matters: LayerNorm, gelu_new's ~8
    elementwise ops on the [tokens, 10240] activation (168 MB per 8k-token batch in bf16,
    ~2.7 GB of memory traffic per layer eager), bias adds, dropout and the residuals.
    The attention call is a graph break (see varlen_attention_forward)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.compile()
            count += 1
    return count
