"""Greedy decoding with a static KV cache, the decode step replayed from CUDA graphs.

transformers' ``generate()`` launches the ~1,000 kernels of a Phi-2 decode step one by one from
Python on every step, and the host, not the GPU, sets the pace (bench/RESULTS.md, "evaluate").
Compiling the model removes that, but costs minutes per shape. Here the eager step is captured
as it is in a CUDA graph (a capture costs about one step, no compilation) and replayed.

Every step also reads each row's whole cache; the cache is sized for the batch's longest
prompt + max_new_tokens, so early steps would read positions nothing has written yet. Each
layer's cache is therefore read through a prefix view whose length grows in buckets of
``bucket_tokens``: one captured graph per bucket, so a step reads at most ``bucket_tokens - 1``
positions beyond those in use.

With ``attention="sdpa"`` the result is the token-for-token output of ``generate()`` with greedy
decoding (same prefill call, same masks, masked positions contribute exact zeros);
tests/test_decoding.py checks it on CPU, where the same loop runs without graphs. With
``attention="triton"`` (``eval.decode_attention``) the decode steps' attention is the kernel of
medreason/evaluation/decode_attention.py, which reads only each row's real positions; the prefill
is unchanged, and the tokens are those of ``generate()`` up to float rounding in the attention
(the kernel sums in another order), which tests/test_decode_attention.py checks on CPU through
Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BUCKET_TOKENS = 128
# Which scaled_dot_product_attention kernels a decode step may use, in order of preference
# (comma-separated: cudnn, efficient, flash, math); unset: PyTorch's own choice. For measuring.
SDPA_ENV = "MEDREASON_DECODE_SDPA"
_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
             "math": "MATH"}
# How often (steps) the loop asks the GPU whether every row has finished: each question is a
# host-device synchronisation, which would stall the replays queued behind it.
FINISHED_CHECK_STEPS = 16


class PrefixCacheView:
    """Makes every layer of a transformers StaticCache hand attention its first ``length``
    positions only. Writes still go to the full cache; masked positions beyond ``length``
    would have contributed exact zeros, so results are unchanged and fewer bytes are read."""

    def __init__(self, cache: Any, length: int) -> None:
        self.length, self.layers = length, list(cache.layers)
        for layer in self.layers:
            layer.update = self._wrap(layer.update)

    def close(self) -> None:
        """Unwraps the layers. The wrapper holds the layer's bound method, a reference cycle
        that would keep the cache (tens of GiB on a GPU) alive until the garbage collector
        runs, i.e. still allocated while the next batch allocates its own."""
        for layer in self.layers:
            del layer.update
        self.layers = []

    def _wrap(self, update: Callable[..., Any]) -> Callable[..., Any]:
        def sliced(key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            keys, values = update(key_states, value_states, *args, **kwargs)
            return keys[:, :, : self.length], values[:, :, : self.length]

        return sliced


def bucket_length(position: int, bucket_tokens: int, cache_len: int) -> int:
    """The view length for a step that writes cache position ``position``."""
    return min(cache_len, -(-(position + 1) // bucket_tokens) * bucket_tokens)


class _StepState:
    """The device tensors a decode step reads and writes, at fixed addresses (graphs replay
    on the addresses they were captured with)."""

    def __init__(self, first: Any, positions: Any, mask: Any, cache_len: int, starts: Any = None) -> None:
        import torch

        rows, width = mask.shape
        device = mask.device
        self.tokens = first[:, None].clone()  # the token each row feeds this step
        self.positions = positions[:, -1:] + 1  # its position id (pads do not count)
        self.key_ok = torch.ones(rows, cache_len, dtype=torch.bool, device=device)
        self.key_ok[:, :width] = mask.bool()  # left padding is never attended to
        self.key_index = torch.arange(cache_len, device=device)
        self.current = torch.tensor(width, device=device)  # the cache position this step writes
        self.next_tokens = torch.zeros(rows, dtype=torch.long, device=device)
        # For the decode attention kernel: each row's first real position, and one past the
        # last position a step attends to (None: the step runs sdpa with the mask above).
        self.rows = None if starts is None else (starts, torch.tensor([width + 1], dtype=torch.int32, device=device))

    def advance(self, fed: Any) -> None:
        self.tokens.copy_(fed[:, None])
        self.positions += 1
        self.current += 1
        if self.rows is not None:
            self.rows[1].add_(1)


def attention_kernels() -> Any:
    """A context choosing the attention kernels of a decode step (``MEDREASON_DECODE_SDPA``)."""
    value = os.environ.get(SDPA_ENV, "").strip()
    if not value:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [v.strip() for v in value.split(",")]
    unknown = [n for n in names if n not in _BACKENDS]
    if unknown:
        from medreason.errors import InputError

        raise InputError(f"{SDPA_ENV}={value!r}: unknown {unknown}; use a comma-separated list of {sorted(_BACKENDS)}")
    return sdpa_kernel([getattr(SDPBackend, _BACKENDS[n]) for n in names], set_priority=True)


def _forward_step(model: Any, cache: Any, view: PrefixCacheView, state: _StepState, length: int) -> None:
    """One decode step reading ``length`` cache positions; the greedy token goes to
    ``state.next_tokens``."""
    view.length = length
    if state.rows is not None:  # the kernel takes the rows' ranges, not a mask
        logits = model(input_ids=state.tokens, position_ids=state.positions, past_key_values=cache, use_cache=True,
                       logits_to_keep=1, decode_rows=state.rows).logits
    else:
        allowed = state.key_ok[:, :length] & (state.key_index[:length] <= state.current)
        with attention_kernels():
            logits = model(input_ids=state.tokens, position_ids=state.positions,
                           attention_mask=allowed[:, None, None, :], past_key_values=cache, use_cache=True,
                           logits_to_keep=1).logits
    state.next_tokens.copy_(logits[:, -1].argmax(dim=-1))


class _Steps:
    """Runs the decode step for a view length: eagerly, or from a CUDA graph captured on the
    first step of each length (that first step runs eagerly and warms the kernels up)."""

    def __init__(self, step: Callable[[int], None], cuda_graphs: bool) -> None:
        self.step, self.cuda_graphs = step, cuda_graphs
        self.graphs: dict[int, Any] = {}
        self.pool = None

    def __call__(self, length: int) -> None:
        graph = self.graphs.get(length)
        if graph is not None:
            graph.replay()
            return
        self.step(length)
        if self.cuda_graphs:
            try:
                self.graphs[length] = self._capture(length)
            except RuntimeError as exc:  # a step that syncs with the host cannot be captured
                log.warning("decode step not captured in a CUDA graph (%s); decoding eagerly", exc)
                self.cuda_graphs = False

    def _capture(self, length: int) -> Any:
        import torch

        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # Capturing records the kernels without running them: the step just run eagerly is not
        # repeated, and the graph's scratch memory comes from one pool shared by its buckets.
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(length)
        return graph


def plain_greedy_only(model: Any) -> str | None:
    """Why ``generate()`` must decode this model (a logits processor this loop does not apply),
    or None."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    checks = {
        "repetition_penalty": (getattr(config, "repetition_penalty", 1.0) or 1.0) != 1.0,
        "no_repeat_ngram_size": bool(getattr(config, "no_repeat_ngram_size", 0)),
        "bad_words_ids": bool(getattr(config, "bad_words_ids", None)),
        "suppress_tokens": bool(getattr(config, "suppress_tokens", None)),
        "begin_suppress_tokens": bool(getattr(config, "begin_suppress_tokens", None)),
        "forced_bos_token_id": getattr(config, "forced_bos_token_id", None) is not None,
        "forced_eos_token_id": getattr(config, "forced_eos_token_id", None) is not None,
        "min_new_tokens": bool(getattr(config, "min_new_tokens", None)),
        "min_length": (getattr(config, "min_length", 0) or 0) > 0,
        "sequence_bias": bool(getattr(config, "sequence_bias", None)),
    }
    named = [name for name, found in checks.items() if found]
    return ", ".join(named) if named else None


