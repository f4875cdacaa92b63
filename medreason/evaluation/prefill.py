"""The prefill of a left-padded batch in groups of rows, each padded only to its own longest prompt.

A batch's rows share one width, its longest prompt's, so one forward over the whole batch spends
its matrix products on padding (the MedQA file's first batch: 128 prompts of 666-2,040 tokens
padded to 2,040, 2.5x the real tokens), and its attention runs over the whole static cache with a
mask. Here the rows (length-sorted by the planner) are cut into contiguous groups
(``plan_chunks``); each group runs the model's own forward as if it were a batch of its own,
through a cache whose layers are views of the batch cache: its rows, and the last ``w`` positions
(``w``: the group's longest prompt). A group's forward is the forward ``generate()`` runs for
those rows alone, so it writes the same keys and values where the whole-batch prefill writes
them; positions left of its window are left padding for every row in it, written by nobody and
never attended to. The decode steps then run on the batch cache as before.

``MEDREASON_PREFILL_CHUNKS=0`` prefills the whole batch in one forward (the switch back).
"""

from __future__ import annotations

from typing import Any

CHUNKS_ENV = "MEDREASON_PREFILL_CHUNKS"
# What one more forward costs, in tokens of work: its ~700 kernel launches and the smaller
# products of fewer rows. A group is split off when that saves more padding than this.
CHUNK_OVERHEAD_TOKENS = 2048


def chunks_enabled() -> bool:
    """False when ``MEDREASON_PREFILL_CHUNKS`` is 0/false/no/off; another value is an InputError."""
    from medreason.errors import env_switch

    return env_switch(CHUNKS_ENV)


def plan_chunks(lengths: list[int], overhead: int = CHUNK_OVERHEAD_TOKENS) -> list[tuple[int, int, int]]:
    """Contiguous row groups ``[(first, end, width)]`` minimising the tokens a prefill computes:
    the sum of rows x the group's longest prompt, plus ``overhead`` per group (dynamic
    programming over the rows in their order; the planner sorts them longest first)."""
    n = len(lengths)
    best = [0] + [None] * n  # best[j]: least cost of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        widest = 0
        for i in range(j - 1, -1, -1):
            widest = max(widest, lengths[i])
            cost = best[i] + (j - i) * widest + overhead
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        i = cut[j]
        groups.append((i, j, max(lengths[i:j])))
        j = i
    return groups[::-1]


def _window_cache(model: Any, cache: Any, first: int, end: int, lo: int, hi: int) -> Any:
    """A StaticCache of ``hi - lo`` positions whose layers are views of ``cache``'s: rows
    [first, end), positions [lo, hi). Set up the way StaticLayer.lazy_initialization sets a layer,
    without allocating (tests/test_prefill.py pins these attributes to the pinned transformers)."""
    import torch
    from transformers import StaticCache

    window = StaticCache(config=model.config, max_cache_len=hi - lo)
    for main, layer in zip(cache.layers, window.layers, strict=True):
        layer.dtype, layer.device = main.dtype, main.device
        layer.batch_size, layer.num_heads = end - first, main.num_heads
        layer.k_head_dim, layer.v_head_dim = main.k_head_dim, main.v_head_dim
        layer.keys = main.keys[first:end, :, lo:hi]
        layer.values = main.values[first:end, :, lo:hi]
        layer.cumulative_length = torch.zeros((), dtype=main.cumulative_length.dtype, device=main.device)
        layer.is_initialized = True
    return window


def prefill(model: Any, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
    """The prompts' forward into ``cache`` (a StaticCache of the batch); returns the logits of
    each row's last prompt token, ``[rows, vocab]``."""
    import torch

    rows, width = ids.shape
    lengths = mask.sum(-1).tolist()
    groups = plan_chunks(lengths, CHUNK_OVERHEAD_TOKENS) if chunks_enabled() else [(0, rows, width)]
    if len(groups) == 1 and groups[0][2] == width:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True, logits_to_keep=1).logits[:, -1]
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(model.parameters()).dtype
    cache.early_initialization(rows, config.num_key_value_heads, head_dim, dtype, ids.device)
    logits = []
    for first, end, w in groups:
        window = _window_cache(model, cache, first, end, width - w, width)
        part = slice(first, end), slice(width - w, width)
        logits.append(model(input_ids=ids[part], attention_mask=mask[part], position_ids=positions[part],
                            past_key_values=window, use_cache=True, logits_to_keep=1).logits[:, -1])
    for layer in cache.layers:  # where the batch cache's own update() writes next
        layer.cumulative_length.fill_(width)
    return torch.cat(logits)
