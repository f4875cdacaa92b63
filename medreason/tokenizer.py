"""The one tokenizer loader, shared by model staging, the jobs and inference.

It sits below both medreason.staging (which re-saves and checks a staged model's tokenizer) and
medreason.loading (which builds models for inference), so neither imports the other for it.
"""

from __future__ import annotations

from typing import Any


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding and a pad token (= EOS when the tokenizer has none), on this copy only."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model_dir: str, model_cfg: Any = None, *, for_generation: bool = False) -> Any:
    """The tokenizer of a local model folder (fast tokenizers read tokenizer.json: well under a
    second). ``model_cfg`` supplies trust_remote_code (off without it); ``for_generation`` sets
    left padding and a pad token for batched decoding (``prepare_tokenizer``)."""
    from transformers import AutoTokenizer

    trust = bool(model_cfg.trust_remote_code) if model_cfg is not None else False
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    return prepare_tokenizer(tokenizer) if for_generation else tokenizer
