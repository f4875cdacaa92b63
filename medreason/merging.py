"""Fold a LoRA adapter into its base model, prove the result computes the same, and export it.

Steps (jobs/merge.py runs them in this order):

1. load the base unquantized in ``merge.dtype`` (float32 on a CPU); for a QLoRA run with
   ``merge.dequantize`` load it in the run's quantization on CUDA and replace every
   bitsandbytes layer with a plain Linear holding its de-quantized weight, i.e. exactly the
   weights the adapter was trained against;
2. attach the adapter (an unmerged PeftModel) and record reference logits on a few held-out
   prompts;
3. ``merge_and_unload`` (W' = W + (alpha/r) * B @ A per target layer), save sharded
   safetensors + tokenizer + config + generation config + a model card;
4. load the saved folder back with plain ``AutoModelForCausalLM.from_pretrained`` and compare its
   logits with the reference: max |difference| and top-1 agreement. Checking the written files,
   not the in-memory model, also catches a bad save.
"""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Any

from medreason.errors import InputError

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The merged model's logits differ from base + adapter beyond the tolerance (exit 1)."""


# -- loading --------------------------------------------------------------------------------------
def merge_dtype(name: str, device_type: str) -> Any:
    """``merge.dtype`` on CUDA; float32 on CPUs (medreason.loading.resolve_dtype), which also
    keeps bf16 rounding out of the parity check: a 2.78e9-param Phi-2 merge needs 11 GB in fp32."""
    from medreason.loading import resolve_dtype

    return resolve_dtype(name, device_type)


