"""Stage a random-weight model of the exact Phi-2 shape plus a MedReason-like prepare stage.

Throughput does not depend on weight values, so this lets `medreason train` be benchmarked on a
GPU machine with no internet:

    python bench/stage_phi2_random.py --store /data/store --run bench
    medreason train --store /data/store --run bench --preset phi2-bf16 --set train.max_steps=50

What it writes into the store:
  cache/models/microsoft--phi-2@main/   config.json, generation_config.json, sharded
        *.safetensors (bf16, 2.78e9 parameters, ~5.6 GB) and a byte-level BPE tokenizer trained
        on generated text (Phi-2's tokenizer has 50,295 entries for a 51,200-row embedding; we
        ask for the same 50,295). This is where `--preset phi2-bf16` / `phi2-nf4` / `phi2-seed`
        (model microsoft/phi-2, no revision) look for the staged base model.
  runs/<run>/prepare/   train.tokens.safetensors and eval.tokens.safetensors with synthetic
        records whose lengths follow formatted MedReason records (log-normal, median ~550
        tokens, long tail clipped at 2,048), ~30% prompt tokens, each ending with EOS; a
        stats.json; MANIFEST.json. No train.jsonl/eval.jsonl: `medreason evaluate` cannot run on
        this synthetic stage, only `medreason train`.

Building and saving the model takes a few minutes on CPU and ~6 GB of RAM beyond the weights'.
`--layers 2` gives a quick check of the script itself (same widths, 2 layers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("stage_phi2_random")

PHI2 = {
    "vocab_size": 51200,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "hidden_act": "gelu_new",
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
}
TOKENIZER_VOCAB = 50295  # Phi-2's tokenizer size (the embedding is padded to 51,200 rows)
EOS = "<|endoftext|>"
# MedReason formatted records with Phi-2's tokenizer: median ~550 tokens, tail to 2k.
# log-normal with sigma 0.45: p90 = 550 * e^(1.28*0.45) = ~980, p99 = ~1560, clipped at 2048.
LEN_MEDIAN, LEN_SIGMA, LEN_MIN, LEN_MAX = 550, 0.45, 64, 2048


def generated_text(n_words: int, seed: int) -> list[str]:
    """Pseudo-words from random syllables with a Zipf-like frequency: enough distinct words for
    the BPE trainer to fill a ~50k vocabulary."""
    rng = np.random.default_rng(seed)
    consonants = list("bcdfghjklmnprstvwxz") + ["th", "ch", "sh", "ph", "tr", "st", "pl", "cr"]
    vowels = list("aeiouy") + ["ae", "ou", "ia", "io"]
    syllables = [c + v for c in consonants for v in vowels] + [v + c for c in consonants for v in vowels]
    n_vocab_words = 400_000
    lengths = rng.integers(1, 5, size=n_vocab_words)
    words = ["".join(rng.choice(syllables, size=k)) for k in lengths]
    ranks = np.minimum(rng.zipf(1.15, size=n_words), n_vocab_words) - 1
    lines, line = [], []
    for i, r in enumerate(ranks):
        line.append(words[r])
        if len(line) >= 40 or i == len(ranks) - 1:
            lines.append(" ".join(line) + ".")
            line = []
    return lines


def build_tokenizer(out_dir: str, seed: int, n_words: int) -> tuple[int, int]:
    """Train and save the tokenizer; returns (EOS id, tokenizer length)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(generated_text(n_words, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=2048)
    fast.save_pretrained(out_dir)
    return fast.convert_tokens_to_ids(EOS), len(fast)


def build_model(out_dir: str, eos_id: int, layers: int, seed: int, device: str = "cpu") -> int:
    import torch
    from transformers import GenerationConfig, PhiConfig, PhiForCausalLM

    config = PhiConfig(**{**PHI2, "num_hidden_layers": layers}, bos_token_id=eos_id, eos_token_id=eos_id,
                       pad_token_id=eos_id, dtype="bfloat16")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: 5.6 GB instead of 11 GB
    try:
        with torch.device(device):
            model = PhiForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="2GB")
    return n_params


