"""Batched greedy generation: prompts, KV-cache planning, left-padded batches, progress.

Every decode step reads each row's whole KV cache, so batches are sorted by prompt length and
each gets a cache sized for its own longest prompt (``plan_generation_batches``). On CUDA the
cache is static (written in place) and ``eval.compile`` picks the decode path: ``graphs``
(medreason/evaluation/decoding.py: the eager step replayed from CUDA graphs, the default),
``none`` (transformers' ``generate()``, eager) or ``full`` (``generate()`` with the whole model
compiled). Measured figures for these choices are in bench/RESULTS.md (section "evaluate").
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

STATIC_CACHE_ENV = "MEDREASON_STATIC_CACHE"
# A long batch (a CPU batch of 16 questions x 384 new tokens takes minutes) logs its progress
# at least this often, so a log without a terminal still shows the job is alive.
PROGRESS_INTERVAL_S = 30.0


# -- prompts -------------------------------------------------------------------------------------
def encode_prompt(tokenizer: Any, prompt: str, template: str) -> list[int]:
    """Token ids of a formatted prompt, encoded exactly as prepare encodes training prompts."""
    from medreason.data import encode_prompt as _encode

    return _encode(tokenizer, prompt, template)


def build_prompt(record: dict[str, Any], template: str, tokenizer: Any) -> str:
    from medreason.data import format_prompt

    return format_prompt(record, template, tokenizer)


# -- planning ------------------------------------------------------------------------------------
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
    single shape) so a handful of cache shapes cover a whole file. Sizing it per batch keeps
    short prompts from paying for the longest one. ``max_batch_tokens`` caps rows x cache length
    (the cache's memory: 320 KiB per position for Phi-2 in bf16), so batches of short prompts
    hold more rows and the longest ones fewer, never more than ``batch_size``.
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


def _compile_generation(mode: str, plan: list[tuple[list[int], int]], batch_size: int,
                        max_batch_tokens: int | None) -> dict[str, Any]:
    """The generate() keywords for ``eval.compile``.

    'full' is transformers' own: the whole forward compiled with CUDA graphs, once per shape,
    or once for symbolic shapes when the plan has several. Compiling a 32-layer model for
    symbolic shapes costs minutes, more than the faster steps save on one benchmark file
    (bench/RESULTS.md); 'none' decodes eagerly, the static cache still written in place. The
    default, 'graphs', does not go through generate() (medreason/evaluation/decoding.py).
    """
    if mode != "full":  # 'none', or 'graphs' where generate() decodes instead
        return {"disable_compile": True}
    # Without a token cap every batch is padded to batch_size rows (generate_texts).
    shapes = {(len(b) if max_batch_tokens else batch_size, n) for b, n in plan}
    if len(shapes) > 1:
        from transformers.generation import CompileConfig

        return {"compile_config": CompileConfig(dynamic=True)}
    return {}


def use_static_cache(model: Any, device: Any) -> bool:
    """Whether generation uses a static KV cache.

    The default dynamic cache re-copies the whole cache every step (torch.cat: ~2 x 37 GB per
    step for 128 prompts of ~900 tokens); a static cache is written in place, and is what
    transformers' compiled decode step (``eval.compile: full``) needs. On by default on CUDA;
    off for quantized (bitsandbytes) models. MEDREASON_STATIC_CACHE=0 turns it off, =1 turns it
    on elsewhere too (only useful on CPU to test the cache sizing).
    """
    from medreason.loading import is_quantized

    value = os.environ.get(STATIC_CACHE_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if is_quantized(model):
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


# -- decoding ------------------------------------------------------------------------------------
class _Progress:
    """A stopping criterion that never stops: generate() calls it after every decoding step,
    and it logs tokens generated and rows finished when ``interval_s`` has passed."""

    def __init__(self, desc: str, width: int, eos_ids: list[int], interval_s: float, started: float) -> None:
        self.desc, self.width, self.eos_ids = desc, width, eos_ids
        self.interval_s, self.started = interval_s, started
        self.last = time.monotonic()

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            new = input_ids[:, self.width:]
            finished = int(torch.isin(new, torch.tensor(self.eos_ids, dtype=torch.long, device=new.device)).any(dim=1).sum())
            log.info("%s: %d new tokens per row so far, %d/%d rows finished, %.0f s so far",
                     self.desc, new.shape[1], finished, new.shape[0], now - self.started)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _left_padded(prompt_ids: list[list[int]], batch: list[int], pad_id: int) -> tuple[Any, Any]:
    """(input ids, attention mask) of a batch, left-padded to its longest prompt."""
    import torch

    width = max(len(prompt_ids[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        seq = prompt_ids[i]
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def _generate_batch(model: Any, ids: Any, mask: Any, max_new_tokens: int, pad_id: int,
                    eos_ids: list[int], progress: _Progress, extra: dict[str, Any]) -> Any:
    """transformers' generate(): the new token ids of a batch, ``[rows, steps]``."""
    import torch
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
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
            stopping_criteria=StoppingCriteriaList([progress]),
            **extra,
        )
    return generated[:, ids.shape[1]:]


