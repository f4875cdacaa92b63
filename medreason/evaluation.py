"""Evaluation: batched greedy generation, answer scoring, accuracy with Wilson intervals,
held-out loss, and the evaluate stage that ties them together.

What is scored: the held-out split from prepare (``eval.jsonl``) and any ``eval.benchmarks``
files (see medreason.benchmarks), with the prompt template the run was trained with. Which
model: the base alone, base + the run's adapter (final, best or a step checkpoint) or the merged
model; with ``eval.compare_base`` the base is scored too, side by side (for an adapter run the
same weights with the adapter switched off, so the base costs no second load).

Answers are pulled out of the generations by medreason.extraction (its docstring gives the rule
order); an unparsed answer counts as wrong and is also counted as a parse failure.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from medreason.benchmarks import jsonl_objects
from medreason.errors import InputError
from medreason.extraction import extract_answer

log = logging.getLogger(__name__)

# z for a two-sided 95% interval: the 97.5th percentile of the standard normal.
Z95 = 1.959963984540054
HELDOUT = "heldout"


# -- statistics -------------------------------------------------------------------------------------
def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927).

    Unlike the normal approximation p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not
    degenerate at 0 or n successes: for 0/10 it gives (0, 0.278), not (0, 0).
    """
    if total <= 0:
        return (0.0, 0.0)
    if not 0 <= correct <= total:
        raise ValueError(f"correct={correct} must be between 0 and total={total}")
    p = correct / total
    z2 = z * z
    denom = 1 + z2 / total
    center = (p + z2 / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, its 95% Wilson interval and parse failures over prediction rows."""
    n = len(rows)
    correct = sum(1 for r in rows if r["correct"])
    failures = sum(1 for r in rows if r["extracted"] is None)
    low, high = wilson_interval(correct, n)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95_low": low,
        "ci95_high": high,
        "parse_failures": failures,
        "parse_failure_rate": failures / n if n else 0.0,
    }


def summarize(predictions: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{set: {model: summary + by_source: {dataset_name: summary}}} over all prediction rows."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in predictions:
        groups[(row["set"], row["model"])].append(row)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (set_name, model), rows in sorted(groups.items()):
        summary = summarize_rows(rows)
        by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_source[row["source"]].append(row)
        summary["by_source"] = {src: summarize_rows(rs) for src, rs in sorted(by_source.items())}
        out.setdefault(set_name, {})[model] = summary
    return out


def score(record: dict[str, Any], generated: str, model: str, set_name: str, prompt: str) -> dict[str, Any]:
    """One prediction row: the extracted letter against the gold one."""
    letter, method = extract_answer(generated, record["options_map"])
    gold = record["answer_letter"]
    return {
        "model": model,
        "set": set_name,
        "id": record["uid"],
        "source": record.get("dataset_name", set_name),
        "prompt": prompt,
        "generated": generated,
        "extracted": letter,
        "gold": gold,
        "correct": letter is not None and letter == gold,
        "parse_method": method,
    }


# -- records --------------------------------------------------------------------------------------
def heldout_records(lines: list[str], where: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Scorable records of prepare's eval.jsonl (those with options and a gold letter)."""
    records, skipped = [], 0
    for lineno, rec in jsonl_objects(lines, where):
        options = rec.get("options_map") or {}
        gold = rec.get("answer_letter") or ""
        if not options or not gold:
            skipped += 1  # open questions, or an answer prepare could not map to a letter
            continue
        if gold not in options:
            raise InputError(
                f"{where} line {lineno} ({rec.get('uid')}): gold letter {gold!r} is not one of the "
                f"options {', '.join(options)}; re-run `medreason prepare --force`"
            )
        records.append(rec)
        if limit and len(records) >= limit:
            break
    if skipped:
        log.info("%s: %d records without options or gold letter are not scored", where, skipped)
    return records


# -- generation --------------------------------------------------------------------------------------
def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, longest first (an out-of-memory shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def round_up(n: int, multiple: int) -> int:
    return n if multiple <= 0 else -(-n // multiple) * multiple


def plan_generation_batches(
    lengths: list[int], max_new_tokens: int, batch_size: int,
    max_batch_tokens: int | None = None, cache_bucket_tokens: int = 0,
) -> list[tuple[list[int], int]]:
    """Length-sorted batches, each with the KV-cache length it needs: ``[(indices, cache_len)]``.

    A batch's cache must hold its longest prompt plus ``max_new_tokens``; that is rounded up to
    a multiple of ``cache_bucket_tokens`` (0: every batch gets the length of the longest one, a
    single shape) so a handful of cache shapes cover a whole file. Every decode step reads each
    row's whole cache, so sizing it per batch is what keeps short prompts from paying for the
    longest one: on MedQA (prompt p50 444 tokens, max 2,040, 512 new) one shared cache is 2,552
    positions, the median batch needs ~1,024. ``max_batch_tokens`` caps rows x cache length (the
    cache's memory: 320 KiB per position for Phi-2 in bf16), so batches of short prompts hold
    more rows and the longest ones fewer, never more than ``batch_size``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not order:
        return []
    longest = round_up(lengths[order[0]] + max_new_tokens, cache_bucket_tokens)
    plan: list[tuple[list[int], int]] = []
    k = 0
    while k < len(order):
        cache_len = round_up(lengths[order[k]] + max_new_tokens, cache_bucket_tokens) if cache_bucket_tokens else longest
        rows = batch_size if not max_batch_tokens else max(1, min(batch_size, max_batch_tokens // cache_len))
        plan.append((order[k : k + rows], cache_len))
        k += rows
    return plan


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
    max_batch_tokens: int | None = None,
    cache_bucket_tokens: int = 0,
    compile_mode: str = "none",
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding and the KV cache.

    Left padding keeps every prompt's last token at the same position, so one ``generate``
    call continues all rows; sorting by length keeps padding small (a batch of 8 prompts of
    300..320 tokens pads at most 20 tokens each instead of up to hundreds). With a static cache
    (CUDA) each batch gets the cache length ``plan_generation_batches`` gives it.
    """
    import torch
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompt_ids)
    static = use_static_cache(model, device)
    # The transformers model that generate() runs on (a PeftModel forwards to it).
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan = plan_generation_batches(
        [len(p) for p in prompt_ids], max_new_tokens, batch_size,
        max_batch_tokens=max_batch_tokens, cache_bucket_tokens=cache_bucket_tokens if static else 0,
    )
    extra: dict[str, Any] = {}
    if static:
        extra["cache_implementation"] = "static"
        extra.update(_compile_generation(compile_mode, plan, batch_size, max_batch_tokens))
    started = time.monotonic()
    for k, (batch, cache_len) in enumerate(tqdm(plan, desc=desc, unit="batch", disable=None), start=1):
        n_questions = len(batch)
        if static:
            # transformers sizes a new static cache as max(this call's need, the previous
            # call's size), so that the compiled decode step keeps one shape; set the size this
            # batch was planned for instead (the plan never gives less than the need).
            hf_model._previous_max_cache_length = cache_len
            if compile_mode == "full" and len(batch) < batch_size and not max_batch_tokens:
                # Fill the last, smaller batch with copies of its first prompt (outputs
                # dropped): one more row count would cost one more compilation.
                batch = batch + [batch[0]] * (batch_size - len(batch))
        width = max(len(prompt_ids[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = prompt_ids[i]
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                temperature=None,
                top_p=None,
                top_k=None,
                **extra,
            )
        for row, i in enumerate(batch[:n_questions]):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
        # A line per batch: without a terminal the progress bar is off, and a CPU batch of 16
        # questions x 384 new tokens takes minutes.
        log.info("%s: batch %d/%d (%d questions, %d new tokens%s) done, %.0f s so far", desc, k, len(plan),
                 n_questions, int(generated.shape[1] - width),
                 f", cache {cache_len}" if static else "", time.monotonic() - started)
    return out


def _compile_generation(mode: str, plan: list[tuple[list[int], int]], batch_size: int,
                        max_batch_tokens: int | None) -> dict[str, Any]:
    """The generate() keywords for ``eval.compile``.

    'full' is transformers' own: the whole forward compiled with CUDA graphs, once per shape,
    or once for symbolic shapes when the plan has several. Measured for Phi-2 on an H200 on
    MedQA: a compiled decode step of 128 rows x 1,024 positions took 17.6 ms, an eager step of
    192 x 1,024 28 ms (the host launching ~1,000 kernels, not the 15 ms of cache reads, sets the
    pace), but compiling the 32-layer model for symbolic shapes took ~120 s, more than the
    faster steps saved on the 1,273 questions (237 s compiled vs 147 s eager). So 'none' (eager,
    the static cache still written in place) is the default; 'full' pays on longer runs.
    """
    if mode != "full":
        return {"disable_compile": True}
    # Without a token cap every batch is padded to batch_size rows (generate_texts).
    shapes = {(len(b) if max_batch_tokens else batch_size, n) for b, n in plan}
    if len(shapes) > 1:
        from transformers.generation import CompileConfig

        return {"compile_config": CompileConfig(dynamic=True)}
    return {}


STATIC_CACHE_ENV = "MEDREASON_STATIC_CACHE"


def use_static_cache(model: Any, device: Any) -> bool:
    """Whether generation uses a static KV cache.

    The default dynamic cache re-copies the whole cache every step (torch.cat: ~2 x 37 GB per
    step for 128 prompts of ~900 tokens); a static cache is written in place, and is what
    transformers' compiled decode step (``eval.compile: full``) needs. On by default on CUDA;
    off for quantized (bitsandbytes) models. MEDREASON_STATIC_CACHE=0 turns it off, =1 turns it
    on elsewhere too (only useful on CPU to test the cache sizing).
    """
    value = os.environ.get(STATIC_CACHE_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return getattr(device, "type", "cpu") == "cuda"


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(int(v) for v in value)
    return sorted(set(ids))


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding and a pad token (= EOS when the tokenizer has none), on this copy only."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompt(tokenizer: Any, prompt: str, template: str) -> list[int]:
    """Token ids of a formatted prompt, encoded exactly as prepare encodes training prompts."""
    from medreason.data import encode_prompt as _encode

    return _encode(tokenizer, prompt, template)


def build_prompt(record: dict[str, Any], template: str, tokenizer: Any) -> str:
    from medreason.data import format_prompt

    return format_prompt(record, template, tokenizer)


# -- held-out loss -------------------------------------------------------------------------------------
def heldout_loss(model: Any, split: Any, batch_size: int, indices: list[int] | None = None) -> dict[str, float]:
    """Teacher-forced loss on prepared token ids, prompt tokens masked as in training.

    Returns the token-summed loss and the number of scored tokens, so shards from several
    processes add up exactly; ``finish_loss`` turns the sums into mean loss and perplexity.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from medreason.tokens import IGNORE_INDEX

    device = next(model.parameters()).device
    indices = list(range(len(split))) if indices is None else indices
    total, count = 0.0, 0
    lengths = [int(split.lengths[i]) for i in indices]
    for batch in tqdm(length_sorted_batches(lengths, batch_size), desc="held-out loss", disable=None):
        rows = [indices[b] for b in batch]
        width = max(int(split.lengths[i]) for i in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = torch.as_tensor(split.ids(i).astype("int64"))
            ids[r, : len(seq)] = seq
            labels[r, : len(seq)] = torch.as_tensor(split.labels(i))
            mask[r, : len(seq)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(device)
        loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((shift_labels != IGNORE_INDEX).sum())
    return {"loss_sum": total, "tokens": count}


def finish_loss(parts: list[dict[str, float]]) -> dict[str, float]:
    total = sum(p["loss_sum"] for p in parts)
    count = int(sum(p["tokens"] for p in parts))
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if count and loss < 700 else float("inf"), "tokens": count}


# -- distributed helpers -----------------------------------------------------------------------------
@dataclass
class Dist:
    """Process layout under ``accelerate launch`` (one process when run plainly)."""

    state: Any = None
    index: int = 0
    count: int = 1
    device: Any = None

    @classmethod
    def create(cls) -> Dist:
        from accelerate import PartialState

        state = PartialState()
        return cls(state=state, index=state.process_index, count=state.num_processes, device=state.device)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @contextmanager
    def shard(self, items: list[Any]) -> Iterator[list[Any]]:
        if self.count == 1 or self.state is None:
            yield items
            return
        with self.state.split_between_processes(items) as mine:
            yield list(mine)

    def gather(self, items: list[Any]) -> list[Any]:
        if self.count == 1:
            return items
        from accelerate.utils import gather_object

        return list(gather_object(items))


# -- models ---------------------------------------------------------------------------------------------
def torch_dtype(name: str, device_type: str) -> Any:
    import torch

    if device_type == "cpu":
        # bf16 matmuls on CPU are several times slower than fp32 on most x86 parts, and the
        # models that run on CPU here are small: 135M params in fp32 is 0.54 GB.
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_causal_lm(model_dir: str, cfg_model: Any, device: Any, quantized: bool = True) -> Any:
    """A model from a local folder, in the run's dtype (and quantization, on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else torch.device("cpu")
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(cfg_model.dtype, device.type),
        "trust_remote_code": cfg_model.trust_remote_code,
    }
    if cfg_model.attn_implementation:
        kwargs["attn_implementation"] = cfg_model.attn_implementation
    if quantized and cfg_model.quantization != "none" and device.type == "cuda":
        from transformers import BitsAndBytesConfig

        compute = torch_dtype(cfg_model.dtype, "cuda")
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if cfg_model.quantization == "int8"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=True,
            )
        )
        kwargs["device_map"] = {"": device.index or 0}
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)
    model.eval()
    return model


def load_tokenizer(model_dir: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code))


