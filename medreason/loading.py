"""Load models for every job and bench: dtype, quantization, base model, tokenizer, and the
model a run's stage asks for (``load_for_inference``).

One rule per question, so evaluate, generate and merge see the same model:

- dtype: ``model.dtype`` on CUDA, float32 elsewhere (``resolve_dtype``);
- quantization: bitsandbytes int8 or NF4 with double quantization, built by
  ``quantization_config`` (training's loader in medreason.modeling uses it too);
- adapters: base + adapter is a PeftModel whose adapter is folded into the weights while it runs
  (``adapter_toggle``), unless the loaded base is quantized (see ``fold_adapter``).

Training keeps its own loader (medreason.modeling.load_base_model: frozen, gradient
checkpointing) built on the same dtype and quantization helpers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from medreason.errors import InputError
from medreason.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


# -- dtype and quantization ---------------------------------------------------------------------
def resolve_dtype(name: str, device_type: str) -> Any:
    """The torch dtype of ``model.dtype`` (or ``merge.dtype``) on this device type.

    Off CUDA it is float32 whatever the config says: bf16 matmuls on CPUs without AMX run
    several times slower than fp32, fp16 is not worth it, and the models that run on a CPU here
    are small (135M params in fp32 is 0.54 GB).
    """
    import torch

    if device_type != "cuda":
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(model_cfg: Any, compute_dtype: Any) -> Any:
    """The bitsandbytes config of ``model.quantization`` (int8 or nf4)."""
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # NF4 with double quantization: the quantization constants are themselves quantized,
    # ~0.37 bits/param saved (0.5 -> 0.127), i.e. ~130 MB on Phi-2's 2.78e9 parameters.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def is_quantized(model: Any) -> bool:
    """Whether a loaded model holds bitsandbytes weights."""
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_quantized", False))


# -- base model and tokenizer -------------------------------------------------------------------
def load_causal_lm(model_dir: str, model_cfg: Any, device: Any, quantized: bool = True) -> Any:
    """A model from a local folder for inference, in the run's dtype (and quantization, on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(model_cfg.dtype, device.type)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if device.type == "cuda":
        # Straight onto the GPU: transformers reads the safetensors shards into device memory,
        # with no full float copy in host memory first (and bitsandbytes quantizes while loading).
        kwargs["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
        if quantized and model_cfg.quantization != "none":
            kwargs["quantization_config"] = quantization_config(model_cfg, dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)
    model.eval()
    return model


def fuse_activations(model: Any) -> int:
    """Swap every ``gelu_new`` activation module (transformers' NewGELUActivation, Phi-2's MLP
    activation) of a model loaded for inference for the one-kernel tanh GELU
    (``ACT2FN["gelu_pytorch_tanh"]``: ``torch.nn.functional.gelu(x, approximate="tanh")``).
    Returns how many modules were swapped.

    Same formula, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); run eagerly, NewGELU is ~7
    elementwise kernels over the [tokens, intermediate] activation (10240 wide for Phi-2), the
    fused one reads and writes it once. The two differ by float rounding only (~1e-7 relative in
    float32). For inference only: training compiles its layers, which fuses the GELU already,
    and merge/export keep the model as it was loaded.
    """
    from transformers.activations import ACT2FN, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
                swapped += 1
    if swapped:
        log.info("%d gelu_new activation(s) run as the fused tanh GELU (eval.fused_activation)", swapped)
    return swapped


# -- a run's stage outputs ----------------------------------------------------------------------
def require_stage(store: Any, run_id: str, stage: str, hint: str) -> dict[str, Any]:
    """The manifest of a committed stage; InputError with ``hint`` when it is not committed."""
    manifest = store.read_manifest(store.stage_rel(run_id, stage))
    if manifest is None:
        raise InputError(f"run {run_id!r} has no committed {stage} stage: {hint}")
    return manifest


def _step_name(store: Any, run_id: str, manifest: dict[str, Any], which: str) -> str:
    """eval.checkpoint best -> step-<best_step>; other names unchanged."""
    if which != "best":
        return which
    best = (manifest.get("metrics") or {}).get("best_step")
    if best is None:
        raise InputError(f"run {run_id!r}: the train manifest records no best_step (no eval during training)")
    return f"step-{int(best)}"


def resolve_adapter(store: Any, run_id: str, which: str) -> tuple[str, str, dict[str, Any]]:
    """(local adapter folder, label, train manifest) for eval.checkpoint final|best|step-<N>."""
    train_rel = store.stage_rel(run_id, "train")
    manifest = require_stage(
        store, run_id, "train", "run `medreason train` first, or evaluate the base alone with "
        "--set eval.checkpoint=none"
    )
    if which == "final":
        if not any(n.startswith("adapter/") for n in manifest.get("files", {})) and not store.is_committed(
            f"{train_rel}/adapter"
        ):
            raise InputError(f"run {run_id!r}: the train commit holds no adapter/ folder; re-run `medreason train`")
        return store.materialize_subfolder(train_rel, manifest, "adapter"), "final", manifest
    which = _step_name(store, run_id, manifest, which)
    if which.startswith("step-") and which[5:].isdigit():
        rel = f"{train_rel}/checkpoints/{which}"
        if not store.is_committed(rel):
            have = store.list_committed(f"{train_rel}/checkpoints", prefix="step-")
            raise InputError(
                f"run {run_id!r}: checkpoint {which} is not committed; committed: {', '.join(have) or 'none'}"
            )
        return store.materialize(rel), which, manifest
    raise InputError(f"eval.checkpoint: {which!r} is not one of final, best, merged, none, step-<N>")


# -- the model a stage runs -----------------------------------------------------------------------
def fold_adapter(base: Any) -> bool:
    """The one adapter-folding rule: fold unless the loaded base holds quantized weights.

    Merging into 4/8-bit weights re-quantizes them, and the adapter would no longer sit on the
    weights it was trained against; on any other base the fold is the arithmetic the merge
    stage does (its parity check bounds the difference, ~1e-5 in fp32).
    """
    return not is_quantized(base)


def adapter_toggle(model: Any, fold: bool = True) -> Callable[[bool], Any]:
    """A context factory over a PeftModel: ``toggle(False)`` runs it with the adapter switched
    off (the base); ``toggle(True)`` folds the adapter into the weights for the duration.

    Folding (W + (alpha/r) B A, undone afterwards) makes the fine-tuned model as fast as the
    base: unmerged, every LoRA-wrapped projection runs two extra small matmuls per decoding
    step. ``fold=False`` leaves the adapter unmerged (see ``fold_adapter``).
    """
    @contextmanager
    def toggle(enabled: bool) -> Iterator[None]:
        if not enabled:
            with model.disable_adapter():
                yield
            return
        if not fold:
            yield
            return
        model.merge_adapter()
        try:
            yield
        finally:
            model.unmerge_adapter()

    return toggle


@dataclass
class InferenceModel:
    """A model ready to generate, and the context to run it in (``with m.context(): ...``)."""

    label: str  # "base" or "finetuned"
    model: Any
    tokenizer: Any
    adapter_on: bool = True
    toggle: Callable[[bool], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def context(self) -> Any:
        return self.toggle(self.adapter_on) if self.toggle else nullcontext()


def _timed_import(package: str) -> None:
    """Import a heavy package (and, for transformers, its model classes) and log how long it
    took, so a job's start-up log tells imports from loading: transformers pulls in scikit-learn
    when it is installed, peft pulls in bitsandbytes, seconds each."""
    import importlib
    import sys

    if package in sys.modules and package != "transformers":
        return
    started = time.monotonic()
    importlib.import_module(package)
    if package == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (resolves the lazy modules)
    took = time.monotonic() - started
    if took >= 0.05:
        log.info("%s imported in %.1f s", package, took)


# Called with each tokenizer as soon as it is loaded, before its model: evaluate starts encoding
# its requests there, so the encoding runs while the model loads.
TokenizerHook = Callable[[Any], None]


def _tokenizer_then_model(model_dir: str, cfg: Any, device: Any, on_tokenizer: TokenizerHook | None,
                          quantized: bool = True, tokenizer_cfg: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a folder, the tokenizer first; each load's time logged."""
    started = time.monotonic()
    tokenizer = load_tokenizer(model_dir, tokenizer_cfg, for_generation=True)
    loaded = time.monotonic()
    log.info("tokenizer of %s loaded in %.1f s", model_dir, loaded - started)
    if on_tokenizer is not None:
        on_tokenizer(tokenizer)
    model = load_causal_lm(model_dir, cfg.model, device, quantized=quantized)
    log.info("model of %s loaded in %.1f s", model_dir, time.monotonic() - loaded)
    return model, tokenizer


def _load_base(store: Any, cfg: Any, device: Any, on_tokenizer: TokenizerHook | None = None) -> InferenceModel:
    from medreason.staging import local_model_dir

    started = time.monotonic()
    base_dir = local_model_dir(store, cfg.model)
    log.info("base model folder %s ready in %.1f s", base_dir, time.monotonic() - started)
    model, tokenizer = _tokenizer_then_model(base_dir, cfg, device, on_tokenizer, tokenizer_cfg=cfg.model)
    return InferenceModel("base", model, tokenizer, info={"source": "base"})


def _load_merged(store: Any, run_id: str, cfg: Any, device: Any, hint: str,
                 on_tokenizer: TokenizerHook | None = None) -> InferenceModel:
    manifest = require_stage(store, run_id, "merge", hint)
    merged_dir = store.materialize_subfolder(store.stage_rel(run_id, "merge"), manifest, "model")
    # The merged folder is plain float weights with the tokenizer saved next to them.
    model, tokenizer = _tokenizer_then_model(merged_dir, cfg, device, on_tokenizer, quantized=False)
    return InferenceModel("finetuned", model, tokenizer, info={"source": "merged"})


def load_for_inference(store: Any, run_id: str, which: str, cfg: Any, device: Any = None,
                       compare_base: bool = False,
                       merge_hint: str = "run `medreason merge` first",
                       on_tokenizer: TokenizerHook | None = None) -> list[InferenceModel]:
    """The model(s) of a run to generate with: ``which`` = final | best | step-<N> (base + that
    adapter), merged (the merge stage's model) or none/base (the base alone).

    With ``compare_base`` the base comes first in the list, labelled "base": for an adapter the
    same weights with the adapter switched off (no second load); for merged a separate load.
    A missing adapter or stage fails (InputError) before any model is loaded. ``on_tokenizer``
    is called with each tokenizer loaded, before its model is.
    """
    _timed_import("transformers")
    if which == "merged":
        out = [_load_merged(store, run_id, cfg, device, merge_hint, on_tokenizer)]
        if compare_base:
            out.insert(0, _load_base(store, cfg, device, on_tokenizer))
        return out
    if which in ("none", "base"):
        return [_load_base(store, cfg, device, on_tokenizer)]
    adapter_dir, label, _ = resolve_adapter(store, run_id, which)
    base = _load_base(store, cfg, device, on_tokenizer)
    _timed_import("peft")
    from peft import PeftModel

    started = time.monotonic()
    model = PeftModel.from_pretrained(base.model, adapter_dir, is_trainable=False).eval()
    log.info("adapter %s loaded in %.1f s", label, time.monotonic() - started)
    toggle = adapter_toggle(model, fold=fold_adapter(base.model))
    out = [InferenceModel("finetuned", model, base.tokenizer, True, toggle, info={"source": f"adapter ({label})"})]
    if compare_base:
        out.insert(0, InferenceModel("base", model, base.tokenizer, False, toggle, info={"source": "base"}))
    return out
