"""Build committed prepare/train stages by hand (tiny model, random non-zero LoRA) so the
evaluate and merge jobs can be tested without running prepare and train."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

OPTIONS = {"A": "myocardial infarction", "B": "pneumonia", "C": "ischemic stroke", "D": "gout"}


PHI_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_overrides(model_dir: Path | str, targets: list[str] | None = None) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        "model.dtype=float32",
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0.0",
        f"lora.target_modules=[{','.join(targets or PHI_TARGETS)}]",
        "data.template=medreason",
        "eval.max_new_tokens=8",
        "eval.batch_size=4",
        "merge.dtype=float32",
        "merge.parity_prompts=3",
    ]


def records(n: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        gold = "ABCD"[i % 4]
        out.append({
            "uid": f"{'medqa' if i % 2 else 'medmcqa'}:{100 + i}",
            "dataset_name": "medqa" if i % 2 else "medmcqa",
            "id_in_dataset": 100 + i,
            "question": f"A {rng.randint(20, 80)}-year-old man presents with chest pain. Diagnosis?",
            "options": "Answer Choices:\n" + "\n".join(f"{k}. {v}" for k, v in OPTIONS.items()),
            "options_map": dict(OPTIONS),
            "reasoning": "Finding reasoning paths: chest pain -> troponin.",
            "answer": OPTIONS[gold],
            "answer_letter": gold,
        })
    return out


def commit_prepare(store: Any, run: str, cfg: Any, tokenizer: Any, recs: list[dict[str, Any]],
                   inputs: dict[str, str] | None = None) -> dict:
    """A prepare commit with eval.jsonl and eval.tokens.safetensors (prompt masked)."""
    from medreason.data import encode_prompt, format_prompt, format_response
    from medreason.store import build_manifest
    from medreason.tokens import TokenizedSplit, save_split

    template = cfg.data.template
    with store.staged_folder() as out:
        lines, toks = [], []
        for rec in recs:
            prompt = format_prompt(rec, template, tokenizer)
            response = format_response(rec, template)
            rec = dict(rec, prompt=prompt, response=response)
            lines.append(json.dumps(rec))
            p = encode_prompt(tokenizer, prompt, template)
            r = tokenizer(response, add_special_tokens=False)["input_ids"]
            toks.append((rec["uid"], p + r + [tokenizer.eos_token_id], len(p)))
        for name in ("eval", "train"):
            with open(os.path.join(out, f"{name}.jsonl"), "w") as fh:
                fh.write("\n".join(lines) + "\n")
            save_split(TokenizedSplit.from_records(toks), os.path.join(out, f"{name}.tokens.safetensors"))
        manifest = build_manifest(stage="prepare", run_id=run, config=cfg,
                                  config_hash=cfg.stage_hash("prepare"), inputs=inputs,
                                  metrics={"n_train": len(recs), "n_eval": len(recs)})
        return store.commit_dir(out, store.stage_rel(run, "prepare"), manifest)


def make_adapter(model_dir: Path | str, out_dir: str, seed: int = 0, targets: list[str] | None = None) -> None:
    """A LoRA adapter with random (non-zero) A and B, so merging changes the logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=targets or PHI_TARGETS)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
    model.save_pretrained(out_dir)


def commit_train(store: Any, run: str, cfg: Any, model_dir: Path | str, steps: int = 20,
                 targets: list[str] | None = None) -> dict:
    """A train commit: adapter/, one committed checkpoint, metrics.jsonl; best_step 10."""
    from medreason.store import build_manifest

    train_rel = store.stage_rel(run, "train")
    with store.staged_folder() as ck:
        make_adapter(model_dir, ck, seed=1, targets=targets)
        store.commit_dir(ck, f"{train_rel}/checkpoints/step-10",
                         build_manifest(stage="checkpoint", run_id=run, config=cfg,
                                        config_hash=cfg.stage_hash("train")))
    with store.staged_folder() as out:
        make_adapter(model_dir, os.path.join(out, "adapter"), targets=targets)
        with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
            for step in range(1, steps + 1):
                row = {"step": step, "loss": 3.0 - step * 0.05, "lr": 1e-4}
                if step % 5 == 0:
                    row["eval_loss"] = 3.1 - step * 0.04
                fh.write(json.dumps(row) + "\n")
        manifest = build_manifest(stage="train", run_id=run, config=cfg, config_hash=cfg.stage_hash("train"),
                                  metrics={"best_step": 10, "best_eval_loss": 2.7, "final_loss": 2.0})
        return store.commit_dir(out, train_rel, manifest, clear=False)


def build_run(store_dir: Path | str, model: Path | str, run: str = "r1", n: int = 6,
              train: bool = True, targets: list[str] | None = None,
              extra: list[str] = ()) -> tuple[Any, Any, list[str]]:
    """Stage the model and commit prepare (+ train). Returns (store, config, --set overrides)."""
    from transformers import AutoTokenizer

    from medreason.config import build_config
    from medreason.staging import local_model_dir, stage_model
    from medreason.store import ArtifactStore, manifest_hash

    store = ArtifactStore(str(store_dir))
    overrides = model_overrides(model, targets) + list(extra)
    cfg = build_config(overrides=overrides)
    model_manifest = stage_model(store, cfg.model)
    model_dir = local_model_dir(store, cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The inputs prepare itself records, so a real `medreason prepare` sees this commit as done.
    commit_prepare(store, run, cfg, tokenizer, records(n), inputs={"model": manifest_hash(model_manifest)})
    if train:
        commit_train(store, run, cfg, model_dir, targets=targets)
    return store, cfg, overrides


def set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]