# -- locating stage outputs ------------------------------------------------------------------------------
def require_stage(store: Any, run_id: str, stage: str, hint: str) -> dict[str, Any]:
    manifest = store.read_manifest(store.stage_rel(run_id, stage))
    if manifest is None:
        raise InputError(f"run {run_id!r} has no committed {stage} stage: {hint}")
    return manifest


def materialize_subfolder(store: Any, rel: str, manifest: dict[str, Any], prefix: str) -> str:
    """A verified local copy of the files a committed folder's manifest lists under ``prefix/``.

    A sub-folder with its own MANIFEST.json is materialized as is; otherwise every file is
    checked against the size and sha256 the parent's manifest recorded, so a file changed after
    the commit is caught before it is used (InputError naming it).
    """
    from medreason.store import MANIFEST, manifest_hash, sha256_file

    sub = f"{rel}/{prefix}"
    if store.is_committed(sub):
        return store.materialize(sub)
    files = {
        name[len(prefix) + 1:]: info
        for name, info in manifest.get("files", {}).items()
        if name.startswith(prefix + "/")
    }
    if not files:
        raise InputError(f"{store.display(sub)}: the commit of {store.display(rel)} lists no files there")
    if store.is_local:
        target = store.full(sub)
        for name, info in files.items():
            path = os.path.join(target, *name.split("/"))
            if not os.path.exists(path):
                raise InputError(f"{store.display(sub)}: {name} is listed in {MANIFEST} but missing")
            if os.path.getsize(path) != info["size"] or sha256_file(path) != info["sha256"]:
                raise InputError(
                    f"{store.display(sub)}: {name} does not match its sha256 in {store.display(rel)}/{MANIFEST}; "
                    "the file was modified or corrupted after its commit"
                )
        return target
    cache_root = os.environ.get("MEDREASON_LOCAL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "medreason"
    )
    target = os.path.join(cache_root, "store", f"{manifest_hash(manifest)[:32]}-{prefix.replace('/', '_')}")
    done = os.path.join(target, ".verified")
    if os.path.exists(done):
        return target
    for name, info in files.items():
        local = os.path.join(target, *name.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as fh:
            fh.write(store.read_bytes(f"{sub}/{name}"))
        if sha256_file(local) != info["sha256"]:
            raise InputError(f"{store.display(sub)}: {name} does not match its sha256 in {MANIFEST}")
    with open(done, "w") as fh:
        fh.write("ok\n")
    return target


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
        return materialize_subfolder(store, train_rel, manifest, "adapter"), "final", manifest
    if which == "best":
        best = (manifest.get("metrics") or {}).get("best_step")
        if best is None:
            raise InputError(f"run {run_id!r}: the train manifest records no best_step (no eval during training)")
        which = f"step-{int(best)}"
    if which.startswith("step-") and which[5:].isdigit():
        rel = f"{train_rel}/checkpoints/{which}"
        if not store.is_committed(rel):
            have = store.list_committed(f"{train_rel}/checkpoints", prefix="step-")
            raise InputError(
                f"run {run_id!r}: checkpoint {which} is not committed; committed: {', '.join(have) or 'none'}"
            )
        return store.materialize(rel), which, manifest
    raise InputError(f"eval.checkpoint: {which!r} is not one of final, best, merged, none, step-<N>")


def stage_inputs(store: Any, run_id: str, which: str) -> dict[str, str]:
    """{input stage: manifest hash} of an evaluation; InputError when a needed stage is missing."""
    from medreason.store import manifest_hash

    inputs = {"prepare": manifest_hash(require_stage(store, run_id, "prepare", "run `medreason prepare` first"))}
    if which != "none":
        inputs["train"] = manifest_hash(require_stage(
            store, run_id, "train", "no committed adapter; run `medreason train` first, or evaluate "
            "the base alone with --set eval.checkpoint=none"))
    if which == "merged":
        inputs["merge"] = manifest_hash(require_stage(store, run_id, "merge", "run `medreason merge` first"))
    return inputs


def adapter_toggle(model: Any, fold: bool = True) -> Callable[[bool], Any]:
    """A context factory over a PeftModel: ``toggle(False)`` runs it with the adapter switched
    off (the base); ``toggle(True)`` folds the adapter into the weights for the duration.

    Folding (W + (alpha/r) B A, undone afterwards) makes the fine-tuned model as fast as the
    base: unmerged, each of the 7 x 30 LoRA-wrapped projections of SmolLM2 runs two extra small
    matmuls per decoding step, about doubling the number of kernels in a step. The fold is the
    same arithmetic the merge stage does (its parity check bounds the difference, ~1e-5 in fp32).
    A quantized base is never folded (``fold=False``): merging into 4/8-bit weights re-quantizes
    them, and the adapter would no longer sit on the weights it was trained against.
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
class ModelUnderTest:
    label: str  # "base" or "finetuned"
    model: Any
    tokenizer: Any
    adapter_on: bool = True
    toggle: Callable[[bool], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def context(self) -> Any:
        return self.toggle(self.adapter_on) if self.toggle else nullcontext()


# -- the evaluate stage ------------------------------------------------------------------------------------
def evaluate_run(store: Any, run_id: str, cfg: Any, out_dir: str, dist: Dist | None = None) -> dict[str, Any]:
    """Score the run's model(s); write predictions.jsonl, metrics.json, report.md and plots.

    Returns {"metrics": ..., "inputs": {stage: manifest hash}, "headline": {...}}.
    Only the main process writes files.
    """
    from medreason.store import manifest_hash
    from medreason.tokens import load_split

    dist = dist or Dist.create()
    started = time.monotonic()
    ecfg = cfg.eval
    which = ecfg.checkpoint
    inputs: dict[str, str] = {}

    prep = require_stage(store, run_id, "prepare", "run `medreason prepare` first")
    inputs["prepare"] = manifest_hash(prep)
    prep_dir = store.materialize(store.stage_rel(run_id, "prepare"))

    # What to score.
    sets: dict[str, list[dict[str, Any]]] = {}
    if ecfg.heldout:
        path = os.path.join(prep_dir, "eval.jsonl")
        with open(path, encoding="utf-8") as fh:
            sets[HELDOUT] = heldout_records(fh.read().splitlines(), "prepare/eval.jsonl", ecfg.heldout_limit)
        if not sets[HELDOUT]:
            log.warning("the held-out split has no scorable multiple-choice records")
    if ecfg.benchmarks:
        from medreason.benchmarks import load_benchmark

        for bench in ecfg.benchmarks:
            sets[bench.name] = load_benchmark(bench)
    if not any(sets.values()):
        raise InputError("nothing to evaluate: eval.heldout is off (or empty) and eval.benchmarks is empty")

    models = load_models_under_test(store, run_id, cfg, which, dist, inputs)
    template = cfg.data.template

    predictions: list[dict[str, Any]] = []
    losses: dict[str, dict[str, float]] = {}
    split = None
    if ecfg.heldout and os.path.exists(os.path.join(prep_dir, "eval.tokens.safetensors")):
        split = load_split(os.path.join(prep_dir, "eval.tokens.safetensors"))
    loss_indices: list[int] = []
    if split is not None:
        # With eval.heldout_limit the loss covers the same records as the accuracy does.
        scored = {r["uid"] for r in sets.get(HELDOUT, [])} if ecfg.heldout_limit else None
        loss_indices = [i for i, uid in enumerate(split.uids) if scored is None or uid in scored]
    for mut in models:
        prompts_by_set = {
            name: [build_prompt(rec, template, mut.tokenizer) for rec in records] for name, records in sets.items()
        }
        items = [(name, i) for name, records in sets.items() for i in range(len(records))]
        with mut.context():
            with dist.shard(items) as mine:
                ids = [encode_prompt(mut.tokenizer, prompts_by_set[n][i], template) for n, i in mine]
                texts = generate_texts(
                    mut.model, mut.tokenizer, ids, ecfg.max_new_tokens, ecfg.batch_size,
                    desc=f"generate ({mut.label})", max_batch_tokens=ecfg.max_batch_tokens,
                    cache_bucket_tokens=ecfg.cache_bucket_tokens, compile_mode=ecfg.compile,
                )
                local = [
                    score(sets[n][i], t, mut.label, n, prompts_by_set[n][i]) for (n, i), t in zip(mine, texts, strict=True)
                ]
            gathered = dist.gather(local)
            if split is not None and loss_indices:
                with dist.shard(loss_indices) as mine_idx:
                    part = heldout_loss(mut.model, split, max(1, min(ecfg.batch_size, 4)), list(mine_idx))
                losses[mut.label] = finish_loss(dist.gather([part]))
        order = {(n, sets[n][i]["uid"]): k for k, (n, i) in enumerate(items)}
        gathered.sort(key=lambda r: order.get((r["set"], r["id"]), 0))
        predictions.extend(gathered)

    train_metrics_rows = read_train_metrics(store, run_id) if which != "none" else []
    metrics = {
        "run_id": run_id,
        "checkpoint": which,
        "models": [m.label for m in models],
        "model_info": {m.label: m.info for m in models},
        "template": template,
        "max_new_tokens": ecfg.max_new_tokens,
        "sets": summarize(predictions),
        "heldout_loss": losses,
        "eval_seconds": round(time.monotonic() - started, 1),
    }
    metrics["headline"] = headline(metrics)
    if dist.is_main:
        from medreason.report import write_outputs

        write_outputs(out_dir, predictions, metrics, train_metrics_rows)
    return {"metrics": metrics, "inputs": inputs, "headline": metrics["headline"]}


def load_models_under_test(
    store: Any, run_id: str, cfg: Any, which: str, dist: Dist, inputs: dict[str, str]
) -> list[ModelUnderTest]:
    """The base and/or fine-tuned model, per eval.checkpoint and eval.compare_base."""
    from medreason.staging import local_model_dir
    from medreason.store import manifest_hash

    if which == "merged":
        manifest = require_stage(store, run_id, "merge", "run `medreason merge` first")
        train = require_stage(store, run_id, "train", "run `medreason train` first")
        inputs["train"] = manifest_hash(train)
        inputs["merge"] = manifest_hash(manifest)
        merged_dir = materialize_subfolder(store, store.stage_rel(run_id, "merge"), manifest, "model")
        out = [ModelUnderTest("finetuned", load_causal_lm(merged_dir, cfg.model, dist.device, quantized=False),
                              load_tokenizer(merged_dir), info={"source": "merged"})]
        if cfg.eval.compare_base:
            base_dir = local_model_dir(store, cfg.model)
            out.insert(0, ModelUnderTest("base", load_causal_lm(base_dir, cfg.model, dist.device),
                                         load_tokenizer(base_dir, cfg.model.trust_remote_code),
                                         info={"source": "base"}))
        return out
    if which != "none":
        # Fail on a missing adapter before paying for loading the base.
        adapter_dir, label, train = resolve_adapter(store, run_id, which)
        inputs["train"] = manifest_hash(train)
    base_dir = local_model_dir(store, cfg.model)
    tokenizer = load_tokenizer(base_dir, cfg.model.trust_remote_code)
    base = load_causal_lm(base_dir, cfg.model, dist.device)
    if which == "none":
        return [ModelUnderTest("base", base, tokenizer, info={"source": "base"})]
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).eval()
    toggle = adapter_toggle(model, fold=not getattr(base, "is_quantized", False)
                            and cfg.model.quantization == "none")
    out = [ModelUnderTest("finetuned", model, tokenizer, True, toggle, info={"source": f"adapter ({label})"})]
    if cfg.eval.compare_base:
        out.insert(0, ModelUnderTest("base", model, tokenizer, False, toggle, info={"source": "base"}))
    return out


def read_train_metrics(store: Any, run_id: str) -> list[dict[str, Any]]:
    rel = f"{store.stage_rel(run_id, 'train')}/metrics.jsonl"
    if not store.exists(rel):
        return []
    rows = []
    for line in store.read_text(rel).splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for the manifest: <set>_accuracy_<model>, parse failures, held-out loss."""
    out: dict[str, float] = {}
    for set_name, per_model in metrics["sets"].items():
        for model, summary in per_model.items():
            out[f"{set_name}_accuracy_{model}"] = round(summary["accuracy"], 4)
            out[f"{set_name}_parse_failure_rate_{model}"] = round(summary["parse_failure_rate"], 4)
            out[f"{set_name}_n"] = summary["n"]
    for model, loss in metrics.get("heldout_loss", {}).items():
        out[f"heldout_loss_{model}"] = round(loss["loss"], 4)
        out[f"heldout_perplexity_{model}"] = round(loss["perplexity"], 3)
    return out
