"""Data order and batching for training: which records go into which row, step and rank.

Everything here is a pure function of (record lengths, layout, seed, epoch), so every rank of a
distributed run computes the same plan without talking to the others, and a resumed run only
needs (epoch, index within the epoch) to continue exactly where it stopped.

Vocabulary:
  row          one sequence of the batch tensor: one record (max_length, dynamic) or several
               records back to back (packed)
  micro-batch  up to ``micro_batch_size`` rows: one forward/backward on one rank
  step         ``grad_accum_steps * world_size`` micro-batches: one optimizer step

Labels: the model predicts token p+1 from position p. We shift on the host, so ``targets[p]``
is the label of token p+1 and the loss is a plain cross-entropy of ``logits[:, p]`` against
``targets[:, p]``. In a packed row the last token of record k sits right before the first token
of record k+1; ``targets`` at that position is -100, so no record is ever asked to predict its
neighbour's first token. Padding positions are -100 as well; a record's EOS is a real target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medreason.tokens import IGNORE_INDEX, TokenizedSplit

PaddingMode = Literal["max_length", "dynamic", "packed"]

# Length grouping for dynamic padding: records are sorted by length inside windows of
# 32 micro-batches, so a micro-batch holds records of similar length (little padding) while
# the order of micro-batches stays random. With median ~550 and a tail to 2k tokens, random
# batches of 8 pad to ~1.6x the real tokens; grouped ones to ~1.05x.
GROUP_WINDOW_MICRO_BATCHES = 32
# Packing keeps at most this many rows open while filling them first-fit. 32 open rows of
# 2048 tokens reach ~97% fill with MedReason-like lengths (next-fit, i.e. 1 open row, ~80%).
PACK_OPEN_ROWS = 32


@dataclass(frozen=True)
class Layout:
    """How rows are formed and how long they may be."""

    mode: PaddingMode
    row_len_tokens: int  # max_length: every row is padded to this; otherwise the cap
    micro_batch_size: int
    pad_to_multiple: int = 8  # round dynamic/packed row lengths up (tensor-core friendly shapes)


MicroBatch = list[list[int]]  # rows; each row a list of record indices


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # A fresh generator per (seed, epoch): no global RNG state involved, so the order of
    # epoch e never depends on what happened in earlier epochs or before a restart.
    return np.random.default_rng([int(seed), int(epoch), 0x6D72])


def pack_rows(order: np.ndarray, lengths: np.ndarray, row_len: int,
              open_rows: int = PACK_OPEN_ROWS) -> list[list[int]]:
    """First-fit packing of records (in the given order) into rows of at most ``row_len`` tokens.

    Records longer than a row are truncated at collation, so they count as ``row_len`` here.
    Rows are emitted in the order they are closed (deterministic).
    """
    rows: list[list[int]] = []
    open_list: list[tuple[list[int], int]] = []  # (records, used tokens)
    for idx in order.tolist():
        size = min(int(lengths[idx]), row_len)
        for j, (recs, used) in enumerate(open_list):
            if used + size <= row_len:
                recs.append(idx)
                open_list[j] = (recs, used + size)
                break
        else:
            open_list.append(([idx], size))
            if len(open_list) > open_rows:
                rows.append(open_list.pop(0)[0])
        # A full row cannot take anything more: close it now rather than scanning it forever.
        open_list_full = [k for k, (_, used) in enumerate(open_list) if used == row_len]
        for k in reversed(open_list_full):
            rows.append(open_list.pop(k)[0])
    rows.extend(recs for recs, _ in open_list)
    return rows


def epoch_plan(lengths: np.ndarray, layout: Layout, seed: int, epoch: int,
               shuffle: bool = True) -> list[MicroBatch]:
    """The micro-batches of one epoch, in order. ``shuffle=False`` gives the fixed eval order."""
    n = len(lengths)
    if n == 0:
        return []
    rng = _rng(seed, epoch)
    order = rng.permutation(n) if shuffle else np.arange(n)
    mbs = layout.micro_batch_size
    if layout.mode == "packed":
        rows = pack_rows(order, lengths, layout.row_len_tokens)
    elif layout.mode == "dynamic":
        if shuffle:
            window = mbs * GROUP_WINDOW_MICRO_BATCHES
            grouped = []
            for start in range(0, n, window):
                chunk = order[start:start + window]
                # stable sort, longest first: deterministic for equal lengths
                chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
                grouped.append(chunk)
            order = np.concatenate(grouped)
        else:
            order = np.argsort(-lengths, kind="stable")
        rows = [[int(i)] for i in order]
    else:
        rows = [[int(i)] for i in order]
    batches = [rows[i:i + mbs] for i in range(0, len(rows), mbs)]
    if layout.mode == "dynamic" and shuffle:
        # Grouping sorted the rows by length; shuffle the micro-batches so long ones are not
        # all at the start of each window.
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def steps_in_epoch(num_micro_batches: int, grad_accum_steps: int, world_size: int) -> int:
    """Whole optimizer steps an epoch provides; the remainder micro-batches are skipped."""
    return num_micro_batches // (grad_accum_steps * world_size)


def step_micro_batches(plan: list[MicroBatch], index_in_epoch: int, grad_accum_steps: int,
                       world_size: int, rank: int) -> list[MicroBatch]:
    """The micro-batches rank ``rank`` runs for step ``index_in_epoch`` of an epoch.

    Step s owns plan[s*A*W : (s+1)*A*W]; accumulation slot a of rank r is plan[s*A*W + a*W + r].
    One process with A*W accumulation slots therefore sees exactly the same rows per step as
    W processes with A slots each.
    """
    per_step = grad_accum_steps * world_size
    base = index_in_epoch * per_step
    return [plan[base + a * world_size + rank] for a in range(grad_accum_steps)]


def step_counts(split: TokenizedSplit, micro_batches: list[MicroBatch], layout: Layout) -> tuple[int, int]:
    """(target tokens, real input tokens) of the given micro-batches, computed on the host.

    Target tokens are the loss's denominator; knowing it up front for the whole step on every
    rank means no all-reduce is needed to normalise the loss.
    """
    targets = 0
    real = 0
    lengths = split.lengths
    cap = layout.row_len_tokens
    for mb in micro_batches:
        for row in mb:
            for i in row:
                length = min(int(lengths[i]), cap)
                real += length
                # Targets of a record: its tokens 1..len-1 that are not prompt tokens.
                first_target = max(int(split.prompt_lens[i]), 1)
                targets += max(length - first_target, 0)
    return targets, real


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def collate(split: TokenizedSplit, micro_batch: MicroBatch, layout: Layout, pad_id: int) -> dict[str, Any]:
    """Numpy arrays for one micro-batch.

    Returns input_ids [B, L] int64, targets [B, L] int64 (already shifted: the label of token
    p+1 at position p), segment_ids [B, L] int32 (k+1 for the k-th record of a row, 0 for
    padding), position_ids [B, L] int64 (restarting at 0 for every record), attention_mask
    [B, L] int64 (1 on real tokens), n_targets and n_real_tokens.
    """
    cap = layout.row_len_tokens
    row_lens = [sum(min(int(split.lengths[i]), cap) for i in row) for row in micro_batch]
    if layout.mode == "max_length":
        length = cap
    else:
        length = min(_round_up(max(row_lens), layout.pad_to_multiple), cap)
        length = max(length, max(row_lens))
    bsz = len(micro_batch)
    input_ids = np.full((bsz, length), pad_id, dtype=np.int64)
    labels = np.full((bsz, length), IGNORE_INDEX, dtype=np.int64)
    segment_ids = np.zeros((bsz, length), dtype=np.int32)
    position_ids = np.zeros((bsz, length), dtype=np.int64)
    for b, row in enumerate(micro_batch):
        pos = 0
        for k, i in enumerate(row):
            ids = split.ids(i)[:cap]
            lab = split.labels(i)[:cap]
            n = len(ids)
            input_ids[b, pos:pos + n] = ids
            labels[b, pos:pos + n] = lab
            # The first token of a record is never a target: it would be predicted from the
            # previous record's last token (packed) or from nothing (the row start).
            labels[b, pos] = IGNORE_INDEX
            segment_ids[b, pos:pos + n] = k + 1
            position_ids[b, pos:pos + n] = np.arange(n)
            pos += n
        # Padding tail: its own positions from 0, so every padding query can attend to itself
        # (a fully masked softmax row would be NaN with a boolean mask).
        position_ids[b, pos:] = np.arange(length - pos)
    targets = np.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return {
        "input_ids": input_ids,
        "targets": targets,
        "segment_ids": segment_ids,
        "position_ids": position_ids,
        "attention_mask": (segment_ids > 0).astype(np.int64),
        "n_targets": int((targets != IGNORE_INDEX).sum()),
        "n_real_tokens": int(sum(row_lens)),
    }


def block_causal_mask(segment_ids: Any, attn_implementation: str, dtype: Any) -> Any:
    """A [B, 1, L, L] mask that keeps attention causal and inside each record of a packed row.

    sdpa takes a boolean mask (True = may attend); eager adds the mask to the scores, so it gets
    0 / the dtype's most negative value. Built on the device of ``segment_ids`` (a [B, L] tensor):
    for B=4, L=2048 that is 16 MiB as bool, never copied from the host.
    """
    import torch

    length = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril_()
    mask = (same & causal)[:, None, :, :]
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min)
    return mask