def greedy_static(
    model: Any, ids: Any, mask: Any, max_new_tokens: int, cache_len: int, pad_id: int, eos_ids: list[int],
    *, bucket_tokens: int = DEFAULT_BUCKET_TOKENS, cuda_graphs: bool = True, attention: str = "sdpa",
    on_progress: Callable[[int, Any], None] | None = None,
) -> Any:
    """Greedy continuations of a left-padded batch: ``[rows, steps]`` new token ids (``pad_id``
    after a row's EOS), what ``generate(do_sample=False)`` returns past the prompt.

    ``model`` is the transformers model (a PEFT model's base model, adapters injected);
    ``cache_len`` >= prompt width + max_new_tokens. ``cuda_graphs`` applies on CUDA only.
    ``attention``: "triton" runs the decode steps' attention as the kernel of decode_attention.py
    where it can run (else, with a log line, as "sdpa": PyTorch's SDPA with a mask).
    ``on_progress(steps, unfinished)`` is called after every step; it must not synchronise
    with the device unless it logs.
    """
    from transformers import StaticCache

    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    width = ids.shape[1]
    if width + max_new_tokens > cache_len:
        raise ValueError(f"cache of {cache_len} positions < prompt width {width} + {max_new_tokens} new tokens")
    starts = kernel_rows(attention, device, mask)
    if starts is not None:
        # The kernel reads each row's range whatever the view's length: one view, one graph.
        bucket_tokens = cache_len
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    view = PrefixCacheView(cache, cache_len)
    try:
        return _decode(model, ids, mask, max_new_tokens, cache, view, pad_id, eos_ids, bucket_tokens,
                       cuda_graphs and device.type == "cuda", on_progress, starts)
    finally:
        view.close()