def dequantize_bnb_layers(model: Any, dtype: Any) -> int:
    """Replace every bitsandbytes Linear8bitLt/Linear4bit with an nn.Linear of its de-quantized
    weight in ``dtype``; returns how many were replaced."""
    import torch
    import torch.nn as nn
    from peft.utils.integrations import dequantize_bnb_weight

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise InputError("merge.dequantize needs the bitsandbytes package (it is in the project's image)") from None
    bnb_types = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, bnb_types)]
    for name, module in targets:
        weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                        device=weight.device, dtype=dtype)
        with torch.no_grad():
            new.weight.copy_(weight.to(dtype))
            if module.bias is not None:
                new.bias.copy_(module.bias.to(dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    # The model is now a plain float model; drop the quantization markers so save_pretrained
    # writes ordinary weights and config.json has no quantization_config.
    for attr in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    return len(targets)


def load_base_for_merge(base_dir: str, model_cfg: Any, merge_cfg: Any) -> tuple[Any, Any]:
    """(base model ready for the adapter, its device)."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = merge_dtype(merge_cfg.dtype, device.type)
    if merge_cfg.dequantize and model_cfg.quantization != "none":
        if not cuda:
            raise InputError(
                f"merge.dequantize with model.quantization={model_cfg.quantization} needs a CUDA GPU "
                "(bitsandbytes de-quantization); run the merge on a GPU node, or set "
                "merge.dequantize=false to merge onto the original unquantized weights"
            )
        from medreason.loading import quantization_config

        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=dtype, quantization_config=quantization_config(model_cfg, dtype),
            device_map={"": 0}, trust_remote_code=model_cfg.trust_remote_code,
        )
        n = dequantize_bnb_layers(model, dtype)
        log.info("de-quantized %d %s layers to %s", n, model_cfg.quantization, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code
        ).to(device)
    model.eval()
    return model, device


# -- parity ---------------------------------------------------------------------------------------------
def compute_logits(model: Any, prompts: list[list[int]]) -> list[Any]:
    """Float32 CPU logits per prompt, one forward each (no padding to get wrong)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], dtype=torch.long, device=device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return out


def compare_logits(reference: list[Any], candidate: list[Any]) -> dict[str, float]:
    """Max |logit difference| and the share of positions whose argmax agrees."""
    max_abs, agree, total = 0.0, 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        max_abs = max(max_abs, float((ref - cand).abs().max()))
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        total += ref.shape[0]
    return {"max_abs_diff": max_abs, "top1_agreement": agree / total if total else 1.0,
            "positions": total, "prompts": len(reference)}


def check_parity(result: dict[str, float], max_abs_diff: float, min_top1: float) -> None:
    if result["max_abs_diff"] > max_abs_diff or result["top1_agreement"] < min_top1:
        raise ParityError(
            f"merge parity check failed: max |logit diff| {result['max_abs_diff']:.3g} "
            f"(tolerance merge.parity_max_abs_diff={max_abs_diff}), top-1 agreement "
            f"{result['top1_agreement']:.4f} (needs merge.parity_min_top1={min_top1}) over "
            f"{result['positions']} positions of {result['prompts']} prompts; the merged model was not committed"
        )


# -- merging and saving ----------------------------------------------------------------------------------
def merge_and_save(
    base: Any,
    adapter_dir: str,
    tokenizer: Any,
    out_dir: str,
    parity_prompts: list[list[int]],
    max_shard_size: str,
    card: str | None = None,
) -> dict[str, float]:
    """Attach the adapter, take reference logits, merge, save, reload, compare. Returns parity."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).eval()
    reference = compute_logits(peft_model, parity_prompts)
    dtype = next(base.parameters()).dtype
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    if card is not None:
        with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(card)
    device = next(merged.parameters()).device
    del merged, peft_model, base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).to(device).eval()
    return compare_logits(reference, compute_logits(reloaded, parity_prompts))


def zip_folder(folder: str, zip_path: str) -> None:
    """adapter.zip: the adapter folder's files (no MANIFEST), paths relative to the folder."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for dirpath, _dirs, files in os.walk(folder):
            for name in sorted(files):
                if name == "MANIFEST.json" or name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                zf.write(full, os.path.relpath(full, folder))


def _data_lines(d: Any, prepare_manifest: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Data", "", f"- source: `{d.source}`" + (f" (file {d.hub_file})" if d.source.startswith("hub:") else ""),
             f"- prompt template: `{d.template}`; max length {d.max_len_tokens} tokens; "
             f"held-out fraction {d.eval_fraction} (seed {d.split_seed})"]
    pm = (prepare_manifest or {}).get("metrics") or {}
    counts = {k: v for k, v in pm.items() if isinstance(v, (int, float)) and ("train" in k or "eval" in k)}
    if counts:
        lines.append("- " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return lines


def _eval_lines(eval_metrics: dict[str, Any] | None) -> list[str]:
    if not eval_metrics:
        return []
    lines = ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
    return lines + [f"| {key} | {value} |" for key, value in sorted(eval_metrics.items())]


def model_card(
    run_id: str,
    cfg: Any,
    base_name: str,
    train_manifest: dict[str, Any],
    prepare_manifest: dict[str, Any] | None,
    eval_metrics: dict[str, Any] | None,
    parity: dict[str, float],
) -> str:
    """README.md of the merged model: what it is, how it was trained, on what, how it scores."""
    t, lo = cfg.train, cfg.lora
    tm = train_manifest.get("metrics") or {}
    lines = [
        "---",
        f"base_model: {base_name}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [medical, medreason, lora, merged]",
        "---",
        "",
        f"# {base_name} + MedReason LoRA (run `{run_id}`), merged",
        "",
        f"{base_name} fine-tuned with a LoRA adapter on clinical reasoning chains from the MedReason "
        "dataset, with the adapter folded into the weights: load it with "
        "`AutoModelForCausalLM.from_pretrained` like any causal LM. Research use only; not medical advice.",
        "",
        "## Training",
        "",
        f"- LoRA: r={lo.r}, alpha={lo.alpha}, dropout={lo.dropout}, targets={lo.target_modules}",
        f"- base precision: {cfg.model.dtype}, quantization: {cfg.model.quantization}"
        + (" (merged onto the de-quantized weights)" if cfg.merge.dequantize and cfg.model.quantization != "none" else ""),
        f"- steps: {tm.get('steps', t.max_steps)}, micro batch {t.micro_batch_size} x grad accum "
        f"{t.grad_accum_steps}, lr {t.learning_rate} ({t.lr_scheduler}, warmup {t.warmup_steps}), seed {t.seed}",
    ]
    lines += [f"- {key.replace('_', ' ')}: {tm[key]}" for key in ("final_loss", "best_eval_loss", "best_step")
              if key in tm]
    lines += _data_lines(cfg.data, prepare_manifest) + _eval_lines(eval_metrics)
    lines += [
        "",
        "## Merge check",
        "",
        f"Logits of the merged model vs base + adapter on {parity['prompts']} held-out prompts "
        f"({parity['positions']} positions): max |difference| {parity['max_abs_diff']:.3g}, "
        f"top-1 agreement {100 * parity['top1_agreement']:.2f}%.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        "```",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(folder: str, repo_id: str, private: bool = True) -> str:
    """Upload the merged model folder to a hub model repo with the standard HF token env/file."""
    from huggingface_hub import HfApi

    api = HfApi()  # token from HF_TOKEN or the huggingface-cli login file, never from config
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                             commit_message="Upload merged medreason model")
    return str(getattr(info, "commit_url", repo_id))
