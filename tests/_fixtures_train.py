"""Builders for the train tests: a store holding a staged tiny model and a committed prepare stage.

The prepare stage is written the way `medreason prepare` commits it (tokenized splits through
medreason.tokens.save_split, then store.commit_dir with a prepare manifest), from the
medical-sounding corpus of tests/helpers.py tokenized with the tiny model's own tokenizer, so
a 2-layer model can visibly learn it in a few dozen steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_NAME = "tiny-phi"


def train_config(path: Path, **train: Any) -> Path:
    """Write a config YAML for the tiny model; ``train`` entries override the train section."""
    cfg = {
        "model": {"name_or_path": TINY_NAME, "dtype": "float32"},
        "data": {"source": "sample", "max_len_tokens": 96},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "auto"},
        "train": {
            "max_steps": 12, "micro_batch_size": 4, "grad_accum_steps": 1, "learning_rate": 3e-3,
            "lr_scheduler": "cosine", "warmup_steps": 2, "padding": "dynamic",
            "eval_every_steps": 4, "save_every_steps": 4, "keep_last_checkpoints": 2,
            "log_every_steps": 1, "seed": 7,
        },
    }
    for key, value in train.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg["train"][key] = value
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def stage_model(store_uri: str, model_dir: Path, name: str = TINY_NAME) -> str:
    """Commit ``model_dir`` as the staged base model ``name`` (revision main)."""
    from medreason.store import ArtifactStore, build_manifest, model_cache_name

    store = ArtifactStore(store_uri)
    rel = f"cache/models/{model_cache_name(name, None)}"
    if not store.is_committed(rel):
        manifest = build_manifest(stage="model", run_id="cache", config={"name_or_path": name},
                                  config_hash="")
        store.commit_dir(str(model_dir), rel, manifest)
    return rel


def tokenized_records(model_dir: Path, n: int, seed: int, max_len: int) -> list[tuple[str, list[int], int]]:
    from helpers import medical_corpus
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for i, text in enumerate(medical_corpus(n, seed=seed)):
        prompt, _, answer = text.partition("Reasoning:")
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok("Reasoning:" + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p_ids + r_ids)[:max_len]
        out.append((f"synthetic:{seed}-{i}", ids, min(len(p_ids), len(ids))))
    return out


def commit_prepare(store_uri: str, run_id: str, config_path: Path, model_dir: Path,
                   n_train: int = 48, n_eval: int = 12) -> dict[str, Any]:
    """A committed prepare stage for ``run_id`` with tokenized train/eval splits."""
    from medreason.config import build_config
    from medreason.store import ArtifactStore, build_manifest
    from medreason.tokens import TokenizedSplit, save_split

    cfg = build_config(config_file=str(config_path))
    store = ArtifactStore(store_uri)
    stage_model(store_uri, model_dir, cfg.model.name_or_path)
    with store.staged_folder() as tmp:
        max_len = cfg.data.max_len_tokens
        save_split(TokenizedSplit.from_records(tokenized_records(model_dir, n_train, 1, max_len)),
                   os.path.join(tmp, "train.tokens.safetensors"))
        save_split(TokenizedSplit.from_records(tokenized_records(model_dir, n_eval, 2, max_len)),
                   os.path.join(tmp, "eval.tokens.safetensors"))
        manifest = build_manifest(stage="prepare", run_id=run_id, config=cfg,
                                  config_hash=cfg.stage_hash("prepare"),
                                  metrics={"train_records": n_train, "eval_records": n_eval})
        return store.commit_dir(tmp, store.stage_rel(run_id, "prepare"), manifest)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def start_train(store_uri: str, run_id: str, config_path: Path, log_path: Path,
                extra_env: dict[str, str] | None = None, *args: str) -> subprocess.Popen:
    """`python -m jobs.train ...` in a subprocess, stdout+stderr into ``log_path``."""
    fh = open(log_path, "ab")  # the child keeps its own copy of the descriptor
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.train", "--store", store_uri, "--run", run_id,
             "--config", str(config_path), *args],
            env=subprocess_env(extra_env), cwd=str(config_path.parent), stdout=fh, stderr=subprocess.STDOUT,
        )
    finally:
        fh.close()


def wait_for(predicate: Any, timeout_s: float, proc: subprocess.Popen | None = None,
             what: str = "condition", log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}\n{tail}")
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")