def kernel_rows(attention: str, device: Any, mask: Any) -> Any:
    """The rows' first real positions for the decode attention kernel, or None for sdpa."""
    if attention == "sdpa":
        return None
    if attention != "triton":
        raise ValueError(f"decode attention {attention!r}: use 'triton' or 'sdpa'")
    from medreason.evaluation import decode_attention

    reason = decode_attention.kernel_usable(device)
    starts = None if reason else decode_attention.row_starts(mask.to(device))
    if reason is None and starts is None:
        reason = "the attention mask is not plain left padding"
    if reason:
        log.info("decode attention: sdpa (%s)", reason)
    return starts


@contextlib.contextmanager
def attention_implementation(model: Any, name: str | None) -> Any:
    """The model's attention implementation set to ``name`` (None: unchanged) for a block."""
    if name is None:
        yield
        return
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def _fused_layers(model: Any, kernel: bool) -> Any:
    """decode_rotary's fused attention forward for the block, with the kernel path only."""
    if not kernel:
        yield
        return
    from medreason.evaluation.decode_rotary import FUSED_ENV, fused_phi_decode

    with fused_phi_decode(model) as fused:
        log.debug("decode: %d attention layer(s) with the fused rotary + cache write (%s=0: off)", fused, FUSED_ENV)
        yield


def _decode(model: Any, ids: Any, mask: Any, max_new_tokens: int, cache: Any, view: PrefixCacheView, pad_id: int,
            eos_ids: list[int], bucket_tokens: int, cuda_graphs: bool,
            on_progress: Callable[[int, Any], None] | None, starts: Any) -> Any:
    import torch

    from medreason.evaluation import decode_attention
    from medreason.evaluation.prefill import prefill

    rows, width = ids.shape
    cache_len = view.length
    eos = torch.tensor(eos_ids, dtype=torch.long, device=ids.device)
    with torch.inference_mode():
        # The prefill: generate()'s own first call (2-D mask, pads at position 0), run per group
        # of rows of similar length (medreason/evaluation/prefill.py).
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        first = prefill(model, ids, mask, positions, cache).argmax(dim=-1)
        state = _StepState(first, positions, mask, cache_len, starts)
        out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=ids.device)
        out[:, 0] = first
        unfinished = ~torch.isin(first, eos)
        steps = _Steps(lambda n: _forward_step(model, cache, view, state, n), cuda_graphs)
        done = 1
        # The prefill above ran the model's own attention; the steps run the kernel's, with
        # the rotary embedding and the cache write fused where the model is Phi (decode_rotary).
        with attention_implementation(model, None if starts is None else decode_attention.register()), \
                _fused_layers(model, starts is not None):
            while done < max_new_tokens:
                if done % FINISHED_CHECK_STEPS == 0 and not bool(unfinished.any()):
                    break
                steps(bucket_length(width + done - 1, bucket_tokens, cache_len))
                fed = torch.where(unfinished, state.next_tokens, pad_id)
                out[:, done] = fed
                unfinished &= ~torch.isin(fed, eos)
                state.advance(fed)
                done += 1
                if on_progress is not None:
                    on_progress(done, unfinished)
        steps.graphs.clear()  # the graphs hold the cache's addresses and their memory pool
    return out[:, :done]
