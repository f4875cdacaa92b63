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


def _segment_attention_backward(grad: Any, q: Any, k: Any, v: Any, cu: Any, scaling: float) -> tuple[Any, Any, Any]:
    """Gradients of _segment_attention for q/k/v, written out per record.

    Autograd cannot record inside a custom op's implementation (it runs below the autograd
    dispatch key), so the backward of PACKED_ATTENTION_OP is the attention backward by hand:
    P = softmax(q k^T * s + causal), dV = P^T dO, dS = P * (dO v^T - rowsum(dO * O)),
    dQ = dS k * s, dK = dS^T q * s; computed in float32 at least (sdpa's backward also
    accumulates half-precision inputs in float32), returned in the inputs' dtypes."""
    import torch

    work = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        qs, ks, vs, gs = (t[start:end].transpose(0, 1).to(work) for t in (q, k, v, grad))  # [H, n, D]
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        probs = torch.softmax((qs @ ks.transpose(1, 2) * scaling).masked_fill(~causal, float("-inf")), dim=-1)
        dprobs = gs @ vs.transpose(1, 2)
        dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
        dq[start:end] = (dscores @ ks * scaling).transpose(0, 1).to(q.dtype)
        dk[start:end] = (dscores.transpose(1, 2) @ qs * scaling).transpose(0, 1).to(k.dtype)
        dv[start:end] = (probs.transpose(1, 2) @ gs).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


# The reference as a torch.library custom op: torch.compile keeps it as one opaque node of the
# layer graph (its fake implementation gives the output's shape without reading cu_seq_lens, so
# a changing number of records needs no recompilation), instead of a graph break around it.
PACKED_ATTENTION_OP = "medreason::packed_causal_attention"
_KERNEL: list[Any] = []  # [the varlen kernel or None], filled once by _prepare_attention()


def _prepare_attention() -> None:
    """Resolve the varlen kernel and define the reference custom ops (once per process)."""
    import torch

    if _KERNEL:
        return
    forward = torch.library.custom_op(
        PACKED_ATTENTION_OP, mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor cu, float scale) -> Tensor")(_segment_attention)
    backward = torch.library.custom_op(
        PACKED_ATTENTION_OP + "_backward", mutates_args=(),
        schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor cu, float scale) -> (Tensor, Tensor, Tensor)",
    )(_segment_attention_backward)

    @forward.register_fake
    def _(q: Any, k: Any, v: Any, cu: Any, scale: float) -> Any:
        return torch.empty_like(q)

    @backward.register_fake
    def _(grad: Any, q: Any, k: Any, v: Any, cu: Any, scale: float) -> tuple[Any, Any, Any]:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, cu, scale = inputs
        ctx.save_for_backward(q, k, v, cu)
        ctx.scale = scale

    def grads(ctx: Any, grad: Any) -> tuple[Any, ...]:
        q, k, v, cu = ctx.saved_tensors
        return (*backward(grad.contiguous(), q, k, v, cu, ctx.scale), None, None)

    forward.register_autograd(grads, setup_context=setup_context)
    _KERNEL.append(_varlen_kernel())


def _packed_attention(query: Any, key: Any, value: Any, scaling: float | None, dropout: float,
                      kwargs: dict[str, Any], reference: Any) -> tuple[Any, None]:
    """Shared body of the two registered forms; ``reference`` runs when the kernel cannot."""
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
        _prepare_attention()
    kernel = _KERNEL[0]
    if (query.is_cuda and kernel is not None and query.dtype in (torch.bfloat16, torch.float16)
            and abs(scale - dim ** -0.5) < 1e-6 * scale):
        # The row length bounds every record and is a shape of the batch, not a per-batch
        # value: the kernel sizes its grid with it and a compiled graph never specializes on
        # the longest record of a batch.
        out = kernel(q, k, v, cu, length)
    else:
        out = reference(q, k, v, cu, scale)
    return out.view(bsz, length, heads, dim), None


