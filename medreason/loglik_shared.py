"""Likelihood scoring with the context run once per question (the shared-context path).

The options of a multiple-choice question are requests with the SAME context token ids (lm-eval's
``encode_pair`` splits ``encode(context + continuation)`` at ``len(encode(context))``), so the
plain path (``medreason.loglik``) runs a ~450-token context once per option. Here the requests
whose context ids are identical share ONE packed row::

    ctx_0 .. ctx_{c-1} | cont_1[:-1] | cont_2[:-1] | ... | cont_n[:-1]

with explicit position ids (the context at 0..c-1; every continuation restarts at c) and a 4D
attention mask: the context is causal among itself, each continuation token sees the whole
context and, causally, the earlier tokens of its own continuation only. Continuation k's score
is log p(cont_k[0] | logits at the last context token) + sum_j log p(cont_k[j+1] | logits at
cont_k[j]), the same sum the plain path takes from a row of its own. The last token of each
continuation is never fed: nothing reads its logits and no other token may attend to it (a
one-token option, e.g. a letter, adds no column at all).

Rows are left-padded, so the continuation blocks of a batch all end at the last column and the
model's own ``logits_to_keep`` returns only the columns that predict something.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Attention implementations that take an arbitrary [rows, 1, L, L] mask: sdpa a boolean one
# (True = may attend), eager an additive one. FlashAttention kernels only know causal/padding.
MASKABLE_ATTENTION = (None, "sdpa", "eager")


@dataclass
class PackedRow:
    """One context and the continuations (request index, token ids) that share it."""

    ctx: list[int]
    conts: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.ctx) + sum(len(cont) - 1 for _i, cont in self.conts)


def plan_rows(pairs: Sequence[tuple[list[int], list[int]]],
              max_length: int) -> tuple[list[PackedRow], list[int]]:
    """Packed rows for ``[(context ids, continuation ids)]``, and the request indices left to
    the plain path.

    Requests are grouped by exactly identical context ids. A group goes to the plain path
    whole when any of its requests is longer than the plain path's window (max_length + 1
    tokens): the plain path then drops the request's first tokens, which a shared context
    cannot reproduce, and scoring the whole group there keeps its options comparable. An empty
    context goes there too (its plain scoring drops the continuation's first token). A group
    whose packed row would pass max_length tokens is split over several rows.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _cont) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    rows: list[PackedRow] = []
    plain: list[int] = []
    for key, members in groups.items():
        if not key or any(len(key) + len(pairs[i][1]) > max_length + 1 for i in members):
            plain.extend(members)
            continue
        row = PackedRow(list(key))
        for i in members:
            cont = pairs[i][1]
            if row.conts and row.length + len(cont) - 1 > max_length:
                rows.append(row)
                row = PackedRow(list(key))
            row.conts.append((i, cont))
        rows.append(row)
    log.info("likelihood scoring: %d of %d requests in %d shared-context rows, %d in rows of their own",
             len(pairs) - len(plain), len(pairs), len(rows), len(plain))
    return rows, sorted(plain)


