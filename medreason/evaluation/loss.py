"""Held-out loss: teacher-forced cross-entropy on prepare's token ids, prompt tokens masked as
in training, summed so that shards from several processes add up exactly."""

from __future__ import annotations

import math
from typing import Any

from medreason.evaluation.generation import length_sorted_batches


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
            # use_cache=False: one teacher-forced pass needs no KV cache (it would only be copied).
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
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