def varlen_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """Causal attention inside each record of packed rows, no attention across records.

    transformers calls it with query/key/value as [B, H, L, D] and expects [B, L, H, D] back.
    On CUDA it runs FlashAttention-2's varlen kernel, which only visits the (record x record)
    causal blocks: for 2,048-token rows holding ~4 records of ~550 tokens that is
    sum(len_i^2)/2 ~= 0.6M of the 2.1M query-key pairs a plain causal row computes, and no
    [B, 1, L, L] mask is ever built (a dense mask also rules out the flash kernel in sdpa).

    Traceable by torch.compile: the kernel is torch's own custom op (with a fake and an
    autograd formula) and the reference is PACKED_ATTENTION_OP, so a compiled decoder layer
    holds the attention, and the [B, H, L, D] <-> [T, H, D] copies around it are fused into
    the neighbouring kernels instead of running as separate copies at a graph break.
    """
    import torch

    return _packed_attention(query, key, value, scaling, dropout, kwargs, torch.ops.medreason.packed_causal_attention)


def graph_break_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                                  scaling: float | None = None, dropout: float = 0.0,
                                  **kwargs: Any) -> tuple[Any, None]:
    """varlen_attention_forward with the reference called directly (autograd through sdpa);
    registered under torch.compiler.disable when train.attention_in_graph is false."""
    return _packed_attention(query, key, value, scaling, dropout, kwargs, _segment_attention)


def register_varlen_attention(in_graph: bool = True) -> str:
    """Register the packed-rows attention with transformers; returns its name.

    ``in_graph``: traceable by torch.compile (see varlen_attention_forward). Otherwise wrapped
    in torch.compiler.disable, a graph break in every compiled layer (the form before
    train.attention_in_graph existed). The registry is per process: the last call wins."""
    import torch
    from transformers import AttentionInterface

    _prepare_attention()
    function = varlen_attention_forward if in_graph else torch.compiler.disable(graph_break_attention_forward)
    AttentionInterface.register(VARLEN_ATTENTION, function)
    return VARLEN_ATTENTION


def varlen_attention_in_graph() -> bool:
    """Whether the registered packed-rows attention is the traceable form."""
    from transformers import AttentionInterface

    return AttentionInterface().get(VARLEN_ATTENTION) is varlen_attention_forward


def _mark_records_dynamic(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: the length of cu_seq_lens (records per batch + 1) is a dynamic size for
    torch.compile from the first batch on, so a compiled layer is not recompiled when it changes
    (dynamo would otherwise compile once for the first length, then again with a dynamic one)."""
    import torch

    if torch.compiler.is_compiling():  # a whole-model compile traces this hook: nothing to mark then
        return
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        cu = kwargs.get(key)
        if isinstance(cu, torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(cu, 0)


def use_varlen_attention(model: Any, in_graph: bool = True) -> bool:
    """Switch a loaded model to the packed-rows attention. False when the model cannot.

    ``in_graph``: see register_varlen_attention."""
    register_varlen_attention(in_graph)
    try:
        model.set_attn_implementation(VARLEN_ATTENTION)
    except (ValueError, AttributeError, NotImplementedError) as exc:
        log.info("packed-rows attention not available for %s (%s); keeping %s", type(model).__name__,
                 exc, getattr(model.config, "_attn_implementation", None))
        return False
    if not getattr(model, "_medreason_records_hook", False):
        model.register_forward_pre_hook(_mark_records_dynamic, with_kwargs=True)
        model._medreason_records_hook = True
    return getattr(model.config, "_attn_implementation", None) == VARLEN_ATTENTION


def compile_decoder_layers(model: Any, backend: Any = "inductor") -> int:
    """torch.compile each decoder layer (regional compilation); returns how many.

    All 32 Phi-2 layers share one code object, so this compiles once (far less than the whole
    model; bench/RESULTS.md) and still fuses what matters: LayerNorm, gelu_new's ~8
    elementwise ops on the [tokens, 10240] activation (168 MB per 8k-token batch in bf16,
    ~2.7 GB of memory traffic per layer eager), bias adds, dropout and the residuals.
    The packed-rows attention is inside each layer's graph unless it was registered with
    in_graph=False (train.attention_in_graph), which makes it a graph break. ``backend``: the
    torch.compile backend (tests on a CPU without a C++ toolchain use "aot_eager")."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.compile(backend=backend)
            count += 1
    return count