def batches(rows: Sequence[PackedRow], batch_size: int,
            max_batch_tokens: int | None) -> Iterator[list[PackedRow]]:
    """Rows longest first, ``batch_size`` per batch, fewer where rows x the batch's width would
    pass ``max_batch_tokens`` (the mask is rows x width x width: 128 rows of 500 tokens make
    32 MB as booleans)."""
    order = sorted(rows, key=lambda r: -r.length)
    start = 0
    while start < len(order):
        width = order[start].length
        n = batch_size if not max_batch_tokens else max(1, min(batch_size, max_batch_tokens // width))
        yield order[start:start + n]
        start += n


@dataclass
class _Layout:
    """A batch's tensors on the host and which logits score which request."""

    ids: Any  # [rows, width] token ids, left-padded
    positions: Any  # [rows, width]
    groups: Any  # [rows, width]: 0 context, k continuation k (1-based), -1 padding
    keep: int  # the last ``keep`` columns hold every logit that is read
    rows: list[int]  # per scored token: its row ...
    cols: list[int]  # ... its column among the kept ones
    targets: list[int]  # ... the token it scores
    owner: list[int]  # ... and its request's index in ``requests``
    requests: list[int]  # the batch's request indices


def layout(batch: Sequence[PackedRow], pad_id: int) -> _Layout:
    import torch

    # A multiple of 16 columns: sdpa's memory-efficient kernel wants the mask's rows aligned
    # so, and pads a copy of the mask otherwise.
    width = -(-max(r.length for r in batch) // 16) * 16
    keep = max(r.length - len(r.ctx) for r in batch) + 1
    # Each row is built as Python lists and the batch becomes one tensor per field: a few
    # slice assignments per continuation cost more (~15 small torch calls per question).
    ids: list[list[int]] = []
    positions: list[list[int]] = []
    groups: list[list[int]] = []
    out = _Layout(None, None, None, keep, [], [], [], [], [])
    for r, row in enumerate(batch):
        c = len(row.ctx)
        pad = width - row.length
        row_ids, row_pos, row_groups = [pad_id] * pad + row.ctx, [0] * pad + list(range(c)), [-1] * pad + [0] * c
        col = pad + c
        last_ctx = col - 1 - (width - keep)  # the last context token's index among the kept
        for k, (i, cont) in enumerate(row.conts, start=1):
            fed = len(cont) - 1
            row_ids += cont[:-1]
            row_pos += range(c, c + fed)
            row_groups += [k] * fed
            first = col - (width - keep)
            out.cols += [last_ctx] + list(range(first, first + fed))
            out.rows += [r] * len(cont)
            out.targets += cont
            out.owner += [len(out.requests)] * len(cont)
            out.requests.append(i)
            col += fed
        ids.append(row_ids)
        positions.append(row_pos)
        groups.append(row_groups)
    out.ids = torch.tensor(ids, dtype=torch.long)
    out.positions = torch.tensor(positions, dtype=torch.long)
    out.groups = torch.tensor(groups, dtype=torch.long)
    return out


def shared_mask(groups: Any, attn_implementation: str | None, dtype: Any) -> Any:
    """[rows, 1, L, L] mask of a batch: query i may read key j <= i when j is context or in i's
    own continuation. Padding (group -1) reads earlier padding and itself only, never real
    tokens, so no softmax row is empty (an all-False boolean row would give NaN), and no real
    token reads it. sdpa takes the booleans; eager adds 0 / the dtype's most negative value."""
    import torch

    width = groups.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=groups.device).tril_()
    mask = (causal & ((groups[:, None, :] == 0) | (groups[:, :, None] == groups[:, None, :])))[:, None]
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def score_rows(model: Any, rows: Sequence[PackedRow], n_requests: int, pad_id: int, batch_size: int,
               max_batch_tokens: int | None) -> list[tuple[float, bool] | None]:
    """(summed log-likelihood, is_greedy) of every request the rows hold; None for the others.

    No batch waits for the device: the host tensors go over from pinned memory without
    blocking, and the per-request sums stay on the device until every batch is queued, so on a
    GPU the host builds batch k+1 (layout, mask, kernel launches) while batch k runs.
    """
    import torch

    device = next(model.parameters()).device
    impl = getattr(model.config, "_attn_implementation", None)
    dtype = getattr(model, "dtype", torch.float32)
    dtype = dtype if dtype.is_floating_point else torch.float32
    pinned = device.type == "cuda"

    def to_device(values: Any) -> Any:
        host = values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.long)
        return host.pin_memory().to(device, non_blocking=True) if pinned else host.to(device)

    out: list[tuple[float, bool] | None] = [None] * n_requests
    pending: list[tuple[list[int], Any, Any]] = []
    for batch in batches(rows, batch_size, max_batch_tokens):
        lay = layout(batch, pad_id)
        mask = shared_mask(to_device(lay.groups), impl, dtype)
        with torch.inference_mode():
            logits = model(input_ids=to_device(lay.ids), attention_mask=mask,
                           position_ids=to_device(lay.positions), logits_to_keep=lay.keep).logits
            picked = logits[to_device(lay.rows), to_device(lay.cols)]
            logprobs = torch.log_softmax(picked.float(), dim=-1)
            target = to_device(lay.targets)
            owner = to_device(lay.owner)
            sums = torch.zeros(len(lay.requests), dtype=torch.float32, device=device).index_add_(
                0, owner, logprobs.gather(1, target[:, None])[:, 0])
            misses = torch.zeros(len(lay.requests), dtype=torch.long, device=device).index_add_(
                0, owner, (logprobs.argmax(dim=-1) != target).long())
        pending.append((lay.requests, sums, misses))
    if pending:
        # One transfer back for the whole run, and the only wait.
        sums_all = torch.cat([p[1] for p in pending]).tolist()
        misses_all = torch.cat([p[2] for p in pending]).tolist()
        requests = [i for p in pending for i in p[0]]
        for i, ll, miss in zip(requests, sums_all, misses_all, strict=True):
            out[i] = (float(ll), miss == 0)
    return out