def synthetic_split(n: int, vocab: int, eos_id: int, seed: int) -> tuple[object, dict]:
    """``n`` records of token ids in [0, vocab) other than EOS, each ending with EOS."""
    from medreason.tokens import TokenizedSplit

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(LEN_MEDIAN), LEN_SIGMA, size=n)), LEN_MIN, LEN_MAX)
    lengths = lengths.astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = rng.integers(0, vocab - 1, size=int(offsets[-1]), dtype=np.int32)
    ids[ids >= eos_id] += 1  # every id but EOS, uniformly
    ids[offsets[1:] - 1] = eos_id
    prompt_lens = np.maximum(1, (lengths * rng.uniform(0.2, 0.4, size=n)).astype(np.int32))
    split = TokenizedSplit(input_ids=ids, offsets=offsets, prompt_lens=prompt_lens,
                           uids=[f"synthetic:{seed}-{i}" for i in range(n)])
    stats = {"records": n, "tokens": int(offsets[-1]), "p50": float(np.median(lengths)),
             "p90": float(np.percentile(lengths, 90)), "max": int(lengths.max())}
    return split, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="store URI (folder or s3://bucket/prefix)")
    parser.add_argument("--run", required=True, help="run id for the synthetic prepare stage")
    parser.add_argument("--preset", default="phi2-bf16", help="preset whose config the prepare manifest records")
    parser.add_argument("--n-train", type=int, default=32_000, help="train records (MedReason: 29,4k after split)")
    parser.add_argument("--n-eval", type=int, default=600)
    parser.add_argument("--layers", type=int, default=PHI2["num_hidden_layers"])
    parser.add_argument("--tokenizer-words", type=int, default=3_000_000,
                        help="generated words to train the BPE on (3M: ~40 s, ~50k tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="a folder with a tokenizer saved by an earlier run of this script "
                        "(skips the ~40 s BPE training)")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda: seconds, not minutes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    from medreason.config import build_config
    from medreason.store import ArtifactStore, build_manifest, model_cache_name, validate_segment
    from medreason.tokens import save_split

    cfg = build_config(preset=args.preset)
    store = ArtifactStore(args.store)
    run = validate_segment(args.run, "--run")
    model_rel = f"cache/models/{model_cache_name(cfg.model.name_or_path, cfg.model.revision)}"

    if store.is_committed(model_rel):
        log.info("model already staged at %s", store.display(model_rel))
        from medreason.loading import load_tokenizer

        tokenizer = load_tokenizer(store.materialize(model_rel, hashes=False))
        eos_id, tok_len = tokenizer.eos_token_id, len(tokenizer)
    else:
        started = time.monotonic()
        with store.staged_folder() as tmp:
            if args.tokenizer:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
                tokenizer.save_pretrained(tmp)
                eos_id, tok_len = tokenizer.convert_tokens_to_ids(EOS), len(tokenizer)
            else:
                eos_id, tok_len = build_tokenizer(tmp, args.seed, args.tokenizer_words)
            log.info("tokenizer ready (%.0f s); building the random model", time.monotonic() - started)
            n_params = build_model(tmp, eos_id, args.layers, args.seed, args.device)
            identity = {"name_or_path": cfg.model.name_or_path, "revision": "main", "dtype": "bfloat16",
                        "trust_remote_code": False, "random_weights": True, "layers": args.layers}
            manifest = build_manifest(
                stage="model", run_id="", config=identity, config_hash="random-phi2-shape",
                timings_s={"stage": time.monotonic() - started}, metrics={"n_params": n_params},
                extra={"source": {"kind": "random", "location": "bench/stage_phi2_random.py"},
                       "dtype": "bfloat16"},
            )
            store.commit_dir(tmp, model_rel, manifest, progress=True)
        log.info("staged %s parameters at %s (%.0f s)", f"{n_params:,}", store.display(model_rel),
                 time.monotonic() - started)

    with store.staged_folder() as tmp:
        stats = {}
        for name, n, seed in (("train", args.n_train, args.seed + 1), ("eval", args.n_eval, args.seed + 2)):
            # ids below the tokenizer's length, like real text (the embedding has 51,200 rows)
            split, stats[name] = synthetic_split(n, tok_len, eos_id, seed)
            save_split(split, os.path.join(tmp, f"{name}.tokens.safetensors"))
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2)
        manifest = build_manifest(stage="prepare", run_id=run, config=cfg, config_hash=cfg.stage_hash("prepare"),
                                  metrics={"train_records": args.n_train, "eval_records": args.n_eval,
                                           "synthetic": True, **{f"train_tokens_{k}": v for k, v in
                                                                 stats["train"].items() if k != "records"}})
        store.commit_dir(tmp, store.stage_rel(run, "prepare"), manifest)
    log.info("synthetic prepare stage committed at %s: %s", store.display(store.stage_rel(run, "prepare")),
             json.dumps(stats))
    log.info("next: medreason train --store %s --run %s --preset %s", args.store, run, args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