def _graph_batch(hf_model: Any, ids: Any, mask: Any, max_new_tokens: int, cache_len: int, pad_id: int,
                 eos_ids: list[int], progress: _Progress, attention: str) -> Any:
    """The decode loop of medreason/evaluation/decoding.py: the new token ids, ``[rows, steps]``."""
    from medreason.evaluation.decoding import greedy_static

    def report(steps: int, unfinished: Any) -> None:
        now = time.monotonic()
        if now - progress.last >= progress.interval_s:
            progress.last = now
            log.info("%s: %d new tokens per row so far, %d/%d rows finished, %.0f s so far", progress.desc,
                     steps, int((~unfinished).sum()), unfinished.shape[0], now - progress.started)

    return greedy_static(hf_model, ids, mask, max_new_tokens, cache_len, pad_id, eos_ids, attention=attention,
                         on_progress=report)


def decode_path(compile_mode: str, static: bool, hf_model: Any) -> str:
    """Which decoder runs: 'graphs' (decoding.py), or transformers' generate() ('generate')."""
    if compile_mode != "graphs" or not static:
        return "generate"
    from medreason.evaluation.decoding import plain_greedy_only

    reason = plain_greedy_only(hf_model)
    if reason:
        log.warning("generation config sets %s: decoding with transformers' generate()", reason)
        return "generate"
    from medreason.evaluation.decode_attention import launch_params
    from medreason.evaluation.decode_rotary import fused_enabled
    from medreason.evaluation.decoding import attention_kernels
    from medreason.evaluation.prefill import chunks_enabled

    attention_kernels()  # a bad MEDREASON_DECODE_SDPA stops here, before the first batch
    launch_params()  # and a bad MEDREASON_DECODE_KERNEL
    fused_enabled()  # MEDREASON_DECODE_FUSED
    chunks_enabled()  # MEDREASON_PREFILL_CHUNKS
    return "graphs"


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
    max_batch_tokens: int | None = None,
    cache_bucket_tokens: int = 0,
    compile_mode: str = "graphs",
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    decode_attention: str = "triton",
) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding and the KV cache.

    Left padding keeps every prompt's last token at the same position, so one ``generate``
    call continues all rows; sorting by length keeps padding small (a batch of 8 prompts of
    300..320 tokens pads at most 20 tokens each instead of up to hundreds). With a static cache
    (CUDA) each batch gets the cache length ``plan_generation_batches`` gives it. Progress is
    logged after each batch and at least every ``progress_interval_s`` inside one.
    ``decode_attention``: eval.decode_attention, for the ``graphs`` path.
    """
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    out: list[str] = [""] * len(prompt_ids)
    static = use_static_cache(model, next(model.parameters()).device)
    # The transformers model that generate() runs on (a PeftModel forwards to it).
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan = plan_generation_batches(
        [len(p) for p in prompt_ids], max_new_tokens, batch_size,
        max_batch_tokens=max_batch_tokens, cache_bucket_tokens=cache_bucket_tokens if static else 0,
    )
    path = decode_path(compile_mode, static, hf_model)
    extra: dict[str, Any] = {}
    if static:
        extra["cache_implementation"] = "static"
        extra.update(_compile_generation(compile_mode, plan, batch_size, max_batch_tokens))
    started = time.monotonic()
    generated = 0
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
        ids, mask = _left_padded(prompt_ids, batch, pad_id)
        width = ids.shape[1]
        progress = _Progress(f"{desc}: batch {k}/{len(plan)}", width, eos_ids, progress_interval_s, started)
        if path == "graphs":
            new = _graph_batch(hf_model, ids, mask, max_new_tokens, cache_len, pad_id, eos_ids, progress,
                               decode_attention)
        else:
            new = _generate_batch(model, ids, mask, max_new_tokens, pad_id, eos_ids, progress, extra)
        for row, i in enumerate(batch[:n_questions]):
            out[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
        generated += new_token_count(new[:n_questions], eos_ids)
        # A line per batch: without a terminal the progress bar is off.
        log.info("%s: batch %d/%d (%d questions, %d new tokens%s) done, %.1f s so far", desc, k, len(plan),
                 n_questions, int(new.shape[1]),
                 f", cache {cache_len}" if static else "", time.monotonic() - started)
    seconds = time.monotonic() - started
    log.info("%s: %d new tokens in %.1f s, %.0f tokens/s", desc, generated, seconds, generated / max(seconds, 1e-9))
    _log_peak_memory(desc, next(model.parameters()).device)
    return out


def new_token_count(new: Any, eos_ids: list[int]) -> int:
    """Tokens generated in a ``[rows, steps]`` block: each row's up to and including its first
    EOS (the padding after it was not generated), or all of them."""
    import torch

    steps = new.shape[1]
    if steps == 0 or new.shape[0] == 0:
        return 0
    is_eos = torch.isin(new, torch.tensor(eos_ids, dtype=new.dtype, device=new.device))
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, steps)
    return int(first.sum())


def _log_peak_memory(desc: str, device: Any) -> None:
    """The GPU memory high-water mark so far: what eval.batch_size / max_batch_tokens left free."""
    if getattr(device, "type", "cpu") != "cuda":
        return
    import torch

    peak, total = torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
    log.info("%s: peak GPU memory %.1f of %.1f GiB", desc, peak / 2**30, total / 2**30)
